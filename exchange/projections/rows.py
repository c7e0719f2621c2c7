"""From a journal batch to the rows storage writes: pure, no I/O, one pass over the events.

:func:`derive_rows` turns a :class:`~exchange.ports.Batch` into

- one ``order_events`` row per event (``payload`` = the msgspec JSON of the event);
- one ``trades`` row per ``filled`` event;
- ``orders`` rows for the orders *created* in the batch (accepted, or rejected
  place commands), already in their final state at the end of the batch;
- one update per *pre-existing* order the batch touched, in relative terms
  where the previous row is needed (``filled_lots`` grows by ``filled_delta``;
  a ``None`` column keeps the stored value);
- the new absolute position of every client the batch's fills touched;
- balances (an instrument that keeps them, see :mod:`exchange.core.balances`): per
  ``(instrument, client, asset)`` the last value the batch's events carry (their
  ``balances``), with the seq of that event -- the venue's fees account is client
  ``""`` --, and one ``transfers`` row per transfer the engine remembers: each
  deposit and withdrawal applied, and each withdrawal refused ``insufficient_funds``
  (``asset`` and the amount unknown then: the rejection does not carry them), with
  the outcome text exactly as the engine remembers it;
- per instrument, the seq and id counters at the end of the batch, and the
  highest input offset per topic partition; the partitions' own offsets
  (``Batch.partitions``, instrument ``""``); the batch's snapshots.

Whether a batch may be written over what is stored, and the engine image stored rows make, are in
:mod:`exchange.projections.stored`.

Order status rules (``orders.status``):

- ``accepted`` creates the row ``open`` with ``remaining = qty``, ``filled = 0``,
  ``priority`` = its seq and ``rate`` (what each open lot holds, with balances) =
  ``reserved // qty`` (0 for a market buy's budget);
- ``filled`` sets the maker's and the taker's remaining from the event, adds
  the fill to ``filled_lots``, and makes the status ``filled`` when nothing
  remains, else ``partially_filled``;
- ``canceled`` and ``expired`` set remaining to 0 and the status of that name
  (``filled_lots`` tells how much traded before);
- ``amended`` sets price, total quantity and remaining from the event and, when
  it re-queued the order, ``priority`` to its seq and ``rate`` to
  ``reserved // remaining``; the status is unchanged;
- ``rejected`` creates a ``rejected`` row (``order_id`` NULL) when the refused
  command was a place, and changes nothing otherwise;
- order types: an accepted stop or stop-limit is ``open`` with its ``stop_price_ticks`` and
  ``triggered_seq`` 0 while it waits (``funds``: a stop buy's budget, which it holds; any accepted
  order's ``funds`` is stored); ``triggered`` sets ``triggered_seq`` and ``priority`` to its seq (a
  stop-limit that then rests has that place); an amend of a waiting stop sets its stop price too. An
  iceberg's row keeps its ``display_lots``; ``remaining_lots`` is the slice it shows and
  ``hidden_lots`` the rest of its open quantity (0 for any other order): accepted, or re-queued by an
  amend, it shows ``min(display, open)`` after each of its taker fills (as it would rest), ``amended``
  gives the split (``remaining_lots - hidden_lots`` shows), ``replenished`` shows the next slice
  with ``priority`` its seq (and the status ``partially_filled`` again after the fill that emptied
  the slice), and a cancel or expiry leaves nothing hidden;
- ``halted``/``resumed`` change no order; the instrument's ``halted`` flag in
  its progress row follows them;
- ``cleared`` (the operator's clear, before its cancellations) changes no row
  but its own ``order_events`` row (``order_id`` NULL, ``client_id`` the
  operator), like ``halted``/``resumed``.

``updated_seq`` is the seq of the last event that changed the row, so the
finished orders ordered by ``(updated_seq, priority)`` are in the order the
engine finished them (when one fill finishes both, the maker — queued earlier,
so lower priority — finishes first), which is how the dedupe window is rebuilt.
One maker is queued later than its taker: an iceberg whose next slice joined
the level during that taker's matching (its priority is the ``replenished``
seq). When one fill finishes such a maker and its taker, the maker's row gets
the taker's priority minus one, so that it still sorts first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec

from exchange.core.balances import refused, transferred
from exchange.core.events import (
    Balance,
    BookCleared,
    Deposited,
    InstrumentHalted,
    InstrumentResumed,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderExpired,
    OrderFilled,
    OrderRejected,
    OrderReplenished,
    OrderTriggered,
    Withdrawn,
)
from exchange.core.instruments import Instrument
from exchange.core.types import RejectReason, Side
from exchange.ports import Batch, Position, SnapshotRequest
from exchange.projections.positions import apply_fill

__all__ = [
    "BALANCE_FIELDS",
    "EVENT_COLUMNS",
    "ORDER_COLUMNS",
    "POSITION_FIELDS",
    "TRADE_COLUMNS",
    "TRANSFER_COLUMNS",
    "UPDATE_FIELDS",
    "BatchRows",
    "Progress",
    "RowError",
    "Scale",
    "derive_rows",
    "finished_statuses",
    "open_statuses",
    "transfer_outcome",
]

# The shape of every row kind, defined here only: the rows are tuples (or lists) of these fields in this
# order, and whatever reads them -- the stores' statements, exchange_commit_batch (migration 010, through
# the positions the PostgreSQL store sends with each batch), the positions below -- finds a field by its
# name here. The names are the tables' column names, but filled_delta (added to filled_lots).
EVENT_COLUMNS = ("instrument", "seq", "ts_ns", "type", "order_id", "client_id", "payload")
ORDER_COLUMNS = (
    "instrument", "created_seq", "order_id", "client_id", "client_order_id", "side", "order_type", "tif",
    "price_ticks", "qty_lots", "remaining_lots", "filled_lots", "status", "priority", "expire_ns", "post_only",
    "stp", "reject_reason", "reject_text", "created_ts_ns", "updated_seq", "updated_ts_ns", "price", "qty", "rate",
    "stop_price_ticks", "triggered_seq", "display_lots", "hidden_lots", "funds",
)
TRADE_COLUMNS = (
    "instrument", "trade_id", "seq", "ts_ns", "price_ticks", "qty_lots", "price", "qty", "aggressor_side",
    "maker_order_id", "maker_client_id", "maker_client_order_id", "taker_order_id", "taker_client_id",
    "taker_client_order_id",
)
# an update of a pre-existing order: None keeps the stored value; filled_delta is added to filled_lots
UPDATE_FIELDS = ("instrument", "order_id", "remaining_lots", "filled_delta", "qty_lots", "price_ticks", "priority",
                 "status", "updated_seq", "updated_ts_ns", "rate", "hidden_lots", "stop_price_ticks", "triggered_seq")
POSITION_FIELDS = ("client_id", "instrument", "net_lots", "cost", "realized", "updated_seq")
# balances: exact integers (base lots, or quote units of tick x lot); the store adds the decimal columns
# (available_amount, reserved_amount) in the asset's units
BALANCE_FIELDS = ("instrument", "client_id", "asset", "available", "reserved", "updated_seq")
# a transfer the engine remembers; asset, amount_units and amount are NULL for a refused withdrawal
TRANSFER_COLUMNS = ("instrument", "transfer_id", "client_id", "asset", "kind", "amount_units", "amount", "status",
                    "outcome", "seq", "ts_ns")
open_statuses = ("open", "partially_filled")
finished_statuses = ("filled", "canceled", "expired")

_ZERO = Position()
_BUY, _SELL = Side.BUY, Side.SELL
_encode = msgspec.json.Encoder().encode

# positions in a mutable order record (a list of ORDER_COLUMNS, for speed) while the batch is walked
_PRICE, _QTY, _REMAINING, _FILLED, _STATUS, _PRIORITY, _UPDATED_SEQ, _UPDATED_TS, _PRICE_VALUE, _QTY_VALUE, _RATE = map(
    ORDER_COLUMNS.index, ("price_ticks", "qty_lots", "remaining_lots", "filled_lots", "status", "priority",
                          "updated_seq", "updated_ts_ns", "price", "qty", "rate"))
_STOP, _TRIGGERED, _HIDDEN = map(ORDER_COLUMNS.index, ("stop_price_ticks", "triggered_seq", "hidden_lots"))
# positions in a mutable update record (a list of UPDATE_FIELDS) of a pre-existing order
_U_REMAINING, _U_FILLED, _U_QTY, _U_PRICE, _U_PRIORITY, _U_STATUS, _U_SEQ, _U_TS, _U_RATE = map(
    UPDATE_FIELDS.index, ("remaining_lots", "filled_delta", "qty_lots", "price_ticks", "priority", "status",
                          "updated_seq", "updated_ts_ns", "rate"))
_U_HIDDEN, _U_STOP, _U_TRIGGERED = map(UPDATE_FIELDS.index, ("hidden_lots", "stop_price_ticks", "triggered_seq"))
_INSUFFICIENT_FUNDS = RejectReason.INSUFFICIENT_FUNDS


class Scale:
    """One instrument's operator-facing decimals: ticks -> price, lots -> quantity, units of an asset -> amount.

    The values go into the NUMERIC columns of the rows that are COPied (new
    orders, trades, transfers). This one gives :class:`~decimal.Decimal`; a store may pass a
    subclass that gives its driver's wire form instead (see
    ``exchange.adapters.postgres``).
    """

    __slots__ = ("base_asset", "lot", "tick")

    def __init__(self, spec: Instrument) -> None:
        self.tick = Decimal(spec.tick_size)
        self.lot = Decimal(spec.lot_size)
        self.base_asset = spec.base_asset

    def price(self, ticks: int) -> Any:
        return self.tick * ticks

    def qty(self, lots: int) -> Any:
        return self.lot * lots

    def amount(self, asset: str, units: int) -> Any:
        """Units of the base asset (lots) or of the quote asset (tick x lot) in the asset's own units."""
        return (self.lot if asset == self.base_asset else self.tick * self.lot) * units


class RowError(ValueError):
    """The batch cannot be stored as it is (unknown instrument, a gap in the sequence...)."""


@dataclass(frozen=True, slots=True)
class Progress:
    """An instrument's counters: the last seq, and the next order and trade ids; and whether it is halted."""

    seq: int = 0
    next_order_id: int = 1
    next_trade_id: int = 1
    halted: bool = False


@dataclass(slots=True)
class BatchRows:
    """Everything one batch writes, as rows ready for COPY or for the store's set-based statements.

    ``order_updates`` tuples hold :data:`UPDATE_FIELDS`, where ``None`` means
    "keep the stored value" (the store derives ``price``/``qty`` from the new
    ticks/lots). ``positions`` maps instrument -> client -> new position (only
    those that changed); ``position_rows`` are the same as tuples of
    :data:`POSITION_FIELDS` (the store adds the decimal columns). ``first_seq`` and
    ``progress`` hold, per instrument with events, the batch's first seq and the
    counters at its end. ``offsets`` maps ``(instrument, topic, partition)`` to
    the highest offset. ``snapshots`` rows are ``(instrument, seq, state_hash,
    order_count, state)``. ``balance_rows`` hold :data:`BALANCE_FIELDS` (the store adds the
    decimal columns), ``transfers`` :data:`TRANSFER_COLUMNS`.
    """

    events: list[tuple[Any, ...]] = field(default_factory=list)
    trades: list[tuple[Any, ...]] = field(default_factory=list)
    new_orders: list[Sequence[Any]] = field(default_factory=list)
    order_updates: list[tuple[Any, ...]] = field(default_factory=list)
    positions: dict[str, dict[str, Position]] = field(default_factory=dict)
    position_rows: list[tuple[Any, ...]] = field(default_factory=list)
    first_seq: dict[str, int] = field(default_factory=dict)
    progress: dict[str, Progress] = field(default_factory=dict)
    offsets: dict[tuple[str, str, int], int] = field(default_factory=dict)
    snapshots: list[tuple[Any, ...]] = field(default_factory=list)
    balance_rows: list[tuple[Any, ...]] = field(default_factory=list)
    transfers: list[tuple[Any, ...]] = field(default_factory=list)


class _Instrument:
    """Per-instrument working state while one batch is walked."""

    __slots__ = ("balances", "first_seq", "halted", "last_seq", "new", "next_order_id", "next_trade_id",
                 "old_positions", "position_seq", "positions", "rejected", "scale", "spec", "symbol", "taking",
                 "updates")

    def __init__(self, spec: Instrument, progress: Progress, positions: Mapping[str, Position],
                 scale: Scale) -> None:
        self.spec = spec
        self.symbol = spec.symbol
        self.scale = scale
        self.first_seq = 0
        self.last_seq = progress.seq
        self.next_order_id = progress.next_order_id
        self.next_trade_id = progress.next_trade_id
        self.halted = progress.halted
        self.new: dict[int, list[Any]] = {}
        self.updates: dict[int, list[Any]] = {}
        self.rejected: list[tuple[Any, ...]] = []
        self.old_positions = positions
        self.positions: dict[str, Position] = {}
        self.position_seq: dict[str, int] = {}
        self.balances: dict[tuple[str, str], tuple[int, int, int]] = {}  # (client, asset) -> (avail, reserved, seq)
        # icebergs that were accepted or re-queued in the batch: order id -> the slice a taker fill leaves shown
        self.taking: dict[int, int] = {}


def _moved(inst: _Instrument, balances: Sequence[Balance], seq: int) -> None:
    """An event's resulting balances: the last value of each (client, asset) in the batch is the row's."""
    rows = inst.balances
    for client, asset, available, reserved in balances:
        rows[(client, asset)] = (available, reserved, seq)


def transfer_outcome(spec: Instrument, kind: str, asset: str, units: int, client: str, seq: int) -> str:
    """What the engine remembers of an applied transfer (``kind`` deposit or withdraw) of ``units`` of ``asset``."""
    return transferred("deposited" if kind == "deposit" else "withdrawn", spec.units_to_amount(asset, units), asset,
                       client, seq)


def _touch(inst: _Instrument, order_id: int, remaining: int, filled: int, status: str | None, seq: int,
           ts: int, hidden: int | None = None) -> None:
    """Record a fill (``filled`` > 0), cancel or expiry of one order (``hidden``: an iceberg's hidden quantity now;
    None: unchanged)."""
    rec = inst.new.get(order_id)
    if rec is not None:
        rec[_REMAINING] = remaining
        rec[_FILLED] += filled
        if status is not None:
            rec[_STATUS] = status
        if hidden is not None:
            rec[_HIDDEN] = hidden
        rec[_UPDATED_SEQ] = seq
        rec[_UPDATED_TS] = ts
        return
    upd = inst.updates.get(order_id)
    if upd is None:
        inst.updates[order_id] = [inst.symbol, order_id, remaining, filled, None, None, None, status, seq, ts, None,
                                  hidden, None, None]
        return
    upd[_U_REMAINING] = remaining
    upd[_U_FILLED] += filled
    if status is not None:
        upd[_U_STATUS] = status
    if hidden is not None:
        upd[_U_HIDDEN] = hidden
    upd[_U_SEQ] = seq
    upd[_U_TS] = ts


def _queued(inst: _Instrument, order_id: int, remaining: int, hidden: int | None, status: str | None, seq: int,
            ts: int, *, triggered: bool = False) -> None:
    """An order takes its place in its queue at ``seq`` (priority): a triggered stop (``triggered_seq`` too), or an
    iceberg's next slice (``remaining`` shown, ``hidden`` the rest)."""
    rec = inst.new.get(order_id)
    if rec is not None:
        rec[_REMAINING] = remaining
        rec[_PRIORITY] = seq
        if hidden is not None:
            rec[_HIDDEN] = hidden
        if status is not None:
            rec[_STATUS] = status
        if triggered:
            rec[_TRIGGERED] = seq
        rec[_UPDATED_SEQ] = seq
        rec[_UPDATED_TS] = ts
        return
    upd = inst.updates.get(order_id)
    if upd is None:
        upd = inst.updates[order_id] = [inst.symbol, order_id, remaining, 0, None, None, None, None, seq, ts, None,
                                        None, None, None]
    upd[_U_REMAINING] = remaining
    upd[_U_PRIORITY] = seq
    if hidden is not None:
        upd[_U_HIDDEN] = hidden
    if status is not None:
        upd[_U_STATUS] = status
    if triggered:
        upd[_U_TRIGGERED] = seq
    upd[_U_SEQ] = seq
    upd[_U_TS] = ts


def _priority(inst: _Instrument, order_id: int) -> int | None:
    """An order's priority as the batch has set it (None: as stored, older than any the batch sets)."""
    rec = inst.new.get(order_id)
    if rec is not None:
        return int(rec[_PRIORITY])
    upd = inst.updates.get(order_id)
    return None if upd is None else upd[_U_PRIORITY]


def _maker_first(inst: _Instrument, maker: int, taker: int) -> None:
    """One fill finished both: the maker must sort first among the finished orders of that seq (see the module
    docstring); only an iceberg's slice queued during this taker's matching is queued after it."""
    mine, theirs = _priority(inst, maker), _priority(inst, taker)
    if mine is not None and theirs is not None and mine > theirs:
        rec = inst.new.get(maker)
        if rec is not None:
            rec[_PRIORITY] = theirs - 1
        else:
            inst.updates[maker][_U_PRIORITY] = theirs - 1


def _amended_rate(ev: OrderAmended) -> int:
    """What each open lot of a re-queued order holds: what it reserves over its open quantity, but nothing for a
    stop buy's budget (a stop, price 0, that holds its ``funds``)."""
    if not ev.reserved or not ev.remaining_lots or (ev.stop_price_ticks and not ev.price_ticks and ev.side == _BUY):
        return 0
    return ev.reserved // ev.remaining_lots


def derive_rows(  # noqa: C901 - one pass over every event of a batch, a branch per event kind
    batch: Batch,
    specs: Mapping[str, Instrument],
    progress: Mapping[str, Progress],
    positions: Mapping[str, Mapping[str, Position]],
    scale: Callable[[Instrument], Scale] = Scale,
) -> BatchRows:
    """All rows ``batch`` writes, given each instrument's stored counters and positions.

    Pure: ``progress`` and ``positions`` (instrument -> client -> position) are
    only read. ``scale`` gives each instrument's :class:`Scale` for the NUMERIC
    columns (Decimals by default). Raises :class:`RowError` for an instrument missing from
    ``specs`` or a batch whose sequence numbers are not consecutive.
    """
    out = BatchRows()
    events_append = out.events.append
    trades_append = out.trades.append
    offsets = out.offsets
    state: dict[str, _Instrument] = {}
    encode = _encode
    inst: _Instrument | None = None
    symbol = ""
    expected = 0
    new: dict[int, list[Any]] = {}
    price_of: Callable[[int], Any] = int
    qty_of: Callable[[int], Any] = int
    for item in batch.applied:
        pos = item.position
        if pos is not None:
            key = (item.instrument, pos.topic, pos.partition)
            if offsets.get(key, -1) < pos.offset:
                offsets[key] = pos.offset
        events = item.events
        if not events:
            continue
        if item.instrument is not symbol:  # another instrument than the previous record's
            if inst is not None:
                inst.last_seq = expected - 1
            symbol = item.instrument
            inst = state.get(symbol)
            if inst is None:
                spec = specs.get(symbol)
                if spec is None:
                    raise RowError(f"instrument {symbol!r} is not configured in this store")
                inst = state[symbol] = _Instrument(spec, progress.get(symbol) or Progress(),
                                                    positions.get(symbol) or {}, scale(spec))
                inst.first_seq = events[0].seq
                inst.last_seq = inst.first_seq - 1
            price_of, qty_of = inst.scale.price, inst.scale.qty
            new = inst.new
            expected = inst.last_seq + 1
        assert inst is not None
        for ev in events:
            seq = ev.seq
            if seq != expected or ev.instrument != symbol:
                raise RowError(f"{symbol}: event {ev.instrument}/{seq} where {symbol}/{expected} was expected; "
                               "a batch must hold each instrument's events in consecutive sequence order")
            expected = seq + 1
            ts = ev.ts_ns
            if isinstance(ev, OrderAccepted):
                oid = ev.order_id
                qty = shown = ev.qty_lots
                display = ev.display_qty_lots
                if display:  # an iceberg: what it shows if it rests untraded (its taker fills cut it again)
                    inst.taking[oid] = display
                    if display < qty:
                        shown = display
                new[oid] = [symbol, seq, oid, ev.client_id, ev.client_order_id, ev.side, ev.order_type, ev.tif,
                            ev.price_ticks, qty, shown, 0, "open", seq, ev.expire_ns, ev.post_only,
                            ev.stp, None, None, ts, seq, ts, None, None,  # price, qty: at the end of the batch
                            ev.reserved // qty if ev.reserved and not ev.funds else 0,
                            ev.stop_price_ticks, 0, display, qty - shown, ev.funds]
                inst.next_order_id = oid + 1
                if ev.balances:
                    _moved(inst, ev.balances, seq)
                events_append((symbol, seq, ts, "accepted", oid, ev.client_id, encode(ev)))
            elif isinstance(ev, OrderFilled):
                lots = ev.qty_lots
                price = ev.price_ticks
                maker_left = ev.maker_remaining_lots
                taker_left = ev.taker_remaining_lots
                maker, taker = ev.maker_order_id, ev.taker_order_id
                _touch(inst, maker, maker_left, lots, "partially_filled" if maker_left else "filled", seq, ts)
                cut = inst.taking.get(taker) if inst.taking else None
                if cut is None:
                    _touch(inst, taker, taker_left, lots, "partially_filled" if taker_left else "filled", seq, ts)
                else:  # an iceberg matching as a taker: what it would show and hide if it rested now
                    shown = cut if cut < taker_left else taker_left
                    _touch(inst, taker, shown, lots, "partially_filled" if taker_left else "filled", seq, ts,
                           taker_left - shown)
                if not maker_left and not taker_left:
                    _maker_first(inst, maker, taker)
                inst.next_trade_id = ev.trade_id + 1
                aggressor = ev.aggressor_side
                mc, tc = ev.maker_client_id, ev.taker_client_id
                changed, old = inst.positions, inst.old_positions
                p = changed.get(mc) or old.get(mc) or _ZERO
                changed[mc] = apply_fill(p, _SELL if aggressor is _BUY or aggressor == "buy" else _BUY,
                                         price, lots)
                p = changed.get(tc) or old.get(tc) or _ZERO
                changed[tc] = apply_fill(p, aggressor, price, lots)
                inst.position_seq[mc] = inst.position_seq[tc] = seq
                if ev.balances:
                    _moved(inst, ev.balances, seq)
                trades_append((symbol, ev.trade_id, seq, ts, price, lots, price_of(price), qty_of(lots), aggressor,
                               maker, mc, ev.maker_client_order_id, taker, tc, ev.taker_client_order_id))
                events_append((symbol, seq, ts, "filled", taker, tc, encode(ev)))
            elif isinstance(ev, OrderCanceled):
                _touch(inst, ev.order_id, 0, 0, "canceled", seq, ts, 0)
                if ev.balances:
                    _moved(inst, ev.balances, seq)
                events_append((symbol, seq, ts, "canceled", ev.order_id, ev.client_id, encode(ev)))
            elif isinstance(ev, OrderRejected):
                if ev.command == "place":
                    inst.rejected.append((symbol, seq, None, ev.client_id, ev.client_order_id, None, None, None,
                                          None, None, 0, 0, "rejected", None, 0, False, None, ev.reason, ev.text,
                                          ts, seq, ts, None, None, 0, 0, 0, 0, 0, 0))
                elif ev.transfer_id and ev.reason == _INSUFFICIENT_FUNDS:  # remembered, as the engine does
                    out.transfers.append((symbol, ev.transfer_id, ev.client_id, None, ev.command, None, None,
                                          "refused", refused(seq, _INSUFFICIENT_FUNDS.value, ev.text), seq, ts))
                events_append((symbol, seq, ts, "rejected", ev.order_id, ev.client_id, encode(ev)))
            elif isinstance(ev, OrderAmended):
                oid = ev.order_id
                hidden = ev.hidden_lots  # (an iceberg's: the rest shows)
                rec = new.get(oid)
                if rec is not None:
                    rec[_PRICE] = ev.price_ticks
                    rec[_QTY] = ev.qty_lots
                    rec[_REMAINING] = ev.remaining_lots - hidden
                    rec[_HIDDEN] = hidden
                    if ev.stop_price_ticks:
                        rec[_STOP] = ev.stop_price_ticks
                    if ev.requeued:
                        rec[_PRIORITY] = seq
                        rec[_RATE] = _amended_rate(ev)
                    rec[_UPDATED_SEQ] = seq
                    rec[_UPDATED_TS] = ts
                else:
                    upd = inst.updates.get(oid)
                    if upd is None:
                        upd = inst.updates[oid] = [symbol, oid, 0, 0, None, None, None, None, seq, ts, None, None,
                                                   None, None]
                    upd[_U_REMAINING] = ev.remaining_lots - hidden
                    upd[_U_HIDDEN] = hidden
                    upd[_U_QTY] = ev.qty_lots
                    upd[_U_PRICE] = ev.price_ticks
                    if ev.stop_price_ticks:
                        upd[_U_STOP] = ev.stop_price_ticks
                    if ev.requeued:
                        upd[_U_PRIORITY] = seq
                        upd[_U_RATE] = _amended_rate(ev)
                    upd[_U_SEQ] = seq
                    upd[_U_TS] = ts
                if ev.requeued and not ev.stop_price_ticks:  # it may trade now: an iceberg with all it has
                    if hidden:
                        inst.taking[oid] = ev.remaining_lots - hidden
                    elif inst.taking:
                        inst.taking.pop(oid, None)
                if ev.balances:
                    _moved(inst, ev.balances, seq)
                events_append((symbol, seq, ts, "amended", oid, ev.client_id, encode(ev)))
            elif isinstance(ev, OrderExpired):
                _touch(inst, ev.order_id, 0, 0, "expired", seq, ts, 0)
                if ev.balances:
                    _moved(inst, ev.balances, seq)
                events_append((symbol, seq, ts, "expired", ev.order_id, ev.client_id, encode(ev)))
            elif isinstance(ev, OrderTriggered):  # a waiting stop (remaining = qty) takes a place at this seq
                _queued(inst, ev.order_id, ev.qty_lots, None, None, seq, ts, triggered=True)
                events_append((symbol, seq, ts, "triggered", ev.order_id, ev.client_id, encode(ev)))
            elif isinstance(ev, OrderReplenished):  # (right after the fill that emptied the slice: open again)
                _queued(inst, ev.order_id, ev.shown_lots, ev.hidden_lots, "partially_filled", seq, ts)
                events_append((symbol, seq, ts, "replenished", ev.order_id, ev.client_id, encode(ev)))
            elif isinstance(ev, InstrumentHalted | InstrumentResumed):
                inst.halted = isinstance(ev, InstrumentHalted)
                events_append((symbol, seq, ts, "halted" if inst.halted else "resumed", None, ev.client_id,
                               encode(ev)))
            elif isinstance(ev, BookCleared):
                events_append((symbol, seq, ts, "cleared", None, ev.client_id, encode(ev)))
            elif isinstance(ev, Deposited | Withdrawn):
                kind = "deposit" if isinstance(ev, Deposited) else "withdraw"
                asset, units, client = ev.asset, ev.amount, ev.client_id
                out.transfers.append((symbol, ev.transfer_id, client, asset, kind, units,
                                      inst.scale.amount(asset, units), "applied",
                                      transfer_outcome(inst.spec, kind, asset, units, client, seq), seq, ts))
                _moved(inst, ev.balances, seq)
                events_append((symbol, seq, ts, "deposited" if kind == "deposit" else "withdrawn", None, client,
                               encode(ev)))
            else:
                raise RowError(f"{symbol}: not an event: {ev!r}")
    if inst is not None:
        inst.last_seq = expected - 1

    for symbol, inst in state.items():
        sc = inst.scale
        price_of, qty_of = sc.price, sc.qty
        new_orders = out.new_orders
        for rec in inst.new.values():  # COPY takes the lists as they are
            price = rec[_PRICE]
            rec[_PRICE_VALUE] = price_of(price) if price else None
            rec[_QTY_VALUE] = qty_of(rec[_QTY])
            new_orders.append(rec)
        new_orders.extend(inst.rejected)
        out.order_updates.extend(map(tuple, inst.updates.values()))
        if inst.positions:
            out.positions[symbol] = inst.positions
            out.position_rows.extend(
                (client, symbol, p.net_lots, p.cost, p.realized, inst.position_seq[client])
                for client, p in inst.positions.items())
        if inst.balances:
            out.balance_rows.extend((symbol, client, asset, available, reserved, seq) for (client, asset), (
                available, reserved, seq) in sorted(inst.balances.items()))
        out.first_seq[symbol] = inst.first_seq
        out.progress[symbol] = Progress(inst.last_seq, inst.next_order_id, inst.next_trade_id, inst.halted)

    for (topic, partition), offset in batch.partitions.items():  # the partition's own row: instrument ""
        offsets[("", topic, partition)] = offset
    latest: dict[tuple[str, int], SnapshotRequest] = {}  # two snapshots with no command between share a seq
    for snap in batch.snapshots:
        if snap.instrument not in specs:
            raise RowError(f"snapshot of instrument {snap.instrument!r}, which is not configured in this store")
        latest[(snap.instrument, snap.state.seq)] = snap
    for (symbol, seq), snap in latest.items():
        out.snapshots.append((symbol, seq, snap.state_hash, len(snap.state.orders), encode(snap.state)))
    return out
