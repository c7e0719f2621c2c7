"""Amend: quantity down keeps priority; price change or quantity up re-queues; a crossing price trades."""

from __future__ import annotations

import pytest

from exchange import AmendOrder, MatchingEngine, RejectReason

from ._helpers import (
    ALICE,
    BOB,
    BUY,
    CAROL,
    GTD,
    SELL,
    accepted,
    amend,
    amended,
    book,
    buy,
    cancel,
    canceled,
    expired,
    filled,
    rejected,
    run,
    sell,
)

INVALID_AMEND = RejectReason.INVALID_AMEND


@pytest.fixture
def two_asks(engine: MatchingEngine) -> MatchingEngine:
    """alice: s1 sells 10 @ 100 (order 1), then s2 sells 5 @ 100 (order 2)."""
    run(engine, sell("s1", 100, 10), sell("s2", 100, 5))
    return engine


@pytest.mark.parametrize("command", [amend("s1", qty=6), amend(oid=1, qty=6), amend("s1", oid=1, qty=6, price=100)],
                         ids=["client-order-id", "order-id", "both-ids-same-price"])
def test_reducing_quantity_keeps_priority(two_asks: MatchingEngine, command: AmendOrder) -> None:
    assert run(two_asks, command) == [
        amended(3, 1, "s1", SELL, old_price=100, price=100, old_qty=10, qty=6, remaining=6, requeued=False)]
    assert book(two_asks) == [("sell", 100, "s1", 6), ("sell", 100, "s2", 5)]
    # a later taker still meets s1 first
    assert run(two_asks, buy("b1", 100, 8, client=BOB)) == [
        accepted(4, 3, "b1", BUY, 100, 8, client=BOB),
        filled(5, 1, 100, 6, BUY, (1, ALICE, "s1", 0), (3, BOB, "b1", 2)),
        filled(6, 2, 100, 2, BUY, (2, ALICE, "s2", 3), (3, BOB, "b1", 0)),
    ]


def test_increasing_quantity_requeues_at_the_back(two_asks: MatchingEngine) -> None:
    assert run(two_asks, amend("s1", qty=12)) == [
        amended(3, 1, "s1", SELL, old_price=100, price=100, old_qty=10, qty=12, remaining=12, requeued=True)]
    assert book(two_asks) == [("sell", 100, "s2", 5), ("sell", 100, "s1", 12)]
    assert run(two_asks, buy("b1", 100, 8, client=BOB)) == [
        accepted(4, 3, "b1", BUY, 100, 8, client=BOB),
        filled(5, 1, 100, 5, BUY, (2, ALICE, "s2", 0), (3, BOB, "b1", 3)),
        filled(6, 2, 100, 3, BUY, (1, ALICE, "s1", 9), (3, BOB, "b1", 0)),
    ]


def test_price_change_requeues_at_the_back_of_the_new_level(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 10), sell("s2", 101, 5))
    assert run(engine, amend("s1", price=101, qty=7)) == [  # a lower quantity does not save its priority
        amended(3, 1, "s1", SELL, old_price=100, price=101, old_qty=10, qty=7, remaining=7, requeued=True)]
    assert book(engine) == [("sell", 101, "s2", 5), ("sell", 101, "s1", 7)]
    assert run(engine, buy("b1", 101, 6, client=BOB)) == [
        accepted(4, 3, "b1", BUY, 101, 6, client=BOB),
        filled(5, 1, 101, 5, BUY, (2, ALICE, "s2", 0), (3, BOB, "b1", 1)),
        filled(6, 2, 101, 1, BUY, (1, ALICE, "s1", 6), (3, BOB, "b1", 0)),
    ]


def test_price_away_and_back_loses_priority(two_asks: MatchingEngine) -> None:
    assert run(two_asks, amend("s1", price=103), amend("s1", price=100)) == [
        amended(3, 1, "s1", SELL, old_price=100, price=103, old_qty=10, qty=10, remaining=10, requeued=True),
        amended(4, 1, "s1", SELL, old_price=103, price=100, old_qty=10, qty=10, remaining=10, requeued=True),
    ]
    assert book(two_asks) == [("sell", 100, "s2", 5), ("sell", 100, "s1", 10)]


def test_crossing_price_trades_at_once_at_the_makers_prices(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 3), sell("s2", 101, 3), sell("s3", 102, 3), buy("b1", 98, 10, client=BOB))
    assert run(engine, amend("b1", client=BOB, price=101, ts=5)) == [
        amended(5, 4, "b1", BUY, old_price=98, price=101, old_qty=10, qty=10, remaining=10, requeued=True,
                client=BOB, ts=5),
        filled(6, 1, 100, 3, BUY, (1, ALICE, "s1", 0), (4, BOB, "b1", 7), ts=5),
        filled(7, 2, 101, 3, BUY, (2, ALICE, "s2", 0), (4, BOB, "b1", 4), ts=5),
    ]
    # the remainder rests at the new price under the same ids
    assert book(engine) == [("buy", 101, "b1", 4), ("sell", 102, "s3", 3)]
    assert run(engine, sell("c1", 101, 1, client=CAROL), cancel(oid=4, client=BOB)) == [
        accepted(8, 5, "c1", SELL, 101, 1, client=CAROL),
        filled(9, 3, 101, 1, SELL, (4, BOB, "b1", 3), (5, CAROL, "c1", 0)),
        canceled(10, 4, "b1", BUY, 101, 3, client=BOB),
    ]


def test_crossing_sell_amend_that_fills_completely_finishes_the_order(engine: MatchingEngine) -> None:
    run(engine, buy("b1", 100, 2, client=BOB), buy("b2", 99, 5, client=BOB), sell("s1", 101, 4))
    assert run(engine, amend("s1", price=99)) == [
        amended(4, 3, "s1", SELL, old_price=101, price=99, old_qty=4, qty=4, remaining=4, requeued=True),
        filled(5, 1, 100, 2, SELL, (1, BOB, "b1", 0), (3, ALICE, "s1", 2)),
        filled(6, 2, 99, 2, SELL, (2, BOB, "b2", 3), (3, ALICE, "s1", 0)),
    ]
    assert book(engine) == [("buy", 99, "b2", 3)]
    assert run(engine, cancel("s1"), amend("s1", qty=9), buy("s1", 1, 1)) == [
        rejected(7, RejectReason.TOO_LATE, "s1", command="cancel"),
        rejected(8, RejectReason.TOO_LATE, "s1", command="amend"),
        rejected(9, RejectReason.DUPLICATE_CLIENT_ORDER_ID, "s1", oid=3),
    ]


# ---------------------------------------------------- amending a partial fill


@pytest.fixture
def partial(engine: MatchingEngine) -> MatchingEngine:
    """s1 sold 4 of its 10 lots @ 100: filled 4, remaining 6."""
    run(engine, sell("s1", 100, 10), buy("b1", 100, 4, client=BOB))
    assert book(engine) == [("sell", 100, "s1", 6)]
    return engine


@pytest.mark.parametrize("qty", [4, 3, 1])
def test_new_total_not_above_filled_is_invalid(partial: MatchingEngine, qty: int) -> None:
    before = partial.state_hash()
    assert run(partial, amend("s1", qty=qty)) == [rejected(4, INVALID_AMEND, "s1", oid=1, command="amend")]
    assert partial.state_hash() == before


def test_partial_reduce_is_total_quantity(partial: MatchingEngine) -> None:
    assert run(partial, amend("s1", qty=5)) == [
        amended(4, 1, "s1", SELL, old_price=100, price=100, old_qty=10, qty=5, remaining=1, requeued=False)]
    assert book(partial) == [("sell", 100, "s1", 1)]


def test_partial_increase_is_total_quantity(partial: MatchingEngine) -> None:
    assert run(partial, amend(oid=1, qty=12)) == [
        amended(4, 1, "s1", SELL, old_price=100, price=100, old_qty=10, qty=12, remaining=8, requeued=True)]
    assert book(partial) == [("sell", 100, "s1", 8)]


# ---------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (amend("s1"), rejected(3, INVALID_AMEND, "s1", oid=1, command="amend")),
        (amend("s1", price=100), rejected(3, INVALID_AMEND, "s1", oid=1, command="amend")),
        (amend("s1", qty=10), rejected(3, INVALID_AMEND, "s1", oid=1, command="amend")),
        (amend(oid=1, price=100, qty=10), rejected(3, INVALID_AMEND, "s1", oid=1, command="amend")),
        (amend("s1", price=0), rejected(3, RejectReason.INVALID_PRICE, "s1", oid=1, command="amend")),
        (amend("s1", price=-100), rejected(3, RejectReason.INVALID_PRICE, "s1", oid=1, command="amend")),
        (amend("s1", qty=0), rejected(3, RejectReason.INVALID_QUANTITY, "s1", oid=1, command="amend")),
        (amend("zz", qty=5), rejected(3, RejectReason.UNKNOWN_ORDER, "zz", command="amend")),
        (amend(oid=9, qty=5), rejected(3, RejectReason.UNKNOWN_ORDER, oid=9, command="amend")),
        (amend(oid=1, qty=5, client=BOB), rejected(3, RejectReason.NOT_OWNER, oid=1, client=BOB, command="amend")),
        (amend("s1", qty=5, client=BOB), rejected(3, RejectReason.UNKNOWN_ORDER, "s1", client=BOB, command="amend")),
        (amend("s1", oid=2, qty=5), rejected(3, RejectReason.UNKNOWN_ORDER, "s1", oid=2, command="amend")),
        (amend(qty=5), rejected(3, RejectReason.MALFORMED, command="amend")),
    ],
)
def test_amend_rejections_leave_the_order_unchanged(two_asks: MatchingEngine, command: AmendOrder,
                                                    expected: object) -> None:
    before = two_asks.state_hash()
    assert run(two_asks, command) == [expected]
    assert two_asks.state_hash() == before


def test_post_only_amend_that_would_cross_is_rejected(engine: MatchingEngine) -> None:
    run(engine, buy("p1", 98, 5, post_only=True), buy("x", 99, 1), sell("s1", 101, 5, client=BOB))
    before = engine.state_hash()
    assert run(engine, amend("p1", price=101), amend("p1", price=150, qty=3)) == [
        rejected(4, RejectReason.POST_ONLY_WOULD_TRADE, "p1", oid=1, command="amend"),
        rejected(5, RejectReason.POST_ONLY_WOULD_TRADE, "p1", oid=1, command="amend"),
    ]
    assert engine.state_hash() == before
    assert book(engine) == [("buy", 99, "x", 1), ("buy", 98, "p1", 5), ("sell", 101, "s1", 5)]
    # a non-crossing amend of the same order is fine
    assert run(engine, amend("p1", price=100)) == [
        amended(6, 1, "p1", BUY, old_price=98, price=100, old_qty=5, qty=5, remaining=5, requeued=True)]


def test_amended_gtd_order_keeps_its_expiry(engine: MatchingEngine) -> None:
    run(engine, buy("g1", 99, 5, tif=GTD, expire_ns=100))
    assert run(engine, amend("g1", price=98, qty=6, ts=10), amend("g1", qty=2, ts=20), buy("x", 1, 1, ts=100)) == [
        amended(2, 1, "g1", BUY, old_price=99, price=98, old_qty=5, qty=6, remaining=6, requeued=True, ts=10),
        amended(3, 1, "g1", BUY, old_price=98, price=98, old_qty=6, qty=2, remaining=2, requeued=False, ts=20),
        expired(4, 1, "g1", BUY, 98, 2, ts=100),
        accepted(5, 2, "x", BUY, 1, 1, ts=100),
    ]
