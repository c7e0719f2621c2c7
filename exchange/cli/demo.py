"""``exchange demo``: the daemon on the embedded default, with a live terminal view.

The demo is the real daemon (:class:`exchange.service.daemon.Daemon`: recovery, matching
loops, journal writer, fan-out, shutdown) with the adapters its configuration
chooses (by default ``exchange/defaults/demo.toml``, shipped in the package, so
it runs from any directory): a SQLite file for storage, the in-process order
generator as the source, no Kafka publisher, and the in-process market-data bus
(``[publisher] marketdata = "memory"``, :class:`exchange.pipeline.fanout.MemorySink`)
instead of Redis. The view is a market-data consumer of that bus, like
``exchange watch`` is of Redis: per instrument it subscribes to the ``l2``,
``trades`` and ``heartbeat`` channels, reads the book key and keeps a local
book with :class:`exchange.projections.booksync.BookSync` (duplicates at or below its seq
dropped, a resync from the key on a gap). What it shows -- best bid and offer,
spread, trades per second -- comes from those messages, which the fan-out
sends only after the events are durable; orders per second and the
sent-to-published latency are the generator's own measurement (from handing a
command to its loop to the round that published its events).

On start it says whether it started fresh or recovered (orders loaded, seq and
state hash per instrument); Ctrl-C (SIGINT) or SIGTERM takes the daemon's
normal shutdown (drain the queues, final snapshot, commit, publish, summary),
and a summary of the run follows, with the same state hashes the next start
will recover, and per instrument whether the view's book, synced from the bus,
equals the engine's. ``--headless`` prints plain lines once a second instead of
redrawing a screen (it is the default when stdout is not a terminal);
``--seconds N`` stops by itself N seconds after the daemon became ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TextIO

import msgspec

from exchange.core.balances import Ledger
from exchange.core.instruments import Instrument
from exchange.projections.booksync import BookSync
from exchange.projections.marketdata import MarketData
from exchange.service.daemon import Daemon
from exchange.settings import ConfigError, Settings
from exchange.telemetry.logging import configure_logging

__all__ = ["LiveView", "run_demo"]

_WINDOW_S = 2.0  # rates and live percentiles cover the last two seconds
_RESERVOIR = 100_000  # latency samples kept per instrument for the run's summary
_RESYNC_WAIT_S = 0.05  # a book key older than the buffered stream is read again this much later
_HIDE_CURSOR, _SHOW_CURSOR, _HOME, _CLEAR_LINE, _CLEAR_BELOW = "\x1b[?25l", "\x1b[?25h", "\x1b[H", "\x1b[K", "\x1b[J"
_decode = msgspec.json.Decoder().decode


@dataclass(slots=True)
class _Instrument:
    """One instrument as the view follows it: its subscription and local book from the bus."""

    spec: Instrument
    book_key: str
    queue: asyncio.Queue[bytes]
    sync: BookSync
    next_attempt: float = 0.0  # when to read the book key again while not synced


class LiveView:
    """A market-data consumer of the daemon's in-process bus, plus the generator's counts and latencies.

    It subscribes when constructed, before the daemon runs, so it sees every message from the first;
    :meth:`follow` consumes until cancelled, :meth:`drain` takes what is left once the daemon stopped.
    """

    def __init__(self, daemon: Daemon) -> None:
        bus = daemon.marketdata
        if bus is None:
            raise ConfigError(f"{daemon.settings.source}: exchange demo shows the in-process market-data bus; set "
                              "[publisher] marketdata = \"memory\" (and [redis] enabled = false), as the shipped "
                              "exchange/defaults/demo.toml does")
        self.daemon = daemon
        self._bus = bus
        names = daemon.settings.redis.channel
        self._inst = {spec.symbol: _Instrument(spec, names("book", spec.symbol),
                                               bus.subscribe(*(names(kind, spec.symbol)
                                                               for kind in ("l2", "trades", "heartbeat"))),
                                               BookSync(spec.symbol))
                      for spec in daemon.settings.instruments}
        self._history: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()  # (time, symbol -> counts)
        self._recent: dict[str, deque[tuple[float, int]]] = {s: deque() for s in self._inst}  # (time, ns)
        self._reservoir: dict[str, list[int]] = {s: [] for s in self._inst}
        self._seen: dict[str, int] = dict.fromkeys(self._inst, 0)  # the generator's orders published
        self._rng = random.Random(0)

    # ------------------------------------------------------------ the consumer

    async def follow(self) -> None:
        """Consume every instrument's subscription until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for inst in self._inst.values():
                tg.create_task(self._follow(inst), name=f"view-{inst.spec.symbol}")

    async def _follow(self, inst: _Instrument) -> None:
        while True:
            if not inst.sync.synced:
                self._resync(inst)
                with contextlib.suppress(TimeoutError):
                    self._on_message(inst, await asyncio.wait_for(inst.queue.get(), _RESYNC_WAIT_S))
                continue
            self._on_message(inst, await inst.queue.get())

    def drain(self) -> None:
        """Take the messages still queued (the daemon has stopped: nothing more comes), then sync if needed."""
        for inst in self._inst.values():
            while not inst.queue.empty():
                self._on_message(inst, inst.queue.get_nowait())
            if not inst.sync.synced:
                inst.next_attempt = 0.0
                self._resync(inst)

    def _on_message(self, inst: _Instrument, raw: bytes) -> None:
        inst.sync.on_message(_decode(raw))  # on a gap it forgets its book: _follow reads the key again

    def _resync(self, inst: _Instrument) -> None:
        now = time.monotonic()
        if now < inst.next_attempt:
            return
        raw = self._bus.keys.get(inst.book_key)
        if raw is None or not inst.sync.on_book(_decode(raw)):  # no key yet, or older than the stream
            inst.next_attempt = now + _RESYNC_WAIT_S

    # ------------------------------------------------------------ sampling

    def _start(self, symbol: str) -> tuple[int, int]:
        """(seq, last trade id) the run started from."""
        state = self.daemon.recovery[symbol].state
        return state.seq, state.next_trade_id - 1

    def _trades(self, symbol: str) -> int:
        """Trades published since the start, by trade id (+1 per trade; ids a lost message skipped count too)."""
        last = self._inst[symbol].sync.last_trade_id
        return max(0, last - self._start(symbol)[1]) if last is not None else 0

    def _take_latencies(self, now: float) -> None:
        samples = getattr(self.daemon.source, "latencies", None)
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
        self._take_latencies(now)
        counts = {symbol: (self._trades(symbol), self._seen[symbol]) for symbol in self._inst}
        self._history.append((now, counts))
        while len(self._history) > 1 and self._history[1][0] <= now - _WINDOW_S:
            self._history.popleft()
        then, old = self._history[0]
        elapsed = now - then
        out = []
        for symbol, inst in self._inst.items():
            sync = inst.sync
            bids, asks = sync.levels(True, 1), sync.levels(False, 1)
            trades_s = orders_s = "-"
            if elapsed > 0:
                trades_s = f"{(counts[symbol][0] - old[symbol][0]) / elapsed:,.0f}"
                orders_s = f"{(counts[symbol][1] - old[symbol][1]) / elapsed:,.0f}"
            p50, p99 = _percentiles([ns for _, ns in self._recent[symbol]])
            out.append({
                "instrument": symbol,
                "bid": f"{bids[0][1]} @ {bids[0][0]}" if bids else "-",
                "ask": f"{asks[0][0]} x {asks[0][1]}" if asks else "-",
                "spread": str(Decimal(asks[0][0]) - Decimal(bids[0][0])) if bids and asks else "-",
                "trades/s": trades_s, "orders/s": orders_s, "p50": p50, "p99": p99,
                "seq": str(sync.seq) if sync.synced else "syncing", "levels": str(len(sync.bids) + len(sync.asks)),
                "resyncs": str(sync.resyncs),
            })
        return out

    def summary(self, elapsed_s: float) -> list[str]:
        """The run's totals per instrument, the durable state a restart will recover (the engines' after
        the final snapshot), and whether the view's book from the bus equals the engine's."""
        self._take_latencies(time.monotonic())
        lines = []
        for symbol in self._inst:
            engine = self.daemon.loops[symbol].engine
            orders = self._seen[symbol]
            p50, p99 = _percentiles(self._reservoir[symbol])
            rate = f"{orders / elapsed_s:,.0f}" if elapsed_s > 0 else "-"
            lines.append(f"  {symbol}: {orders} orders ({rate}/s), {self._trades(symbol)} trades, latency p50 {p50} "
                         f"p99 {p99}; seq {self._start(symbol)[0]} -> {engine.seq}, {len(engine.book)} resting, "
                         f"state hash {engine.state_hash()}")
        for symbol, inst in self._inst.items():
            lines.append(f"  {symbol} market data: {self._compare(inst)}")
        for symbol, inst in self._inst.items():
            ledger = self.daemon.loops[symbol].engine.ledger
            if ledger is not None:
                lines.append(f"  {symbol} balances: {_balances(inst.spec, ledger)}")
        return lines

    def _compare(self, inst: _Instrument) -> str:
        engine = self.daemon.loops[inst.spec.symbol].engine
        sync = inst.sync
        problems = f"{sync.gaps} gaps, {sync.resyncs} resyncs, {sync.duplicates} duplicates dropped"
        if sync.seq != engine.seq:
            return f"the view's book is at seq {sync.seq}, the engine's at {engine.seq} ({problems})"
        truth = MarketData(inst.spec, engine.export_state(), depth=sync.depth)
        differ = [side for buy, side in ((True, "bid"), (False, "ask"))
                  if sync.levels(buy) != truth.levels(buy, sync.depth)]
        if differ:
            return f"the view's book DIFFERS from the engine's at seq {engine.seq} on the " \
                   f"{' and '.join(differ)} side ({problems})"
        return f"the view's book (from the bus) equals the engine's at seq {engine.seq}: {len(sync.bids)} bid and " \
               f"{len(sync.asks)} ask levels ({problems})"


def _balances(spec: Instrument, ledger: Ledger) -> str:
    """What an instrument's clients hold in all, and the fees the venue took."""
    sums = [sum(column) for column in zip(*ledger.accounts.values(), strict=True)] or [0, 0, 0, 0]
    amount = spec.units_to_amount
    return (f"{len(ledger.accounts)} clients hold {amount(ledger.base, sums[0])} {ledger.base} available and "
            f"{amount(ledger.base, sums[1])} reserved, {amount(ledger.quote, sums[2])} {ledger.quote} available and "
            f"{amount(ledger.quote, sums[3])} reserved; fees taken {amount(ledger.quote, ledger.fees)} {ledger.quote}; "
            f"{len(ledger.transfers)} transfers")


def _percentiles(samples: list[int]) -> tuple[str, str]:
    if not samples:
        return "-", "-"
    ordered = sorted(samples)
    pick = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.50, 0.99)]
    return f"{pick[0] / 1e6:.1f}ms", f"{pick[1] / 1e6:.1f}ms"


# two tables, so that each fits 80 columns: the books from the bus, then the flow and its latency
_BOOK_COLUMNS = ("instrument", "bid", "ask", "spread", "seq", "resyncs")
_FLOW_COLUMNS = ("instrument", "orders/s", "trades/s", "p50", "p99", "levels")


def _table(rows: list[dict[str, str]], columns: tuple[str, ...] = _BOOK_COLUMNS) -> list[str]:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    head = "  ".join(c.rjust(widths[c]) if c != "instrument" else c.ljust(widths[c]) for c in columns)
    return [head, "-" * len(head)] + ["  ".join(r[c].rjust(widths[c]) if c != "instrument" else r[c].ljust(widths[c])
                                              for c in columns) for r in rows]


def _screen(intro: list[str], rows: list[dict[str, str]], elapsed: float, stopping: bool,
            columns: int = 80) -> list[str]:
    """The live screen's lines, none longer than ``columns`` (a wrapped line would break the redraw)."""
    lines = [*intro, "", f"{elapsed:6.1f} s  books from the market-data bus"
             + (" (stopping: draining, final snapshot)" if stopping else ""), "", *_table(rows, _BOOK_COLUMNS),
             "", *_table(rows, _FLOW_COLUMNS), "", "Ctrl-C to stop (the next start recovers from the store)"]
    return [line[:columns] for line in lines]


def _start_lines(daemon: Daemon, settings: Settings) -> list[str]:
    where = settings.storage.path if settings.storage.kind == "sqlite" else "PostgreSQL"
    recovered = daemon.recovery
    if all(rec.state.seq == 0 for rec in recovered.values()):
        return [f"started fresh: nothing stored in {where} yet"]
    from exchange.core.matching import MatchingEngine

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
    intro = [f"configuration: {settings.source}", *_start_lines(daemon, settings),
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
                          f"seq {r['seq']}  resyncs {r['resyncs']}", file=out)
                out.flush()
            else:
                lines = _screen(intro, rows, elapsed, not daemon.ready, shutil.get_terminal_size().columns)
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
    daemon = Daemon(settings)
    view = LiveView(daemon)  # subscribes now: it sees every message the daemon publishes
    done = asyncio.Event()

    if not headless:
        out.write(_HOME + _CLEAR_BELOW)
    async with asyncio.TaskGroup() as tg:
        following = tg.create_task(view.follow(), name="market-data view")

        async def run_daemon() -> int:
            try:
                return await daemon.run()
            finally:
                done.set()
                following.cancel()

        code_task = tg.create_task(run_daemon(), name="daemon")
        shown = tg.create_task(_show(view, daemon, settings, out, headless=headless, seconds=seconds, done=done),
                               name="view")
    code = code_task.result()
    if daemon.loops:
        view.drain()  # the fan-out published everything durable before the daemon returned
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
