"""PostgresStore against a real PostgreSQL: schema, exact rows, round trips, failures and retries."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import pytest

from exchange import (
    AmendOrder,
    Event,
    Instrument,
    MatchingEngine,
    OrderFilled,
    OrderType,
    PlaceOrder,
    Side,
    TimeInForce,
)
from exchange.adapters.postgres import PostgresStore
from exchange.journal import Applied, Batch, InputPosition, Position, StoreUnavailable
from exchange.migrations import available
from exchange.positions import apply_fill
from tests.integration._workload import SPECS, Workload

pytestmark = pytest.mark.integration


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# Every test that commits runs on both commit paths: small batches in one statement (the function of
# migration 002; it needs the instrument's counters loaded, as the daemon's recovery does), and the
# multi-statement COPY path that large batches and snapshots take.
COMMIT_PATHS = {"one-statement": 1000, "copy": 0}
_commit_path = {"max": 1000}


@pytest.fixture(autouse=True, params=sorted(COMMIT_PATHS))
def commit_path(request: pytest.FixtureRequest) -> str:
    _commit_path["max"] = COMMIT_PATHS[request.param]
    return str(request.param)


async def migrated_store(dsn: str, specs: list[Instrument] = SPECS) -> PostgresStore:
    store = PostgresStore(dsn, specs, pool_size=2, one_statement_max_events=_commit_path["max"])
    await store.start()
    await store.migrate()
    if _commit_path["max"]:
        await store.load(specs)
    return store


# ------------------------------------------------------------------ schema


SHIPPED = [name for name, _ in available()]


def test_migrations_apply_once_and_rerun_is_a_no_op(pg_dsn: str) -> None:
    async def scenario() -> None:
        async with PostgresStore(pg_dsn, SPECS) as store:
            assert await store.migrate() == SHIPPED
            assert await store.migrate() == []
            await store.start()  # idempotent
        async with PostgresStore(pg_dsn, SPECS) as again:
            assert await again.migrate() == []
        await again.stop()  # idempotent
        names = [r["name"] for r in await fetch(pg_dsn, "SELECT name FROM schema_migrations")]
        assert names == SHIPPED
        tables = {r["tablename"] for r in await fetch(
            pg_dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"orders", "order_events", "trades", "positions", "engine_progress", "input_offsets", "snapshots",
                "schema_migrations", "publish_progress"} <= tables
        indexes = {r["indexname"] for r in await fetch(
            pg_dsn, "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
        assert {"orders_client_order_idx", "orders_open_idx", "orders_finished_idx",
                "trades_time_idx"} <= indexes

    run(scenario())


def test_concurrent_migrators_apply_each_migration_once(pg_dsn: str) -> None:
    async def scenario() -> list[list[str]]:
        stores = [PostgresStore(pg_dsn, SPECS) for _ in range(3)]
        for s in stores:
            await s.start()
        try:
            return list(await asyncio.gather(*(s.migrate() for s in stores)))
        finally:
            for s in stores:
                await s.stop()

    results = run(scenario())
    assert sorted(results, key=len) == [[], [], SHIPPED]


def test_a_halt_is_durable_and_recovery_restores_it(pg_dsn: str) -> None:
    from exchange import HaltInstrument, MatchingEngine, ResumeInstrument
    from recovery.rebuild import recover

    spec = SPECS[0]
    engine = MatchingEngine(spec)
    commands: list[Any] = [PlaceOrder(spec.symbol, "alice", "a1", Side.BUY, OrderType.LIMIT, 100, 1, ts_ns=1),
                           HaltInstrument(spec.symbol, "ops", "why", 2), ResumeInstrument(spec.symbol, "ops", "", 3),
                           HaltInstrument(spec.symbol, "ops", "again", 4)]

    async def scenario() -> None:
        store = await migrated_store(pg_dsn)
        try:
            for n, command in enumerate(commands):  # one batch each, with the progress row following
                await store.commit(Batch([Applied(spec.symbol, engine.apply(command), InputPosition("in", 0, n))]))
        finally:
            await store.stop()
        async with PostgresStore(pg_dsn, SPECS) as again:
            recovered = await recover(again, SPECS)  # checks the rebuilt state against a replay of the events
        state = recovered[spec.symbol].state
        assert state.halted
        assert MatchingEngine.from_state(spec, state).state_hash() == engine.state_hash()
        rows = await fetch(pg_dsn, "SELECT type, client_id FROM order_events WHERE instrument = $1 AND seq > 1 "
                                   "ORDER BY seq", spec.symbol)
        assert [(r["type"], r["client_id"]) for r in rows] == [("halted", "ops"), ("resumed", "ops"),
                                                                ("halted", "ops")]

    run(scenario())


# --------------------------------------------------------------- exact rows

SPEC = Instrument.from_decimals("X", tick_size="0.01", lot_size="0.1")


def _place(client: str, coid: str, side: Side, price: int, qty: int, ts: int, **kw: Any) -> PlaceOrder:
    return PlaceOrder("X", client, coid, side, OrderType.LIMIT, price, qty, ts_ns=ts, **kw)


def test_batch_commit_writes_exactly_the_expected_rows(pg_dsn: str) -> None:
    engine = MatchingEngine(SPEC)

    def applied(command: Any, offset: int) -> Applied:
        return Applied("X", engine.apply(command), InputPosition("orders", 3, offset))

    batch1 = Batch([
        applied(_place("alice", "a1", Side.BUY, 10_000, 50, 1_700_000_000_123_456_789), 10),  # seq 1: rests
        applied(_place("bob", "b1", Side.SELL, 10_000, 20, 1_700_000_001_000_000_000), 11),  # 2 accepted, 3 fill
    ])
    batch2 = Batch([
        applied(AmendOrder("X", "alice", "a1", qty_lots=40, ts_ns=1_700_000_002_000_000_000), 12),  # 4 amended
        applied(_place("carol", "c1", Side.SELL, 9_900, 30, 1_700_000_003_000_000_000,
                       tif=TimeInForce.IOC), 13),  # 5 accepted, 6 fill alice (done), 7 canceled remainder 10
        applied(_place("carol", "c1", Side.SELL, 9_900, 1, 1_700_000_004_000_000_000), 14),  # 8 dup rejected
    ], [])

    async def scenario() -> None:
        store = await migrated_store(pg_dsn, [SPEC])
        try:
            await store.load([SPEC])
            await store.commit(batch1)
            orders = await fetch(pg_dsn, "SELECT * FROM orders ORDER BY created_seq")
            assert [(r["order_id"], r["status"], r["remaining_lots"], r["filled_lots"], r["priority"],
                     r["updated_seq"]) for r in orders] == [(1, "partially_filled", 30, 20, 1, 3),
                                                            (2, "filled", 0, 20, 2, 3)]
            a1 = orders[0]
            assert (a1["client_id"], a1["client_order_id"], a1["side"], a1["order_type"], a1["tif"],
                    a1["price_ticks"], a1["qty_lots"], a1["price"], a1["qty"], a1["stp"], a1["post_only"],
                    a1["created_seq"], a1["created_ts_ns"]) == (
                "alice", "a1", "buy", "limit", "GTC", 10_000, 50, Decimal("100.00"), Decimal("5.0"), "none",
                False, 1, 1_700_000_000_123_456_789)

            await store.commit(batch2)
            orders = await fetch(pg_dsn, "SELECT * FROM orders ORDER BY created_seq")
            assert [(r["created_seq"], r["order_id"], r["client_order_id"], r["status"], r["qty_lots"],
                     r["remaining_lots"], r["filled_lots"], r["priority"], r["updated_seq"], r["reject_reason"])
                    for r in orders] == [
                (1, 1, "a1", "filled", 40, 0, 40, 1, 6, None),
                (2, 2, "b1", "filled", 20, 0, 20, 2, 3, None),
                (5, 3, "c1", "canceled", 30, 0, 20, 5, 7, None),
                (8, None, "c1", "rejected", None, 0, 0, None, 8, "duplicate_client_order_id"),
            ]
            assert orders[0]["qty"] == Decimal("4.0")
            assert orders[0]["updated_ts_ns"] == 1_700_000_003_000_000_000

            events = await fetch(pg_dsn, "SELECT * FROM order_events ORDER BY seq")
            assert [(r["seq"], r["type"], r["order_id"], r["client_id"]) for r in events] == [
                (1, "accepted", 1, "alice"), (2, "accepted", 2, "bob"), (3, "filled", 2, "bob"),
                (4, "amended", 1, "alice"), (5, "accepted", 3, "carol"), (6, "filled", 3, "carol"),
                (7, "canceled", 3, "carol"), (8, "rejected", 3, "carol")]
            decoded = [msgspec.json.decode(r["payload"], type=Event) for r in events]
            originals = [e for b in (batch1, batch2) for a in b.applied for e in a.events]
            assert decoded == originals
            assert [r["ts_ns"] for r in events] == [e.ts_ns for e in originals]

            trades = await fetch(pg_dsn, "SELECT * FROM trades ORDER BY trade_id")
            assert [(r["trade_id"], r["seq"], r["price_ticks"], r["qty_lots"], r["price"], r["qty"],
                     r["aggressor_side"], r["maker_order_id"], r["maker_client_id"], r["maker_client_order_id"],
                     r["taker_order_id"], r["taker_client_id"], r["taker_client_order_id"]) for r in trades] == [
                (1, 3, 10_000, 20, Decimal("100.00"), Decimal("2.0"), "sell", 1, "alice", "a1", 2, "bob", "b1"),
                (2, 6, 10_000, 20, Decimal("100.00"), Decimal("2.0"), "sell", 1, "alice", "a1", 3, "carol", "c1"),
            ]
            assert trades[0]["traded_at"].timestamp() == pytest.approx(1_700_000_001.0)
            assert trades[0]["traded_at"].microsecond == 0

            positions = {r["client_id"]: r for r in await fetch(pg_dsn, "SELECT * FROM positions")}
            assert {c: (int(r["net_lots"]), int(r["cost"]), int(r["realized"]), r["net_qty"], r["updated_seq"])
                    for c, r in positions.items()} == {
                "alice": (40, 400_000, 0, Decimal("4.0"), 6),
                "bob": (-20, -200_000, 0, Decimal("-2.0"), 3),
                "carol": (-20, -200_000, 0, Decimal("-2.0"), 6),
            }
            progress = await fetch(pg_dsn, "SELECT * FROM engine_progress")
            assert [(r["instrument"], r["seq"], r["next_order_id"], r["next_trade_id"]) for r in progress] == [
                ("X", 8, 4, 3)]
            offsets = await fetch(pg_dsn, "SELECT * FROM input_offsets")
            assert [(r["instrument"], r["topic"], r["partition"], r["last_offset"]) for r in offsets] == [
                ("X", "orders", 3, 14)]
        finally:
            await store.stop()

    run(scenario())


# ------------------------------------------------------- the big round trip


def _positions_from_fills(events: list[Event]) -> dict[tuple[str, str], Position]:
    out: dict[tuple[str, str], Position] = {}
    for e in events:
        if isinstance(e, OrderFilled):
            maker_side = Side.SELL if e.aggressor_side is Side.BUY else Side.BUY
            for client, side in ((e.maker_client_id, maker_side), (e.taker_client_id, e.aggressor_side)):
                key = (e.instrument, client)
                out[key] = apply_fill(out.get(key, Position()), side, e.price_ticks, e.qty_lots)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_stream_round_trips_through_storage(pg_dsn: str, seed: int, commit_path: str) -> None:
    work = Workload(seed=seed)
    batches = work.batches(2_500, max_batch=150)

    async def scenario() -> None:
        store = await migrated_store(pg_dsn)
        try:
            assert all(r.state.seq == 0 and r.state.next_order_id == 1 for r in (await store.load(SPECS)).values())
            for batch in batches:
                await store.commit(batch)
            recovered = await store.load(SPECS)
        finally:
            await store.stop()
        one_statement = store.one_statement_commits
        assert one_statement > len(batches) // 2 if commit_path == "one-statement" else one_statement == 0

        # positions: stored == recomputed from the stored trades == recomputed from the live fills
        trades = await fetch(pg_dsn, "SELECT instrument, price_ticks, qty_lots, aggressor_side, maker_client_id, "
                                     "taker_client_id FROM trades ORDER BY instrument, trade_id")
        from_trades: dict[tuple[str, str], Position] = {}
        for t in trades:
            aggressor = Side(t["aggressor_side"])
            maker_side = Side.SELL if aggressor is Side.BUY else Side.BUY
            for client, side in ((t["maker_client_id"], maker_side), (t["taker_client_id"], aggressor)):
                key = (t["instrument"], client)
                from_trades[key] = apply_fill(from_trades.get(key, Position()), side, t["price_ticks"],
                                              t["qty_lots"])
        assert from_trades == _positions_from_fills(work.events)
        stored = {(r["instrument"], r["client_id"]): Position(int(r["net_lots"]), int(r["cost"]), int(r["realized"]))
                  for r in await fetch(pg_dsn, "SELECT * FROM positions")}
        assert stored == from_trades
        steps = {spec.symbol: (Decimal(spec.tick_size), Decimal(spec.lot_size)) for spec in SPECS}
        for r in await fetch(pg_dsn, "SELECT * FROM positions"):
            tick, lot = steps[r["instrument"]]
            assert r["net_qty"] == r["net_lots"] * lot
            assert r["realized_pnl"] == r["realized"] * tick * lot
        for r in await fetch(pg_dsn, "SELECT * FROM trades"):
            tick, lot = steps[r["instrument"]]
            assert (r["price"], r["qty"]) == (r["price_ticks"] * tick, r["qty_lots"] * lot)
        net: dict[tuple[str, str], int] = {}
        for t in trades:
            lots = t["qty_lots"]
            buyer, seller = ((t["taker_client_id"], t["maker_client_id"]) if t["aggressor_side"] == "buy"
                             else (t["maker_client_id"], t["taker_client_id"]))
            net[(t["instrument"], buyer)] = net.get((t["instrument"], buyer), 0) + lots
            net[(t["instrument"], seller)] = net.get((t["instrument"], seller), 0) - lots
        assert {k: p.net_lots for k, p in stored.items()} == net
        for spec in SPECS:
            assert recovered[spec.symbol].positions == {
                c: p for (s, c), p in stored.items() if s == spec.symbol}

        for spec in SPECS:
            live = work.engines[spec.symbol]
            rec = recovered[spec.symbol]
            assert rec.state == live.export_state()  # orders in priority order, counters, dedupe window
            assert rec.offsets == {("orders", work.partition[spec.symbol]): work.offsets[spec.symbol]}
            rebuilt = MatchingEngine.from_state(spec, rec.state)
            assert rebuilt.state_hash() == live.state_hash()
            assert (rebuilt.seq, rebuilt.next_order_id, rebuilt.next_trade_id) == (
                live.seq, live.next_order_id, live.next_trade_id)
            # the same future: identical events for the same next commands
            for _ in range(400):
                command = work.command(spec.symbol)
                assert rebuilt.apply(command) == live.apply(command)
            assert rebuilt.state_hash() == live.state_hash()

        counts = (await fetch(pg_dsn, "SELECT (SELECT count(*) FROM order_events) AS e, "
                                      "(SELECT count(*) FROM trades) AS t"))[0]
        produced = sum(len(a.events) for b in batches for a in b.applied)
        assert (counts["e"], counts["t"]) == (produced, len([e for b in batches for a in b.applied
                                                             for e in a.events if isinstance(e, OrderFilled)]))
        snaps = await fetch(pg_dsn, "SELECT instrument, count(*) AS n FROM snapshots GROUP BY instrument")
        assert all(r["n"] <= 3 for r in snaps)
        assert snaps

    run(scenario())


def test_statuses_match_the_engine(pg_dsn: str) -> None:
    """Every stored order's status, quantities and priority agree with what the events say."""
    work = Workload(seed=11)
    batches = work.batches(1_500, max_batch=80)

    async def scenario() -> None:
        store = await migrated_store(pg_dsn)
        try:
            for batch in batches:
                await store.commit(batch)
        finally:
            await store.stop()
        rows = await fetch(pg_dsn, "SELECT * FROM orders WHERE order_id IS NOT NULL")
        for spec in SPECS:
            live = {o.order_id: o for o in work.engines[spec.symbol].book.orders.values()}
            mine = [r for r in rows if r["instrument"] == spec.symbol]
            open_rows = {r["order_id"]: r for r in mine if r["status"] in ("open", "partially_filled")}
            assert set(open_rows) == set(live)
            for oid, o in live.items():
                r = open_rows[oid]
                assert (r["remaining_lots"], r["qty_lots"], r["price_ticks"], r["priority"], r["filled_lots"]) == (
                    o.remaining, o.qty, o.price, o.priority, o.qty - o.remaining)
                assert r["status"] == ("partially_filled" if o.qty > o.remaining else "open")
            tick, lot = Decimal(spec.tick_size), Decimal(spec.lot_size)
            for r in mine:
                # the decimal columns follow the integers, whether COPied or updated (amends)
                assert r["price"] == (r["price_ticks"] * tick if r["price_ticks"] else None)
                assert r["qty"] == r["qty_lots"] * lot
                assert r["filled_lots"] + r["remaining_lots"] <= r["qty_lots"]
                if r["status"] == "filled":
                    assert r["filled_lots"] == r["qty_lots"]
                    assert r["remaining_lots"] == 0

    run(scenario())


# ------------------------------------------------------- failures and retries


def test_terminated_connection_mid_commit_is_retriable_and_the_retry_writes_once(pg_dsn: str) -> None:
    work = Workload(seed=5)
    batches = work.batches(600, max_batch=100)

    async def scenario() -> None:
        store = await migrated_store(pg_dsn)
        try:
            half = len(batches) // 2
            for batch in batches[:half]:
                await store.commit(batch)
            # the next upsert of engine_progress (late in the transaction, after the COPYs) kills its own backend
            await execute(pg_dsn, """
                CREATE SEQUENCE kill_once;
                CREATE FUNCTION kill_me() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF nextval('kill_once') = 1 THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
                    RETURN NEW;
                END $$;
                CREATE TRIGGER kill_me BEFORE INSERT OR UPDATE ON engine_progress
                    FOR EACH ROW EXECUTE FUNCTION kill_me();
            """)
            with pytest.raises(StoreUnavailable) as info:
                await store.commit(batches[half])
            assert info.value.retriable
            for batch in batches[half:]:
                await store.commit(batch)
            # a closed pool is retriable too, and the same batch goes through after a restart
            more = work.batches(50, max_batch=50)
            await store.stop()
            with pytest.raises(StoreUnavailable) as info:
                await store.commit(more[0])
            assert info.value.retriable
            await store.start()
            for batch in more:
                await store.commit(batch)
            batches.extend(more)
            recovered = await store.load(SPECS)
        finally:
            await store.stop()
        produced = [e for b in batches for a in b.applied for e in a.events]
        rows = await fetch(pg_dsn, "SELECT instrument, seq FROM order_events ORDER BY instrument, seq")
        assert [(r["instrument"], r["seq"]) for r in rows] == sorted((e.instrument, e.seq) for e in produced)
        for spec in SPECS:
            assert recovered[spec.symbol].state == work.engines[spec.symbol].export_state()
        stored = {(r["instrument"], r["client_id"]): Position(int(r["net_lots"]), int(r["cost"]), int(r["realized"]))
                  for r in await fetch(pg_dsn, "SELECT * FROM positions")}
        assert stored == _positions_from_fills(produced)

    run(scenario())


def test_a_batch_whose_acknowledgement_was_lost_is_not_written_twice(pg_dsn: str) -> None:
    work = Workload(seed=6)
    batches = work.batches(300, max_batch=60)

    async def scenario() -> None:
        writer = await migrated_store(pg_dsn)
        retrier = await migrated_store(pg_dsn)
        try:
            await writer.load(SPECS)
            await retrier.load(SPECS)  # its caches stay at seq 0, like a writer whose commit "failed"
            await writer.commit(batches[0])
            await retrier.commit(batches[0])  # already durable: acknowledged, nothing written
            for batch in batches[1:]:
                await retrier.commit(batch)
            await retrier.commit(batches[-1])  # a retry after success is a no-op too
            recovered = await retrier.load(SPECS)
        finally:
            await writer.stop()
            await retrier.stop()
        produced = [e for b in batches for a in b.applied for e in a.events]
        count = (await fetch(pg_dsn, "SELECT count(*) AS n FROM order_events"))[0]["n"]
        assert count == len(produced)
        for spec in SPECS:
            assert recovered[spec.symbol].state == work.engines[spec.symbol].export_state()
        stored = {(r["instrument"], r["client_id"]): Position(int(r["net_lots"]), int(r["cost"]), int(r["realized"]))
                  for r in await fetch(pg_dsn, "SELECT * FROM positions")}
        assert stored == _positions_from_fills(produced)

    run(scenario())


def test_a_gap_or_an_unknown_instrument_is_refused_and_not_retriable(pg_dsn: str) -> None:
    work = Workload(seed=7)
    batches = work.batches(200, max_batch=40)
    other = Instrument.from_decimals("ZZZ", tick_size="1", lot_size="1")

    async def scenario() -> None:
        store = await migrated_store(pg_dsn)
        try:
            await store.commit(batches[0])
            with pytest.raises(StoreUnavailable) as info:
                await store.commit(batches[2])  # batches[1] is missing
            assert not info.value.retriable
            assert "sequence" in str(info.value)
            stranger = Batch([Applied("ZZZ", MatchingEngine(other).apply(
                PlaceOrder("ZZZ", "a", "1", Side.BUY, OrderType.LIMIT, 1, 1)), None)])
            with pytest.raises(StoreUnavailable) as info:
                await store.commit(stranger)
            assert not info.value.retriable
            assert "ZZZ" in str(info.value)
            for batch in batches[1:]:  # nothing was written by the refused attempts
                await store.commit(batch)
        finally:
            await store.stop()

    run(scenario())


def test_orders_row_missing_is_refused_loudly(pg_dsn: str) -> None:
    engine = MatchingEngine(SPEC)
    first = Batch([Applied("X", engine.apply(_place("alice", "a1", Side.BUY, 100, 5, 1)), None)])
    second = Batch([Applied("X", engine.apply(_place("bob", "b1", Side.SELL, 100, 5, 2)), None)])

    async def scenario() -> None:
        store = await migrated_store(pg_dsn, [SPEC])
        try:
            await store.commit(first)
            await execute(pg_dsn, "DELETE FROM orders WHERE order_id = 1")
            with pytest.raises(StoreUnavailable) as info:
                await store.commit(second)
            assert not info.value.retriable
            assert "orders" in str(info.value)
        finally:
            await store.stop()

    run(scenario())


def test_unmigrated_database_says_to_migrate(pg_dsn: str) -> None:
    async def scenario() -> None:
        async with PostgresStore(pg_dsn, SPECS) as store:
            with pytest.raises(StoreUnavailable) as info:
                await store.load(SPECS)
            assert not info.value.retriable
            assert "migrat" in str(info.value)

    run(scenario())


def test_unreachable_database_is_retriable() -> None:
    async def scenario() -> None:
        store = PostgresStore("postgresql://127.0.0.1:1/nothing", SPECS, connect_timeout=2)
        with pytest.raises(StoreUnavailable) as info:
            await store.start()
        assert info.value.retriable
        with pytest.raises(StoreUnavailable) as info:
            await store.commit(Batch([]))
        assert info.value.retriable

    run(scenario())


def test_read_events_in_small_chunks_and_stopping_early(pg_dsn: str) -> None:
    work = Workload(seed=8)
    batches = work.batches(300, max_batch=60, snapshot_every=2)

    async def scenario() -> None:
        store = await migrated_store(pg_dsn)
        try:
            for batch in batches:
                await store.commit(batch)
            for spec in SPECS:
                produced = [e for e in work.events if e.instrument == spec.symbol]
                chunks = [c async for c in store.read_events(spec.symbol, 0, chunk=7)]
                assert [e for c in chunks for e in c] == produced
                assert max(map(len, chunks)) == 7
                middle = [e for c in [c async for c in store.read_events(spec.symbol, 10, 30, chunk=6)] for e in c]
                assert [e.seq for e in middle] == list(range(11, 31))
                stream = store.read_events(spec.symbol, 0, chunk=5)
                async for _ in stream:
                    break  # the read-ahead is dropped quietly
                await stream.aclose()
                snap = await store.latest_snapshot(spec.symbol)
                assert snap is not None
                assert snap.state_hash == MatchingEngine.from_state(spec, snap.state).state_hash()
                older = await store.latest_snapshot(spec.symbol, snap.state.seq - 1)
                assert older is None or older.state.seq < snap.state.seq
                assert await store.latest_snapshot(spec.symbol, 0) is None
        finally:
            await store.stop()

    run(scenario())



def test_the_numeric_wire_codec_agrees_with_postgresql(pg_dsn: str) -> None:
    """The store's own NUMERIC codec (pre-encoded prices and sizes) against the server's text form."""
    import random

    from exchange.adapters.postgres import _decode_numeric, _encode_numeric, _init_connection, numeric_binary

    rng = random.Random(3)
    values = [(0, 0), (0, 3), (1, 0), (-1, 0), (10_000, 2), (5, 4), (5, 5), (-42, 1), (10**37, 0), (1, 18),
              (-(10**37) + 1, 0), (99_999_999, 18), (123_456_789, 9)]
    values += [(rng.choice((1, -1)) * rng.randrange(10 ** rng.randrange(1, 38)), rng.randrange(19))
               for _ in range(400)]

    async def scenario() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await _init_connection(conn)
            for units, scale in values:
                expected = Decimal(f"{units}E-{scale}")
                text = await conn.fetchval("SELECT $1::numeric::text", numeric_binary(units, scale))
                assert Decimal(text) == expected
                assert len(text.partition(".")[2]) == scale  # exactly the display scale asked for
                assert await conn.fetchval("SELECT $1::numeric::text", _encode_numeric(expected)) == text
                back = await conn.fetchval("SELECT $1::text::numeric", text)
                assert back == expected
                assert f"{back:f}" == text
            assert await conn.fetchval("SELECT $1::numeric", 12345) == 12345
            assert str(await conn.fetchval("SELECT 'NaN'::numeric")) == "NaN"
            with pytest.raises(TypeError):
                _encode_numeric(1.5)
            assert _decode_numeric(numeric_binary(-5, 2)) == Decimal("-0.05")
        finally:
            await conn.close()

    run(scenario())


def test_publish_watermark_is_stored_and_never_moves_back(pg_dsn: str) -> None:
    async def scenario() -> None:
        store = await migrated_store(pg_dsn)
        try:
            assert await store.published_seqs() == {}
            await store.record_published({"AAA-USD": 10, "BBB-USD": 3})
            await store.record_published({"AAA-USD": 7})
            assert await store.published_seqs() == {"AAA-USD": 10, "BBB-USD": 3}
            await store.record_published({"AAA-USD": 12})
            assert (await store.published_seqs())["AAA-USD"] == 12
        finally:
            await store.stop()

    run(scenario())
