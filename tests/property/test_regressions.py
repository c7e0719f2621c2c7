"""Minimal reproducers of disagreements the property tests found, as plain unit tests.

Each test applies an exact command list to a fresh engine and checks the
outcome the rules require; it then replays the same commands through the
differential :class:`~tests.property.harness.Harness` (reference + invariants).
"""

from __future__ import annotations

import pytest

from exchange.core.commands import PlaceOrder
from exchange.core.events import OrderAccepted, OrderCanceled, OrderFilled, OrderRejected, OrderTriggered
from exchange.core.instruments import Instrument
from exchange.core.matching import MatchingEngine
from exchange.core.types import CancelReason, OrderType, RejectReason, Side, TimeInForce

from .harness import SPECS, Harness


@pytest.mark.parametrize("tif", [TimeInForce.IOC, "IOC"], ids=["enum", "plain-str"])
def test_post_only_ioc_limit_is_rejected_as_invalid_order(tif: TimeInForce | str) -> None:
    """Found by the state machine on the first run (engine at d04e4a1; fixed in e1f67b1).

    Rule: "post-only orders must be GTC or GTD limit orders". The fast path of
    ``_place`` let a well-typed post-only IOC limit through without calling
    ``_place_error``: it was accepted and its remainder canceled
    ``ioc_remainder`` (or, when it crossed, rejected ``post_only_would_trade``),
    while the same order with ``tif="IOC"`` as a plain string took the slow
    path and was rejected ``invalid_order``.
    """
    engine = MatchingEngine(SPECS["band"])
    cmds = [
        # would not cross: was accepted + canceled ioc_remainder
        PlaceOrder("BAND", "alice", "o1", Side.BUY, OrderType.LIMIT, 95, 1, tif=tif, ts_ns=1000, post_only=True),
        PlaceOrder("BAND", "bob", "o2", Side.SELL, OrderType.LIMIT, 100, 3, ts_ns=1000),
        # would cross: was rejected post_only_would_trade instead of invalid_order
        PlaceOrder("BAND", "alice", "o3", Side.BUY, OrderType.LIMIT, 100, 1, tif=tif, ts_ns=1000, post_only=True),
    ]
    first = engine.apply(cmds[0])
    assert [type(e) for e in first] == [OrderRejected]
    assert first[0].reason is RejectReason.INVALID_ORDER
    assert first[0].order_id is None
    assert engine.next_order_id == 1, "a rejected place must not consume an order id"
    assert [type(e) for e in engine.apply(cmds[1])] == [OrderAccepted]
    third = engine.apply(cmds[2])
    assert [(type(e), e.reason) for e in third] == [(OrderRejected, RejectReason.INVALID_ORDER)]
    engine.book.check_invariants()

    h = Harness(SPECS["band"])
    for cmd in cmds:
        h.step(cmd)
    h.final_checks()


@pytest.mark.parametrize("expire_ns", [0, -5])
def test_gtd_expiry_must_be_a_positive_time(expire_ns: int) -> None:
    """Found by reading ``_place``/``_place_error`` while writing the reference.

    With ``ts_ns`` < 0 a GTD order could carry ``expire_ns=0``, which the
    scheduler read as "no expiry", so the order would rest forever. Input
    timestamps are Kafka times, never negative; the engine now refuses a GTD
    expiry that is not a positive time (``invalid_expiry``), whatever ``ts_ns``.
    """
    spec = Instrument.from_decimals("X", tick_size="1", lot_size="1")
    engine = MatchingEngine(spec)
    placed = engine.apply(PlaceOrder("X", "a", "g0", Side.BUY, OrderType.LIMIT, 100, 5, tif=TimeInForce.GTD,
                                     ts_ns=-10, expire_ns=expire_ns))
    assert [(type(e), e.reason) for e in placed] == [(OrderRejected, RejectReason.INVALID_EXPIRY)]
    assert len(engine.book) == 0


def test_fok_with_cancel_resting_skips_own_orders_without_touching_them() -> None:
    """Pinned from the rules (no disagreement): the FOK check honours STP, and a failed FOK changes nothing."""
    spec = SPECS["plain"]
    h = Harness(spec)
    h.step(PlaceOrder("PLAIN", "alice", "a1", Side.SELL, OrderType.LIMIT, 100, 5, ts_ns=1))
    h.step(PlaceOrder("PLAIN", "bob", "b1", Side.SELL, OrderType.LIMIT, 101, 3, ts_ns=1))
    events = h.step(PlaceOrder("PLAIN", "alice", "a2", Side.BUY, OrderType.LIMIT, 101, 4, tif=TimeInForce.FOK,
                               ts_ns=1, stp="cancel_resting"))
    assert [type(e) for e in events] == [OrderAccepted, OrderCanceled]
    assert events[1].reason is CancelReason.FOK_UNFILLED
    assert len(h.engine.book) == 2
    events = h.step(PlaceOrder("PLAIN", "alice", "a3", Side.BUY, OrderType.LIMIT, 101, 3, tif=TimeInForce.FOK,
                               ts_ns=1, stp="cancel_resting"))
    assert [(type(e).__name__, getattr(e, "reason", None)) for e in events] == [
        ("OrderAccepted", None), ("OrderCanceled", CancelReason.SELF_TRADE), ("OrderFilled", None)]
    h.final_checks()


def test_one_trade_reaching_stops_on_both_sides_triggers_both() -> None:
    """Found by the state machine once it learned stops.

    Before anything has traded (last price 0) a stop on either side is accepted whatever its stop price, so
    the first trade can reach a buy stop at or below it and a sell stop at or above it at once. Rule: a stop
    triggers once a trade is at or above (buy) / at or below (sell) its stop price. An engine that looks at
    the sell stops only when a trade reached no buy stop leaves the sell stop at 100 waiting although the
    trade at 99 reached it (and a new sell stop at 100 would then be refused ``stop_would_trigger``). Buys
    fire first, then sells.
    """
    cmds = [
        PlaceOrder("BAND", "alice", "o1", Side.BUY, OrderType.STOP, 0, 1, ts_ns=1000, stop_price_ticks=99),
        PlaceOrder("BAND", "bob", "o2", Side.BUY, OrderType.LIMIT, 99, 1, ts_ns=1000),
        PlaceOrder("BAND", "alice", "o3", Side.SELL, OrderType.STOP, 0, 1, ts_ns=1000, stop_price_ticks=100),
        PlaceOrder("BAND", "carol", "o4", Side.SELL, OrderType.LIMIT, 99, 1, ts_ns=1000),
    ]
    engine = MatchingEngine(SPECS["band"])
    for cmd in cmds[:-1]:
        engine.apply(cmd)
    events = engine.apply(cmds[-1])
    assert [(type(e), getattr(e, "order_id", None)) for e in events] == [
        (OrderAccepted, 4), (OrderFilled, None), (OrderTriggered, 1), (OrderCanceled, 1), (OrderTriggered, 3),
        (OrderCanceled, 3)]  # (each a market order meeting an empty side: ioc_remainder)
    assert engine.export_state().stops == []

    h = Harness(SPECS["band"])
    for cmd in cmds:
        h.step(cmd)
    h.final_checks()
