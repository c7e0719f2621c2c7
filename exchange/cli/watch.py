"""``exchange watch INSTRUMENT``: a terminal market-data client that follows the sync procedure.

:class:`Follower` subscribes to the instrument's ``l2``, ``trades`` and
``heartbeat`` channels, reads the book key, and keeps a local book with
:class:`~exchange.projections.booksync.BookSync` (the procedure documented in the README).
It reports gaps and resyncs, and survives Redis restarts: a broken
subscription is re-opened and the book resynced from the key. A book key older
than the first message after subscribing is read again without counting a gap
(see :mod:`exchange.projections.booksync`). When nothing, not even a heartbeat,
has arrived for :func:`silence_threshold_s` (three heartbeat intervals), the
screen says the daemon has gone silent.

On a terminal the screen fits its size: fewer book levels when it is short, lines
cut to its width. Piped, one plain line a second (``bid 29999.98 x 0.0030``).

``--check`` follows for a while, then compares the local book with the book
the engine persisted in the configured store (``[storage] kind``: PostgreSQL or
the SQLite file) at the same sequence number (the latest snapshot at or below
it plus the stored events after it) and exits 1 on any difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TextIO

import msgspec
from redis.exceptions import RedisError

from exchange.adapters.redis import redis_client
from exchange.projections.booksync import RESYNC, BookSync
from exchange.settings import RedisSettings, Settings

__all__ = ["Follower", "check", "plain_line", "render", "silence_threshold_s", "watch"]

_decode = msgspec.json.Decoder().decode


class Follower:
    """One instrument's market data from Redis, kept in sync (see the module docstring)."""

    def __init__(self, settings: RedisSettings, instrument: str,
                 on_change: Callable[[Follower], None] | None = None, keep_messages: bool = False) -> None:
        self.settings = settings
        self.instrument = instrument
        self.sync = BookSync(instrument)
        self.on_change = on_change
        self.messages = 0
        self.connected = False
        self.notes: deque[str] = deque(maxlen=5)  # recent gaps, resyncs and connection problems
        self.received: list[dict[str, Any]] | None = [] if keep_messages else None  # every message (tests)
        self.last_message_at: float | None = None  # time.monotonic() of the last message (a heartbeat or any)
        self.started_at = time.monotonic()
        self.silence_s = silence_threshold_s(settings)
        self._next_attempt = 0.0

    def silent_for(self, now: float | None = None) -> float | None:
        """Seconds without any message (heartbeats included), once that is past the threshold; else None."""
        since = self.last_message_at if self.last_message_at is not None else self.started_at
        quiet = (time.monotonic() if now is None else now) - since
        return quiet if quiet >= self.silence_s else None

    def note(self, text: str) -> None:
        self.notes.append(f"{time.strftime('%H:%M:%S')} {text}")

    async def run(self, stop: asyncio.Event) -> None:
        """Follow until ``stop`` is set; reconnect whenever the connection breaks."""
        s = self.settings
        channels = [s.channel(kind, self.instrument) for kind in ("l2", "trades", "heartbeat")]
        while not stop.is_set():
            client = redis_client(s, socket_timeout=None)
            pubsub: Any = client.pubsub()  # Any: redis-py's stubs for aclose() differ between releases
            try:
                await pubsub.subscribe(*channels)
                self.connected = True
                self._next_attempt = 0.0
                while not stop.is_set():
                    if not self.sync.synced and time.monotonic() >= self._next_attempt:
                        await self._resync(client)
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                    if msg is None:
                        continue
                    self.messages += 1
                    self.last_message_at = time.monotonic()
                    data = _decode(msg["data"])
                    if self.received is not None:
                        self.received.append(data)
                    gaps = self.sync.gaps
                    if self.sync.on_message(data) == RESYNC and self.sync.gaps > gaps:  # not a stale first key
                        self.note(f"gap: {self.sync.last_problem}; resyncing from the book key")
                    if self.on_change is not None:
                        self.on_change(self)
            except (RedisError, OSError) as exc:
                if self.connected:
                    self.note(f"redis connection lost ({type(exc).__name__}); reconnecting")
                    self.sync.lost("redis connection lost")
                self.connected = False
                await _sleep_unless(stop, 0.2)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()

    async def _resync(self, client: Any) -> None:
        raw = await client.get(self.settings.channel("book", self.instrument))
        if raw is None:
            self._next_attempt = time.monotonic() + 0.2
            return
        if self.sync.on_book(_decode(raw)):
            self.note(f"synced from the book key at seq {self.sync.seq}")
            if self.on_change is not None:
                self.on_change(self)
        else:  # the key is older than the messages already buffered: it is rewritten soon
            self._next_attempt = time.monotonic() + 0.05


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def silence_threshold_s(settings: RedisSettings) -> float:
    """How long without a message (the daemon sends a heartbeat every ``heartbeat_interval_s``) is silence."""
    return 3 * settings.heartbeat_interval_s


def _silence(f: Follower, now: float | None) -> str | None:
    quiet = f.silent_for(now)
    if quiet is None:
        return None
    return (f"SILENT: nothing for {quiet:.0f} s (a heartbeat is due every {f.settings.heartbeat_interval_s:g} s); "
            "is the daemon running?")


def _level(level: tuple[str, str] | None) -> str:
    return f"{level[0]} x {level[1]}" if level else "-"


def plain_line(f: Follower, now: float | None = None) -> str:
    """One line for a pipe: ``BTC-USD seq 12 bid 29999.98 x 0.0030 ask 30000.01 x 0.0100 spread 0.03 ...``."""
    sync = f.sync
    bid, ask = sync.levels(True, 1), sync.levels(False, 1)
    spread = str(Decimal(ask[0][0]) - Decimal(bid[0][0])) if bid and ask else "-"
    silent = f.silent_for(now)
    return (f"{f.instrument} seq {sync.seq if sync.synced else '-'} bid {_level(bid[0] if bid else None)} "
            f"ask {_level(ask[0] if ask else None)} spread {spread} gaps {sync.gaps} resyncs {sync.resyncs}"
            + ("" if f.connected else " disconnected") + (f" silent {silent:.0f}s" if silent is not None else ""))


def render(f: Follower, levels: int = 10, size: tuple[int, int] | None = None, now: float | None = None) -> str:
    """The screen: top levels, spread, latest trades, sync state; ``size`` (columns, rows) fits it to a terminal:
    fewer levels per side when short (at least one), as many of the latest trades and notes as fit, lines cut."""
    sync = f.sync
    columns, rows = size if size is not None else (10_000, 10_000)
    state = f"seq {sync.seq}" if sync.synced else "syncing..."
    head = [f"{f.instrument}  {state}  messages {f.messages}" + ("" if f.connected else "  [disconnected]"),
            f"gaps {sync.gaps}  resyncs {sync.resyncs}  duplicates dropped {sync.duplicates}  "
            f"missed trades {sync.missed_trades}"]
    silence = _silence(f, now)
    if silence is not None:
        head.append(silence)
    room = rows - 1 - len(head) - 1 - 1 - 2  # the cursor's line, a blank, the spread, blank + "latest trades:"
    keep = min(len(f.notes), 2 if room < 30 else 5) if room > 8 else 0  # the book first on a short terminal
    notes = list(f.notes)[-keep:] if keep else []
    room -= len(notes) + (1 if notes else 0)
    shown = max(1, min(levels, (room - min(3, len(sync.trades))) // 2))
    bids, asks = sync.levels(True, shown), sync.levels(False, shown)
    trades_room = max(0, room - len(bids) - len(asks))
    width = max([len(p) + len(q) for p, q in bids + asks] + [20]) + 4
    lines = [*head, ""]
    lines += [f"{'':>{width}}  {p:>14}  {q:<14}" for p, q in reversed(asks)]
    if bids and asks:
        lines.append(f"{'spread ' + str(Decimal(asks[0][0]) - Decimal(bids[0][0])):>{width + 16}}")
    else:
        lines.append(f"{'(one side empty)':>{width + 16}}")
    lines += [f"{q:>{width}}  {p:>14}" for p, q in bids]
    lines += ["", "latest trades:"]
    trades = list(reversed(sync.trades))[:trades_room]
    lines += [f"  #{t['trade_id']:<8} {t['side']:<4} {t['qty']:>14} @ {t['price']}" for t in trades]
    if notes:
        lines += ["", *notes]
    return "\n".join(line[:columns].rstrip() for line in lines[:max(1, rows - 1)])


async def watch(settings: Settings, instrument: str, *, levels: int = 10, seconds: float | None = None,
                out: TextIO = sys.stdout) -> int:
    """Show the book live until Ctrl-C (or ``seconds``)."""
    follower = Follower(settings.redis, instrument)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    tty = out.isatty()
    started = time.monotonic()
    try:
        while seconds is None or time.monotonic() - started < seconds:
            await asyncio.sleep(0.1 if tty else 1.0)
            if task.done():
                break
            if tty:
                size = shutil.get_terminal_size()
                out.write("\x1b[H\x1b[2J" + render(follower, levels, (size.columns, size.lines)) + "\n")
            else:
                out.write(plain_line(follower) + "\n")
            out.flush()
    finally:
        stop.set()
        await task
    return 0


async def check(settings: Settings, instrument: str, *, seconds: float = 2.0, out: TextIO = sys.stdout) -> int:
    """Follow for ``seconds``, then compare the local book with the one persisted in the configured store at the
    same seq (1: differs)."""
    from exchange.projections.marketdata import MarketData
    from exchange.service.compose import make_store
    from recovery.rebuild import replay_stored

    spec = settings.instrument_map()[instrument]
    synced = asyncio.Event()
    follower = Follower(settings.redis, instrument,
                        on_change=lambda f: synced.set() if f.sync.synced else synced.clear())
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    await asyncio.sleep(seconds)
    with contextlib.suppress(TimeoutError):  # not synced yet: give it a little longer
        await asyncio.wait_for(synced.wait(), 10.0)
    stop.set()
    await task
    sync = follower.sync
    if sync.seq is None:
        out.write(f"{instrument}: could not sync from Redis at {settings.redis.redacted_url()} "
                  f"({'; '.join(follower.notes) or 'no book key'}); is the daemon publishing market data?\n")
        return 1
    async with make_store(settings) as store:
        snapshot = await store.latest_snapshot(instrument, sync.seq)
        state = (await replay_stored(store, spec, sync.seq, snapshot=snapshot)).state
    stored = MarketData(spec, state, depth=sync.depth)
    differences = []
    for buy, name in ((True, "bid"), (False, "ask")):
        mine, theirs = dict(sync.levels(buy)), dict(stored.levels(buy, sync.depth))
        differences += [f"  {name} {price}: watch {mine.get(price, '-')}, persisted {theirs.get(price, '-')}"
                        for price in sorted(set(mine) | set(theirs), key=float)
                        if mine.get(price) != theirs.get(price)]
    levels = len(sync.bids) + len(sync.asks)
    where = settings.storage.path if settings.storage.kind == "sqlite" else "PostgreSQL"
    if differences:
        out.write(f"{instrument}: the local book differs from the persisted book ({where}) at seq {sync.seq} "
                  f"({len(differences)} levels):\n" + "\n".join(differences[:50]) + "\n")
        return 1
    out.write(f"{instrument}: the local book equals the persisted book ({where}) at seq {sync.seq} ({levels} levels; "
              f"{sync.gaps} gaps, {sync.resyncs} resyncs while following)\n")
    return 0
