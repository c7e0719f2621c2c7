"""``exchange recover --verify``: check the stored state offline, three ways, per instrument.

(a) ``open orders``: the book rebuilt from the open orders in the orders table
    (what the daemon would start from), with the counters of engine_progress;
(b) ``snapshot+events``: the latest snapshot at or below the durable seq plus
    the stored events after it;
(c) ``full replay``: every stored event from seq 1, through the event applier —
    the reference, since the events are the journal of record.

Each source's seq, counters, open orders (and waiting stops), dedupe window size and
state hash are reported, and whether they all agree (the waiting stops and the last
trade price included, which the state hash covers). The full replay also folds every fill into
client positions (:func:`exchange.projections.positions.apply_fills`), and the positions table
must hold exactly those. Nothing is written.

An instrument that keeps balances (:mod:`exchange.core.balances`) is checked three more ways:

- the stored balances, the fees account and the transfers remembered (source (a)) must be what the
  events make of them (the full replay folds every event's ``balances``): a difference names the
  client and the asset (:func:`recovery.rebuild.describe_balances`);
- money is conserved, per asset: the deposits minus the withdrawals in the events equal every
  client's available plus reserved, plus the fees account for the quote asset;
- each client's reserved amounts are what its open orders hold (``remaining * rate`` of each, an
  iceberg's hidden quantity included, and each waiting stop's quantity times its rate or, a stop buy,
  its budget: base for its sells, quote for its buys).

The last two are checked on the stored state and on the full replay (the events' own consistency).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from exchange.core.events import Deposited, Event, Withdrawn
from exchange.core.instruments import Instrument
from exchange.core.matching import MatchingEngine
from exchange.core.state import EngineState
from exchange.core.types import Side
from exchange.ports import History, Position, SnapshotRequest, Store, StoreUnavailable
from exchange.projections.applier import EventApplier, ReplayError
from exchange.projections.positions import apply_fills
from recovery.rebuild import describe_difference, replay_stored, without_window

__all__ = ["InstrumentReport", "SourceResult", "VerifiableStore", "VerifyReport", "unreadable", "verify_store"]

_log = structlog.get_logger("exchange.recovery")


class VerifiableStore(Store, History, Protocol):
    """A store that keeps the history verify reads (PostgreSQL, SQLite)."""


@dataclass(frozen=True, slots=True)
class SourceResult:
    """One way of rebuilding an instrument's state, or why it failed."""

    source: str
    state: EngineState | None = None
    state_hash: str | None = None
    note: str = ""  # e.g. which snapshot, how many events
    error: str | None = None


@dataclass(slots=True)
class InstrumentReport:
    instrument: str
    durable_seq: int
    results: list[SourceResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    positions_checked: int | None = None  # clients whose stored position was compared with the fills
    balances_checked: int | None = None  # with balances: clients whose stored balances were checked
    assets: tuple[str, str] = ("", "")  # (base, quote), with balances

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(slots=True)
class VerifyReport:
    instruments: list[InstrumentReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(report.ok for report in self.instruments)

    def render(self) -> str:
        """A readable table: one row per instrument and source, then the verdict and problems."""
        header = ("instrument", "source", "seq", "next_order", "next_trade", "open", "dedupe", "state_hash", "note")
        rows: list[tuple[str, ...]] = []
        for rep in self.instruments:
            for res in rep.results:
                st = res.state
                if st is None:
                    rows.append((rep.instrument, res.source, "-", "-", "-", "-", "-", "-",
                                 res.error or res.note))
                else:
                    rows.append((rep.instrument, res.source, str(st.seq), str(st.next_order_id),
                                 str(st.next_trade_id),
                                 str(len(st.orders)) + (f" +{len(st.stops)} stops" if st.stops else ""),
                                 str(len(st.done)) + ("" if st.done_complete else " recent"),
                                 res.state_hash or "-", res.note))
        widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i])
                  for i in range(len(header))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.append("")
        for rep in self.instruments:
            if rep.ok:
                checked = ("" if rep.positions_checked is None else
                           f"; the positions of {rep.positions_checked} clients match the fills")
                lines.append(f"{rep.instrument}: OK, all sources agree at seq {rep.durable_seq}{checked}")
                if rep.balances_checked is not None:
                    base, quote = rep.assets
                    lines.append(f"  balances: the {rep.balances_checked} clients' balances and the fees account "
                                 f"match the events; {base} and {quote} are conserved (deposits - withdrawals = "
                                 "available + reserved + fees); every reserve is what the open orders hold")
            else:
                lines.append(f"{rep.instrument}: MISMATCH")
                lines += [f"  - {p}" for p in rep.problems]
        lines.append("verdict: " + ("OK" if self.ok else "PROBLEMS FOUND (see above; the full replay is the "
                                            "reference, since the events are the journal of record)"))
        return "\n".join(lines)


async def _verify_one(store: VerifiableStore, spec: Instrument) -> InstrumentReport:
    symbol = spec.symbol
    rec = (await store.load([spec]))[symbol]
    durable = rec.state.seq
    report = InstrumentReport(symbol, durable)
    assets = (spec.base_asset, spec.quote_asset)
    balances = spec.balances or bool(rec.state.accounts or rec.state.fees or rec.state.transfers)

    # (a) the open orders, as the daemon would start from them
    try:
        engine = MatchingEngine.from_state(spec, rec.state)
        engine.book.check_invariants()
        report.results.append(SourceResult("open orders", engine.export_state(), engine.state_hash(),
                                           "orders table + engine_progress" + (" + balances + transfers"
                                                                               if balances else "")))
    except (AssertionError, ValueError, KeyError) as exc:
        report.results.append(SourceResult("open orders", error=f"not a valid book: {exc}"))

    # (b) the latest snapshot plus the events after it
    # (as recovery does it: with no snapshot stored, that is every event from seq 1)
    snapshot = await store.latest_snapshot(symbol, durable)
    try:
        replay = await replay_stored(store, spec, durable, snapshot=snapshot, log=_log,
                                     what="verify: snapshot+events")
        if snapshot is None:
            note = f"no snapshot stored: {replay.events} events from seq 1"
        else:
            note = f"snapshot seq {snapshot.state.seq} + {replay.events} events"
            own = EventApplier(spec, without_window(snapshot.state)).state_hash()
            if own != snapshot.state_hash:
                note += f"; SNAPSHOT DAMAGED (stored hash {snapshot.state_hash}, content {own})"
                report.problems.append(f"the snapshot at seq {snapshot.state.seq} does not match its stored hash")
        report.results.append(SourceResult("snapshot+events", replay.state, replay.state_hash, note))
    except ReplayError as exc:
        report.results.append(SourceResult("snapshot+events", error=str(exc)))

    # (c) everything from the first event: the reference; its fills give every client's position
    from_fills: dict[str, Position] = {}
    net: dict[str, int] = dict.fromkeys(assets, 0)  # per asset: deposits - withdrawals

    def observe(chunk: Sequence[Event]) -> None:
        apply_fills(from_fills, chunk)
        if balances:
            _transferred(net, chunk)

    full: EngineState | None = None
    try:
        replay = await replay_stored(store, spec, durable, snapshot=None, log=_log, what="verify: full replay",
                                     observe=observe)
        report.results.append(SourceResult("full replay", replay.state, replay.state_hash,
                                           f"{replay.events} events from seq 1"))
    except ReplayError as exc:
        report.results.append(SourceResult("full replay", error=str(exc)))
    else:
        report.positions_checked = len(rec.positions.keys() | from_fills.keys())
        differ = _positions_differ(rec.positions, from_fills)
        if differ:
            report.problems.append(differ)
        full = replay.state

    _compare(report, snapshot, assets)
    if balances:
        report.assets = assets
        for state, source in ((rec.state, "stored"), (full, "full replay")):
            if state is not None:
                report.problems += _ledger_problems(state, source, assets, net if full is not None else None)
        if full is not None:
            report.balances_checked = len({a[0] for a in rec.state.accounts} | {a[0] for a in full.accounts})
    return report


def _compare(report: InstrumentReport, snapshot: SnapshotRequest | None, assets: tuple[str, str]) -> None:
    """The sources' errors, and how each source that built a state differs from the reference (the last one)."""
    for res in report.results:
        if res.error is not None:
            report.problems.append(f"{res.source}: {res.error}")
    built = [res for res in report.results if res.state is not None]
    reference = next((res for res in reversed(built)), None)
    if reference is None:
        return
    for res in built:
        if res is reference:
            continue
        assert res.state is not None
        assert reference.state is not None
        partial = "snapshot+events" in (res.source, reference.source)  # the one whose window may be partial
        since = snapshot.state if snapshot is not None and partial else None
        diff = describe_difference(res.state, reference.state, res.source, reference.source, since=since,
                                   assets=assets)
        if res.state_hash != reference.state_hash or diff:
            report.problems.append(
                f"{res.source} (hash {res.state_hash}) differs from {reference.source} (hash "
                f"{reference.state_hash}): {diff or 'same orders, different hash'}")


async def verify_store(store: VerifiableStore, instruments: Sequence[Instrument]) -> VerifyReport:
    """Compare (a) open orders, (b) snapshot + events and (c) a full replay for every instrument."""
    report = VerifyReport()
    try:
        for spec in instruments:
            report.instruments.append(await _verify_one(store, spec))
    except StoreUnavailable as exc:
        return unreadable(exc)
    return report


def _positions_differ(stored: Mapping[str, Position], from_fills: Mapping[str, Position]) -> str:
    """Which clients' stored positions are not what the fills make of them ("" when all are)."""
    clients = stored.keys() | from_fills.keys()
    differ = sorted(c for c in clients if stored.get(c) != from_fills.get(c))
    if not differ:
        return ""

    def show(p: Position | None) -> str:
        return "no row" if p is None else f"net {p.net_lots} lots, cost {p.cost}, realized {p.realized}"

    listed = "; ".join(f"{c}: stored {show(stored.get(c))}, from the fills {show(from_fills.get(c))}"
                       for c in differ[:5])
    more = f"; and {len(differ) - 5} more" if len(differ) > 5 else ""
    return (f"positions: {len(differ)} of {len(clients)} clients differ from the fills in the events "
            f"({listed}{more})")


def _transferred(net: dict[str, int], events: Sequence[Event]) -> None:
    """Add the events' deposits and take their withdrawals from ``net`` (per asset)."""
    for e in events:
        if isinstance(e, Deposited):
            net[e.asset] = net.get(e.asset, 0) + e.amount
        elif isinstance(e, Withdrawn):
            net[e.asset] = net.get(e.asset, 0) - e.amount


def _ledger_problems(state: EngineState, source: str, assets: tuple[str, str],
                     net: Mapping[str, int] | None) -> list[str]:
    """What is wrong with an image's balances on their own: money not conserved (against ``net``, the deposits
    minus the withdrawals per asset, when known), reserves that are not what the open orders hold."""
    base, quote = assets
    problems: list[str] = []
    if net is not None:
        held = {base: sum(ba + br for _, ba, br, _, _ in state.accounts),
                quote: sum(qa + qr for _, _, _, qa, qr in state.accounts) + state.fees}
        for asset, total in held.items():
            if total != net.get(asset, 0):
                problems.append(f"balances ({source}): {asset} is not conserved: the deposits minus the withdrawals "
                                f"in the events are {net.get(asset, 0)}, but the clients' available + reserved"
                                f"{' + the fees account' if asset == quote else ''} is {total}")
    holds: dict[str, list[int]] = {}  # client -> [base, quote] its open orders hold
    for o in state.orders:
        entry = holds.setdefault(o.client_id, [0, 0])
        entry[o.side == Side.BUY] += (o.remaining_lots + o.hidden_lots) * o.rate
    for s in state.stops:  # a waiting stop holds what its order will need (a stop buy: its budget)
        entry = holds.setdefault(s.client_id, [0, 0])
        entry[s.side == Side.BUY] += s.funds or s.qty_lots * s.rate
    reserved = {c: [br, qr] for c, _, br, _, qr in state.accounts}
    differ = []
    for client in sorted(holds.keys() | reserved.keys()):
        mine, backed = reserved.get(client, [0, 0]), holds.get(client, [0, 0])
        differ += [f"{client} has {mine[i]} {asset} reserved, its open orders hold {backed[i]}"
                   for i, asset in enumerate(assets) if mine[i] != backed[i]]
    if differ:
        more = f"; and {len(differ) - 5} more" if len(differ) > 5 else ""
        problems.append(f"balances ({source}): {len(differ)} reserves are not what the open orders hold: "
                        f"{'; '.join(differ[:5])}{more}")
    return problems


def unreadable(exc: StoreUnavailable) -> VerifyReport:
    """The report when the store cannot be opened or read."""
    rep = InstrumentReport("*", 0)
    rep.problems.append(f"cannot read the database: {exc}")
    return VerifyReport([rep])
