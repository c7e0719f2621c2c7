"""Determinism: sequence numbers, id counters, byte-identical replays, state hashes, snapshots, routing."""

from __future__ import annotations

import msgspec
import pytest

from exchange import (
    BookCleared,
    CancelAll,
    ClearBook,
    Command,
    EngineState,
    Event,
    Exchange,
    MatchingEngine,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderExpired,
    OrderFilled,
    OrderRejected,
    RejectInput,
    RejectReason,
    RestingOrder,
    StpMode,
)

from ._helpers import (
    ALICE,
    BOB,
    BUY,
    CAROL,
    CLEARED,
    FOK,
    FOK_UNFILLED,
    GTD,
    IOC,
    IOC_REMAINDER,
    MARKET,
    SELF_TRADE,
    SELL,
    SYM,
    accepted,
    amend,
    amended,
    book,
    buy,
    cancel,
    canceled,
    expired,
    filled,
    make_engine,
    make_spec,
    market,
    place,
    rejected,
    run,
    sell,
)

SCRIPT: list[Command] = [
    sell("s1", 101, 5, client=BOB, ts=1),
    sell("s2", 102, 5, client=BOB, ts=2),
    buy("b1", 99, 5, tif=GTD, expire_ns=50, ts=3),
    buy("b2", 100, 3, ts=4),
    buy("x", 0, 1, ts=5),  # rejected
    buy("t1", 101, 7, client=CAROL, ts=6),  # fills s1, rests 2 @ 101
    amend("b2", qty=2, ts=7),
    sell("i1", 99, 10, client=BOB, tif=IOC, ts=8),  # sweeps t1, b2, b1; remainder canceled
    buy("g1", 90, 1, tif=GTD, expire_ns=60, ts=9),
    cancel("nope", ts=10),  # rejected
    buy("f1", 102, 9, tif=FOK, ts=11),  # unfilled
    sell("p1", 103, 2, post_only=True, ts=12),
    buy("p2", 103, 2, post_only=True, ts=13),  # rejected: would trade
    market("m1", BUY, 1, client=CAROL, ts=14),
    amend("p1", price=102, ts=15),  # requeued behind s2
    buy("y", 95, 1, ts=60),  # g1 expires first
    RejectInput(SYM, BOB, "r1", RejectReason.INVALID_PRICE, "price 1.001 is not a multiple of 0.01", ts_ns=61),
    buy("a1", 98, 1, stp=StpMode.CANCEL_BOTH, ts=62),
    sell("a2", 98, 2, stp=StpMode.CANCEL_RESTING, ts=63),  # cancels own a1, rests
    CancelAll(CAROL, ts_ns=64),
    ClearBook(SYM, ts_ns=70),
]


def test_sequence_numbers_step_by_one_across_every_event_type(engine: MatchingEngine) -> None:
    events = run(engine, *SCRIPT)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert engine.seq == len(events)
    assert {type(e) for e in events} == {OrderAccepted, OrderRejected, OrderFilled, OrderCanceled, OrderAmended,
                                         OrderExpired, BookCleared}
    assert book(engine) == []


def test_order_and_trade_ids_come_from_counters(engine: MatchingEngine) -> None:
    events = run(engine, *SCRIPT)
    order_ids = [e.order_id for e in events if isinstance(e, OrderAccepted)]
    trade_ids = [e.trade_id for e in events if isinstance(e, OrderFilled)]
    assert order_ids == list(range(1, len(order_ids) + 1))  # rejections consume none
    assert trade_ids == list(range(1, len(trade_ids) + 1))
    assert (engine.next_order_id, engine.next_trade_id) == (len(order_ids) + 1, len(trade_ids) + 1)


def test_same_commands_give_identical_events_and_bytes() -> None:
    first, second = run(make_engine(), *SCRIPT), run(make_engine(), *SCRIPT)
    assert first == second
    assert msgspec.json.encode(first) == msgspec.json.encode(second)
    assert msgspec.json.decode(msgspec.json.encode(first), type=list[Event]) == first


def test_the_script_event_by_event(engine: MatchingEngine) -> None:
    S = StpMode
    assert run(engine, *SCRIPT) == [
        accepted(1, 1, "s1", SELL, 101, 5, client=BOB, ts=1),
        accepted(2, 2, "s2", SELL, 102, 5, client=BOB, ts=2),
        accepted(3, 3, "b1", BUY, 99, 5, tif=GTD, expire_ns=50, ts=3),
        accepted(4, 4, "b2", BUY, 100, 3, ts=4),
        rejected(5, RejectReason.INVALID_PRICE, "x", ts=5),
        accepted(6, 5, "t1", BUY, 101, 7, client=CAROL, ts=6),
        filled(7, 1, 101, 5, BUY, (1, BOB, "s1", 0), (5, CAROL, "t1", 2), ts=6),
        amended(8, 4, "b2", BUY, old_price=100, price=100, old_qty=3, qty=2, remaining=2, requeued=False, ts=7),
        accepted(9, 6, "i1", SELL, 99, 10, client=BOB, tif=IOC, ts=8),
        filled(10, 2, 101, 2, SELL, (5, CAROL, "t1", 0), (6, BOB, "i1", 8), ts=8),
        filled(11, 3, 100, 2, SELL, (4, ALICE, "b2", 0), (6, BOB, "i1", 6), ts=8),
        filled(12, 4, 99, 5, SELL, (3, ALICE, "b1", 0), (6, BOB, "i1", 1), ts=8),
        canceled(13, 6, "i1", SELL, 99, 1, IOC_REMAINDER, client=BOB, ts=8),
        accepted(14, 7, "g1", BUY, 90, 1, tif=GTD, expire_ns=60, ts=9),
        rejected(15, RejectReason.UNKNOWN_ORDER, "nope", command="cancel", ts=10),
        accepted(16, 8, "f1", BUY, 102, 9, tif=FOK, ts=11),
        canceled(17, 8, "f1", BUY, 102, 9, FOK_UNFILLED, ts=11),
        accepted(18, 9, "p1", SELL, 103, 2, post_only=True, ts=12),
        rejected(19, RejectReason.POST_ONLY_WOULD_TRADE, "p2", ts=13),
        accepted(20, 10, "m1", BUY, 0, 1, client=CAROL, otype=MARKET, tif=IOC, ts=14),
        filled(21, 5, 102, 1, BUY, (2, BOB, "s2", 4), (10, CAROL, "m1", 0), ts=14),
        amended(22, 9, "p1", SELL, old_price=103, price=102, old_qty=2, qty=2, remaining=2, requeued=True, ts=15),
        expired(23, 7, "g1", BUY, 90, 1, ts=60),  # b1 (expiry 50) filled long ago: nothing to expire
        accepted(24, 11, "y", BUY, 95, 1, ts=60),
        OrderRejected(SYM, 25, 61, BOB, "r1", None, "place", RejectReason.INVALID_PRICE,
                      "price 1.001 is not a multiple of 0.01"),
        accepted(26, 12, "a1", BUY, 98, 1, stp=S.CANCEL_BOTH, ts=62),
        accepted(27, 13, "a2", SELL, 98, 2, stp=S.CANCEL_RESTING, ts=63),
        canceled(28, 12, "a1", BUY, 98, 1, SELF_TRADE, ts=63),
        # CancelAll(CAROL): she has nothing open, so no events
        BookCleared(SYM, 29, 70, "", "", 4),
        canceled(30, 11, "y", BUY, 95, 1, CLEARED, ts=70),
        canceled(31, 13, "a2", SELL, 98, 2, CLEARED, ts=70),
        canceled(32, 2, "s2", SELL, 102, 4, CLEARED, client=BOB, ts=70),
        canceled(33, 9, "p1", SELL, 102, 2, CLEARED, ts=70),
    ]


# ------------------------------------------------------------- state hash


def test_state_hash_equal_for_equal_books_reached_differently() -> None:
    one, two = make_engine(), make_engine()
    run(one, buy("a1", 100, 5), buy("a2", 100, 1), buy("a3", 100, 4), cancel("a2"))
    run(two, buy("a1", 100, 5), sell("a2", 200, 1), buy("a3", 100, 4), amend("a2", price=201), cancel("a2"))
    assert book(one) == book(two)
    assert one.state_hash() == two.state_hash()
    assert make_engine().state_hash() == make_engine(symbol="OTHER").state_hash()  # two empty books


def test_state_hash_differs_when_fifo_order_within_a_level_differs() -> None:
    one, two = make_engine(), make_engine()
    run(one, buy("a1", 100, 5), buy("a2", 100, 5))
    run(two, buy("a1", 100, 5), buy("a2", 100, 5), amend("a1", qty=6), amend("a1", qty=5))  # a1 now behind a2
    assert sorted(book(one)) == sorted(book(two))
    assert [o.qty for o in one.book.iter_orders()] == [o.qty for o in two.book.iter_orders()] == [5, 5]
    assert one.state_hash() != two.state_hash()


@pytest.mark.parametrize(
    "extra",
    [amend("a1", qty=4), amend("a1", price=101), buy("a3", 99, 1), sell("a1x", 101, 1)],
    ids=["remaining", "price", "extra-bid", "extra-ask"],
)
def test_state_hash_differs_when_the_book_differs(extra: Command) -> None:
    one, two = make_engine(), make_engine()
    run(one, buy("a1", 100, 5), buy("a2", 99, 5))
    run(two, buy("a1", 100, 5), buy("a2", 99, 5), extra)
    assert one.state_hash() != two.state_hash()


# ------------------------------------------------------------- snapshots


def test_export_state_lists_orders_in_priority_order_and_finished_ids(engine: MatchingEngine) -> None:
    run(engine, sell("s1", 102, 3, client=BOB), buy("b1", 100, 5), buy("b2", 101, 2, tif=GTD, expire_ns=99),
        buy("b3", 100, 4, post_only=True, stp=StpMode.CANCEL_BOTH), sell("x1", 101, 1, client=CAROL, tif=IOC),
        amend("b1", qty=6), buy("i1", 50, 1, tif=IOC))
    assert engine.export_state() == EngineState(
        instrument=SYM, seq=9, next_order_id=7, next_trade_id=2,
        orders=[
            RestingOrder(3, ALICE, "b2", BUY, 101, 2, 1, 3, expire_ns=99),
            RestingOrder(4, ALICE, "b3", BUY, 100, 4, 4, 4, post_only=True, stp=StpMode.CANCEL_BOTH),
            RestingOrder(2, ALICE, "b1", BUY, 100, 6, 6, 7),  # priority: the amend's seq
            RestingOrder(1, BOB, "s1", SELL, 102, 3, 3, 1),
        ],
        done=[(CAROL, "x1", 5), (ALICE, "i1", 6)],
        last_price_ticks=101,  # the one trade's
    )


PART_ONE: list[Command] = [
    sell("s1", 102, 3, client=BOB, ts=1),
    sell("s2", 102, 4, client=CAROL, ts=2),
    buy("b1", 100, 5, ts=3),
    buy("b2", 101, 2, tif=GTD, expire_ns=100, ts=4),
    buy("b3", 100, 4, post_only=True, stp=StpMode.CANCEL_RESTING, ts=5),
    sell("x1", 101, 1, client=CAROL, tif=IOC, ts=6),  # b2 partially filled
    amend("b1", qty=6, ts=7),  # b1 re-queued behind b3
    sell("s3", 103, 1, client=BOB, ts=8),
    cancel("s3", client=BOB, ts=9),
    buy("i1", 50, 1, tif=IOC, ts=10),
    buy("dead", 101, 1, ts=11),
    cancel("dead", ts=12),  # leaves a dead entry in the 101 queue
    sell("gx", 110, 1, client=CAROL, tif=GTD, expire_ns=120, ts=13),  # expires after the restore
]

PART_TWO: list[Command] = [
    buy("i1", 50, 1, ts=20),  # finished id: duplicate
    buy("b1", 50, 1, ts=21),  # live id: duplicate
    cancel(oid=9, client=BOB, ts=22),  # s3: too late
    sell("t1", 100, 8, client=BOB, ts=30),  # b2, b3, b1 in that order
    amend("s1", client=BOB, qty=2, ts=31),
    buy("t2", 102, 5, client=CAROL, stp=StpMode.CANCEL_RESTING, ts=40),  # skips own s2
    sell("g", 120, 1, tif=GTD, expire_ns=150, ts=41),
    buy("z", 1, 1, ts=100),  # b2 (if live) expires here
    buy("a", 99, 1, stp=None, ts=150),  # g expires first
    ClearBook(SYM, ts_ns=200),
    buy("new", 100, 1, ts=201),
]


def test_export_and_restore_round_trip() -> None:
    spec = make_spec()
    original = make_engine()
    run(original, *PART_ONE)
    state = original.export_state()
    wire = msgspec.json.decode(msgspec.json.encode(state), type=EngineState)
    restored = MatchingEngine.from_state(spec, wire)
    restored.book.check_invariants()
    assert restored.state_hash() == original.state_hash()
    assert restored.export_state() == state
    assert book(restored) == book(original)
    later: list[Event] = []
    for command in PART_TWO:
        expected = run(original, command)
        assert run(restored, command) == expected
        assert restored.state_hash() == original.state_hash()
        later += expected
    assert restored.export_state() == original.export_state()
    # the continuation exercised what the snapshot carries: dedupe memory, live ids, GTD expiries, counters
    assert [(type(e).__name__, getattr(e, "client_order_id", None), getattr(e, "reason", None))
            for e in later if not isinstance(e, (OrderAccepted, OrderFilled))] == [
        ("OrderRejected", "i1", RejectReason.DUPLICATE_CLIENT_ORDER_ID),
        ("OrderRejected", "b1", RejectReason.DUPLICATE_CLIENT_ORDER_ID),
        ("OrderRejected", None, RejectReason.TOO_LATE),
        ("OrderAmended", "s1", None),
        ("OrderCanceled", "s2", SELF_TRADE),
        ("OrderExpired", "gx", None),
        ("OrderExpired", "g", None),
        ("BookCleared", None, None),
        ("OrderCanceled", "t2", CLEARED),
        ("OrderCanceled", "b1", CLEARED),
        ("OrderCanceled", "a", CLEARED),
        ("OrderCanceled", "z", CLEARED),
    ]


def test_restore_into_the_wrong_instrument_is_refused() -> None:
    state = make_engine().export_state()
    with pytest.raises(ValueError, match=r"'T'.*'U'"):
        MatchingEngine.from_state(make_spec("U"), state)


# ------------------------------------------------------- routing, RejectInput


@pytest.fixture
def exchange() -> Exchange:
    return Exchange([make_spec("AAA"), make_spec("BBB", tick_size="0.5")])


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (place("a1", BUY, 100, 1, instrument="ZZZ", ts=7),
         rejected(0, RejectReason.UNKNOWN_INSTRUMENT, "a1", ts=7, instrument="ZZZ")),
        (cancel("a1", oid=3, instrument="ZZZ"),
         rejected(0, RejectReason.UNKNOWN_INSTRUMENT, "a1", oid=None, command="cancel", instrument="ZZZ")),
        (ClearBook("ZZZ", ts_ns=3),
         rejected(0, RejectReason.UNKNOWN_INSTRUMENT, client="", command="clear", ts=3, instrument="ZZZ")),
        (CancelAll(BOB, "ZZZ"),
         rejected(0, RejectReason.UNKNOWN_INSTRUMENT, client=BOB, command="cancel_all", instrument="ZZZ")),
        (RejectInput("ZZZ", BOB, "r1", RejectReason.INVALID_PRICE, "bad", command="amend"),
         rejected(0, RejectReason.UNKNOWN_INSTRUMENT, "r1", client=BOB, command="amend", instrument="ZZZ")),
    ],
)
def test_exchange_rejects_unknown_instrument_with_seq_zero(exchange: Exchange, command: Command,
                                                           expected: Event) -> None:
    assert exchange.apply(command) == [expected]
    # no instrument's sequence moved
    assert exchange.apply(place("a1", BUY, 100, 1, instrument="AAA")) == [
        accepted(1, 1, "a1", BUY, 100, 1, instrument="AAA")]
    assert exchange.engines["BBB"].seq == 0


def test_exchange_routes_by_instrument(exchange: Exchange) -> None:
    assert exchange.apply(place("s1", SELL, 100, 1, client=BOB, instrument="BBB")) == [
        accepted(1, 1, "s1", SELL, 100, 1, client=BOB, instrument="BBB")]
    # same client order id on another instrument; no cross-instrument matching
    assert exchange.apply(place("s1", BUY, 100, 1, client=BOB, instrument="AAA")) == [
        accepted(1, 1, "s1", BUY, 100, 1, client=BOB, instrument="AAA")]
    assert exchange.apply(place("b1", BUY, 100, 1, instrument="BBB")) == [
        accepted(2, 2, "b1", BUY, 100, 1, instrument="BBB"),
        OrderFilled("BBB", 3, 0, 1, 100, 1, BUY, 1, BOB, "s1", 0, 2, ALICE, "b1", 0),
    ]
    for e in exchange.engines.values():
        e.book.check_invariants()


def test_exchange_refuses_a_symbol_defined_twice() -> None:
    with pytest.raises(ValueError, match="'AAA' is defined twice"):
        Exchange([make_spec("AAA"), make_spec("AAA")])


def test_reject_input_becomes_a_sequenced_rejection(engine: MatchingEngine) -> None:
    run(engine, buy("a0", 100, 1))
    assert run(engine,
               RejectInput(SYM, BOB, "r1", RejectReason.INVALID_PRICE, "price 1.001 is not a multiple of 0.01",
                           ts_ns=5),
               RejectInput(SYM, BOB, None, RejectReason.MALFORMED, "not JSON", command="unknown", ts_ns=6),
               buy("r1", 100, 1, client=BOB, ts=7)) == [
        OrderRejected(SYM, 2, 5, BOB, "r1", None, "place", RejectReason.INVALID_PRICE,
                      "price 1.001 is not a multiple of 0.01"),
        OrderRejected(SYM, 3, 6, BOB, None, None, "unknown", RejectReason.MALFORMED, "not JSON"),
        accepted(4, 2, "r1", BUY, 100, 1, client=BOB, ts=7),  # the refused input did not burn "r1"
    ]


def test_exchange_passes_reject_input_through(exchange: Exchange) -> None:
    assert exchange.apply(RejectInput("AAA", BOB, "r1", RejectReason.INVALID_QUANTITY, "qty 0.5 is off-lot",
                                      command="amend", ts_ns=4)) == [
        OrderRejected("AAA", 1, 4, BOB, "r1", None, "amend", RejectReason.INVALID_QUANTITY, "qty 0.5 is off-lot")]


def test_engine_rejects_a_command_for_another_instrument_in_sequence(engine: MatchingEngine) -> None:
    assert run(engine, place("a1", BUY, 100, 1, instrument="OTHER"), buy("a1", 100, 1)) == [
        rejected(1, RejectReason.UNKNOWN_INSTRUMENT, "a1"),
        accepted(2, 1, "a1", BUY, 100, 1),
    ]
