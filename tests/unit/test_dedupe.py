"""The dedupe window's rule: at most ``dedupe_per_client`` (K) ids a client, ``dedupe_window`` (N) in all.

A finished order is remembered iff it is among its client's K most recently
finished orders and among the N most recent of those (see
:class:`exchange.core.dedupe.DedupeWindow`): a busy client cannot push out another
client's ids, it takes N/K other clients to do so. Exact events through the
engine, then the window's structure (tombstones and their sweeps, restore, the
newest-first rebuild the stores use) directly.
"""

from __future__ import annotations

import pytest

from exchange import Instrument, MatchingEngine, RejectReason
from exchange.core.dedupe import DedupeWindow, NewestFirstWindow
from exchange.core.state import EngineState
from recovery.rebuild import describe_difference

from ._helpers import ALICE, BOB, BUY, CAROL, IOC, accepted, buy, make_engine, rejected, run

DUPLICATE = RejectReason.DUPLICATE_CLIENT_ORDER_ID


def finish(engine: MatchingEngine, client: str, coid: str) -> int:
    """An IOC order that finishes at once (nothing to trade against); its order id."""
    oid = engine.next_order_id
    run(engine, buy(coid, 100, 1, tif=IOC, client=client))
    return oid


def retry(engine: MatchingEngine, client: str, coid: str) -> list[object]:
    """Resubmit ``coid`` as a GTC order: rejected as a duplicate if remembered, accepted if forgotten."""
    return list(run(engine, buy(coid, 50, 1, client=client)))


# -------------------------------------------------------------- the rule


def test_a_busy_client_does_not_evict_another_clients_ids() -> None:
    """N = 6, K = 2: bob finishing 10 x N orders leaves alice's two most recent ids remembered."""
    engine = make_engine(dedupe_window=6, dedupe_per_client=2)
    finish(engine, ALICE, "a0")
    a1, a2 = finish(engine, ALICE, "a1"), finish(engine, ALICE, "a2")
    for n in range(60):
        finish(engine, BOB, f"b{n}")
    assert engine.export_state().done == [(ALICE, "a1", a1), (ALICE, "a2", a2), (BOB, "b58", 62), (BOB, "b59", 63)]
    seq = engine.seq
    assert retry(engine, ALICE, "a1") + retry(engine, ALICE, "a2") + retry(engine, ALICE, "a0") == [
        rejected(seq + 1, DUPLICATE, "a1", oid=a1),
        rejected(seq + 2, DUPLICATE, "a2", oid=a2),
        accepted(seq + 3, 64, "a0", BUY, 50, 1),  # alice's third most recent: past her own bound of 2
    ]


def test_the_per_client_bound_forgets_a_clients_own_oldest_first() -> None:
    engine = make_engine(dedupe_window=100, dedupe_per_client=3)
    oids = [finish(engine, ALICE, f"a{n}") for n in range(5)]
    assert engine.export_state().done == [(ALICE, f"a{n}", oids[n]) for n in (2, 3, 4)]
    seq = engine.seq
    assert retry(engine, ALICE, "a1") + retry(engine, ALICE, "a2") == [
        accepted(seq + 1, 6, "a1", BUY, 50, 1),
        rejected(seq + 2, DUPLICATE, "a2", oid=oids[2]),
    ]
    assert [len(run(engine, buy(f"a{n}", 50, 1, client=BOB))) for n in range(2)] == [1, 1]  # ids are per client


def test_the_cap_takes_n_over_k_other_clients() -> None:
    """N = 6, K = 2: alice's ids go once three other clients have each finished two orders after them."""
    engine = make_engine(dedupe_window=6, dedupe_per_client=2)
    a1, a2 = finish(engine, ALICE, "a1"), finish(engine, ALICE, "a2")
    for client in (BOB, CAROL):
        finish(engine, client, "x1")
        finish(engine, client, "x2")
    seq = engine.seq
    assert retry(engine, ALICE, "a1") == [rejected(seq + 1, DUPLICATE, "a1", oid=a1)]  # 5 after it: kept
    finish(engine, "dave", "x1")
    seq = engine.seq
    assert retry(engine, ALICE, "a1") == [accepted(seq + 1, engine.next_order_id - 1, "a1", BUY, 50, 1)]
    assert retry(engine, ALICE, "a2") == [rejected(seq + 2, DUPLICATE, "a2", oid=a2)]  # still 5 after it
    finish(engine, "dave", "x2")
    assert [e[:2] for e in engine.export_state().done] == [
        (BOB, "x1"), (BOB, "x2"), (CAROL, "x1"), (CAROL, "x2"), ("dave", "x1"), ("dave", "x2")]


def test_a_forgotten_client_order_id_can_be_used_again_and_is_remembered_as_the_new_order() -> None:
    """The id's old slot is a tombstone while the new order is remembered: neither is taken for the other."""
    engine = make_engine(dedupe_window=5, dedupe_per_client=2)
    first = finish(engine, ALICE, "x")
    finish(engine, ALICE, "y")
    finish(engine, ALICE, "z")  # x leaves through alice's bound; its slot stays, a tombstone
    again = finish(engine, ALICE, "x")  # accepted again: a new order with the same client order id
    assert again != first
    assert engine.export_state().done == [(ALICE, "z", 3), (ALICE, "x", again)]
    for n in range(3):
        finish(engine, BOB, f"b{n}")  # alice's old slots reach the front and leave; her entries stay
    assert engine.export_state().done == [(ALICE, "z", 3), (ALICE, "x", again), (BOB, "b1", 6), (BOB, "b2", 7)]
    seq = engine.seq
    assert retry(engine, ALICE, "x") == [rejected(seq + 1, DUPLICATE, "x", oid=again)]
    finish(engine, CAROL, "c1")  # five: the window is full
    finish(engine, CAROL, "c2")  # z, the oldest entry, leaves
    seq = engine.seq
    assert retry(engine, ALICE, "z") == [accepted(seq + 1, engine.next_order_id - 1, "z", BUY, 50, 1)]


def test_dedupe_per_client_is_at_least_one_and_above_the_window_means_the_window() -> None:
    with pytest.raises(ValueError, match="dedupe_per_client"):
        Instrument.from_decimals("T", tick_size="1", lot_size="1", dedupe_per_client=0)
    with pytest.raises(ValueError, match="dedupe_per_client"):
        Instrument.from_decimals("T", tick_size="1", lot_size="1", dedupe_per_client=True)
    big, same = make_engine(dedupe_window=4, dedupe_per_client=1_000), make_engine(dedupe_window=4,
                                                                                  dedupe_per_client=4)
    for engine in (big, same):
        for n in range(9):
            finish(engine, ALICE if n % 3 else BOB, f"o{n}")
    assert big.export_state().done == same.export_state().done
    assert [e[1] for e in big.export_state().done] == ["o5", "o6", "o7", "o8"]


# ------------------------------------------------------------ the structure


def test_tombstones_are_swept_away_and_the_window_restores_exactly() -> None:
    """One client past its bound makes a tombstone per order: sweeps keep them from outnumbering the entries
    by much."""
    window = DedupeWindow(50, 20)
    for n in range(30):
        window.remember(f"c{n}", "only", n)  # thirty quiet clients, one id each
    for n in range(5_000):
        window.remember("busy", f"b{n}", 100 + n)
        assert window.slots() <= 3 * len(window) + 90
    entries = window.entries()
    assert len(window) == len(entries) == 50
    assert entries == [(f"c{n}", "only", n) for n in range(30)] + [("busy", f"b{n}", 100 + n)
                                                                        for n in range(4_980, 5_000)]
    restored = DedupeWindow(50, 20)
    for entry in entries:
        restored.remember(*entry)
    assert restored.entries() == entries
    for w in (window, restored):  # the same future
        for n in range(25):
            w.remember(f"new{n}", "x", 10_000 + n)
    assert window.entries() == restored.entries()
    assert window.entries()[:5] == [(f"c{n}", "only", n) for n in range(25, 30)]
    assert "c0" not in window.ids  # a client with nothing remembered takes no room


def test_a_remembered_id_cannot_be_remembered_twice() -> None:
    window = DedupeWindow(10, 5)
    window.remember(ALICE, "x", 1)
    with pytest.raises(ValueError, match="still remembered as order 1"):
        window.remember(ALICE, "x", 2)
    window.remember(BOB, "x", 3)  # another client's x is another id
    assert window.entries() == [(ALICE, "x", 1), (BOB, "x", 3)]


def test_the_newest_first_rebuild_reads_past_a_dominant_client() -> None:
    """What the stores do at start-up: it may need more than N rows, when one client finished most of them."""
    history = [("quiet", f"q{n}", n) for n in range(3)] + [("busy", f"b{n}", 10 + n) for n in range(40)]
    window = DedupeWindow(6, 2)
    for entry in history:
        window.remember(*entry)
    rebuilt = NewestFirstWindow(6, 2)
    read = 0
    for entry in reversed(history):
        read += 1
        if not rebuilt.add(*entry):
            break
    assert rebuilt.entries() == window.entries() == [("quiet", "q1", 1), ("quiet", "q2", 2), ("busy", "b38", 48),
                                                     ("busy", "b39", 49)]
    assert (read, rebuilt.rows, len(rebuilt)) == (43, 43, 4)  # not full: every row was read


# ------------------------------------------------- comparing a partial window


def _state(done: list[tuple[str, str, int]], *, complete: bool = True, orders: int = 0,
           next_order_id: int = 100) -> EngineState:
    from exchange.core.state import RestingOrder
    from exchange.core.types import Side

    resting = [RestingOrder(oid, "r", f"r{oid}", Side.BUY, 10, 1, 1, oid) for oid in range(1, orders + 1)]
    return EngineState("T", 50, next_order_id, 1, resting, done, done_complete=complete)


def test_a_partial_window_is_exactly_the_entries_that_finished_after_the_snapshot() -> None:
    """From a snapshot with orders 1-2 open and next order id 10: orders 1, 2 and 10+ finished after it."""
    snapshot = _state([], complete=False, orders=2, next_order_id=10)
    whole = _state([(ALICE, "a", 5), (BOB, "b", 2), (ALICE, "c", 7), (CAROL, "d", 11)])
    agree = _state([(BOB, "b", 2), (CAROL, "d", 11)], complete=False)
    assert describe_difference(agree, whole, "replay", "store", since=snapshot) == ""
    # an entry of an order that finished after the snapshot missing from the partial one: the store remembers
    # an order the replay says is forgotten; a tail comparison cannot see it (alice's c is not known there)
    missing = _state([(CAROL, "d", 11)], complete=False)
    assert "dedupe window differs" in describe_difference(missing, whole, "replay", "store", since=snapshot)
    assert describe_difference(missing, whole, "replay", "store") == ""
    wrong_order = _state([(CAROL, "d", 11), (BOB, "b", 2)], complete=False)
    assert "dedupe window differs" in describe_difference(wrong_order, whole, "replay", "store", since=snapshot)
    assert describe_difference(_state([], complete=False), _state([(ALICE, "a", 5)]), "replay", "store",
                               since=snapshot) == ""  # finished before the snapshot: unknown to the replay
    assert describe_difference(whole, whole, "a", "b", since=snapshot) == ""
