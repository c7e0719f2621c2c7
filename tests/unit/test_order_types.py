"""Stop, stop-limit and iceberg orders in the pure core: exact event lists for every rule.

Prices are ticks and quantities lots of the test instrument ``T`` (see ``_helpers``). A stop waits out of
the book until a trade reaches its stop price; an iceberg shows one slice at a time.
"""

from __future__ import annotations

import pytest

from exchange import (
    ClearBook,
    Command,
    HaltInstrument,
    MatchingEngine,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderExpired,
    OrderType,
    PlaceOrder,
    RejectReason,
    ResumeInstrument,
    Side,
    StpMode,
    TimeInForce,
)
from exchange.core.commands import AmendOrder, CancelAll, Deposit
from exchange.core.events import BookCleared, OrderReplenished, OrderTriggered
from exchange.core.state import StopOrder

from ._helpers import (
    ALICE,
    BOB,
    BUY,
    CAROL,
    CLEARED,
    FOK,
    FOK_UNFILLED,
    GTC,
    GTD,
    IOC,
    IOC_REMAINDER,
    SELF_TRADE,
    SELL,
    SYM,
    accepted,
    book,
    buy,
    cancel,
    canceled,
    filled,
    make_engine,
    make_spec,
    rejected,
    run,
    sell,
)

STOP, STOP_LIMIT = OrderType.STOP, OrderType.STOP_LIMIT
DAVE = "dave"


def stop(coid: str, side: Side, stop_price: int, qty: int, *, client: str = ALICE, price: int = 0,
         tif: TimeInForce = GTC, ts: int = 0, expire_ns: int = 0, funds: int = 0,
         stp: StpMode | None = None) -> PlaceOrder:
    """A stop (market when triggered), or with ``price`` a stop-limit."""
    return PlaceOrder(SYM, client, coid, side, STOP_LIMIT if price else STOP, price, qty, tif=tif, ts_ns=ts,
                      expire_ns=expire_ns, funds=funds, stop_price_ticks=stop_price, stp=stp)


def iceberg(coid: str, side: Side, price: int, qty: int, display: int, *, client: str = ALICE,
            tif: TimeInForce = GTC, stp: StpMode | None = None) -> PlaceOrder:
    return PlaceOrder(SYM, client, coid, side, OrderType.LIMIT, price, qty, tif=tif, display_qty_lots=display,
                      stp=stp)


def stop_accepted(seq: int, oid: int, coid: str, side: Side, stop_price: int, qty: int, *, client: str = ALICE,
                  price: int = 0, tif: TimeInForce = GTC, expire_ns: int = 0) -> OrderAccepted:
    return OrderAccepted(SYM, seq, 0, oid, client, coid, side, STOP_LIMIT if price else STOP, price, qty, tif, False,
                         StpMode.NONE, expire_ns, stop_price_ticks=stop_price)


def ice_accepted(seq: int, oid: int, coid: str, side: Side, price: int, qty: int, display: int, *,
                 client: str = ALICE, tif: TimeInForce = GTC, stp: StpMode = StpMode.NONE) -> OrderAccepted:
    return OrderAccepted(SYM, seq, 0, oid, client, coid, side, OrderType.LIMIT, price, qty, tif, False, stp, 0,
                         display_qty_lots=display)


def triggered(seq: int, oid: int, coid: str, side: Side, stop_price: int, qty: int, trade_id: int, at: int, *,
              client: str = ALICE, price: int = 0) -> OrderTriggered:
    return OrderTriggered(SYM, seq, 0, oid, client, coid, side, STOP_LIMIT if price else STOP, stop_price, price,
                          qty, trade_id, at)


def replenished(seq: int, oid: int, coid: str, side: Side, price: int, shown: int, hidden: int, *,
                client: str = ALICE) -> OrderReplenished:
    return OrderReplenished(SYM, seq, 0, oid, client, coid, side, price, shown, hidden)


def stop_amend(coid: str, *, stop_price: int | None = None, price: int | None = None, qty: int | None = None,
               client: str = ALICE) -> AmendOrder:
    return AmendOrder(SYM, client, coid, price_ticks=price, qty_lots=qty, stop_price_ticks=stop_price)


def stops(engine: MatchingEngine) -> list[tuple[str, str, int, int]]:
    """The waiting stops as ``(coid, side, stop price, priority)``, in trigger order per side (buys first)."""
    state = engine.export_state()

    def key(s: StopOrder) -> tuple[bool, int, int]:
        return s.side != "buy", s.stop_price_ticks if s.side == "buy" else -s.stop_price_ticks, s.priority
    return [(s.client_order_id, s.side.value, s.stop_price_ticks, s.priority) for s in sorted(state.stops, key=key)]


def after_a_trade_at_100() -> MatchingEngine:
    """carol and dave trade 1 lot at 100 (orders 1 and 2, trade 1): the last trade price is 100; nothing rests."""
    engine = make_engine()
    run(engine, sell("c0", 100, 1, client=CAROL), buy("d0", 100, 1, client=DAVE))
    assert engine.last_price == 100
    assert not book(engine)
    return engine


# ------------------------------------------------------------------ stops: arrival


def test_a_stop_waits_unseen_and_one_already_reached_is_rejected() -> None:
    engine = after_a_trade_at_100()
    events = run(engine, stop("b1", BUY, 101, 2), stop("s1", SELL, 99, 2, price=98),
                 stop("b2", BUY, 100, 2), stop("s2", SELL, 100, 2))
    assert events == [
        stop_accepted(4, 3, "b1", BUY, 101, 2),
        stop_accepted(5, 4, "s1", SELL, 99, 2, price=98),
        rejected(6, RejectReason.STOP_WOULD_TRIGGER, "b2"),
        rejected(7, RejectReason.STOP_WOULD_TRIGGER, "s2"),
    ]
    assert book(engine) == []  # not in the book, so not in market data either
    assert stops(engine) == [("b1", "buy", 101, 4), ("s1", "sell", 99, 5)]


def test_before_any_trade_no_stop_is_reached() -> None:
    engine = make_engine()
    assert run(engine, stop("b1", BUY, 1, 1), stop("s1", SELL, 10**6, 1)) == [
        stop_accepted(1, 1, "b1", BUY, 1, 1), stop_accepted(2, 2, "s1", SELL, 10**6, 1)]


@pytest.mark.parametrize(("command", "reason"), [
    (stop("x", BUY, 0, 1), RejectReason.INVALID_PRICE),
    (stop("x", BUY, 105, 1, tif=IOC), RejectReason.INVALID_ORDER),  # a stop waits: GTC or GTD
    (stop("x", BUY, 105, 1, price=-1), RejectReason.INVALID_PRICE),
    (PlaceOrder(SYM, ALICE, "x", BUY, OrderType.LIMIT, 100, 1, stop_price_ticks=105), RejectReason.INVALID_ORDER),
    (PlaceOrder(SYM, ALICE, "x", BUY, STOP_LIMIT, 100, 1, post_only=True, stop_price_ticks=105),
     RejectReason.INVALID_ORDER),
    (PlaceOrder(SYM, ALICE, "x", BUY, STOP_LIMIT, 100, 5, display_qty_lots=2, stop_price_ticks=105),
     RejectReason.INVALID_ORDER),
])
def test_malformed_stops_are_rejected(command: PlaceOrder, reason: RejectReason) -> None:
    engine = after_a_trade_at_100()
    assert run(engine, command) == [rejected(4, reason, "x")]


# ------------------------------------------------------------------ stops: triggering


def test_a_buy_stop_triggers_at_its_price_and_trades_as_a_market_order() -> None:
    engine = after_a_trade_at_100()
    events = run(engine,
                 stop("st", BUY, 102, 3),                       # order 3
                 sell("a1", 102, 1, client=BOB),                # order 4
                 sell("a2", 103, 1, client=BOB),                # order 5
                 buy("t1", 102, 1, client=CAROL))               # order 6: trade 2 at 102 reaches the stop
    assert events[-5:] == [
        accepted(7, 6, "t1", BUY, 102, 1, client=CAROL),
        filled(8, 2, 102, 1, BUY, (4, BOB, "a1", 0), (6, CAROL, "t1", 0)),
        triggered(9, 3, "st", BUY, 102, 3, 2, 102),
        filled(10, 3, 103, 1, BUY, (5, BOB, "a2", 0), (3, ALICE, "st", 2)),
        canceled(11, 3, "st", BUY, 0, 2, IOC_REMAINDER),  # a stop is a market order once triggered: IOC
    ]
    assert engine.last_price == 103
    assert stops(engine) == []
    assert book(engine) == []


def test_a_sell_stop_triggers_on_a_trade_below_it_not_only_at_it() -> None:
    engine = after_a_trade_at_100()
    events = run(engine, stop("st", SELL, 99, 1, price=97),  # order 3: a stop-limit
                 buy("b1", 98, 2, client=BOB),               # order 4
                 sell("t1", 98, 1, client=CAROL))            # order 5: trade at 98 (below 99)
    assert events[-3:] == [
        filled(7, 2, 98, 1, SELL, (4, BOB, "b1", 1), (5, CAROL, "t1", 0)),
        triggered(8, 3, "st", SELL, 99, 1, 2, 98, price=97),
        filled(9, 3, 98, 1, SELL, (4, BOB, "b1", 0), (3, ALICE, "st", 0)),
    ]


def test_a_triggered_stop_limit_that_does_not_fill_rests_with_the_trigger_as_its_priority() -> None:
    engine = after_a_trade_at_100()
    events = run(engine, stop("st", BUY, 101, 5, price=101),   # order 3
                 sell("a1", 101, 2, client=BOB),               # order 4
                 buy("t1", 101, 1, client=CAROL))              # order 5
    assert events[-3:] == [
        filled(7, 2, 101, 1, BUY, (4, BOB, "a1", 1), (5, CAROL, "t1", 0)),
        triggered(8, 3, "st", BUY, 101, 5, 2, 101, price=101),
        filled(9, 3, 101, 1, BUY, (4, BOB, "a1", 0), (3, ALICE, "st", 4)),
    ]
    assert book(engine) == [("buy", 101, "st", 4)]
    assert engine.book.orders[3].priority == 8
    assert stops(engine) == []


def test_a_cascade_triggers_by_trade_then_nearest_stop_then_arrival_and_a_triggered_stop_triggers_more() -> None:
    engine = after_a_trade_at_100()
    run(engine,
        stop("far", SELL, 97, 1, client=BOB),            # order 3: reached only by the cascade
        stop("near2", SELL, 99, 1),                      # order 4: same stop price as near1, but later ...
        stop("mid", SELL, 98, 1, client=CAROL),          # order 5
        buy("b99", 99, 1, client=DAVE),                  # order 6
        buy("b98", 98, 2, client=DAVE),                  # order 7
        buy("b96", 96, 5, client=DAVE))                  # order 8
    run(engine, stop("near1", SELL, 99, 1, client=BOB))  # order 9: after near2 in arrival
    events = run(engine, sell("t", 99, 1, client=CAROL))  # order 10: trade 2 at 99 reaches near2, near1
    assert events == [
        accepted(11, 10, "t", SELL, 99, 1, client=CAROL),
        filled(12, 2, 99, 1, SELL, (6, DAVE, "b99", 0), (10, CAROL, "t", 0)),
        triggered(13, 4, "near2", SELL, 99, 1, 2, 99),                   # 99 before 98; near2 arrived first
        filled(14, 3, 98, 1, SELL, (7, DAVE, "b98", 1), (4, ALICE, "near2", 0)),  # trade 3 at 98 reaches mid
        triggered(15, 9, "near1", SELL, 99, 1, 2, 99, client=BOB),
        filled(16, 4, 98, 1, SELL, (7, DAVE, "b98", 0), (9, BOB, "near1", 0)),
        triggered(17, 5, "mid", SELL, 98, 1, 3, 98, client=CAROL),        # queued by trade 3, behind near1
        filled(18, 5, 96, 1, SELL, (8, DAVE, "b96", 4), (5, CAROL, "mid", 0)),  # trade 5 at 96 reaches far
        triggered(19, 3, "far", SELL, 97, 1, 5, 96, client=BOB),
        filled(20, 6, 96, 1, SELL, (8, DAVE, "b96", 3), (3, BOB, "far", 0)),
    ]
    assert engine.last_price == 96
    assert stops(engine) == []


def test_stops_wait_through_a_halt_and_trigger_after_resume() -> None:
    engine = after_a_trade_at_100()
    run(engine, stop("st", BUY, 101, 1), sell("a1", 101, 2, client=BOB), HaltInstrument(SYM, "op", "why"))
    events = run(engine, stop("st2", BUY, 105, 1), cancel("st"))
    assert events == [rejected(7, RejectReason.INSTRUMENT_HALTED, "st2"),
                      canceled(8, 3, "st", BUY, 0, 1)]
    events = run(engine, ResumeInstrument(SYM, "op", "ok"), stop("st3", BUY, 101, 1, client=CAROL),
                 buy("t", 101, 1, client=DAVE))
    assert events[2:] == [
        accepted(11, 6, "t", BUY, 101, 1, client=DAVE),
        filled(12, 2, 101, 1, BUY, (4, BOB, "a1", 1), (6, DAVE, "t", 0)),
        triggered(13, 5, "st3", BUY, 101, 1, 2, 101, client=CAROL),
        filled(14, 3, 101, 1, BUY, (4, BOB, "a1", 0), (5, CAROL, "st3", 0)),
    ]


def test_waiting_stops_are_canceled_expired_and_cleared_like_orders() -> None:
    engine = after_a_trade_at_100()
    run(engine, stop("g", BUY, 110, 1, tif=GTD, expire_ns=50), stop("k", SELL, 90, 2, price=89),
        stop("c", SELL, 80, 3, client=BOB), buy("r", 95, 1))
    events = run(engine, PlaceOrder(SYM, BOB, "x", BUY, OrderType.LIMIT, 94, 1, ts_ns=60))  # expiry first
    assert events[0] == OrderExpired(SYM, 8, 60, 3, ALICE, "g", BUY, 0, 1)
    assert run(engine, CancelAll(BOB, SYM)) == [canceled(10, 5, "c", SELL, 0, 3, client=BOB),
                                                canceled(11, 7, "x", BUY, 94, 1, client=BOB)]
    events = run(engine, ClearBook(SYM, 0, "op", "eod"))
    assert events == [BookCleared(SYM, events[0].seq, 0, "op", "eod", 2),
                      canceled(events[0].seq + 1, 6, "r", BUY, 95, 1, CLEARED),   # the book first,
                      canceled(events[0].seq + 2, 4, "k", SELL, 89, 2, CLEARED)]  # then the stops
    assert stops(engine) == []
    assert book(engine) == []


# ------------------------------------------------------------------ stops: amend


def test_amending_a_stop_moves_it_in_the_trigger_order_and_is_checked() -> None:
    engine = after_a_trade_at_100()
    run(engine, stop("a", SELL, 98, 2), stop("b", SELL, 98, 2, client=BOB))  # orders 3, 4: a first
    events = run(engine,
                 stop_amend("a", qty=1),                       # lower qty: keeps its place
                 stop_amend("a", stop_price=100),              # already reached: rejected
                 stop_amend("a", price=97),                    # a stop has no limit price
                 stop_amend("a", stop_price=99),               # moves: requeued
                 stop_amend("b", stop_price=99, client=BOB))   # behind a at 99
    assert events == [
        OrderAmended(SYM, 6, 0, 3, ALICE, "a", SELL, 0, 0, 2, 1, 1, False, stop_price_ticks=98),
        rejected(7, RejectReason.STOP_WOULD_TRIGGER, "a", oid=3, command="amend"),
        rejected(8, RejectReason.INVALID_AMEND, "a", oid=3, command="amend"),
        OrderAmended(SYM, 9, 0, 3, ALICE, "a", SELL, 0, 0, 1, 1, 1, True, stop_price_ticks=99),
        OrderAmended(SYM, 10, 0, 4, BOB, "b", SELL, 0, 0, 2, 2, 2, True, stop_price_ticks=99),
    ]
    assert stops(engine) == [("a", "sell", 99, 9), ("b", "sell", 99, 10)]
    assert run(engine, AmendOrder(SYM, CAROL, "x", order_id=3, stop_price_ticks=97)) == [
        rejected(11, RejectReason.NOT_OWNER, "x", oid=3, command="amend", client=CAROL)]


def test_a_stop_price_on_an_amend_of_a_resting_order_is_rejected() -> None:
    engine = make_engine()
    run(engine, buy("r", 95, 1))
    assert run(engine, stop_amend("r", stop_price=90)) == [
        rejected(2, RejectReason.INVALID_AMEND, "r", oid=1, command="amend")]


# ------------------------------------------------------------------ icebergs


def test_an_iceberg_shows_one_slice_and_refills_at_the_back_of_its_level() -> None:
    engine = make_engine()
    run(engine, iceberg("ice", SELL, 100, 10, 3), sell("s2", 100, 2, client=BOB))  # orders 1, 2
    assert [(level.total_lots, level.hidden) for level in engine.book.asks.values()] == [(5, 7)]
    events = run(engine, buy("t", 100, 7, client=CAROL))  # order 3
    assert events == [
        accepted(3, 3, "t", BUY, 100, 7, client=CAROL),
        filled(4, 1, 100, 3, BUY, (1, ALICE, "ice", 0), (3, CAROL, "t", 4)),
        replenished(5, 1, "ice", SELL, 100, 3, 4),        # the next slice joins the back ...
        filled(6, 2, 100, 2, BUY, (2, BOB, "s2", 0), (3, CAROL, "t", 2)),  # ... behind bob
        filled(7, 3, 100, 2, BUY, (1, ALICE, "ice", 1), (3, CAROL, "t", 0)),
    ]
    assert book(engine) == [("sell", 100, "ice", 1)]  # shown: 1 of the slice; 4 hidden
    assert engine.book.orders[1].hidden == 4
    assert engine.book.orders[1].priority == 5


def test_the_last_slice_is_what_is_left_and_the_iceberg_ends_when_it_is_filled() -> None:
    engine = make_engine()
    run(engine, iceberg("ice", SELL, 100, 5, 3))
    events = run(engine, buy("t", 100, 6, client=BOB))
    assert events[1:] == [
        filled(3, 1, 100, 3, BUY, (1, ALICE, "ice", 0), (2, BOB, "t", 3)),
        replenished(4, 1, "ice", SELL, 100, 2, 0),
        filled(5, 2, 100, 2, BUY, (1, ALICE, "ice", 0), (2, BOB, "t", 1)),
    ]
    assert book(engine) == [("buy", 100, "t", 1)]


def test_an_iceberg_against_an_iceberg() -> None:
    engine = make_engine()
    run(engine, iceberg("m", SELL, 100, 6, 2))
    events = run(engine, iceberg("t", BUY, 100, 9, 4, client=BOB))  # a taker uses all of it
    assert events == [
        ice_accepted(2, 2, "t", BUY, 100, 9, 4, client=BOB),
        filled(3, 1, 100, 2, BUY, (1, ALICE, "m", 0), (2, BOB, "t", 7)),
        replenished(4, 1, "m", SELL, 100, 2, 2),
        filled(5, 2, 100, 2, BUY, (1, ALICE, "m", 0), (2, BOB, "t", 5)),
        replenished(6, 1, "m", SELL, 100, 2, 0),
        filled(7, 3, 100, 2, BUY, (1, ALICE, "m", 0), (2, BOB, "t", 3)),
    ]
    assert book(engine) == [("buy", 100, "t", 3)]  # it rests showing min(4, 3)
    assert engine.book.orders[2].hidden == 0


def test_self_trade_prevention_cancels_all_of_an_iceberg_maker() -> None:
    engine = make_engine()
    run(engine, iceberg("ice", SELL, 100, 10, 3), sell("s2", 100, 2, client=BOB))
    events = run(engine, buy("t", 100, 4, stp=StpMode.CANCEL_RESTING))
    assert events == [
        accepted(3, 3, "t", BUY, 100, 4, stp=StpMode.CANCEL_RESTING),
        canceled(4, 1, "ice", SELL, 100, 10, SELF_TRADE),   # shown and hidden
        filled(5, 1, 100, 2, BUY, (2, BOB, "s2", 0), (3, ALICE, "t", 2)),
    ]
    assert book(engine) == [("buy", 100, "t", 2)]


@pytest.mark.parametrize(("qty", "fills"), [(9, True), (11, False)])
def test_fill_or_kill_counts_what_an_iceberg_hides(qty: int, fills: bool) -> None:
    engine = make_engine()
    run(engine, iceberg("ice", SELL, 100, 8, 3), sell("s2", 100, 2, client=BOB))
    events = run(engine, buy("f", 100, qty, tif=FOK, client=CAROL))
    if fills:
        assert [type(e).__name__ for e in events] == [
            "OrderAccepted", "OrderFilled", "OrderReplenished", "OrderFilled", "OrderFilled", "OrderReplenished",
            "OrderFilled"]
        assert book(engine) == [("sell", 100, "ice", 1)]
    else:
        assert events == [accepted(3, 3, "f", BUY, 100, qty, tif=FOK, client=CAROL),
                          canceled(4, 3, "f", BUY, 100, qty, FOK_UNFILLED, client=CAROL)]


def test_fill_or_kill_with_stp_follows_the_refills_order() -> None:
    """alice's iceberg at 100 shows 2 of 6, bob's order is behind it: a FOK of bob's for 5 that cancels itself
    at its own order (cancel_incoming) can take alice's first slice only before reaching itself."""
    engine = make_engine()
    run(engine, iceberg("ice", SELL, 100, 6, 2), sell("own", 100, 5, client=BOB))
    events = run(engine, buy("f", 100, 3, tif=FOK, client=BOB, stp=StpMode.CANCEL_INCOMING))
    assert events[-1] == canceled(4, 3, "f", BUY, 100, 3, FOK_UNFILLED, client=BOB)
    events = run(engine, buy("g", 100, 2, tif=FOK, client=BOB, stp=StpMode.CANCEL_INCOMING))
    assert [type(e).__name__ for e in events] == ["OrderAccepted", "OrderFilled", "OrderReplenished"]


@pytest.mark.parametrize(("command", "reason"), [
    (iceberg("x", BUY, 100, 5, 6), RejectReason.INVALID_QUANTITY),   # shows more than the order
    (iceberg("x", BUY, 100, 5, -1), RejectReason.INVALID_QUANTITY),
    (PlaceOrder(SYM, ALICE, "x", BUY, OrderType.MARKET, 0, 5, IOC, display_qty_lots=2), RejectReason.INVALID_ORDER),
])
def test_malformed_icebergs_are_rejected(command: PlaceOrder, reason: RejectReason) -> None:
    assert run(make_engine(), command) == [rejected(1, reason, "x")]


def test_amending_an_iceberg_works_on_its_total_quantity() -> None:
    engine = make_engine()
    run(engine, iceberg("ice", SELL, 100, 10, 3), sell("s2", 100, 2, client=BOB))
    events = run(engine, AmendOrder(SYM, ALICE, "ice", qty_lots=5),   # hidden goes first: keeps its place
                 AmendOrder(SYM, ALICE, "ice", qty_lots=2))           # then shown
    assert events == [
        OrderAmended(SYM, 3, 0, 1, ALICE, "ice", SELL, 100, 100, 10, 5, 5, False, hidden_lots=2),
        OrderAmended(SYM, 4, 0, 1, ALICE, "ice", SELL, 100, 100, 5, 2, 2, False, hidden_lots=0),
    ]
    assert book(engine) == [("sell", 100, "ice", 2), ("sell", 100, "s2", 2)]
    events = run(engine, AmendOrder(SYM, ALICE, "ice", qty_lots=9))  # more: requeued, shows a full slice
    assert events == [OrderAmended(SYM, 5, 0, 1, ALICE, "ice", SELL, 100, 100, 2, 9, 9, True, hidden_lots=6)]
    assert book(engine) == [("sell", 100, "s2", 2), ("sell", 100, "ice", 3)]
    assert engine.book.orders[1].hidden == 6


def test_canceling_an_iceberg_cancels_what_it_hides() -> None:
    engine = make_engine()
    run(engine, iceberg("ice", BUY, 100, 10, 3))
    assert run(engine, cancel("ice")) == [canceled(2, 1, "ice", BUY, 100, 10)]
    assert engine.book.bids == {}


# ------------------------------------------------------------------ the engine image


def test_stops_and_icebergs_survive_an_image_and_continue_identically() -> None:
    engine = after_a_trade_at_100()
    commands = [stop("s1", SELL, 98, 2), stop("b1", BUY, 103, 1, price=104, tif=GTD, expire_ns=10**6),
                iceberg("i1", SELL, 102, 7, 2, client=BOB), buy("r", 97, 3, client=CAROL)]
    run(engine, *commands)
    state = engine.export_state()
    assert [s.client_order_id for s in state.stops] == ["s1", "b1"]
    assert state.last_price_ticks == 100
    assert [(o.client_order_id, o.remaining_lots, o.hidden_lots, o.display_lots) for o in state.orders] == [
        ("r", 3, 0, 0), ("i1", 2, 5, 2)]
    again = MatchingEngine.from_state(engine.spec, state)
    assert again.state_hash() == engine.state_hash()
    assert again.export_state() == state
    flow: list[Command] = [buy("t1", 102, 5, client=DAVE), sell("t2", 97, 3, client=DAVE), cancel("b1")]
    assert run(again, *flow) == run(engine, *flow)
    assert again.state_hash() == engine.state_hash()


def test_the_hash_tells_waiting_stops_and_the_last_price_apart() -> None:
    one, two = after_a_trade_at_100(), after_a_trade_at_100()
    assert one.state_hash() == two.state_hash()
    run(one, stop("s", SELL, 90, 1))
    assert one.state_hash() != two.state_hash()
    run(two, stop("s", SELL, 91, 1))
    assert one.state_hash() != two.state_hash()
    three, four = make_engine(), make_engine()
    run(three, sell("a", 100, 1, client=BOB), buy("b", 100, 1), sell("c", 101, 1, client=BOB))
    run(four, sell("a", 101, 1, client=BOB), buy("b", 101, 1), sell("c", 101, 1, client=BOB))
    assert book(three) == book(four)
    assert three.state_hash() != four.state_hash()


# ------------------------------------------------------------------ balances


def balanced() -> MatchingEngine:
    engine = MatchingEngine(make_spec(balances=True, base_asset="B", quote_asset="Q", price_band_bps=1000))
    for client in (ALICE, BOB, CAROL):
        run(engine, Deposit(SYM, client, "B", 100, f"b-{client}"), Deposit(SYM, client, "Q", 100_000, f"q-{client}"))
    return engine


def test_with_balances_a_waiting_stop_holds_what_its_order_will_need() -> None:
    engine = balanced()
    events = run(engine, stop("sl", BUY, 105, 10, price=106), stop("s", SELL, 95, 7),
                 stop("nofunds", BUY, 105, 1), stop("f", BUY, 105, 5, funds=600))
    assert [(e.reserved, e.balances) for e in events if isinstance(e, OrderAccepted)] == [
        (1060, [(ALICE, "Q", 100_000 - 1060, 1060)]),
        (7, [(ALICE, "B", 93, 7)]),
        (600, [(ALICE, "Q", 100_000 - 1660, 1660)]),
    ]
    assert events[2].reason is RejectReason.INVALID_ORDER  # type: ignore[union-attr]  # a stop buy names a budget
    released = [e for e in run(engine, cancel("sl"), cancel("s"), cancel("f")) if isinstance(e, OrderCanceled)]
    assert [(e.released, e.balances) for e in released] == [
        (1060, [(ALICE, "Q", 100_000 - 600, 600)]), (7, [(ALICE, "B", 100, 0)]), (600, [(ALICE, "Q", 100_000, 0)])]
    assert run(engine, stop("big", SELL, 95, 101))[0].reason is RejectReason.INSUFFICIENT_FUNDS  # type: ignore


def test_with_balances_a_triggered_stop_buy_spends_its_budget() -> None:
    engine = balanced()
    run(engine, sell("a0", 100, 1, client=BOB), buy("b0", 100, 1, client=CAROL))  # last price 100
    run(engine, stop("f", BUY, 101, 5, funds=305), sell("a1", 101, 1, client=BOB), sell("a2", 101, 9, client=BOB))
    events = run(engine, buy("t", 101, 1, client=CAROL))
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["OrderAccepted", "OrderFilled", "OrderTriggered", "OrderFilled", "OrderCanceled"]
    fill, cancel_event = events[3], events[4]
    assert fill.qty_lots == 3  # type: ignore[union-attr]  # 305 pays for 3 lots at 101 (303), not 4
    assert isinstance(cancel_event, OrderCanceled)
    assert cancel_event.reason is IOC_REMAINDER
    assert cancel_event.released == 2
    account = engine.ledger.accounts[ALICE]  # type: ignore[union-attr]
    assert account[3] == 0
    assert account[2] == 100_000 - 303


def test_amending_a_stop_limit_with_balances_holds_the_difference() -> None:
    engine = balanced()
    events = run(engine, stop("sl", BUY, 105, 10, price=106), stop_amend("sl", price=110), stop_amend("sl", qty=4))
    assert [(e.reserved, e.balances) for e in events[1:]] == [  # type: ignore[union-attr]
        (1100, [(ALICE, "Q", 100_000 - 1100, 1100)]), (440, [(ALICE, "Q", 100_000 - 440, 440)])]
    assert run(engine, stop_amend("sl", qty=10_000))[0].reason is RejectReason.INSUFFICIENT_FUNDS  # type: ignore
