"""Small builders for commands and expected events, shared by the unit tests of the pure core.

Prices are ticks and quantities lots of the test instrument ``T`` (tick 0.01, lot 1).
Expected events are written in full: ``seq`` first, then the fields that matter,
with defaults for the rest (owner ``alice``, ``ts_ns`` 0, GTC limit, no STP).
"""

from __future__ import annotations

from typing import Any

from exchange import (
    AmendOrder,
    CancelOrder,
    CancelReason,
    Command,
    Event,
    Instrument,
    MatchingEngine,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderExpired,
    OrderFilled,
    OrderRejected,
    OrderType,
    PlaceOrder,
    RejectReason,
    Side,
    StpMode,
    TimeInForce,
)

SYM = "T"
ALICE, BOB, CAROL = "alice", "bob", "carol"
BUY, SELL = Side.BUY, Side.SELL
LIMIT, MARKET = OrderType.LIMIT, OrderType.MARKET
GTC, IOC, FOK, GTD = TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK, TimeInForce.GTD
REQUESTED = CancelReason.REQUESTED
IOC_REMAINDER = CancelReason.IOC_REMAINDER
FOK_UNFILLED = CancelReason.FOK_UNFILLED
SELF_TRADE = CancelReason.SELF_TRADE
CLEARED = CancelReason.CLEARED


class _AnyText:
    """Equal to any non-empty string.

    Rejection texts are for humans; tests pin the machine-readable ``reason``
    exactly and only require that some explanation is given.
    """

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other.strip())

    def __repr__(self) -> str:
        return "ANY_TEXT"


ANY_TEXT: Any = _AnyText()


# ----------------------------------------------------------------- engines


def make_spec(symbol: str = SYM, tick_size: str = "0.01", lot_size: str = "1", **kwargs: Any) -> Instrument:
    return Instrument.from_decimals(symbol, tick_size=tick_size, lot_size=lot_size, **kwargs)


def make_engine(**kwargs: Any) -> MatchingEngine:
    return MatchingEngine(make_spec(**kwargs))


def run(engine: MatchingEngine, *commands: Command) -> list[Event]:
    """Apply commands in order, checking the book's invariants after each; all events."""
    events: list[Event] = []
    for command in commands:
        events += engine.apply(command)
        engine.book.check_invariants()
    return events


def book(engine: MatchingEngine) -> list[tuple[str, int, str, int]]:
    """The resting book in priority order as ``(side, price, client_order_id, remaining)``.

    Bids best first, then asks best first, FIFO within a level.
    """
    return [(o.side.value, o.price, o.client_order_id, o.remaining) for o in engine.book.iter_orders()]


# ---------------------------------------------------------------- commands


def place(coid: str, side: Side, price: int, qty: int, *, client: str = ALICE, otype: OrderType = LIMIT,
          tif: TimeInForce = GTC, ts: int = 0, post_only: bool = False, stp: StpMode | None = None,
          expire_ns: int = 0, instrument: str = SYM) -> PlaceOrder:
    return PlaceOrder(instrument, client, coid, side, otype, price, qty, tif=tif, ts_ns=ts, post_only=post_only,
                      stp=stp, expire_ns=expire_ns)


def buy(coid: str, price: int, qty: int, **kwargs: Any) -> PlaceOrder:
    return place(coid, BUY, price, qty, **kwargs)


def sell(coid: str, price: int, qty: int, **kwargs: Any) -> PlaceOrder:
    return place(coid, SELL, price, qty, **kwargs)


def market(coid: str, side: Side, qty: int, *, tif: TimeInForce = IOC, **kwargs: Any) -> PlaceOrder:
    return place(coid, side, 0, qty, otype=MARKET, tif=tif, **kwargs)


def cancel(coid: str | None = None, *, oid: int | None = None, client: str = ALICE, ts: int = 0,
           instrument: str = SYM) -> CancelOrder:
    return CancelOrder(instrument, client, client_order_id=coid, order_id=oid, ts_ns=ts)


def amend(coid: str | None = None, *, oid: int | None = None, price: int | None = None, qty: int | None = None,
          client: str = ALICE, ts: int = 0) -> AmendOrder:
    return AmendOrder(SYM, client, client_order_id=coid, order_id=oid, price_ticks=price, qty_lots=qty, ts_ns=ts)


# ------------------------------------------------------------------ events


def accepted(seq: int, oid: int, coid: str, side: Side, price: int, qty: int, *, client: str = ALICE,
             otype: OrderType = LIMIT, tif: TimeInForce = GTC, post_only: bool = False,
             stp: StpMode = StpMode.NONE, expire_ns: int = 0, ts: int = 0, instrument: str = SYM) -> OrderAccepted:
    return OrderAccepted(instrument, seq, ts, oid, client, coid, side, otype, price, qty, tif, post_only, stp,
                         expire_ns)


Party = tuple[int, str, str, int]  # (order_id, client_id, client_order_id, remaining_lots after the fill)


def filled(seq: int, trade_id: int, price: int, qty: int, aggressor: Side, maker: Party, taker: Party, *,
           ts: int = 0) -> OrderFilled:
    return OrderFilled(SYM, seq, ts, trade_id, price, qty, aggressor, *maker, *taker)


def canceled(seq: int, oid: int, coid: str, side: Side, price: int, lots: int, reason: CancelReason = REQUESTED,
             *, client: str = ALICE, ts: int = 0, instrument: str = SYM) -> OrderCanceled:
    return OrderCanceled(instrument, seq, ts, oid, client, coid, side, price, lots, reason)


def rejected(seq: int, reason: RejectReason, coid: str | None = None, *, oid: int | None = None,
             client: str = ALICE, command: str = "place", ts: int = 0, text: str = ANY_TEXT,
             instrument: str = SYM) -> OrderRejected:
    return OrderRejected(instrument, seq, ts, client, coid, oid, command, reason, text)


def amended(seq: int, oid: int, coid: str, side: Side, *, old_price: int, price: int, old_qty: int, qty: int,
            remaining: int, requeued: bool, client: str = ALICE, ts: int = 0) -> OrderAmended:
    return OrderAmended(SYM, seq, ts, oid, client, coid, side, old_price, price, old_qty, qty, remaining, requeued)


def expired(seq: int, oid: int, coid: str, side: Side, price: int, lots: int, *, client: str = ALICE,
            ts: int = 0) -> OrderExpired:
    return OrderExpired(SYM, seq, ts, oid, client, coid, side, price, lots)
