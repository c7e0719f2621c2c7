"""Placing orders: limit, market (and its price band), IOC, FOK, post-only, GTD, and field validation."""

from __future__ import annotations

import pytest

from exchange import CancelReason, MatchingEngine, PlaceOrder, RejectReason, Side, StpMode, TimeInForce

from ._helpers import (
    ALICE,
    BOB,
    BUY,
    CAROL,
    FOK,
    FOK_UNFILLED,
    GTC,
    GTD,
    IOC,
    IOC_REMAINDER,
    MARKET,
    SELL,
    SYM,
    accepted,
    book,
    buy,
    cancel,
    canceled,
    expired,
    filled,
    make_engine,
    market,
    place,
    rejected,
    run,
    sell,
)

# ------------------------------------------------------------ limit orders


def test_limit_orders_rest_when_nothing_crosses(engine: MatchingEngine) -> None:
    assert run(engine, buy("b1", 99, 5), sell("s1", 101, 3), buy("b2", 100, 2), sell("s2", 100 + 1, 4)) == [
        accepted(1, 1, "b1", BUY, 99, 5),
        accepted(2, 2, "s1", SELL, 101, 3),
        accepted(3, 3, "b2", BUY, 100, 2),
        accepted(4, 4, "s2", SELL, 101, 4),
    ]
    assert book(engine) == [("buy", 100, "b2", 2), ("buy", 99, "b1", 5), ("sell", 101, "s1", 3),
                            ("sell", 101, "s2", 4)]
    assert (engine.book.best_bid(), engine.book.best_ask()) == (100, 101)


def test_buy_crosses_at_the_makers_price(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 5))
    assert run(engine, buy("b1", 105, 5, client=BOB)) == [
        accepted(2, 2, "b1", BUY, 105, 5, client=BOB),
        filled(3, 1, 100, 5, BUY, (1, ALICE, "s1", 0), (2, BOB, "b1", 0)),
    ]
    assert book(engine) == []


def test_sell_crosses_at_the_makers_price(engine: MatchingEngine) -> None:
    run(engine, buy("b1", 100, 5))
    assert run(engine, sell("s1", 95, 2, client=BOB)) == [
        accepted(2, 2, "s1", SELL, 95, 2, client=BOB),
        filled(3, 1, 100, 2, SELL, (1, ALICE, "b1", 3), (2, BOB, "s1", 0)),
    ]
    assert book(engine) == [("buy", 100, "b1", 3)]


def test_equal_price_crosses(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 5))
    assert run(engine, buy("b1", 100, 1, client=BOB)) == [
        accepted(2, 2, "b1", BUY, 100, 1, client=BOB),
        filled(3, 1, 100, 1, BUY, (1, ALICE, "s1", 4), (2, BOB, "b1", 0)),
    ]


def test_one_fill_per_maker_in_fifo_order(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 3), sell("s2", 100, 4, client=CAROL), sell("s3", 100, 5))
    assert run(engine, buy("b1", 100, 10, client=BOB)) == [
        accepted(4, 4, "b1", BUY, 100, 10, client=BOB),
        filled(5, 1, 100, 3, BUY, (1, ALICE, "s1", 0), (4, BOB, "b1", 7)),
        filled(6, 2, 100, 4, BUY, (2, CAROL, "s2", 0), (4, BOB, "b1", 3)),
        filled(7, 3, 100, 3, BUY, (3, ALICE, "s3", 2), (4, BOB, "b1", 0)),
    ]
    assert book(engine) == [("sell", 100, "s3", 2)]


def test_partially_filled_maker_keeps_its_place(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 10), sell("s2", 100, 5))
    assert run(engine, buy("b1", 100, 4, client=BOB)) == [
        accepted(3, 3, "b1", BUY, 100, 4, client=BOB),
        filled(4, 1, 100, 4, BUY, (1, ALICE, "s1", 6), (3, BOB, "b1", 0)),
    ]
    run(engine, sell("s3", 100, 1))  # arrives after the partial fill, queues behind s2
    assert run(engine, buy("c1", 100, 12, client=CAROL)) == [
        accepted(6, 5, "c1", BUY, 100, 12, client=CAROL),
        filled(7, 2, 100, 6, BUY, (1, ALICE, "s1", 0), (5, CAROL, "c1", 6)),
        filled(8, 3, 100, 5, BUY, (2, ALICE, "s2", 0), (5, CAROL, "c1", 1)),
        filled(9, 4, 100, 1, BUY, (4, ALICE, "s3", 0), (5, CAROL, "c1", 0)),
    ]
    assert book(engine) == []


def test_buy_sweeps_levels_best_first_and_stops_at_its_limit(engine: MatchingEngine) -> None:
    run(engine, sell("s3", 102, 4), sell("s1", 100, 2), sell("s4", 103, 1), sell("s2", 101, 3))
    assert run(engine, buy("b1", 102, 8, client=BOB)) == [
        accepted(5, 5, "b1", BUY, 102, 8, client=BOB),
        filled(6, 1, 100, 2, BUY, (2, ALICE, "s1", 0), (5, BOB, "b1", 6)),
        filled(7, 2, 101, 3, BUY, (4, ALICE, "s2", 0), (5, BOB, "b1", 3)),
        filled(8, 3, 102, 3, BUY, (1, ALICE, "s3", 1), (5, BOB, "b1", 0)),
    ]
    assert book(engine) == [("sell", 102, "s3", 1), ("sell", 103, "s4", 1)]


def test_sweep_remainder_rests_at_its_limit(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 2), sell("s2", 101, 3), sell("s3", 102, 4))
    assert run(engine, buy("b1", 101, 10, client=BOB)) == [
        accepted(4, 4, "b1", BUY, 101, 10, client=BOB),
        filled(5, 1, 100, 2, BUY, (1, ALICE, "s1", 0), (4, BOB, "b1", 8)),
        filled(6, 2, 101, 3, BUY, (2, ALICE, "s2", 0), (4, BOB, "b1", 5)),
    ]
    assert book(engine) == [("buy", 101, "b1", 5), ("sell", 102, "s3", 4)]


def test_sell_sweeps_bids_best_first(engine: MatchingEngine) -> None:
    run(engine, buy("b1", 99, 2), buy("b2", 100, 2), buy("b3", 98, 2))
    assert run(engine, sell("s1", 99, 5, client=BOB)) == [
        accepted(4, 4, "s1", SELL, 99, 5, client=BOB),
        filled(5, 1, 100, 2, SELL, (2, ALICE, "b2", 0), (4, BOB, "s1", 3)),
        filled(6, 2, 99, 2, SELL, (1, ALICE, "b1", 0), (4, BOB, "s1", 1)),
    ]
    assert book(engine) == [("buy", 98, "b3", 2), ("sell", 99, "s1", 1)]


# ------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (buy("x", 0, 5), RejectReason.INVALID_PRICE),
        (buy("x", -100, 5), RejectReason.INVALID_PRICE),
        (sell("x", 100_001, 5), RejectReason.INVALID_PRICE),  # above max_price 1000.00
        (buy("x", 100, 0), RejectReason.INVALID_QUANTITY),
        (buy("x", 100, -1), RejectReason.INVALID_QUANTITY),
        (buy("x", 100, 1), RejectReason.INVALID_QUANTITY),  # below min_qty 2
        (buy("x", 100, 501), RejectReason.INVALID_QUANTITY),  # above max_qty 500
        (PlaceOrder(SYM, ALICE, "x", "up", "limit", 100, 5), RejectReason.MALFORMED),  # type: ignore[arg-type]
        (PlaceOrder(SYM, ALICE, "x", "buy", "trailing_stop", 100, 5), RejectReason.MALFORMED),  # type: ignore[arg-type]
        (PlaceOrder(SYM, ALICE, "x", "buy", "limit", 100, 5, tif="GTX"), RejectReason.MALFORMED),  # type: ignore[arg-type]
        (PlaceOrder(SYM, ALICE, "x", "buy", "limit", 100, 5, stp="maybe"), RejectReason.MALFORMED),  # type: ignore[arg-type]
        (buy("", 100, 5), RejectReason.MALFORMED),
        (buy("x", 100, 5, client=""), RejectReason.MALFORMED),
    ],
)
def test_invalid_place_rejected_and_book_untouched(command: PlaceOrder, reason: RejectReason) -> None:
    engine = make_engine(min_qty="2", max_qty="500", max_price="1000")
    run(engine, sell("s1", 100, 5, client=BOB))
    before = engine.state_hash()
    assert run(engine, command) == [rejected(2, reason, command.client_order_id, client=command.client_id)]
    assert engine.state_hash() == before
    # a rejection consumes no order id
    assert run(engine, buy("y", 90, 5)) == [accepted(3, 2, "y", BUY, 90, 5)]


def test_plain_string_enums_are_accepted(engine: MatchingEngine) -> None:
    command = PlaceOrder(SYM, ALICE, "a1", "buy", "limit", 100, 5, tif="GTC", stp="cancel_both")  # type: ignore[arg-type]
    assert run(engine, command) == [accepted(1, 1, "a1", BUY, 100, 5, stp=StpMode.CANCEL_BOTH)]


# ------------------------------------------------------------ market orders


def test_market_buy_sweeps_and_never_rests(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 2), sell("s2", 105, 3))
    assert run(engine, market("m1", BUY, 10, client=BOB)) == [
        accepted(3, 3, "m1", BUY, 0, 10, client=BOB, otype=MARKET, tif=IOC),
        filled(4, 1, 100, 2, BUY, (1, ALICE, "s1", 0), (3, BOB, "m1", 8)),
        filled(5, 2, 105, 3, BUY, (2, ALICE, "s2", 0), (3, BOB, "m1", 5)),
        canceled(6, 3, "m1", BUY, 0, 5, IOC_REMAINDER, client=BOB),
    ]
    assert book(engine) == []


def test_market_sell_fully_filled_leaves_no_cancel(engine: MatchingEngine) -> None:
    run(engine, buy("b1", 100, 2), buy("b2", 90, 3))
    assert run(engine, place("m1", SELL, 12345, 4, client=BOB, otype=MARKET, tif=IOC)) == [
        accepted(3, 3, "m1", SELL, 0, 4, client=BOB, otype=MARKET, tif=IOC),  # the given price is ignored
        filled(4, 1, 100, 2, SELL, (1, ALICE, "b1", 0), (3, BOB, "m1", 2)),
        filled(5, 2, 90, 2, SELL, (2, ALICE, "b2", 1), (3, BOB, "m1", 0)),
    ]
    assert book(engine) == [("buy", 90, "b2", 1)]


@pytest.mark.parametrize(("tif", "reason"), [(IOC, IOC_REMAINDER), (FOK, FOK_UNFILLED)])
@pytest.mark.parametrize("side", [BUY, SELL])
def test_market_into_empty_side_is_accepted_then_canceled(engine: MatchingEngine, tif: TimeInForce,
                                                          reason: CancelReason, side: Side) -> None:
    # only the same side has liquidity: the opposite side is empty
    run(engine, place("r1", side, 100, 5))
    assert run(engine, market("m1", side, 3, tif=tif, client=BOB)) == [
        accepted(2, 2, "m1", side, 0, 3, client=BOB, otype=MARKET, tif=tif),
        canceled(3, 2, "m1", side, 0, 3, reason, client=BOB),
    ]
    assert book(engine) == [(side.value, 100, "r1", 5)]


@pytest.mark.parametrize(
    "command",
    [
        market("m1", BUY, 5, tif=GTC),
        market("m1", SELL, 5, tif=GTD, expire_ns=10**12),
        market("m1", BUY, 5, tif=IOC, post_only=True),
        market("m1", SELL, 5, tif=FOK, post_only=True),
    ],
)
def test_market_that_could_rest_or_post_only_is_invalid(engine: MatchingEngine, command: PlaceOrder) -> None:
    run(engine, sell("s1", 100, 5, client=BOB), buy("b1", 90, 5, client=BOB))
    before = engine.state_hash()
    assert run(engine, command) == [rejected(3, RejectReason.INVALID_ORDER, "m1")]
    assert engine.state_hash() == before


@pytest.mark.parametrize(
    ("side", "best", "bps", "last_inside", "first_outside"),
    [
        (BUY, 10_000, 100, 10_100, 10_101),  # band edge exactly on a tick is inside
        (BUY, 333, 100, 336, 337),  # 336.33 rounds down into the band
        (BUY, 999, 1, 999, 1_000),  # 999.0999: nothing above best is inside
        (BUY, 100, 100_000, 1_100, 1_101),  # the widest band: +1000 %
        (SELL, 10_000, 100, 9_900, 9_899),
        (SELL, 333, 100, 330, 329),  # 329.67 rounds up into the band
        (SELL, 999, 1, 999, 998),  # 998.9001: nothing below best is inside
    ],
)
def test_market_price_band(side: Side, best: int, bps: int, last_inside: int, first_outside: int) -> None:
    engine = make_engine(price_band_bps=bps)
    maker_side = SELL if side is BUY else BUY
    run(engine, *(place(coid, maker_side, price, 1, client=BOB)
                  for coid, price in [("best", best), ("inside", last_inside), ("outside", first_outside)]
                  if not (coid == "inside" and price == best)))
    n = len(engine.book)
    fills = [("best", best)] + ([("inside", last_inside)] if last_inside != best else [])
    events = run(engine, market("m1", side, 5))
    assert events == [
        accepted(n + 1, n + 1, "m1", side, 0, 5, otype=MARKET, tif=IOC),
        *(filled(n + 2 + i, i + 1, price, 1, side, (i + 1, BOB, coid, 0), (n + 1, ALICE, "m1", 4 - i))
          for i, (coid, price) in enumerate(fills)),
        canceled(n + 2 + len(fills), n + 1, "m1", side, 0, 5 - len(fills), IOC_REMAINDER),
    ]
    assert book(engine) == [(maker_side.value, first_outside, "outside", 1)]


def test_market_band_is_measured_from_the_best_price_at_arrival() -> None:
    engine = make_engine(price_band_bps=500)  # 5 %: 100 -> 105
    run(engine, sell("s1", 100, 1, client=BOB), sell("s2", 104, 1, client=BOB), sell("s3", 106, 1, client=BOB))
    assert run(engine, market("m1", BUY, 3)) == [
        accepted(4, 4, "m1", BUY, 0, 3, otype=MARKET, tif=IOC),
        filled(5, 1, 100, 1, BUY, (1, BOB, "s1", 0), (4, ALICE, "m1", 2)),
        filled(6, 2, 104, 1, BUY, (2, BOB, "s2", 0), (4, ALICE, "m1", 1)),
        canceled(7, 4, "m1", BUY, 0, 1, IOC_REMAINDER),  # 106 is within 5 % of 104 but not of 100
    ]
    # the next market order measures from the new best, 106
    assert run(engine, market("m2", BUY, 1)) == [
        accepted(8, 5, "m2", BUY, 0, 1, otype=MARKET, tif=IOC),
        filled(9, 3, 106, 1, BUY, (3, BOB, "s3", 0), (5, ALICE, "m2", 0)),
    ]


def test_market_fok_needing_liquidity_beyond_the_band_does_nothing() -> None:
    engine = make_engine(price_band_bps=100)
    run(engine, sell("s1", 100, 2, client=BOB), sell("s2", 101, 2, client=BOB), sell("s3", 102, 2, client=BOB))
    before = engine.state_hash()
    assert run(engine, market("m1", BUY, 5, tif=FOK)) == [
        accepted(4, 4, "m1", BUY, 0, 5, otype=MARKET, tif=FOK),
        canceled(5, 4, "m1", BUY, 0, 5, FOK_UNFILLED),
    ]
    assert engine.state_hash() == before
    assert run(engine, market("m2", BUY, 4, tif=FOK)) == [
        accepted(6, 5, "m2", BUY, 0, 4, otype=MARKET, tif=FOK),
        filled(7, 1, 100, 2, BUY, (1, BOB, "s1", 0), (5, ALICE, "m2", 2)),
        filled(8, 2, 101, 2, BUY, (2, BOB, "s2", 0), (5, ALICE, "m2", 0)),
    ]


def test_market_without_band_trades_at_any_price(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 1, 1, client=BOB), sell("s2", 10**15, 1, client=BOB))
    assert run(engine, market("m1", BUY, 2)) == [
        accepted(3, 3, "m1", BUY, 0, 2, otype=MARKET, tif=IOC),
        filled(4, 1, 1, 1, BUY, (1, BOB, "s1", 0), (3, ALICE, "m1", 1)),
        filled(5, 2, 10**15, 1, BUY, (2, BOB, "s2", 0), (3, ALICE, "m1", 0)),
    ]


# -------------------------------------------------------------------- IOC


def test_ioc_remainder_is_canceled_at_its_limit(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 2), sell("s2", 102, 5))
    assert run(engine, buy("b1", 101, 6, tif=IOC, client=BOB)) == [
        accepted(3, 3, "b1", BUY, 101, 6, client=BOB, tif=IOC),
        filled(4, 1, 100, 2, BUY, (1, ALICE, "s1", 0), (3, BOB, "b1", 4)),
        canceled(5, 3, "b1", BUY, 101, 4, IOC_REMAINDER, client=BOB),
    ]
    assert book(engine) == [("sell", 102, "s2", 5)]


def test_ioc_that_does_not_cross_is_canceled_whole(engine: MatchingEngine) -> None:
    run(engine, buy("b1", 100, 2))
    assert run(engine, sell("s1", 101, 6, tif=IOC, client=BOB)) == [
        accepted(2, 2, "s1", SELL, 101, 6, client=BOB, tif=IOC),
        canceled(3, 2, "s1", SELL, 101, 6, IOC_REMAINDER, client=BOB),
    ]
    assert book(engine) == [("buy", 100, "b1", 2)]


def test_ioc_fully_filled_has_no_cancel(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 7))
    assert run(engine, buy("b1", 100, 6, tif=IOC, client=BOB)) == [
        accepted(2, 2, "b1", BUY, 100, 6, client=BOB, tif=IOC),
        filled(3, 1, 100, 6, BUY, (1, ALICE, "s1", 1), (2, BOB, "b1", 0)),
    ]


# -------------------------------------------------------------------- FOK


@pytest.fixture
def fok_book(engine: MatchingEngine) -> MatchingEngine:
    run(engine, sell("s1", 100, 3), sell("s2", 101, 3), sell("s3", 101, 2), sell("s4", 103, 4))
    return engine


@pytest.mark.parametrize(
    ("price", "qty"),
    [
        (101, 9),  # one lot more than the 8 available up to 101
        (100, 4),  # enough in the book, but not at or below 100
        (99, 1),  # does not cross at all
        (102, 9),  # the level at 102 is empty
    ],
)
def test_fok_unfillable_does_nothing(fok_book: MatchingEngine, price: int, qty: int) -> None:
    before, resting = fok_book.state_hash(), book(fok_book)
    assert run(fok_book, buy("f1", price, qty, tif=FOK, client=BOB)) == [
        accepted(5, 5, "f1", BUY, price, qty, client=BOB, tif=FOK),
        canceled(6, 5, "f1", BUY, price, qty, FOK_UNFILLED, client=BOB),
    ]
    assert (fok_book.state_hash(), book(fok_book)) == (before, resting)
    assert fok_book.next_trade_id == 1


def test_fok_into_empty_book(engine: MatchingEngine) -> None:
    assert run(engine, sell("f1", 100, 1, tif=FOK)) == [
        accepted(1, 1, "f1", SELL, 100, 1, tif=FOK),
        canceled(2, 1, "f1", SELL, 100, 1, FOK_UNFILLED),
    ]


def test_fok_exactly_fillable(fok_book: MatchingEngine) -> None:
    assert run(fok_book, buy("f1", 101, 8, tif=FOK, client=BOB)) == [
        accepted(5, 5, "f1", BUY, 101, 8, client=BOB, tif=FOK),
        filled(6, 1, 100, 3, BUY, (1, ALICE, "s1", 0), (5, BOB, "f1", 5)),
        filled(7, 2, 101, 3, BUY, (2, ALICE, "s2", 0), (5, BOB, "f1", 2)),
        filled(8, 3, 101, 2, BUY, (3, ALICE, "s3", 0), (5, BOB, "f1", 0)),
    ]
    assert book(fok_book) == [("sell", 103, "s4", 4)]


def test_fok_across_several_levels_leaves_last_maker_partial(fok_book: MatchingEngine) -> None:
    assert run(fok_book, buy("f1", 200, 10, tif=FOK, client=BOB)) == [
        accepted(5, 5, "f1", BUY, 200, 10, client=BOB, tif=FOK),
        filled(6, 1, 100, 3, BUY, (1, ALICE, "s1", 0), (5, BOB, "f1", 7)),
        filled(7, 2, 101, 3, BUY, (2, ALICE, "s2", 0), (5, BOB, "f1", 4)),
        filled(8, 3, 101, 2, BUY, (3, ALICE, "s3", 0), (5, BOB, "f1", 2)),
        filled(9, 4, 103, 2, BUY, (4, ALICE, "s4", 2), (5, BOB, "f1", 0)),
    ]
    assert book(fok_book) == [("sell", 103, "s4", 2)]


def test_fok_sell_side(engine: MatchingEngine) -> None:
    run(engine, buy("b1", 100, 3), buy("b2", 99, 3))
    assert run(engine, sell("f1", 99, 7, tif=FOK, client=BOB)) == [
        accepted(3, 3, "f1", SELL, 99, 7, client=BOB, tif=FOK),
        canceled(4, 3, "f1", SELL, 99, 7, FOK_UNFILLED, client=BOB),
    ]
    assert run(engine, sell("f2", 99, 6, tif=FOK, client=BOB)) == [
        accepted(5, 4, "f2", SELL, 99, 6, client=BOB, tif=FOK),
        filled(6, 1, 100, 3, SELL, (1, ALICE, "b1", 0), (4, BOB, "f2", 3)),
        filled(7, 2, 99, 3, SELL, (2, ALICE, "b2", 0), (4, BOB, "f2", 0)),
    ]


# -------------------------------------------------------------- post-only


def test_post_only_rests_when_it_does_not_cross(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 101, 5, client=BOB))
    assert run(engine, buy("p1", 100, 5, post_only=True)) == [
        accepted(2, 2, "p1", BUY, 100, 5, post_only=True),
    ]
    assert book(engine) == [("buy", 100, "p1", 5), ("sell", 101, "s1", 5)]


@pytest.mark.parametrize(
    "command",
    [buy("p1", 101, 5, post_only=True), buy("p1", 150, 5, post_only=True), sell("p1", 100, 5, post_only=True),
     sell("p1", 1, 1, post_only=True), buy("p1", 101, 5, post_only=True, tif=GTD, expire_ns=100)],
)
def test_post_only_that_would_trade_is_rejected(engine: MatchingEngine, command: PlaceOrder) -> None:
    run(engine, buy("b1", 100, 5, client=BOB), sell("s1", 101, 5, client=BOB))
    before = engine.state_hash()
    assert run(engine, command) == [rejected(3, RejectReason.POST_ONLY_WOULD_TRADE, "p1")]
    assert engine.state_hash() == before
    # the rejection burned neither the client order id nor an order id
    assert run(engine, buy("p1", 99, 1)) == [accepted(4, 3, "p1", BUY, 99, 1)]


@pytest.mark.parametrize("tif", [IOC, FOK])
@pytest.mark.parametrize("price", [99, 101], ids=["not-crossing", "crossing"])
def test_post_only_with_ioc_or_fok_is_invalid(engine: MatchingEngine, tif: TimeInForce, price: int) -> None:
    run(engine, sell("s1", 101, 5, client=BOB))
    assert run(engine, buy("p1", price, 5, post_only=True, tif=tif)) == [
        rejected(2, RejectReason.INVALID_ORDER, "p1")]
    assert book(engine) == [("sell", 101, "s1", 5)]


# -------------------------------------------------------------------- GTD


def gtd(coid: str, side: Side, price: int, qty: int, expire_ns: int, ts: int = 0) -> PlaceOrder:
    return place(coid, side, price, qty, tif=GTD, expire_ns=expire_ns, ts=ts)


def test_gtd_rests_until_a_later_input_reaches_its_expiry(engine: MatchingEngine) -> None:
    assert run(engine, gtd("g1", BUY, 100, 5, expire_ns=1_000, ts=10)) == [
        accepted(1, 1, "g1", BUY, 100, 5, tif=GTD, expire_ns=1_000, ts=10)]
    # ts 999: still live, so the sell trades against it
    assert run(engine, sell("s1", 100, 2, client=BOB, ts=999)) == [
        accepted(2, 2, "s1", SELL, 100, 2, client=BOB, ts=999),
        filled(3, 1, 100, 2, SELL, (1, ALICE, "g1", 3), (2, BOB, "s1", 0), ts=999),
    ]
    # ts 1000 == expire_ns: it expires first, with its own seq, so the sell rests instead
    assert run(engine, sell("s2", 100, 2, client=BOB, ts=1_000)) == [
        expired(4, 1, "g1", BUY, 100, 3, ts=1_000),
        accepted(5, 3, "s2", SELL, 100, 2, client=BOB, ts=1_000),
    ]
    assert book(engine) == [("sell", 100, "s2", 2)]
    # an expired order is finished: canceling it is too late, and its id is not reusable
    assert run(engine, cancel("g1", ts=1_001), buy("g1", 90, 1, ts=1_001)) == [
        rejected(6, RejectReason.TOO_LATE, "g1", command="cancel", ts=1_001),
        rejected(7, RejectReason.DUPLICATE_CLIENT_ORDER_ID, "g1", oid=1, ts=1_001),
    ]


def test_expiry_precedes_any_command_even_a_rejected_one(engine: MatchingEngine) -> None:
    run(engine, gtd("g2", SELL, 105, 1, expire_ns=500), gtd("g1", BUY, 99, 2, expire_ns=200),
        gtd("g3", BUY, 98, 3, expire_ns=900), gtd("g4", BUY, 97, 4, expire_ns=200))
    assert run(engine, cancel("nope", client=BOB, ts=600)) == [
        expired(5, 2, "g1", BUY, 99, 2, ts=600),  # earliest expiry first, then by order id
        expired(6, 4, "g4", BUY, 97, 4, ts=600),
        expired(7, 1, "g2", SELL, 105, 1, ts=600),
        rejected(8, RejectReason.UNKNOWN_ORDER, "nope", client=BOB, command="cancel", ts=600),
    ]
    assert book(engine) == [("buy", 98, "g3", 3)]


def test_canceled_gtd_does_not_expire_later(engine: MatchingEngine) -> None:
    run(engine, gtd("g1", BUY, 99, 2, expire_ns=200))
    assert run(engine, cancel("g1", ts=100), buy("b2", 90, 1, ts=300)) == [
        canceled(2, 1, "g1", BUY, 99, 2, ts=100),
        accepted(3, 2, "b2", BUY, 90, 1, ts=300),
    ]


def test_fully_filled_gtd_does_not_expire_later(engine: MatchingEngine) -> None:
    run(engine, gtd("g1", BUY, 99, 2, expire_ns=200))
    assert run(engine, sell("s1", 99, 2, client=BOB, ts=100), buy("b2", 90, 1, ts=300)) == [
        accepted(2, 2, "s1", SELL, 99, 2, client=BOB, ts=100),
        filled(3, 1, 99, 2, SELL, (1, ALICE, "g1", 0), (2, BOB, "s1", 0), ts=100),
        accepted(4, 3, "b2", BUY, 90, 1, ts=300),
    ]


@pytest.mark.parametrize(("ts", "expire_ns"), [(100, 100), (100, 99), (0, 0), (5, -1)])
def test_gtd_expiry_not_after_the_order_time_is_invalid(engine: MatchingEngine, ts: int, expire_ns: int) -> None:
    assert run(engine, gtd("g1", BUY, 100, 5, expire_ns=expire_ns, ts=ts)) == [
        rejected(1, RejectReason.INVALID_EXPIRY, "g1", ts=ts)]
    assert book(engine) == []


@pytest.mark.parametrize("tif", [GTC, IOC, FOK])
def test_expiry_on_a_non_gtd_order_is_invalid(engine: MatchingEngine, tif: TimeInForce) -> None:
    assert run(engine, buy("b1", 100, 5, tif=tif, expire_ns=1_000)) == [
        rejected(1, RejectReason.INVALID_EXPIRY, "b1")]
    assert book(engine) == []


def test_gtd_remainder_after_crossing_rests_and_expires(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 2, client=BOB))
    assert run(engine, gtd("g1", BUY, 100, 5, expire_ns=50, ts=1), buy("b2", 10, 1, ts=50)) == [
        accepted(2, 2, "g1", BUY, 100, 5, tif=GTD, expire_ns=50, ts=1),
        filled(3, 1, 100, 2, BUY, (1, BOB, "s1", 0), (2, ALICE, "g1", 3), ts=1),
        expired(4, 2, "g1", BUY, 100, 3, ts=50),
        accepted(5, 3, "b2", BUY, 10, 1, ts=50),
    ]
