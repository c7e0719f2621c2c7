"""Recovery: the event applier, recover() at start-up and the offline verify, on a real database."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec
import pytest
from structlog.testing import capture_logs

from exchange import Instrument, MatchingEngine
from exchange.adapters.postgres import PostgresStore
from exchange.core.state import EngineState
from exchange.ports import Batch, SnapshotRequest
from exchange.projections.applier import EventApplier, ReplayError
from recovery.rebuild import RecoveryError, describe_difference, recover
from tests.integration._workload import SPECS, SPECS_WITH_BALANCES, Workload, stamped
from tests.support.verify import verify


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def execute(dsn: str, sql: str, *args: Any) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.execute(sql, *args)
    finally:
        await conn.close()


async def store_batches(dsn: str, batches: list[Batch]) -> None:
    async with PostgresStore(dsn, SPECS) as store:
        await store.migrate()
        await store.take([spec.symbol for spec in SPECS], [], "test")  # epoch 1: what the batches carry
        await store.load(SPECS)
        for batch in batches:
            await store.commit(batch)


# ------------------------------------------------------- the applier (pure)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_applier_follows_the_engine_command_by_command(seed: int) -> None:
    work = Workload(SPECS_WITH_BALANCES, seed=seed)  # balances too
    appliers = {spec.symbol: EventApplier(spec) for spec in SPECS_WITH_BALANCES}
    for _ in range(3_000):
        applied = work.apply(work.command())
        applier = appliers[applied.instrument]
        applier.apply_all(applied.events)
        live = work.engines[applied.instrument]
        assert applier.state_hash() == live.state_hash()
        assert applier.export_state() == live.export_state()


def test_applier_starts_from_a_snapshot_and_refuses_events_that_do_not_fit() -> None:
    work = Workload(seed=9)
    spec = SPECS[0]
    for _ in range(500):
        work.apply(work.command(spec.symbol))
    engine = work.engines[spec.symbol]
    middle = engine.export_state()
    tail = [e for _ in range(500) for e in work.apply(work.command(spec.symbol)).events]
    applier = EventApplier(spec, msgspec.json.decode(msgspec.json.encode(middle), type=type(middle)))
    applier.apply_all(tail)
    assert applier.export_state() == engine.export_state()

    fresh = EventApplier(spec, middle)
    with pytest.raises(ReplayError, match="seq"):
        fresh.apply(tail[1])  # a gap
    with pytest.raises(ReplayError):
        EventApplier(spec).apply_all(tail)  # events of orders it never saw


def test_applier_follows_stops_and_icebergs_and_refuses_events_that_do_not_fit() -> None:
    """Command by command: a cascade of triggers (a stop-limit that rests after its trigger), an iceberg that
    refills behind another order, an iceberg taker that rests showing a slice, a stop amend, a clear that counts
    the waiting stops. Then events doctored the ways only a broken journal would: each is refused."""
    from exchange import AmendOrder, ClearBook, OrderType, PlaceOrder, Side, TimeInForce
    from exchange.core.events import BookCleared, OrderFilled, OrderReplenished, OrderTriggered

    spec = SPECS[0]
    symbol = spec.symbol
    engine = MatchingEngine(spec)
    applier = EventApplier(spec)

    def limit(client: str, coid: str, side: Side, price: int, qty: int, **kw: Any) -> PlaceOrder:
        return PlaceOrder(symbol, client, coid, side, OrderType.LIMIT, price, qty, **kw)

    def stop(client: str, coid: str, side: Side, stop_price: int, qty: int, price: int = 0, **kw: Any) -> PlaceOrder:
        return PlaceOrder(symbol, client, coid, side, OrderType.STOP_LIMIT if price else OrderType.STOP, price, qty,
                          stop_price_ticks=stop_price, **kw)

    commands: list[Any] = [
        limit("a", "a1", Side.SELL, 100, 2), limit("b", "b1", Side.BUY, 100, 1),  # the last price: 100
        limit("c", "c1", Side.SELL, 102, 9, display_qty_lots=2), limit("d", "d1", Side.SELL, 102, 1),
        stop("e", "e1", Side.BUY, 101, 2), stop("f", "f1", Side.BUY, 102, 8, 102, tif=TimeInForce.GTD, expire_ns=9**9),
        stop("g", "g1", Side.SELL, 95, 3), AmendOrder(symbol, "g", "g1", stop_price_ticks=96, qty_lots=2),
        # 1 at 100 then 2 at 102 (c1's slice): e1 (101) then f1 (102) fire; c1 refills behind d1, then again
        # while f1 takes what is left of it, and f1 rests with 2
        limit("h", "h1", Side.BUY, 102, 3),
        limit("i", "i1", Side.SELL, 104, 12, display_qty_lots=5),  # rests: shows 5, hides 7
        limit("j", "j1", Side.BUY, 104, 2),  # fills i1's slice in part
        ClearBook(symbol, 0, "ops", "day end"),
    ]
    events: list[Any] = []
    for command in commands:
        out = engine.apply(command)
        events += out
        applier.apply_all(out)
        assert applier.state_hash() == engine.state_hash()
        assert applier.export_state() == engine.export_state()
        if isinstance(command, AmendOrder):
            assert [s.stop_price_ticks for s in applier.export_state().stops] == [101, 102, 96]
        if command.client_id == "h":
            assert [(o.client_order_id, o.remaining_lots, o.priority) for o in applier.export_state().orders] == [
                ("f1", 2, next(e.seq for e in out if isinstance(e, OrderTriggered) and e.client_order_id == "f1"))]
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("OrderTriggered") == 2
    assert kinds.count("OrderReplenished") >= 2
    assert next(e for e in events if isinstance(e, BookCleared)).orders == 3  # f1 (rested), i1, and g1 waiting
    assert applier.export_state().stops == []

    def replay(doctored: list[Any]) -> None:
        EventApplier(spec).apply_all(doctored)

    refill = next(i for i, e in enumerate(events) if isinstance(e, OrderReplenished))
    without = [*events[:refill], *(msgspec.structs.replace(e, seq=e.seq - 1) for e in events[refill + 1:])]
    with pytest.raises(ReplayError, match="replenished"):
        replay(without)
    trigger = next(i for i, e in enumerate(events) if isinstance(e, OrderTriggered))
    with pytest.raises(ReplayError, match="not a waiting stop"):
        replay([*events[:trigger], msgspec.structs.replace(events[trigger], order_id=1), *events[trigger + 1:]])
    with pytest.raises(ReplayError, match="waits as"):
        replay([*events[:trigger], msgspec.structs.replace(events[trigger], trigger_price_ticks=100),
                *events[trigger + 1:]])
    cleared = next(i for i, e in enumerate(events) if isinstance(e, BookCleared))
    with pytest.raises(ReplayError, match="stops wait"):
        replay([*events[:cleared], msgspec.structs.replace(events[cleared], orders=2), *events[cleared + 1:]])
    fill = next(i for i, e in enumerate(events) if isinstance(e, OrderFilled) and e.maker_client_id == "c")
    with pytest.raises(ReplayError):  # a slice said to have more left than it showed
        replay([*events[:fill], msgspec.structs.replace(events[fill], maker_remaining_lots=1), *events[fill + 1:]])


# a window bounded per client: the six clients of the workload hold at most 3 ids each, so it never fills
PER_CLIENT = Instrument.from_decimals("CCC-USD", tick_size="1", lot_size="1", max_qty="60", dedupe_window=12,
                                      dedupe_per_client=3)


@pytest.mark.parametrize("spec", [*SPECS, PER_CLIENT],
                         ids=lambda s: f"window {s.dedupe_window}, {s.dedupe_per_client} a client")
def test_applier_from_a_snapshot_without_the_window_knows_the_orders_finished_since(spec: Any) -> None:
    """The daemon's snapshots leave the dedupe window out: a replay from one rebuilds the book and counters
    exactly, and of the window exactly the entries of the orders that finished since (those open in the
    snapshot or accepted after it), which must agree with the whole window; it says it is partial until it
    holds a whole window."""
    work = Workload([*SPECS, PER_CLIENT], seed=11)
    for _ in range(400):
        work.apply(work.command(spec.symbol))
    engine = work.engines[spec.symbol]
    snapshot = msgspec.json.decode(msgspec.json.encode(engine.export_state(window=False)), type=EngineState)
    assert (snapshot.done, snapshot.done_complete) == ([], False)
    with pytest.raises(ValueError, match="dedupe window"):
        MatchingEngine.from_state(spec, snapshot)  # an engine must never start without its window

    applier = EventApplier(spec, snapshot)
    for _ in range(300):
        applier.apply_all(work.apply(work.command(spec.symbol)).events)
    whole, part = engine.export_state(), applier.export_state()
    assert (part.seq, part.next_order_id, part.next_trade_id, part.orders, part.halted) == (
        whole.seq, whole.next_order_id, whole.next_trade_id, whole.orders, whole.halted)
    assert part.done
    since = {o.order_id for o in snapshot.orders} | {s.order_id for s in snapshot.stops}  # open: waiting too
    assert snapshot.stops  # (the workload's stops wait across snapshots)
    assert part.done == [e for e in whole.done if e[2] >= snapshot.next_order_id or e[2] in since]
    assert part.done == whole.done[len(whole.done) - len(part.done):]
    assert part.done_complete == (len(part.done) == spec.dedupe_window)  # AAA: 1,000,000; BBB: 7; CCC: never
    assert describe_difference(part, whole, "replay", "engine", since=snapshot) == ""

    forged = msgspec.structs.replace(part, done=[(c, k, oid + 1) for c, k, oid in part.done])
    assert "dedupe window differs" in describe_difference(forged, whole, "replay", "engine", since=snapshot)
    longer = msgspec.structs.replace(part, done=whole.done + whole.done[-1:], done_complete=False)
    assert "dedupe window differs" in describe_difference(longer, whole, "replay", "engine")
    shorter = msgspec.structs.replace(part, done=part.done[1:])  # still the tail, but one entry is missing
    assert "dedupe window differs" in describe_difference(shorter, whole, "replay", "engine", since=snapshot)


# ------------------------------------------------------------ recover()


@pytest.mark.integration
@pytest.mark.parametrize("snapshot_window", [False, True], ids=["daemon snapshots", "snapshots with the window"])
def test_recover_checks_every_instrument_and_reports_progress(pg_dsn: str, snapshot_window: bool) -> None:
    """Snapshots with the dedupe window are what earlier versions stored: a database may still hold them."""
    work = Workload(seed=21)
    batches = work.batches(3_000, max_batch=200, snapshot_every=4, snapshot_window=snapshot_window)

    async def scenario() -> None:
        await store_batches(pg_dsn, batches)
        async with PostgresStore(pg_dsn, SPECS) as store:
            with capture_logs() as logs:
                recovered = await recover(store, SPECS)
        for spec in SPECS:
            live = work.engines[spec.symbol]
            assert recovered[spec.symbol].state == live.export_state()
            assert MatchingEngine.from_state(spec, recovered[spec.symbol].state).state_hash() == live.state_hash()
        done = [e for e in logs if e["event"] == "instrument recovered"]
        assert [(e["instrument"], e["instruments_done"], e["instruments_total"]) for e in done] == [
            (SPECS[0].symbol, 1, 2), (SPECS[1].symbol, 2, 2)]
        assert all(e["state_hash"] == work.engines[e["instrument"]].state_hash() for e in done)
        assert all("orders_loaded" in e and "events_checked" in e and "elapsed_s" in e for e in done)
        assert logs[-1]["event"] == "recovery finished"
        assert len(logs) < 20  # a line per instrument, never per order

    run(scenario())


@pytest.mark.integration
def test_recover_without_snapshots_replays_everything(pg_dsn: str) -> None:
    work = Workload(seed=22)
    batches = work.batches(800, max_batch=100, snapshot_every=0)

    async def scenario() -> None:
        await store_batches(pg_dsn, batches)
        async with PostgresStore(pg_dsn, SPECS) as store:
            with capture_logs() as logs:
                await recover(store, SPECS)
        total = sum(e["events_checked"] for e in logs if e["event"] == "instrument recovered")
        assert total == sum(len(a.events) for b in batches for a in b.applied)

    run(scenario())


@pytest.mark.integration
def test_recover_on_an_empty_database_gives_fresh_engines(pg_dsn: str) -> None:
    async def scenario() -> None:
        async with PostgresStore(pg_dsn, SPECS) as store:
            await store.migrate()
            recovered = await recover(store, SPECS)
        for spec in SPECS:
            state = recovered[spec.symbol].state
            assert (state.seq, state.next_order_id, state.next_trade_id, state.orders, state.done) == (0, 1, 1, [], [])

    run(scenario())


@pytest.mark.integration
def test_recover_detects_a_corrupted_orders_row(pg_dsn: str) -> None:
    work = Workload(seed=23)
    batches = work.batches(1_500, max_batch=100)
    spec = SPECS[0]
    # one lot less open still makes a valid book: only the events can tell
    victim = next(o for o in work.engines[spec.symbol].book.orders.values() if o.remaining > 1)

    async def scenario() -> None:
        await store_batches(pg_dsn, batches)
        status = await execute(pg_dsn, "UPDATE orders SET remaining_lots = remaining_lots - 1 "
                                       "WHERE instrument = $1 AND order_id = $2", spec.symbol, victim.order_id)
        assert status == "UPDATE 1"
        async with PostgresStore(pg_dsn, SPECS) as store:
            with pytest.raises(RecoveryError) as info:
                await recover(store, SPECS)
        message = str(info.value)
        assert spec.symbol in message
        assert work.engines[spec.symbol].state_hash() in message  # the replay's hash: the truth
        assert f"first {victim.order_id}" in message
        assert "recover --verify" in message

    run(scenario())


@pytest.mark.integration
def test_recover_detects_a_lost_open_order_and_a_damaged_snapshot(pg_dsn: str) -> None:
    work = Workload(seed=24)
    batches = work.batches(1_000, max_batch=100, snapshot_every=2)
    spec = SPECS[0]
    victim = next(iter(work.engines[spec.symbol].book.orders.values()))

    async def scenario() -> None:
        await store_batches(pg_dsn, batches)
        await execute(pg_dsn, "UPDATE orders SET status = 'canceled' WHERE instrument = $1 AND order_id = $2",
                      spec.symbol, victim.order_id)
        async with PostgresStore(pg_dsn, SPECS) as store:
            with pytest.raises(RecoveryError, match=f"open only in replay: orders \\[{victim.order_id}\\]"):
                await recover(store, SPECS)
        await execute(pg_dsn, "UPDATE orders SET status = 'open' WHERE instrument = $1 AND order_id = $2",
                      spec.symbol, victim.order_id)
        await execute(pg_dsn, "UPDATE snapshots SET state_hash = 'deadbeef' WHERE instrument = $1 AND seq = "
                              "(SELECT max(seq) FROM snapshots WHERE instrument = $1)", spec.symbol)
        async with PostgresStore(pg_dsn, SPECS) as store:
            with pytest.raises(RecoveryError, match=r"snapshot .* is damaged"):
                await recover(store, SPECS)

    run(scenario())


# -------------------------------------------------------------- verify()


@pytest.mark.integration
def test_verify_agrees_on_a_healthy_database_and_flags_a_corrupted_one(pg_dsn: str) -> None:
    work = Workload(seed=25)
    batches = work.batches(1_200, max_batch=100, snapshot_every=3)
    spec = SPECS[1]
    victim = next(iter(work.engines[spec.symbol].book.orders.values()))

    async def scenario() -> None:
        await store_batches(pg_dsn, batches)
        report = await verify(pg_dsn, SPECS)
        text = report.render()
        assert report.ok, text
        for inst in report.instruments:
            assert [r.source for r in inst.results] == ["open orders", "snapshot+events", "full replay"]
            hashes = {r.state_hash for r in inst.results}
            assert hashes == {work.engines[inst.instrument].state_hash()}
            assert all(r.state is not None and r.state.seq == work.engines[inst.instrument].seq
                       for r in inst.results)
        assert "verdict: OK" in text
        assert work.engines[spec.symbol].state_hash() in text

        await execute(pg_dsn, "UPDATE orders SET priority = priority + 1000000 WHERE instrument = $1 "
                              "AND order_id = $2", spec.symbol, victim.order_id)
        await execute(pg_dsn, "DELETE FROM order_events WHERE instrument = $1 AND seq = 5", SPECS[0].symbol)
        report = await verify(pg_dsn, SPECS)
        text = report.render()
        assert not report.ok
        bad = {inst.instrument: inst for inst in report.instruments}
        assert not bad[spec.symbol].ok
        assert any("open orders" in p for p in bad[spec.symbol].problems)
        assert not bad[SPECS[0].symbol].ok
        assert any("full replay" in p and "seq" in p for p in bad[SPECS[0].symbol].problems)
        assert "MISMATCH" in text
        assert "PROBLEMS FOUND" in text

    run(scenario())


@pytest.mark.integration
def test_verify_without_snapshots_and_with_a_damaged_one(pg_dsn: str) -> None:
    work = Workload(seed=26)
    batches = work.batches(600, max_batch=80, snapshot_every=0)

    async def scenario() -> None:
        await store_batches(pg_dsn, batches)
        report = await verify(pg_dsn, SPECS)
        assert report.ok, report.render()
        for inst in report.instruments:
            assert {r.state_hash for r in inst.results} == {work.engines[inst.instrument].state_hash()}
            assert "no snapshot stored" in inst.results[1].note

        spec = SPECS[0]
        engine = work.engines[spec.symbol]
        async with PostgresStore(pg_dsn, SPECS) as store:
            bad = msgspec.structs.replace(engine.export_state(), next_trade_id=engine.next_trade_id + 5)
            await store.commit(stamped(Batch([], [SnapshotRequest(spec.symbol, bad, "0" * 32)])))
        report = await verify(pg_dsn, SPECS)
        assert not report.ok
        problems = {i.instrument: i.problems for i in report.instruments}
        assert any("does not match its stored hash" in p for p in problems[spec.symbol])
        assert any("next_trade_id" in p for p in problems[spec.symbol])
        assert problems[SPECS[1].symbol] == []

    run(scenario())
