"""Order lifecycle commands: duplicate client order ids, cancel, cancel-all and clear-book."""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest

from exchange import BookCleared, CancelAll, CancelOrder, ClearBook, Command, Exchange, MatchingEngine, RejectReason
from exchange.core.dedupe import DedupeWindow

from ._helpers import (
    ALICE,
    BOB,
    BUY,
    CAROL,
    CLEARED,
    FOK,
    GTD,
    IOC,
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
    market,
    place,
    rejected,
    run,
    sell,
)

DUPLICATE = RejectReason.DUPLICATE_CLIENT_ORDER_ID

# ------------------------------------------------------ duplicate client ids


@pytest.mark.parametrize(
    "again",
    [buy("a1", 100, 5), sell("a1", 120, 1), buy("a1", 90, 1, tif=IOC), buy("a1", 90, 1, tif=FOK),
     market("a1", SELL, 1), buy("a1", 90, 1, post_only=True), buy("a1", 90, 1, tif=GTD, expire_ns=99)],
    ids=["same", "other-side", "ioc", "fok", "market", "post-only", "gtd"],
)
def test_duplicate_of_a_live_order_is_rejected(engine: MatchingEngine, again: Command) -> None:
    run(engine, buy("a1", 100, 5))
    assert run(engine, again) == [rejected(2, DUPLICATE, "a1", oid=1)]  # points at the original order
    assert book(engine) == [("buy", 100, "a1", 5)]


def test_client_order_ids_are_per_client(engine: MatchingEngine) -> None:
    assert run(engine, buy("x", 100, 5), buy("x", 99, 5, client=BOB)) == [
        accepted(1, 1, "x", BUY, 100, 5),
        accepted(2, 2, "x", BUY, 99, 5, client=BOB),
    ]


# how "a1" finished -> (commands, the order id a duplicate rejection points at)
FINISHES: dict[str, tuple[list[Command], int]] = {
    "canceled": ([buy("a1", 100, 5), cancel("a1")], 1),
    "filled": ([buy("a1", 100, 5), sell("b1", 100, 5, client=BOB)], 1),
    "filled-as-taker": ([sell("b1", 100, 5, client=BOB), buy("a1", 100, 5)], 2),
    "ioc-remainder": ([buy("a1", 100, 5, tif=IOC)], 1),
    "fok-unfilled": ([buy("a1", 100, 5, tif=FOK)], 1),
    "market-remainder": ([market("a1", BUY, 5)], 1),
    "expired": ([buy("a1", 100, 5, tif=GTD, expire_ns=10), buy("z", 1, 1, ts=10)], 1),
    "cleared": ([buy("a1", 100, 5), ClearBook(SYM)], 1),
}


@pytest.mark.parametrize(("finish", "original"), FINISHES.values(), ids=FINISHES.keys())
def test_duplicate_of_a_finished_order_is_rejected(finish: list[Command], original: int) -> None:
    engine = make_engine()
    run(engine, *finish)
    resting, seq = book(engine), engine.seq
    assert run(engine, buy("a1", 50, 1, ts=20)) == [rejected(seq + 1, DUPLICATE, "a1", oid=original, ts=20)]
    assert book(engine) == resting


def test_a_rejected_command_does_not_burn_the_id(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 100, 5, client=BOB))
    assert run(engine,
               buy("a1", 100, 0),  # invalid quantity
               buy("a1", 100, 5, post_only=True),  # would trade
               buy("a1", 100, 5, tif=GTD, expire_ns=0),  # bad expiry
               buy("a1", 99, 5)) == [
        rejected(2, RejectReason.INVALID_QUANTITY, "a1"),
        rejected(3, RejectReason.POST_ONLY_WOULD_TRADE, "a1"),
        rejected(4, RejectReason.INVALID_EXPIRY, "a1"),
        accepted(5, 2, "a1", BUY, 99, 5),
    ]


def finish_ioc(coid: str) -> list[Command]:
    return [buy(coid, 100, 1, tif=IOC)]  # never rests: accepted, then canceled


def finish_rested(coid: str) -> list[Command]:
    return [buy(coid, 100, 1), cancel(coid)]  # rests, then canceled


@pytest.mark.parametrize("finish", [finish_ioc, finish_rested])
def test_dedupe_window_forgets_the_oldest_finished_ids(finish: Callable[[str], list[Command]]) -> None:
    engine = make_engine(dedupe_window=2)
    run(engine, buy("live", 10, 1))  # live orders are never forgotten
    run(engine, *finish("x1"), *finish("x2"))
    seq = engine.seq
    assert run(engine, buy("x1", 100, 1)) == [rejected(seq + 1, DUPLICATE, "x1", oid=2)]  # still within the window
    run(engine, *finish("x3"))  # the third finished id pushes x1 out
    seq = engine.seq
    assert run(engine, buy("x1", 100, 1), buy("x2", 100, 1), buy("x3", 100, 1), buy("live", 10, 1)) == [
        accepted(seq + 1, 5, "x1", BUY, 100, 1),
        rejected(seq + 2, DUPLICATE, "x2", oid=3),
        rejected(seq + 3, DUPLICATE, "x3", oid=4),
        rejected(seq + 4, DUPLICATE, "live", oid=1),
    ]


def test_dedupe_window_zero_remembers_only_live_ids() -> None:
    engine = make_engine(dedupe_window=0)
    run(engine, buy("x1", 100, 1, tif=IOC))
    assert run(engine, buy("x1", 100, 1), buy("x1", 100, 1)) == [
        accepted(3, 2, "x1", BUY, 100, 1),
        rejected(4, DUPLICATE, "x1", oid=2),
    ]
    # with nothing remembered, a finished id is unknown rather than too late
    assert run(engine, cancel("x1"), cancel("x1")) == [
        canceled(5, 2, "x1", BUY, 100, 1),
        rejected(6, RejectReason.UNKNOWN_ORDER, "x1", command="cancel"),
    ]


def test_dedupe_window_evicts_oldest_first_across_clients_and_drops_emptied_clients() -> None:
    window = DedupeWindow(3, 10)
    for client, coid, oid in [("a", "1", 1), ("b", "1", 2), ("a", "2", 3), ("c", "9", 4)]:
        window.remember(client, coid, oid)
    assert window.entries() == [("b", "1", 2), ("a", "2", 3), ("c", "9", 4)]
    assert (window.get("a", "1"), window.get("a", "2"), window.get("b", "1")) == (None, 3, 2)
    window.remember("d", "1", 5)  # evicts b's only entry: b is gone, so the clients do not pile up
    assert sorted(window.ids) == ["a", "c", "d"]
    assert window.get("b", "1") is None


def test_dedupe_window_adds_nothing_for_the_garbage_collector_to_track() -> None:
    """Every finished order enters the window; a tracked object per entry filled the collector's young
    generation, and each young collection traversed them all (the daemon's worst pauses)."""
    window = DedupeWindow(100_000, 500)
    window.remember("warm", "up", 1)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # a collection would untrack tuples of strings on its own and hide them
    try:
        tracked = len(gc.get_objects())
        for i in range(20_000):  # 1,000 a client: past its bound of 500, so tombstones and sweeps too
            window.remember(f"client-{i % 20}", f"o{i}", i + 2)
        assert len(gc.get_objects()) - tracked < 100  # a deque for each busy client, no more
    finally:
        if enabled:
            gc.enable()
    assert len(window.entries()) == 20 * 500 + 1


# ------------------------------------------------------------------- cancel


@pytest.fixture
def resting(engine: MatchingEngine) -> MatchingEngine:
    run(engine, buy("a1", 100, 5), sell("a2", 105, 3), buy("b1", 99, 4, client=BOB))
    return engine


@pytest.mark.parametrize("command", [cancel("a1"), cancel(oid=1), cancel("a1", oid=1)],
                         ids=["client-order-id", "order-id", "both"])
def test_cancel_by_either_id(resting: MatchingEngine, command: Command) -> None:
    assert run(resting, command) == [canceled(4, 1, "a1", BUY, 100, 5)]
    assert book(resting) == [("buy", 99, "b1", 4), ("sell", 105, "a2", 3)]


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (cancel(oid=1, client=BOB), RejectReason.NOT_OWNER),
        (cancel("a1", oid=3), RejectReason.NOT_OWNER),  # order 3 is bob's
        (cancel("a1", client=BOB), RejectReason.UNKNOWN_ORDER),  # bob has no order a1
        (cancel("nope"), RejectReason.UNKNOWN_ORDER),
        (cancel(oid=4), RejectReason.UNKNOWN_ORDER),  # never issued
        (cancel(oid=0), RejectReason.UNKNOWN_ORDER),
        (cancel(oid=-1), RejectReason.UNKNOWN_ORDER),
        (cancel("a1", oid=2), RejectReason.UNKNOWN_ORDER),  # both ids, naming different orders
        (cancel("a2", oid=1), RejectReason.UNKNOWN_ORDER),
        (cancel(), RejectReason.MALFORMED),
    ],
)
def test_cancel_rejections_leave_the_book_alone(resting: MatchingEngine, command: CancelOrder,
                                                reason: RejectReason) -> None:
    before = resting.state_hash()
    assert run(resting, command) == [
        rejected(4, reason, command.client_order_id, oid=command.order_id, client=command.client_id,
                 command="cancel")]
    assert resting.state_hash() == before


def test_cancel_after_fill_is_too_late(resting: MatchingEngine) -> None:
    assert run(resting, sell("c1", 100, 5, client=CAROL)) == [
        accepted(4, 4, "c1", SELL, 100, 5, client=CAROL),
        filled(5, 1, 100, 5, SELL, (1, ALICE, "a1", 0), (4, CAROL, "c1", 0)),
    ]
    assert run(resting, cancel("a1"), cancel(oid=1), cancel(oid=4, client=CAROL)) == [
        rejected(6, RejectReason.TOO_LATE, "a1", command="cancel"),
        rejected(7, RejectReason.TOO_LATE, oid=1, command="cancel"),
        rejected(8, RejectReason.TOO_LATE, oid=4, client=CAROL, command="cancel"),  # a taker that never rested
    ]


def test_cancel_twice_is_too_late(resting: MatchingEngine) -> None:
    assert run(resting, cancel("a2"), cancel("a2"), cancel(oid=2)) == [
        canceled(4, 2, "a2", SELL, 105, 3),
        rejected(5, RejectReason.TOO_LATE, "a2", command="cancel"),
        rejected(6, RejectReason.TOO_LATE, oid=2, command="cancel"),
    ]


def test_cancel_partially_filled_order_cancels_the_rest(resting: MatchingEngine) -> None:
    run(resting, buy("c1", 105, 1, client=CAROL))
    assert run(resting, cancel(oid=2, ts=7)) == [canceled(6, 2, "a2", SELL, 105, 2, ts=7)]


# ---------------------------------------------------------------- cancel all


def test_cancel_all_cancels_one_clients_orders_in_order_id_order(engine: MatchingEngine) -> None:
    run(engine, buy("a1", 100, 5), sell("a2", 105, 3), buy("b1", 99, 4, client=BOB), buy("a3", 101, 1))
    assert run(engine, CancelAll(ALICE, SYM, ts_ns=3)) == [
        canceled(5, 1, "a1", BUY, 100, 5, ts=3),
        canceled(6, 2, "a2", SELL, 105, 3, ts=3),
        canceled(7, 4, "a3", BUY, 101, 1, ts=3),
    ]
    assert book(engine) == [("buy", 99, "b1", 4)]
    assert run(engine, CancelAll(ALICE, SYM), CancelAll(CAROL, SYM)) == []
    assert run(engine, cancel("a3")) == [rejected(8, RejectReason.TOO_LATE, "a3", command="cancel")]


def test_cancel_all_across_instruments_via_exchange() -> None:
    exchange = Exchange([make_spec("BBB"), make_spec("AAA")])
    for command in [place("a1", BUY, 100, 1, instrument="BBB"), place("b1", SELL, 200, 1, client=BOB, instrument="BBB"),
                    place("a2", SELL, 200, 2, instrument="BBB"), place("a3", SELL, 300, 3, instrument="AAA"),
                    place("b2", BUY, 100, 1, client=BOB, instrument="AAA")]:
        exchange.apply(command)
    assert exchange.apply(CancelAll(ALICE, None, ts_ns=9)) == [  # engines in symbol order
        canceled(3, 1, "a3", SELL, 300, 3, ts=9, instrument="AAA"),
        canceled(4, 1, "a1", BUY, 100, 1, ts=9, instrument="BBB"),
        canceled(5, 3, "a2", SELL, 200, 2, ts=9, instrument="BBB"),
    ]
    assert [book(e) for e in (exchange.engines["AAA"], exchange.engines["BBB"])] == [
        [("buy", 100, "b2", 1)], [("sell", 200, "b1", 1)]]
    assert exchange.apply(CancelAll(BOB, "AAA")) == [canceled(4, 2, "b2", BUY, 100, 1, client=BOB, instrument="AAA")]
    assert book(exchange.engines["BBB"]) == [("sell", 200, "b1", 1)]
    for e in exchange.engines.values():
        e.book.check_invariants()


# --------------------------------------------------------------- clear book


def test_clear_book_cancels_everything_in_priority_order(engine: MatchingEngine) -> None:
    run(engine, buy("a1", 99, 1), sell("b1", 102, 2, client=BOB), buy("a2", 100, 3), buy("c1", 99, 4, client=CAROL),
        sell("b2", 101, 5, client=BOB), sell("a3", 101, 6), buy("a4", 99, 7), cancel("a4"))
    assert run(engine, ClearBook(SYM, 5, "ops-1", "fat finger")) == [
        BookCleared(SYM, 9, 5, "ops-1", "fat finger", 6),  # the operator's action first, with the count
        canceled(10, 3, "a2", BUY, 100, 3, CLEARED, ts=5),
        canceled(11, 1, "a1", BUY, 99, 1, CLEARED, ts=5),
        canceled(12, 4, "c1", BUY, 99, 4, CLEARED, client=CAROL, ts=5),
        canceled(13, 5, "b2", SELL, 101, 5, CLEARED, client=BOB, ts=5),
        canceled(14, 6, "a3", SELL, 101, 6, CLEARED, ts=5),
        canceled(15, 2, "b1", SELL, 102, 2, CLEARED, client=BOB, ts=5),
    ]
    assert book(engine) == []
    assert run(engine, ClearBook(SYM, 6)) == [BookCleared(SYM, 16, 6, "", "", 0)]  # journaled on an empty book too
    assert run(engine, cancel("c1", client=CAROL)) == [
        rejected(17, RejectReason.TOO_LATE, "c1", client=CAROL, command="cancel")]
