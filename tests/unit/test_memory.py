"""Memory that follows what is live, not what has been (issue 17, item 11).

Finished GTD orders leave the expiry heap (it is compacted when their entries
would outnumber the live ones), a client without live orders has no entry in
the live-order index, and neither changes when or in which order orders expire.
"""

from __future__ import annotations

import gc
import tracemalloc

from exchange import CancelOrder, MatchingEngine, OrderType, PlaceOrder, StpMode

from ._helpers import BUY, GTD, SELL, SYM, accepted, amend, buy, expired, make_engine, run, sell

LIMIT = OrderType.LIMIT

FAR = 4_000_000_000_000_000_000  # an expiry no test reaches


def _place_and_cancel(engine: MatchingEngine, start: int, count: int, clients: int = 1_000) -> None:
    apply = engine.apply
    for n in range(start, start + count):
        client, coid = f"c{n % clients}", f"o{n}"
        apply(PlaceOrder(SYM, client, coid, BUY, LIMIT, 100 + n % 50, 1, GTD, n, expire_ns=FAR))
        apply(CancelOrder(SYM, client, coid, ts_ns=n))


def test_300000_canceled_gtd_orders_leave_neither_heap_entries_nor_empty_clients_behind() -> None:
    engine = make_engine(dedupe_window=1_000)  # a small window: what it keeps is not what is measured here
    run(engine, buy("keep", 90, 1, tif=GTD, expire_ns=FAR))
    for part in range(30):  # before the heap was compacted, these 300,000 pairs left 300,000 entries (+30 MiB)
        _place_and_cancel(engine, part * 10_000, 10_000)
        assert len(engine._expiries) <= 2 * engine._expiring + 64
    assert (len(engine.book), engine._expiring) == (1, 1)
    assert len(engine._expiries) <= 2 + 64
    assert list(engine._live) == ["alice"]  # only the client with a live order, not the 1,000 that had one
    assert len(engine._dedupe) == 1_000

    # and the engine's memory does not grow with them: traced from a warmed-up point to 50,000 pairs later
    gc.collect()
    tracemalloc.start()
    try:
        _place_and_cancel(engine, 300_000, 10_000)  # what the window and the caches hold, allocated while traced
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        _place_and_cancel(engine, 310_000, 50_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, f"the engine grew by {grown} bytes over 50,000 place+cancel pairs"


def test_expiries_fire_in_expire_ns_then_order_id_order_after_compactions() -> None:
    engine = make_engine(dedupe_window=10)
    apply = engine.apply
    kept: list[tuple[int, int]] = []  # (expire_ns, order_id) of the GTD orders left resting
    for n in range(3_000):
        oid = engine.next_order_id
        expire = 1_000_000 + (n * 7_919) % 500  # many share an expiry: then the order id decides
        apply(PlaceOrder(SYM, f"c{n % 7}", f"o{n}", BUY if n % 2 else SELL, LIMIT,
                         50 if n % 2 else 150, 1, GTD, n, expire_ns=expire))
        if n % 10:
            apply(CancelOrder(SYM, f"c{n % 7}", f"o{n}", ts_ns=n))
        else:
            kept.append((expire, oid))
    assert len(engine._expiries) <= 2 * len(kept) + 64
    restored = MatchingEngine.from_state(engine.spec, engine.export_state())
    events = engine.apply(PlaceOrder(SYM, "late", "z", BUY, LIMIT, 1, 1, ts_ns=2_000_000))
    assert [(e.order_id, e.ts_ns) for e in events[:-1]] == [(oid, 2_000_000) for _, oid in sorted(kept)]
    assert all(type(e).__name__ == "OrderExpired" for e in events[:-1])
    assert restored.apply(PlaceOrder(SYM, "late", "z", BUY, LIMIT, 1, 1, ts_ns=2_000_000)) == events


def test_an_amended_gtd_order_keeps_its_expiry_when_the_heap_is_compacted_while_it_trades() -> None:
    """A re-queuing amend takes the order out of the book while it trades; makers finishing then may trigger
    a compaction, which must keep the amended order's entry."""
    engine = make_engine()
    run(engine, buy("a", 90, 300, tif=GTD, expire_ns=500, ts=1))
    for n in range(200):
        run(engine, sell(f"m{n}", 100, 1, client="maker", tif=GTD, expire_ns=FAR, ts=2))
    assert (len(engine._expiries), engine._expiring) == (201, 201)
    events = run(engine, amend("a", price=100, ts=3))  # fills all 200 makers, then rests 100 at 100
    assert [type(e).__name__ for e in events] == ["OrderAmended"] + ["OrderFilled"] * 200
    assert (len(engine._expiries), engine._expiring) == (1, 1)  # compacted while it traded
    assert run(engine, sell("s", 200, 1, client="maker", ts=500)) == [
        expired(403, 1, "a", BUY, 100, 100, ts=500),
        accepted(404, 202, "s", SELL, 200, 1, client="maker", ts=500),
    ]


def test_a_client_leaves_the_live_index_with_its_last_order_also_through_self_trade_prevention() -> None:
    engine = make_engine()
    run(engine, sell("s1", 100, 1, client="bob"), buy("b1", 99, 1))
    run(engine, buy("t1", 100, 1, client="bob", stp=StpMode.CANCEL_RESTING))
    # bob's incoming t1 canceled his s1, his last live order, and then rested: he is indexed by t1 alone
    assert sorted(engine._live) == ["alice", "bob"]
    assert engine.open_order("bob", "t1") is not None
    run(engine, sell("x", 99, 2, client="carol"))  # fills bob's t1 and alice's b1; carol's order never rests
    assert engine._live == {}
