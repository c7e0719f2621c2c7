"""Start-up recovery: rebuild every book from storage and check it before trading resumes.

For each instrument :func:`recover`

1. loads the durable state (:meth:`exchange.ports.Store.load`): the open
   orders in priority order (icebergs with their shown and hidden quantity),
   the stop orders waiting for their stop price, the last trade price, the
   counters, the dedupe window, offsets, positions and balances (accounts,
   the fees account, the transfers remembered), and rebuilds the engine from it;
2. checks it, when the store keeps history (:class:`exchange.ports.History`):
   the latest snapshot at or below the durable seq, plus every stored event
   after it, replayed through :class:`exchange.projections.applier.EventApplier`, must give
   the same state hash (which covers the balances, the waiting stops and the
   last trade price), the same counters, the same dedupe window, the same
   waiting stops and the same balances. A snapshot whose stored hash does not
   match its own content is refused too.

The dedupe window of such a replay is the part of the window that finished
after the snapshot (the daemon's snapshots leave the window out, and one that an
earlier version stored followed the rule and settings of its time, so the replay
does without it). Whether an order is in the window depends only on the orders
finished after it (:class:`exchange.core.dedupe.DedupeWindow`), so that part is
known exactly: the loaded window's entries of orders that finished after the
snapshot -- those open in it (in the book, or stops waiting) or accepted after
it -- must be the replay's entries, in the same order (see :func:`describe_difference`).

A mismatch raises :class:`RecoveryError` naming the instrument, both hashes and
what to do; the daemon must not trade on a book it cannot vouch for. Progress
goes to the ``exchange.recovery`` structlog logger: one line per instrument
(done/total, orders loaded, events checked, rate, elapsed) and, during long
replays, one line per second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from exchange.core.balances import transfer_summary
from exchange.core.events import Event
from exchange.core.instruments import Instrument
from exchange.core.matching import MatchingEngine
from exchange.core.state import EngineState
from exchange.ports import History, Recovered, SnapshotRequest, Store
from exchange.projections.applier import EventApplier, ReplayError
from exchange.telemetry.metrics import Metrics, discarded

__all__ = ["RecoveryError", "ReplayResult", "describe_balances", "describe_difference", "recover", "replay_stored",
           "without_window"]

_LOG_EVERY_S = 1.0


class RecoveryError(Exception):
    """The stored state of an instrument is inconsistent; the daemon must not start on it."""


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """A state rebuilt from a starting image plus stored events."""

    state: EngineState
    state_hash: str
    start_seq: int  # seq of the starting image (0: from nothing)
    events: int  # events applied
    snapshot: SnapshotRequest | None


async def replay_stored(store: History, spec: Instrument, upto_seq: int, *, snapshot: SnapshotRequest | None,
                        log: Any = None, what: str = "replaying events",
                        observe: Callable[[Sequence[Event]], None] | None = None) -> ReplayResult:
    """``snapshot`` (or nothing) plus the stored events after it up to ``upto_seq``, through the applier.

    ``observe`` is called with every chunk of events once the applier has taken it (verify folds the
    fills into positions with it). Raises :class:`ReplayError` when the events do not fit or end before
    ``upto_seq``.
    """
    symbol = spec.symbol
    applier = EventApplier(spec, without_window(snapshot.state) if snapshot is not None else None)
    start = applier.seq
    started = last_log = time.monotonic()
    async for chunk in store.read_events(symbol, start, upto_seq):
        applier.apply_all(chunk)
        if observe is not None:
            observe(chunk)
        now = time.monotonic()
        if log is not None and now - last_log >= _LOG_EVERY_S:
            last_log = now
            done = applier.seq - start
            log.info(what, instrument=symbol, events_checked=done, events_total=upto_seq - start,
                     rate_per_s=round(done / (now - started)), elapsed_s=round(now - started, 3))
    if applier.seq != upto_seq:
        raise ReplayError(f"{symbol}: the stored events end at seq {applier.seq}, but the durable seq "
                          f"(engine_progress) is {upto_seq}")
    return ReplayResult(applier.export_state(), applier.state_hash(), start, applier.events_applied, snapshot)


def without_window(state: EngineState) -> EngineState:
    """A snapshot's image without the dedupe window it may carry (earlier versions stored it): a replay from
    it knows exactly the orders that finish after it, whatever rule or settings that window was built with."""
    if not state.done and not state.done_complete:
        return state
    return msgspec.structs.replace(state, done=[], done_complete=False)


def describe_difference(a: EngineState, b: EngineState, a_name: str, b_name: str, *,
                        since: EngineState | None = None, assets: tuple[str, str] = ("base", "quote")) -> str:
    """A short, human-readable account of how two engine images differ ("" when they are equal).

    ``since`` is the snapshot a partial dedupe window (``done_complete`` False) was replayed from; with it
    the windows are compared exactly (see :func:`_windows_agree`), without it only as tails of each other.
    ``assets`` names the base and the quote asset in what is said of the balances (:func:`describe_balances`).
    """
    parts: list[str] = []
    for field in ("seq", "next_order_id", "next_trade_id", "halted"):
        va, vb = getattr(a, field), getattr(b, field)
        if va != vb:
            parts.append(f"{field} {va} ({a_name}) vs {vb} ({b_name})")
    ids_a = {o.order_id: o for o in a.orders}
    ids_b = {o.order_id: o for o in b.orders}
    only_a = sorted(set(ids_a) - set(ids_b))
    only_b = sorted(set(ids_b) - set(ids_a))
    if only_a:
        parts.append(f"open only in {a_name}: orders {only_a[:10]}{' ...' if len(only_a) > 10 else ''}")
    if only_b:
        parts.append(f"open only in {b_name}: orders {only_b[:10]}{' ...' if len(only_b) > 10 else ''}")
    changed = [oid for oid in sorted(set(ids_a) & set(ids_b)) if ids_a[oid] != ids_b[oid]]
    if changed:
        oid = changed[0]
        parts.append(f"{len(changed)} orders differ, first {oid}: {ids_a[oid]} ({a_name}) vs {ids_b[oid]} ({b_name})")
    if not parts and [o.order_id for o in a.orders] != [o.order_id for o in b.orders]:
        parts.append("the same orders in a different queue order")
    stops = _stops_differ(a, b, a_name, b_name)
    if stops:
        parts.append(stops)
    if not _windows_agree(a, b, since):
        parts.append(f"dedupe window differs ({len(a.done)}{'' if a.done_complete else ' recent'} vs "
                     f"{len(b.done)}{'' if b.done_complete else ' recent'} entries)")
    balances = describe_balances(a, b, a_name, b_name, assets)
    if balances:
        parts.append(balances)
    return "; ".join(parts)


def _stops_differ(a: EngineState, b: EngineState, a_name: str, b_name: str) -> str:
    """How two images' waiting stops and last trade price differ ("" when they agree)."""
    parts: list[str] = []
    if a.last_price_ticks != b.last_price_ticks:
        parts.append(f"last trade price {a.last_price_ticks} ({a_name}) vs {b.last_price_ticks} ({b_name})")
    mine, theirs = {s.order_id: s for s in a.stops}, {s.order_id: s for s in b.stops}
    for ids, name in ((sorted(mine.keys() - theirs.keys()), a_name), (sorted(theirs.keys() - mine.keys()), b_name)):
        if ids:
            parts.append(f"stops waiting only in {name}: orders {ids[:10]}{' ...' if len(ids) > 10 else ''}")
    changed = [oid for oid in sorted(mine.keys() & theirs.keys()) if mine[oid] != theirs[oid]]
    if changed:
        oid = changed[0]
        parts.append(f"{len(changed)} waiting stops differ, first {oid}: {mine[oid]} ({a_name}) vs {theirs[oid]} "
                     f"({b_name})")
    return "; ".join(parts)


def describe_balances(a: EngineState, b: EngineState, a_name: str, b_name: str,
                      assets: tuple[str, str] = ("base", "quote")) -> str:
    """How two images' balances differ ("" when they agree): which client's balance of which asset (the first
    five), the fees account, and the transfers remembered by one and not the other (when the other is not a
    replay from a snapshot, which knows only the transfers decided after it) or with another outcome."""
    parts: list[str] = []
    mine = {c: (ba, br, qa, qr) for c, ba, br, qa, qr in a.accounts}
    theirs = {c: (ba, br, qa, qr) for c, ba, br, qa, qr in b.accounts}
    differ: list[str] = []
    for client in sorted(mine.keys() | theirs.keys()):
        x, y = mine.get(client, (0, 0, 0, 0)), theirs.get(client, (0, 0, 0, 0))
        for i, asset in ((0, assets[0]), (2, assets[1])):
            if x[i:i + 2] != y[i:i + 2]:
                differ.append(f"{client} {asset} available {x[i]} reserved {x[i + 1]} ({a_name}) vs available "
                              f"{y[i]} reserved {y[i + 1]} ({b_name})")
    if differ:
        more = f"; and {len(differ) - 5} more" if len(differ) > 5 else ""
        parts.append(f"{len(differ)} balances differ: {'; '.join(differ[:5])}{more}")
    if a.fees != b.fees:
        parts.append(f"the fees account holds {a.fees} {assets[1]} ({a_name}) vs {b.fees} ({b_name})")
    if transfer_summary(a) != transfer_summary(b):
        (na, _), (nb, _) = transfer_summary(a), transfer_summary(b)
        parts.append(f"the transfers remembered differ: {na} ({a_name}) vs {nb} ({b_name})"
                     + ("" if na != nb else ", the same number with other ids or outcomes"))
    told, known = dict(a.transfers), dict(b.transfers)
    for ids, name, whole in ((sorted(told.keys() - known.keys()), a_name, b.transfers_complete),
                             (sorted(known.keys() - told.keys()), b_name, a.transfers_complete)):
        if ids and whole:  # (a replay from a snapshot knows only the transfers after it: no more than the whole)
            parts.append(f"transfers remembered only in {name}: {ids[:10]}{' ...' if len(ids) > 10 else ''}")
    changed = [t for t in sorted(told.keys() & known.keys()) if told[t] != known[t]]
    if changed:
        t = changed[0]
        parts.append(f"{len(changed)} transfers remembered with another outcome, first {t!r}: {told[t]!r} "
                     f"({a_name}) vs {known[t]!r} ({b_name})")
    return "; ".join(parts)


def _windows_agree(a: EngineState, b: EngineState, since: EngineState | None = None) -> bool:
    """Do two images' dedupe windows agree?

    Two complete windows must be equal. A partial one (a replay from ``since``, a snapshot: see
    :class:`exchange.projections.applier.EventApplier`) holds exactly the complete window's entries that finished after
    the snapshot, in the same order: those of orders open in the snapshot (in its book or its waiting stops) or
    accepted after it (an order accepted before it and not open in it had finished). So the complete window's
    entries of such orders must be the partial window, and nothing is said of the others, which no replay from
    there can know.
    Without ``since`` (or with two partial windows) the partial one must be the other's tail.
    """
    if a.done_complete and b.done_complete:
        return a.done == b.done
    if a.done_complete or b.done_complete:
        part, whole = (b, a) if a.done_complete else (a, b)
        if since is not None:
            opened = {o.order_id for o in since.orders} | {s.order_id for s in since.stops}
            after = since.next_order_id
            return part.done == [e for e in whole.done if e[2] >= after or e[2] in opened]
        if len(part.done) > len(whole.done):
            return False  # more finished since a snapshot than there are in the whole window
    n = min(len(a.done), len(b.done))
    return a.done[len(a.done) - n:] == b.done[len(b.done) - n:]


async def _check(store: History, spec: Instrument, rec: Recovered, engine: MatchingEngine, log: Any) -> int:
    """Compare the book rebuilt from open orders with snapshot + events; return the events checked."""
    symbol = spec.symbol
    durable = rec.state.seq
    snapshot = await store.latest_snapshot(symbol, durable)
    if snapshot is not None:
        own = EventApplier(spec, without_window(snapshot.state)).state_hash()
        if own != snapshot.state_hash:
            raise RecoveryError(
                f"{symbol}: the snapshot at seq {snapshot.state.seq} is damaged: its stored state hash is "
                f"{snapshot.state_hash} but its content hashes to {own}. Delete that row from the snapshots table "
                "(an older snapshot or a full replay is used instead) and restart; run `exchange recover --verify` "
                "to check the rest.")
    try:
        replay = await replay_stored(store, spec, durable, snapshot=snapshot, log=log, what="checking events")
    except ReplayError as exc:
        raise RecoveryError(
            f"{symbol}: the stored events after seq {snapshot.state.seq if snapshot else 0} cannot be replayed: "
            f"{exc}. The event journal is damaged or incomplete; do not start the daemon: run "
            "`exchange recover --verify` and restore the database from a backup.") from exc
    rebuilt = engine.export_state()
    book_hash = engine.state_hash()
    since = snapshot.state if snapshot is not None else None
    assets = (spec.base_asset, spec.quote_asset)
    if replay.state_hash != book_hash or describe_difference(rebuilt, replay.state, "", "", since=since):
        source = (f"the snapshot at seq {replay.start_seq} plus the {replay.events} stored events after it"
                  if snapshot is not None else f"a replay of all {replay.events} stored events")
        detail = describe_difference(rebuilt, replay.state, "open orders", "replay", since=since, assets=assets)
        raise RecoveryError(
            f"{symbol}: the book rebuilt from the open orders (state hash {book_hash}, {len(rebuilt.orders)} "
            f"orders, {len(rebuilt.stops)} waiting stops) does not match {source} (state hash {replay.state_hash}, "
            f"{len(replay.state.orders)} orders, {len(replay.state.stops)} waiting stops) at seq {durable}: "
            f"{detail or 'same orders, different hash'}. The stored tables (orders, "
            "and balances and transfers when the instrument keeps balances) and the event journal disagree, so "
            "the daemon will not start. Run `exchange recover --verify` to see which source is wrong (a full "
            "replay of the events is the reference) and repair the tables (or restore from a backup) before "
            "restarting.")
    return replay.events


async def recover(store: Store, instruments: Sequence[Instrument], *, log: Any = None,
                  metrics: Metrics | None = None) -> dict[str, Recovered]:
    """Load and check every instrument's durable state; raise :class:`RecoveryError` on any mismatch.

    ``log`` is a structlog logger (default ``exchange.recovery``); ``metrics``
    the :class:`exchange.telemetry.metrics.Metrics` whose recovery gauges are set (none: a discarded one).
    Stores that do not implement :class:`~exchange.ports.History` are loaded
    but not checked (a warning says so).
    """
    log = log if log is not None else structlog.get_logger("exchange.recovery")
    metrics = metrics if metrics is not None else discarded()
    total = len(instruments)
    started = time.monotonic()
    orders_total = events_total = 0
    checkable = isinstance(store, History)
    log.info("recovery started", instruments_total=total, checked=checkable)
    if not checkable:
        log.warning("this store keeps no replayable history; the rebuilt books are not checked",
                    store=type(store).__name__)
    out: dict[str, Recovered] = {}
    for done, spec in enumerate(instruments, 1):
        t0 = time.monotonic()
        symbol = spec.symbol
        rec = (await store.load([spec]))[symbol]
        try:
            engine = MatchingEngine.from_state(spec, rec.state)
            engine.book.check_invariants()
        except (AssertionError, ValueError, KeyError) as exc:
            raise RecoveryError(
                f"{symbol}: the open orders in storage do not form a valid book ({exc}); run "
                "`exchange recover --verify` and repair the orders table before restarting") from exc
        orders_total += len(rec.state.orders)
        metrics.recovery_orders.set(orders_total)
        events = 0
        if checkable:
            assert isinstance(store, History)
            events = await _check(store, spec, rec, engine, log)
        events_total += events
        out[symbol] = rec
        metrics.recovery_instruments.set(done)
        metrics.recovery_events.set(events_total)
        elapsed = time.monotonic() - t0
        log.info("instrument recovered", instrument=symbol, instruments_done=done, instruments_total=total,
                 seq=rec.state.seq, orders_loaded=len(rec.state.orders), events_checked=events,
                 events_per_s=round(events / elapsed) if elapsed > 0 else None, state_hash=engine.state_hash(),
                 elapsed_s=round(elapsed, 3))
    elapsed = time.monotonic() - started
    log.info("recovery finished", instruments_total=total, orders_loaded=orders_total, events_checked=events_total,
             elapsed_s=round(elapsed, 3))
    return out
