"""Self-trade prevention: every mode, instrument default vs per-order override, and the FOK check."""

from __future__ import annotations

import pytest

from exchange import Event, MatchingEngine, RejectReason, StpMode

from ._helpers import (
    ALICE,
    BOB,
    BUY,
    FOK,
    FOK_UNFILLED,
    IOC,
    IOC_REMAINDER,
    MARKET,
    SELF_TRADE,
    SELL,
    accepted,
    amend,
    amended,
    book,
    buy,
    cancel,
    canceled,
    filled,
    make_engine,
    market,
    rejected,
    run,
    sell,
)

NONE, RESTING, INCOMING, BOTH = StpMode.NONE, StpMode.CANCEL_RESTING, StpMode.CANCEL_INCOMING, StpMode.CANCEL_BOTH


def with_makers(engine: MatchingEngine) -> MatchingEngine:
    """Asks: bob s1 2 @ 100 (order 1), alice a1 3 @ 100 (order 2), bob s2 4 @ 101 (order 3).

    The maker's own STP mode is irrelevant (the incoming order's decides), so a1 names one anyway.
    """
    run(engine, sell("s1", 100, 2, client=BOB), sell("a1", 100, 3, stp=BOTH), sell("s2", 101, 4, client=BOB))
    return engine


# alice buys 8 @ 101 into the book above: the expected outcome for each mode
OUTCOMES: dict[StpMode, tuple[list[Event], list[tuple[str, int, str, int]]]] = {
    NONE: ([
        filled(5, 1, 100, 2, BUY, (1, BOB, "s1", 0), (4, ALICE, "t1", 6)),
        filled(6, 2, 100, 3, BUY, (2, ALICE, "a1", 0), (4, ALICE, "t1", 3)),  # a self-trade
        filled(7, 3, 101, 3, BUY, (3, BOB, "s2", 1), (4, ALICE, "t1", 0)),
    ], [("sell", 101, "s2", 1)]),
    RESTING: ([
        filled(5, 1, 100, 2, BUY, (1, BOB, "s1", 0), (4, ALICE, "t1", 6)),
        canceled(6, 2, "a1", SELL, 100, 3, SELF_TRADE),
        filled(7, 2, 101, 4, BUY, (3, BOB, "s2", 0), (4, ALICE, "t1", 2)),
    ], [("buy", 101, "t1", 2)]),
    INCOMING: ([
        filled(5, 1, 100, 2, BUY, (1, BOB, "s1", 0), (4, ALICE, "t1", 6)),
        canceled(6, 4, "t1", BUY, 101, 6, SELF_TRADE),
    ], [("sell", 100, "a1", 3), ("sell", 101, "s2", 4)]),
    BOTH: ([
        filled(5, 1, 100, 2, BUY, (1, BOB, "s1", 0), (4, ALICE, "t1", 6)),
        canceled(6, 2, "a1", SELL, 100, 3, SELF_TRADE),
        canceled(7, 4, "t1", BUY, 101, 6, SELF_TRADE),
    ], [("sell", 101, "s2", 4)]),
}


@pytest.mark.parametrize("mode", list(StpMode))
def test_each_mode_per_order(engine: MatchingEngine, mode: StpMode) -> None:
    with_makers(engine)
    events, resting = OUTCOMES[mode]
    # the fill before the first same-owner maker stands in every mode
    assert run(engine, buy("t1", 101, 8, stp=mode)) == [accepted(4, 4, "t1", BUY, 101, 8, stp=mode), *events]
    assert book(engine) == resting


@pytest.mark.parametrize(
    ("default", "override", "effective"),
    [
        (NONE, None, NONE),
        (RESTING, None, RESTING),
        (INCOMING, None, INCOMING),
        (BOTH, None, BOTH),
        (INCOMING, NONE, NONE),  # an explicit "none" beats the default
        (NONE, BOTH, BOTH),
        (BOTH, RESTING, RESTING),
    ],
)
def test_instrument_default_and_per_order_override(default: StpMode, override: StpMode | None,
                                                   effective: StpMode) -> None:
    engine = with_makers(make_engine(stp_default=default))
    events, resting = OUTCOMES[effective]
    assert run(engine, buy("t1", 101, 8, stp=override)) == [
        accepted(4, 4, "t1", BUY, 101, 8, stp=effective), *events]
    assert book(engine) == resting


def test_first_maker_own_with_cancel_incoming_cancels_everything(engine: MatchingEngine) -> None:
    run(engine, sell("a1", 100, 3), sell("s1", 100, 2, client=BOB))
    assert run(engine, buy("t1", 100, 5, stp=INCOMING)) == [
        accepted(3, 3, "t1", BUY, 100, 5, stp=INCOMING),
        canceled(4, 3, "t1", BUY, 100, 5, SELF_TRADE),
    ]
    assert book(engine) == [("sell", 100, "a1", 3), ("sell", 100, "s1", 2)]


def test_cancel_resting_skips_consecutive_own_orders_on_the_sell_side(engine: MatchingEngine) -> None:
    run(engine, buy("b1", 100, 2, client=BOB), buy("a1", 100, 3), buy("a2", 100, 1), buy("b2", 99, 5, client=BOB))
    assert run(engine, sell("t1", 100, 4, stp=RESTING)) == [
        accepted(5, 5, "t1", SELL, 100, 4, stp=RESTING),
        filled(6, 1, 100, 2, SELL, (1, BOB, "b1", 0), (5, ALICE, "t1", 2)),
        canceled(7, 2, "a1", BUY, 100, 3, SELF_TRADE),
        canceled(8, 3, "a2", BUY, 100, 1, SELF_TRADE),
    ]
    # the remainder does not trade below its limit; it rests at 100
    assert book(engine) == [("buy", 99, "b2", 5), ("sell", 100, "t1", 2)]
    assert run(engine, cancel("a1")) == [rejected(9, RejectReason.TOO_LATE, "a1", command="cancel")]


def test_cancel_resting_with_ioc_cancels_the_remainder_as_ioc(engine: MatchingEngine) -> None:
    with_makers(engine)
    assert run(engine, buy("t1", 100, 8, tif=IOC, stp=RESTING)) == [
        accepted(4, 4, "t1", BUY, 100, 8, tif=IOC, stp=RESTING),
        filled(5, 1, 100, 2, BUY, (1, BOB, "s1", 0), (4, ALICE, "t1", 6)),
        canceled(6, 2, "a1", SELL, 100, 3, SELF_TRADE),
        canceled(7, 4, "t1", BUY, 100, 6, IOC_REMAINDER),
    ]
    assert book(engine) == [("sell", 101, "s2", 4)]


def test_market_stopped_by_stp_is_canceled_for_self_trade(engine: MatchingEngine) -> None:
    with_makers(engine)
    assert run(engine, market("m1", BUY, 8, stp=INCOMING)) == [
        accepted(4, 4, "m1", BUY, 0, 8, otype=MARKET, tif=IOC, stp=INCOMING),
        filled(5, 1, 100, 2, BUY, (1, BOB, "s1", 0), (4, ALICE, "m1", 6)),
        canceled(6, 4, "m1", BUY, 0, 6, SELF_TRADE),
    ]


def test_amend_into_own_order_follows_the_orders_mode(engine: MatchingEngine) -> None:
    run(engine, buy("b1", 98, 5, stp=INCOMING), sell("s1", 100, 2, client=BOB), sell("a1", 101, 3))
    assert run(engine, amend("b1", price=101)) == [
        amended(4, 1, "b1", BUY, old_price=98, price=101, old_qty=5, qty=5, remaining=5, requeued=True),
        filled(5, 1, 100, 2, BUY, (2, BOB, "s1", 0), (1, ALICE, "b1", 3)),
        canceled(6, 1, "b1", BUY, 101, 3, SELF_TRADE),
    ]
    assert book(engine) == [("sell", 101, "a1", 3)]
    assert run(engine, cancel("b1")) == [rejected(7, RejectReason.TOO_LATE, "b1", command="cancel")]


# ----------------------------------------------------------------- FOK + STP


@pytest.mark.parametrize(
    ("mode", "qty"),
    [
        (INCOMING, 5),  # 2 from s1, then it would have to pass a1
        (BOTH, 5),
        (RESTING, 7),  # a1 does not count: only 2 + 4 = 6 are available
    ],
)
def test_fok_unfillable_under_stp_does_nothing(engine: MatchingEngine, mode: StpMode, qty: int) -> None:
    with_makers(engine)
    before = engine.state_hash()
    assert run(engine, buy("f1", 101, qty, tif=FOK, stp=mode)) == [
        accepted(4, 4, "f1", BUY, 101, qty, tif=FOK, stp=mode),
        canceled(5, 4, "f1", BUY, 101, qty, FOK_UNFILLED),
    ]
    assert engine.state_hash() == before  # in particular a1 is NOT canceled
    assert book(engine) == [("sell", 100, "s1", 2), ("sell", 100, "a1", 3), ("sell", 101, "s2", 4)]


def test_fok_unfillable_under_the_instrument_default() -> None:
    engine = with_makers(make_engine(stp_default="cancel_incoming"))
    assert run(engine, buy("f1", 101, 5, tif=FOK)) == [
        accepted(4, 4, "f1", BUY, 101, 5, tif=FOK, stp=INCOMING),
        canceled(5, 4, "f1", BUY, 101, 5, FOK_UNFILLED),
    ]


@pytest.mark.parametrize("mode", list(StpMode))
def test_fok_filled_before_reaching_own_order(engine: MatchingEngine, mode: StpMode) -> None:
    with_makers(engine)
    assert run(engine, buy("f1", 101, 2, tif=FOK, stp=mode)) == [
        accepted(4, 4, "f1", BUY, 101, 2, tif=FOK, stp=mode),
        filled(5, 1, 100, 2, BUY, (1, BOB, "s1", 0), (4, ALICE, "f1", 0)),
    ]
    assert book(engine) == [("sell", 100, "a1", 3), ("sell", 101, "s2", 4)]


def test_fok_cancel_resting_skips_own_orders_and_cancels_them_as_reached(engine: MatchingEngine) -> None:
    with_makers(engine)
    assert run(engine, buy("f1", 101, 6, tif=FOK, stp=RESTING)) == [
        accepted(4, 4, "f1", BUY, 101, 6, tif=FOK, stp=RESTING),
        filled(5, 1, 100, 2, BUY, (1, BOB, "s1", 0), (4, ALICE, "f1", 4)),
        canceled(6, 2, "a1", SELL, 100, 3, SELF_TRADE),
        filled(7, 2, 101, 4, BUY, (3, BOB, "s2", 0), (4, ALICE, "f1", 0)),
    ]
    assert book(engine) == []


def test_fok_without_stp_counts_own_orders(engine: MatchingEngine) -> None:
    with_makers(engine)
    assert run(engine, buy("f1", 101, 9, tif=FOK, stp=NONE)) == [
        accepted(4, 4, "f1", BUY, 101, 9, tif=FOK),
        filled(5, 1, 100, 2, BUY, (1, BOB, "s1", 0), (4, ALICE, "f1", 7)),
        filled(6, 2, 100, 3, BUY, (2, ALICE, "a1", 0), (4, ALICE, "f1", 4)),
        filled(7, 3, 101, 4, BUY, (3, BOB, "s2", 0), (4, ALICE, "f1", 0)),
    ]
