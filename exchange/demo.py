"""``exchange demo``: the daemon on the embedded default, with a live terminal view.

The demo is the real daemon (:class:`exchange.app.Daemon`: recovery, matching
loops, journal writer, shutdown) with the adapters ``config/demo.toml`` chooses:
a SQLite file for storage, the in-process order generator as the source, and no
Kafka publisher. The view is one more listener of durable batches: it follows
each instrument's book through the durable events with the same
:class:`recovery.events.EventApplier` recovery uses, so what it shows -- best
bid and offer, spread, trades and orders per second, and the generator's
sent-to-durable latency -- is what has been committed, never ahead of it.

On start it says whether it started fresh or recovered (orders loaded, seq and
state hash per instrument); Ctrl-C (SIGINT) or SIGTERM takes the daemon's
normal shutdown (drain the queues, final snapshot, commit, summary), and a
summary of the run follows, with the same state hashes the next start will
recover. ``--headless`` prints plain lines once a second instead of redrawing a
screen (it is the default when stdout is not a terminal); ``--seconds N`` stops
by itself N seconds after the daemon became ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from exchange.app import Daemon
from exchange.events import OrderFilled
from exchange.instruments import Instrument
from exchange.journal import Batch
from exchange.logging import configure_logging
from exchange.settings import ConfigError, Settings
from recovery.events import EventApplier

__all__ = ["LiveView", "run_demo"]

_WINDOW_S = 2.0  # rates and live percentiles cover the last two seconds
_RESERVOIR = 100_000  # latency samples kept per instrument for the run's summary
_HIDE_CURSOR, _SHOW_CURSOR, _HOME, _CLEAR_LINE, _CLEAR_BELOW = "\x1b[?25l", "\x1b[?25h", "\x1b[H", "\x1b[K", "\x1b[J"


@dataclass(slots=True)
class _Instrument:
    """What the view knows of one instrument: its durable book and counters."""

    spec: Instrument
    book: EventApplier
    start_seq: int
    trades: int = 0
    orders: int = 0  # commands from the source made durable


class LiveView:
    """A durable-batch listener that keeps per-instrument books, counts and latencies for display."""

    def __init__(self, specs: Sequence[Instrument]) -> None:
        self.daemon: Daemon | None = None  # set before the daemon runs: the view reads its recovery and source
        self._specs = list(specs)
        self._inst: dict[str, _Instrument] = {}
        self._history: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()  # (time, symbol -> counts)
        self._recent: dict[str, deque[tuple[float, int]]] = {s.symbol: deque() for s in specs}  # (time, ns)
        self._reservoir: dict[str, list[int]] = {s.symbol: [] for s in specs}
        self._seen: dict[str, int] = dict.fromkeys(self._reservoir, 0)
        self._rng = random.Random(0)
        self.started_at: float | None = None  # monotonic time the daemon became ready

    # ------------------------------------------------------------ the listener

    def _ensure_books(self) -> dict[str, _Instrument]:
        if not self._inst:
            for spec in self._specs:
                assert self.daemon is not None
                rec = self.daemon.recovery[spec.symbol]
                self._inst[spec.symbol] = _Instrument(spec, EventApplier(spec, rec.state), rec.state.seq)
        return self._inst

    async def on_durable(self, batch: Batch) -> None:
        inst = self._ensure_books()
        for item in batch.applied:
            state = inst[item.instrument]
            if item.events:
                state.book.apply_all(item.events)
                state.trades += sum(1 for e in item.events if type(e) is OrderFilled)
            if item.position is not None:
                state.orders += 1

    # ------------------------------------------------------------ sampling

    def _take_latencies(self, now: float) -> None:
        source = self.daemon.source if self.daemon is not None else None
        samples = getattr(source, "latencies", None)
        if samples is None:
            return
        while samples:
            symbol, ns = samples.popleft()
            self._recent[symbol].append((now, ns))
            seen = self._seen[symbol] = self._seen[symbol] + 1
            keep = self._reservoir[symbol]
            if len(keep) < _RESERVOIR:
                keep.append(ns)
            else:  # reservoir sampling: every sample of the run equally likely to be kept
                slot = self._rng.randrange(seen)
                if slot < _RESERVOIR:
                    keep[slot] = ns
        for recent in self._recent.values():
            while recent and recent[0][0] < now - _WINDOW_S:
                recent.popleft()

    def rows(self) -> list[dict[str, str]]:
        """One row per instrument, formatted for display."""
        now = time.monotonic()
        inst = self._ensure_books()
        self._take_latencies(now)
        counts = {symbol: (i.trades, i.orders) for symbol, i in inst.items()}
        self._history.append((now, counts))
        while len(self._history) > 1 and self._history[1][0] <= now - _WINDOW_S:
            self._history.popleft()
        then, old = self._history[0]
        elapsed = now - then
        out = []
        for symbol, i in inst.items():
            spec = i.spec
            book = i.book.book
            bid, ask = book.best_bid(), book.best_ask()
            trades_s = orders_s = "-"
            if elapsed > 0:
                trades_s = f"{(i.trades - old[symbol][0]) / elapsed:,.0f}"
                orders_s = f"{(i.orders - old[symbol][1]) / elapsed:,.0f}"
            p50, p99 = _percentiles([ns for _, ns in self._recent[symbol]])
            out.append({
                "instrument": symbol,
                "bid": f"{spec.lots_to_qty(book.bids.peekitem(0)[1].total_lots)} @ {spec.ticks_to_price(bid)}"
                       if bid is not None else "-",
                "ask": f"{spec.ticks_to_price(ask)} x {spec.lots_to_qty(book.asks.peekitem(0)[1].total_lots)}"
                       if ask is not None else "-",
                "spread": spec.ticks_to_price(ask - bid) if bid is not None and ask is not None else "-",
                "trades/s": trades_s, "orders/s": orders_s, "p50": p50, "p99": p99,
                "seq": str(i.book.seq), "resting": str(len(book)),
            })
        return out

    def summary(self, elapsed_s: float) -> list[str]:
        """The run's totals per instrument, and the durable state a restart will recover."""
        inst = self._ensure_books()
        self._take_latencies(time.monotonic())
        lines = []
        for symbol, i in inst.items():
            p50, p99 = _percentiles(self._reservoir[symbol])
            rate = f"{i.orders / elapsed_s:,.0f}" if elapsed_s > 0 else "-"
            lines.append(f"  {symbol}: {i.orders} orders ({rate}/s), {i.trades} trades, latency p50 {p50} p99 {p99}; "
                         f"seq {i.start_seq} -> {i.book.seq}, {len(i.book.book)} resting, "
                         f"state hash {i.book.state_hash()}")
        return lines


def _percentiles(samples: list[int]) -> tuple[str, str]:
    if not samples:
        return "-", "-"
    ordered = sorted(samples)
    pick = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.50, 0.99)]
    return f"{pick[0] / 1e6:.1f}ms", f"{pick[1] / 1e6:.1f}ms"


_COLUMNS = ("instrument", "bid", "ask", "spread", "trades/s", "orders/s", "p50", "p99", "seq", "resting")


def _table(rows: list[dict[str, str]]) -> list[str]:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in _COLUMNS}
    head = "  ".join(c.rjust(widths[c]) if c != "instrument" else c.ljust(widths[c]) for c in _COLUMNS)
    return [head, "-" * len(head)] + ["  ".join(r[c].rjust(widths[c]) if c != "instrument" else r[c].ljust(widths[c])
                                              for c in _COLUMNS) for r in rows]


def _start_lines(daemon: Daemon, settings: Settings) -> list[str]:
    where = settings.storage.path if settings.storage.kind == "sqlite" else "PostgreSQL"
    recovered = daemon.recovery
    if all(rec.state.seq == 0 for rec in recovered.values()):
        return [f"started fresh: nothing stored in {where} yet"]
    from exchange.matching import MatchingEngine

    lines = [f"recovered from {where}: {sum(len(r.state.orders) for r in recovered.values())} open orders loaded"]
    for spec in settings.instruments:
        state = recovered[spec.symbol].state
        digest = MatchingEngine.from_state(spec, state).state_hash()
        lines.append(f"  {spec.symbol}: seq {state.seq}, {len(state.orders)} open orders, state hash {digest}")
    return lines


async def _show(view: LiveView, daemon: Daemon, settings: Settings, out: TextIO, *, headless: bool,
                seconds: float | None, done: asyncio.Event) -> float:
    """Draw until the daemon stops; returns the seconds it ran after becoming ready."""
    while not daemon.ready:
        if done.is_set():
            return 0.0
        await asyncio.sleep(0.02)
    started = time.monotonic()
    source = settings.order_source
    intro = [*_start_lines(daemon, settings),
             f"generating {source.rate:,.0f} orders/s (seed {source.seed}) over {len(settings.instruments)} "
             "instruments; " + (f"stopping after {seconds:g} s" if seconds else "Ctrl-C to stop")]
    if headless:
        print("\n".join(intro), file=out, flush=True)
    period = 1.0 if headless else 0.25
    if not headless:
        out.write(_HIDE_CURSOR)
    try:
        while not done.is_set():
            elapsed = time.monotonic() - started
            if seconds is not None and elapsed >= seconds:
                daemon.request_stop()
            rows = view.rows()
            if headless:
                for r in rows:
                    print(f"t={elapsed:5.1f}s {r['instrument']}: bid {r['bid']}  ask {r['ask']}  spread {r['spread']}  "
                          f"trades/s {r['trades/s']}  orders/s {r['orders/s']}  p50 {r['p50']}  p99 {r['p99']}  "
                          f"seq {r['seq']}", file=out)
                out.flush()
            else:
                lines = [*intro, "", f"{elapsed:6.1f} s -- the durable books"
                         + ("" if daemon.ready else "  (stopping: draining, final snapshot)"), "", *_table(rows),
                         "", "Ctrl-C to stop (the next start recovers from the store)"]
                out.write(_HOME + "".join(line + _CLEAR_LINE + "\n" for line in lines) + _CLEAR_BELOW)
                out.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), period)
    finally:
        if not headless:
            out.write(_SHOW_CURSOR)
            out.flush()
    return time.monotonic() - started


async def _demo(settings: Settings, out: TextIO, *, headless: bool, seconds: float | None) -> int:
    view = LiveView(settings.instruments)
    daemon = view.daemon = Daemon(settings, listeners=[view.on_durable])
    done = asyncio.Event()

    async def run_daemon() -> int:
        try:
            return await daemon.run()
        finally:
            done.set()

    if not headless:
        out.write(_HOME + _CLEAR_BELOW)
    async with asyncio.TaskGroup() as tg:
        code_task = tg.create_task(run_daemon(), name="daemon")
        shown = tg.create_task(_show(view, daemon, settings, out, headless=headless, seconds=seconds, done=done),
                               name="view")
    code = code_task.result()
    if daemon.recovery:
        print(f"stopped after {shown.result():.1f} s; durable state (the next start recovers it):", file=out)
        for line in view.summary(shown.result()):
            print(line, file=out)
        if settings.storage.kind == "sqlite":
            print(f"store: {settings.storage.path} (exchange demo --reset starts afresh)", file=out)
        out.flush()
    return code


def reset_store(settings: Settings) -> list[Path]:
    """Delete the demo's SQLite file (with its WAL and shared-memory files); returns what was removed."""
    if settings.storage.kind != "sqlite":
        raise ConfigError("--reset only deletes an SQLite store ([storage] kind = \"sqlite\"); this configuration "
                          "uses PostgreSQL")
    base = Path(settings.storage.path)
    removed = []
    for path in (base, base.with_name(base.name + "-wal"), base.with_name(base.name + "-shm")):
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def run_demo(settings: Settings, *, headless: bool | None = None, seconds: float | None = None,
             reset: bool = False, out: TextIO | None = None) -> int:
    """Run the demo; returns the exit code. ``headless`` None: headless unless stdout is a terminal."""
    out = out or sys.stdout
    if headless is None:
        headless = not out.isatty()
    if reset:
        removed = reset_store(settings)
        print(f"reset: removed {', '.join(map(str, removed))}" if removed else "reset: nothing stored yet", file=out)
    log_file: TextIO | None = None
    if headless:
        configure_logging(settings.log.level, settings.log.format)
    else:  # the screen belongs to the view: logs go to a file beside the store
        log_path = Path(settings.storage.path).with_suffix(".log") if settings.storage.kind == "sqlite" \
            else Path("exchange-demo.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = log_path.open("a", encoding="utf-8")
        configure_logging(settings.log.level, "json", stream=log_file)
        print(f"logs: {log_path}", file=out)
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            return asyncio.run(_demo(settings, out, headless=headless, seconds=seconds))
        return uvloop.run(_demo(settings, out, headless=headless, seconds=seconds))
    finally:
        if log_file is not None:
            log_file.close()
