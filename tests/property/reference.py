"""A deliberately naive reference order book for differential testing of the matching core.

It implements the rules stated in the docstrings of :mod:`exchange.core.matching`,
:mod:`exchange.core.commands`, :mod:`exchange.core.types` and :mod:`exchange.core.instruments`
*independently* of :mod:`exchange.core.book` and :mod:`exchange.core.matching` (neither is
imported here): each side is a plain Python list of orders, re-sorted by
``(price, arrival counter)`` before every look at it, and every lookup is a
linear scan. Speed is irrelevant; obviousness is the point.

Rules as implemented (and as the tests hold the engine to):

- Price-time priority; a trade happens at the maker's price; one fill per
  maker; a partially filled maker keeps its place.
- Market orders are IOC or FOK and never rest; the event price of a market order
  is 0. With ``price_band_bps`` they only trade at prices within that many basis
  points of the best opposite price at arrival (buy: ``p <= best * (1 + bps/1e4)``,
  sell: ``p >= best * (1 - bps/1e4)``, exact rational comparison).
- IOC remainders are canceled (``ioc_remainder``, also for market orders); FOK
  either fills completely or is accepted then canceled ``fok_unfilled`` without
  touching the book. Whether a FOK can fill is decided by running the match on a
  deep copy of the whole reference (so STP is honoured exactly as in matching).
- Post-only is only for GTC/GTD limit orders (else ``invalid_order``); a
  post-only order (or amend) that would cross the opposite best is rejected
  ``post_only_would_trade``, even if the only crossing orders are the owner's.
- STP follows the incoming order's mode (the instrument default when the
  command names none; for an amend, the mode the order was placed with).
- Amend: ``qty`` is the new total; it must exceed the filled quantity. Same
  price and a lower total keeps priority; anything else re-queues at the back
  and, if the new price crosses, trades at once as the taker.
- GTD orders expire (``OrderExpired``) when a command's ``ts_ns`` reaches their
  ``expire_ns``; expiries are processed before that command, oldest expiry
  first (ties by order id). ``expire_ns`` must be a positive time after the order's ``ts_ns``.
- Client order ids that are live, or finished and still remembered, are
  duplicates. A finished order is remembered iff it is among its client's
  ``dedupe_per_client`` most recently finished orders and among the
  ``dedupe_window`` most recent of those: :func:`dedupe_window` recomputes that
  from the whole history of finished orders after every finish.
- Clear: a ``cleared`` event (operator, note, number of open orders) comes
  first, also on an empty book, then every resting order is canceled
  ``cleared`` in priority order.
- Halt: while halted, every place and every amend is rejected
  ``instrument_halted`` before any other check (an amend carries the order id
  it named, a place none); cancels, cancel-all, clear and expiry go on. Halting
  a halted instrument is rejected ``instrument_halted``, resuming a trading one
  ``not_halted`` (``command`` "halt"/"resume", no client order id).
- Validation order of a place (first failing check wins): enums (``malformed``),
  ids (``malformed``), quantity, limit price, market+GTC/GTD, post-only
  combination, GTD expiry, expiry without GTD, duplicate live, duplicate
  finished. A duplicate's rejection carries the original order's id.

Rejection ``text`` is free-form prose: the reference leaves it empty and the
tests compare rejections with the text blanked out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from exchange.core.commands import (
    AmendOrder,
    CancelAll,
    CancelOrder,
    ClearBook,
    HaltInstrument,
    PlaceOrder,
    RejectInput,
    ResumeInstrument,
)
from exchange.core.events import (
    BookCleared,
    InstrumentHalted,
    InstrumentResumed,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderExpired,
    OrderFilled,
    OrderRejected,
)
from exchange.core.types import CancelReason, OrderType, RejectReason, Side, StpMode, TimeInForce

__all__ = ["RefOrder", "ReferenceBook", "dedupe_window"]


def dedupe_window(history: list[tuple[str, str, int]], size: int, per_client: int) -> list[tuple[str, str, int]]:
    """The remembered entries of a history of finished orders (oldest first), straight from the rule.

    First the orders among their client's ``per_client`` most recently finished, then the ``size``
    most recent of those.
    """
    if size <= 0:
        return []
    recent_for_client = [e for i, e in enumerate(history)
                         if sum(1 for later in history[i + 1:] if later[0] == e[0]) < per_client]
    return recent_for_client[-size:]


@dataclass
class RefOrder:
    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    price: int
    qty: int  # total: filled + open
    remaining: int  # open
    arrival: int  # queue position counter: larger = later
    gtd: bool
    expire_ns: int
    post_only: bool
    stp: StpMode


def _enum(enum: type[Any], value: object) -> Any:
    try:
        return enum(value)
    except ValueError:
        return None


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is not a quantity


def _command_name(cmd: object) -> str:
    if isinstance(cmd, RejectInput):
        return cmd.command
    if isinstance(cmd, PlaceOrder):
        return "place"
    if isinstance(cmd, CancelOrder):
        return "cancel"
    if isinstance(cmd, AmendOrder):
        return "amend"
    if isinstance(cmd, CancelAll):
        return "cancel_all"
    if isinstance(cmd, ClearBook):
        return "clear"
    if isinstance(cmd, HaltInstrument):
        return "halt"
    if isinstance(cmd, ResumeInstrument):
        return "resume"
    return "unknown"


class ReferenceBook:
    """One instrument's book, the slow and obvious way."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.symbol: str = spec.symbol
        self.bids: list[RefOrder] = []
        self.asks: list[RefOrder] = []
        self.seq = 0
        self.next_order_id = 1
        self.next_trade_id = 1
        self.arrivals = 0
        self.finished: list[tuple[str, str, int]] = []  # every finished order, in finish order
        self._done: tuple[int, list[tuple[str, str, int]]] = (0, [])  # (len(finished), dedupe_window(finished))
        self.events: list[Any] = []
        self.ts = 0
        self.halted = False

    # ------------------------------------------------------------ queries

    def _sort(self) -> None:
        self.bids.sort(key=lambda o: (-o.price, o.arrival))
        self.asks.sort(key=lambda o: (o.price, o.arrival))

    def orders(self) -> list[RefOrder]:
        """Every resting order: bids best first, then asks best first, FIFO within a price."""
        self._sort()
        return [*self.bids, *self.asks]

    def side_list(self, side: Side) -> list[RefOrder]:
        self._sort()
        return self.bids if side == Side.BUY else self.asks

    def opposite(self, side: Side) -> list[RefOrder]:
        return self.side_list(Side.SELL if side == Side.BUY else Side.BUY)

    def live(self, client: str, coid: str) -> RefOrder | None:
        for o in self.orders():
            if o.client_id == client and o.client_order_id == coid:
                return o
        return None

    def by_id(self, oid: object) -> RefOrder | None:
        for o in self.orders():
            if o.order_id == oid:
                return o
        return None

    def in_done(self, client: str, coid: str) -> bool:
        return self.done_id(client, coid) is not None

    def done_id(self, client: str, coid: str) -> int | None:
        for c, k, oid in self.done:
            if c == client and k == coid:
                return oid
        return None

    # ------------------------------------------------------------ mutation helpers

    def _emit(self, cls: type[Any], **fields: Any) -> None:
        self.seq += 1
        self.events.append(cls(instrument=self.symbol, seq=self.seq, ts_ns=self.ts, **fields))

    def _reject(self, client: str, coid: str | None, oid: int | None, command: str, reason: RejectReason) -> None:
        self._emit(OrderRejected, client_id=client, client_order_id=coid, order_id=oid, command=command,
                   reason=reason, text="")

    def _remember(self, client: str, coid: str, oid: int) -> None:
        self.finished.append((client, coid, oid))

    @property
    def done(self) -> list[tuple[str, str, int]]:
        """The remembered finished orders, oldest first (recomputed from the whole history when it grew)."""
        if self._done[0] != len(self.finished):
            self._done = (len(self.finished), dedupe_window(self.finished, self.spec.dedupe_window,
                                                            self.spec.dedupe_per_client))
        return self._done[1]

    def _take_out(self, order: RefOrder) -> None:
        lst = self.bids if order.side == Side.BUY else self.asks
        for i, o in enumerate(lst):
            if o is order:
                del lst[i]
                return
        raise AssertionError(f"reference lost {order}")

    def _queue(self, order: RefOrder) -> None:
        self.arrivals += 1
        order.arrival = self.arrivals
        (self.bids if order.side == Side.BUY else self.asks).append(order)

    def _acceptable(self, side: Side, limit: Fraction | None) -> Any:
        """Predicate on a maker price: may an incoming order of ``side`` with this limit trade there?

        ``limit`` None means no price limit at all.
        """
        if limit is None:
            return lambda p: True
        if side == Side.BUY:
            return lambda p: p <= limit
        return lambda p: p >= limit

    # ------------------------------------------------------------ API

    def apply(self, cmd: Any) -> list[Any]:
        self.events = []
        self.ts = cmd.ts_ns
        self._expire()
        instrument = cmd.instrument
        if instrument is not None and instrument != self.symbol:
            self._reject(getattr(cmd, "client_id", ""), getattr(cmd, "client_order_id", None), None,
                         _command_name(cmd), RejectReason.UNKNOWN_INSTRUMENT)
            return self.events
        if isinstance(cmd, PlaceOrder | AmendOrder) and self.halted:
            self._reject(cmd.client_id, cmd.client_order_id, getattr(cmd, "order_id", None),
                         _command_name(cmd), RejectReason.INSTRUMENT_HALTED)
        elif isinstance(cmd, PlaceOrder):
            self._place(cmd)
        elif isinstance(cmd, CancelOrder):
            self._cancel(cmd)
        elif isinstance(cmd, AmendOrder):
            self._amend(cmd)
        elif isinstance(cmd, HaltInstrument | ResumeInstrument):
            halting = isinstance(cmd, HaltInstrument)
            if self.halted == halting:
                self._reject(cmd.client_id, None, None, _command_name(cmd),
                             RejectReason.INSTRUMENT_HALTED if halting else RejectReason.NOT_HALTED)
            else:
                self.halted = halting
                self._emit(InstrumentHalted if halting else InstrumentResumed, client_id=cmd.client_id,
                           text=cmd.text)
        elif isinstance(cmd, CancelAll):
            self._cancel_all(cmd)
        elif isinstance(cmd, ClearBook):
            self._clear(cmd)
        elif isinstance(cmd, RejectInput):
            self._emit(OrderRejected, client_id=cmd.client_id, client_order_id=cmd.client_order_id, order_id=None,
                       command=cmd.command, reason=cmd.reason, text="")
        else:
            raise TypeError(cmd)
        return self.events

    # ------------------------------------------------------------ expiry

    def _expire(self) -> None:
        due = [o for o in self.orders() if o.gtd and o.expire_ns <= self.ts]
        due.sort(key=lambda o: (o.expire_ns, o.order_id))
        for o in due:
            self._take_out(o)
            self._emit(OrderExpired, order_id=o.order_id, client_id=o.client_id, client_order_id=o.client_order_id,
                       side=o.side, price_ticks=o.price, expired_lots=o.remaining)
            self._remember(o.client_id, o.client_order_id, o.order_id)

    # ------------------------------------------------------------ place

    def _place_error(self, cmd: PlaceOrder) -> RejectReason | None:
        spec = self.spec
        side, otype, tif = _enum(Side, cmd.side), _enum(OrderType, cmd.order_type), _enum(TimeInForce, cmd.tif)
        stp = _enum(StpMode, spec.stp_default if cmd.stp is None else cmd.stp)
        if side is None or otype is None or tif is None or stp is None:
            return RejectReason.MALFORMED
        for ident in (cmd.client_id, cmd.client_order_id):
            if not isinstance(ident, str) or ident == "":
                return RejectReason.MALFORMED
        if not _is_int(cmd.qty_lots) or not spec.min_qty_lots <= cmd.qty_lots <= spec.max_qty_lots:
            return RejectReason.INVALID_QUANTITY
        if otype == OrderType.LIMIT and (
                not _is_int(cmd.price_ticks) or not 0 < cmd.price_ticks <= spec.max_price_ticks):
            return RejectReason.INVALID_PRICE
        if otype == OrderType.MARKET and tif in (TimeInForce.GTC, TimeInForce.GTD):
            return RejectReason.INVALID_ORDER
        if cmd.post_only and (otype == OrderType.MARKET or tif not in (TimeInForce.GTC, TimeInForce.GTD)):
            return RejectReason.INVALID_ORDER
        if tif == TimeInForce.GTD and (not _is_int(cmd.expire_ns) or cmd.expire_ns <= cmd.ts_ns or cmd.expire_ns <= 0):
            return RejectReason.INVALID_EXPIRY
        if tif != TimeInForce.GTD and cmd.expire_ns != 0:
            return RejectReason.INVALID_EXPIRY
        if self.live(cmd.client_id, cmd.client_order_id) is not None:
            return RejectReason.DUPLICATE_CLIENT_ORDER_ID
        if self.in_done(cmd.client_id, cmd.client_order_id):
            return RejectReason.DUPLICATE_CLIENT_ORDER_ID
        return None

    def _market_limit(self, side: Side) -> tuple[bool, Fraction | None]:
        """(can trade at all, price limit or None for unlimited) of a market order arriving now."""
        opp = self.opposite(side)
        if not opp:
            return False, None
        bps = self.spec.price_band_bps
        if bps is None:
            return True, None
        best = opp[0].price
        if side == Side.BUY:
            return True, Fraction(best) * (10_000 + bps) / 10_000
        return True, Fraction(best) * (10_000 - bps) / 10_000

    def _place(self, cmd: PlaceOrder) -> None:
        error = self._place_error(cmd)
        client, coid = cmd.client_id, cmd.client_order_id
        if error is not None:
            original = None
            if error == RejectReason.DUPLICATE_CLIENT_ORDER_ID:  # the rejection names the original order
                live = self.live(client, coid)
                original = live.order_id if live is not None else self.done_id(client, coid)
            self._reject(client, coid, original, "place", error)
            return
        side, otype, tif = Side(cmd.side), OrderType(cmd.order_type), TimeInForce(cmd.tif)
        stp = StpMode(self.spec.stp_default if cmd.stp is None else cmd.stp)
        qty = cmd.qty_lots
        if otype == OrderType.LIMIT:
            price = cmd.price_ticks
            can_trade, limit = True, Fraction(price)
        else:
            price = 0
            can_trade, limit = self._market_limit(side)
        ok = self._acceptable(side, limit)
        opp = self.opposite(side)
        crosses = can_trade and bool(opp) and ok(opp[0].price)
        if cmd.post_only and crosses:
            self._reject(client, coid, None, "place", RejectReason.POST_ONLY_WOULD_TRADE)
            return

        oid = self.next_order_id
        self.next_order_id += 1
        self._emit(OrderAccepted, order_id=oid, client_id=client, client_order_id=coid, side=side, order_type=otype,
                   price_ticks=price, qty_lots=qty, tif=tif, post_only=cmd.post_only, stp=stp,
                   expire_ns=cmd.expire_ns)

        def cancel_incoming(left: int, reason: CancelReason) -> None:
            self._emit(OrderCanceled, order_id=oid, client_id=client, client_order_id=coid, side=side,
                       price_ticks=price, canceled_lots=left, reason=reason)

        if tif == TimeInForce.FOK:
            fillable = False
            if crosses:
                trial = copy.deepcopy(self)
                left, _ = trial._match(oid, client, coid, side, ok, qty, stp)
                fillable = left == 0
            if not fillable:
                cancel_incoming(qty, CancelReason.FOK_UNFILLED)
                self._remember(client, coid, oid)
                return

        remaining, stopped = qty, False
        if crosses:
            remaining, stopped = self._match(oid, client, coid, side, ok, qty, stp)
        if remaining and stopped:
            cancel_incoming(remaining, CancelReason.SELF_TRADE)
        elif remaining and tif in (TimeInForce.GTC, TimeInForce.GTD):
            self._queue(RefOrder(oid, client, coid, side, price, qty, remaining, 0, tif == TimeInForce.GTD,
                                 cmd.expire_ns, cmd.post_only, stp))
            return
        elif remaining:
            cancel_incoming(remaining, CancelReason.IOC_REMAINDER)
        self._remember(client, coid, oid)

    def _match(self, oid: int, client: str, coid: str, side: Side, ok: Any, remaining: int,
               stp: StpMode) -> tuple[int, bool]:
        """Trade ``remaining`` of an incoming order against the opposite side; (left, stopped by STP)."""
        while remaining > 0:
            opp = self.opposite(side)
            if not opp or not ok(opp[0].price):
                break
            maker = opp[0]
            if stp != StpMode.NONE and maker.client_id == client:
                if stp == StpMode.CANCEL_INCOMING:
                    return remaining, True
                self._take_out(maker)
                self._emit(OrderCanceled, order_id=maker.order_id, client_id=maker.client_id,
                           client_order_id=maker.client_order_id, side=maker.side, price_ticks=maker.price,
                           canceled_lots=maker.remaining, reason=CancelReason.SELF_TRADE)
                self._remember(maker.client_id, maker.client_order_id, maker.order_id)
                if stp == StpMode.CANCEL_BOTH:
                    return remaining, True
                continue
            fill = min(remaining, maker.remaining)
            maker.remaining -= fill
            remaining -= fill
            tid = self.next_trade_id
            self.next_trade_id += 1
            self._emit(OrderFilled, trade_id=tid, price_ticks=maker.price, qty_lots=fill, aggressor_side=side,
                       maker_order_id=maker.order_id, maker_client_id=maker.client_id,
                       maker_client_order_id=maker.client_order_id, maker_remaining_lots=maker.remaining,
                       taker_order_id=oid, taker_client_id=client, taker_client_order_id=coid,
                       taker_remaining_lots=remaining)
            if maker.remaining == 0:
                self._take_out(maker)
                self._remember(maker.client_id, maker.client_order_id, maker.order_id)
        return remaining, False

    # ------------------------------------------------------------ cancel / amend

    def _find(self, client: str, coid: str | None, oid: int | None, command: str) -> RefOrder | None:
        if coid is None and oid is None:
            self._reject(client, coid, oid, command, RejectReason.MALFORMED)
            return None
        if oid is not None:
            order = self.by_id(oid)
            reason = None
            if order is None:
                was_issued = _is_int(oid) and 1 <= oid < self.next_order_id
                reason = RejectReason.TOO_LATE if was_issued else RejectReason.UNKNOWN_ORDER
            elif order.client_id != client:
                reason = RejectReason.NOT_OWNER
            elif coid is not None and order.client_order_id != coid:
                reason = RejectReason.UNKNOWN_ORDER
            if reason is not None:
                self._reject(client, coid, oid, command, reason)
                return None
            return order
        assert coid is not None
        order = self.live(client, coid)
        if order is None:
            reason = RejectReason.TOO_LATE if self.in_done(client, coid) else RejectReason.UNKNOWN_ORDER
            self._reject(client, coid, oid, command, reason)
        return order

    def _cancel_order(self, order: RefOrder, reason: CancelReason) -> None:
        self._take_out(order)
        self._emit(OrderCanceled, order_id=order.order_id, client_id=order.client_id,
                   client_order_id=order.client_order_id, side=order.side, price_ticks=order.price,
                   canceled_lots=order.remaining, reason=reason)
        self._remember(order.client_id, order.client_order_id, order.order_id)

    def _cancel(self, cmd: CancelOrder) -> None:
        order = self._find(cmd.client_id, cmd.client_order_id, cmd.order_id, "cancel")
        if order is not None:
            self._cancel_order(order, CancelReason.REQUESTED)

    def _amend(self, cmd: AmendOrder) -> None:
        order = self._find(cmd.client_id, cmd.client_order_id, cmd.order_id, "amend")
        if order is None:
            return
        spec = self.spec
        new_price = order.price if cmd.price_ticks is None else cmd.price_ticks
        new_qty = order.qty if cmd.qty_lots is None else cmd.qty_lots
        filled = order.qty - order.remaining
        error = None
        if cmd.price_ticks is None and cmd.qty_lots is None:
            error = RejectReason.INVALID_AMEND
        elif not _is_int(new_price) or not 0 < new_price <= spec.max_price_ticks:
            error = RejectReason.INVALID_PRICE
        elif not _is_int(new_qty) or not spec.min_qty_lots <= new_qty <= spec.max_qty_lots:
            error = RejectReason.INVALID_QUANTITY
        elif new_qty <= filled or (new_price == order.price and new_qty == order.qty):
            error = RejectReason.INVALID_AMEND  # must stay above the filled part; must change something
        ok = None
        crosses = False
        if error is None:
            ok = self._acceptable(order.side, Fraction(new_price))
            opp = self.opposite(order.side)
            crosses = bool(opp) and ok(opp[0].price)
            if order.post_only and crosses:
                error = RejectReason.POST_ONLY_WOULD_TRADE
        if error is not None:
            self._reject(order.client_id, order.client_order_id, order.order_id, "amend", error)
            return

        old_price, old_qty = order.price, order.qty
        if new_price == old_price and new_qty < old_qty:
            order.remaining -= old_qty - new_qty
            order.qty = new_qty
            self._emit(OrderAmended, order_id=order.order_id, client_id=order.client_id,
                       client_order_id=order.client_order_id, side=order.side, old_price_ticks=old_price,
                       price_ticks=new_price, old_qty_lots=old_qty, qty_lots=new_qty, remaining_lots=order.remaining,
                       requeued=False)
            return

        self._take_out(order)
        remaining = new_qty - filled
        self._emit(OrderAmended, order_id=order.order_id, client_id=order.client_id,
                   client_order_id=order.client_order_id, side=order.side, old_price_ticks=old_price,
                   price_ticks=new_price, old_qty_lots=old_qty, qty_lots=new_qty, remaining_lots=remaining,
                   requeued=True)
        stopped = False
        if crosses:
            remaining, stopped = self._match(order.order_id, order.client_id, order.client_order_id, order.side, ok,
                                             remaining, order.stp)
        order.price, order.qty, order.remaining = new_price, new_qty, remaining
        if remaining and not stopped:
            self._queue(order)
            return
        if remaining:
            self._emit(OrderCanceled, order_id=order.order_id, client_id=order.client_id,
                       client_order_id=order.client_order_id, side=order.side, price_ticks=new_price,
                       canceled_lots=remaining, reason=CancelReason.SELF_TRADE)
        self._remember(order.client_id, order.client_order_id, order.order_id)

    def _cancel_all(self, cmd: CancelAll) -> None:
        mine = sorted((o for o in self.orders() if o.client_id == cmd.client_id), key=lambda o: o.order_id)
        for o in mine:
            self._cancel_order(o, CancelReason.REQUESTED)

    def _clear(self, cmd: ClearBook) -> None:
        orders = self.orders()
        self._emit(BookCleared, client_id=cmd.client_id, text=cmd.text, orders=len(orders))
        for o in orders:
            self._cancel_order(o, CancelReason.CLEARED)
