"""PostgresStore against a real PostgreSQL: migrations, both commit paths under a lost connection, NUMERIC codec.

The store contract both stores share is tested in ``test_stores.py``.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from exchange import Instrument
from exchange.adapters.postgres import PostgresStore
from exchange.migrations import available
from exchange.ports import Batch, Position, StoreUnavailable
from tests.integration._workload import SPECS, SPECS_WITH_BALANCES, Workload, positions_from_fills

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
# migration 007; it needs the instrument's counters loaded, as the daemon's recovery does), and the
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
    await store.take([spec.symbol for spec in specs], [], "test")  # epoch 1: what the workload's batches carry
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
                "schema_migrations", "publish_progress", "balances", "transfers"} <= tables
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


def test_the_order_types_migration_keeps_every_order_row(pg_dsn: str) -> None:
    """A database of the previous version (migrations up to 009, an order in it) takes 010: the row is what it
    was, with 0 in the new columns, and order_type admits stops from then on."""
    async def scenario() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("CREATE TABLE schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT "
                               "NULL DEFAULT now())")
            for name, sql in available():
                if name < "010":
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            await conn.execute("INSERT INTO orders (instrument, created_seq, order_id, client_id, client_order_id, "
                               "side, order_type, tif, price_ticks, qty_lots, remaining_lots, filled_lots, status, "
                               "priority, created_ts_ns, updated_seq, updated_ts_ns, price, qty, rate) VALUES "
                               "('AAA-USD', 1, 1, 'alice', 'a1', 'buy', 'limit', 'GTC', 100, 5, 3, 2, "
                               "'partially_filled', 1, 7, 2, 8, 1.00, 5, 0)")
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute("UPDATE orders SET order_type = 'stop'")
        finally:
            await conn.close()
        async with PostgresStore(pg_dsn, SPECS) as store:
            assert await store.migrate() == [name for name in SHIPPED if name >= "010"]
        (row,) = await fetch(pg_dsn, "SELECT * FROM orders")
        assert (row["remaining_lots"], row["filled_lots"], row["status"], row["price"], row["stop_price_ticks"],
                row["triggered_seq"], row["display_lots"], row["hidden_lots"], row["funds"]) == (
            3, 2, "partially_filled", Decimal("1.00"), 0, 0, 0, 0, 0)
        await execute(pg_dsn, "UPDATE orders SET order_type = 'stop_limit', stop_price_ticks = 99")
        with pytest.raises(asyncpg.CheckViolationError):
            await execute(pg_dsn, "UPDATE orders SET order_type = 'iceberg'")

    run(scenario())


# ------------------------------------------------------- failures and retries
# (the store contract -- exact rows, round trips, lost acknowledgements, gaps, halts, history -- runs
# against both stores and both PostgreSQL commit paths in test_stores.py; what is PostgreSQL's own is here)


async def assert_stored_exactly(dsn: str, batches: list[Batch], work: Workload, recovered: dict[str, Any]) -> list[Any]:
    """Every event once, the recovered books (balances included) equal the engines', positions equal the fills';
    the events."""
    produced = [e for b in batches for a in b.applied for e in a.events]
    rows = await fetch(dsn, "SELECT instrument, seq FROM order_events ORDER BY instrument, seq")
    assert [(r["instrument"], r["seq"]) for r in rows] == sorted((e.instrument, e.seq) for e in produced)
    for spec in work.specs:
        assert recovered[spec.symbol].state == work.engines[spec.symbol].export_state()
    stored = {(r["instrument"], r["client_id"]): Position(int(r["net_lots"]), int(r["cost"]), int(r["realized"]))
              for r in await fetch(dsn, "SELECT * FROM positions")}
    assert stored == positions_from_fills(produced)
    return produced


def test_terminated_connection_mid_commit_is_retriable_and_the_retry_writes_once(pg_dsn: str) -> None:
    work = Workload(SPECS_WITH_BALANCES, seed=5)
    batches = work.batches(600, max_batch=100)

    async def scenario() -> None:
        store = await migrated_store(pg_dsn, SPECS_WITH_BALANCES)
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
            recovered = await store.load(SPECS_WITH_BALANCES)
        finally:
            await store.stop()
        await assert_stored_exactly(pg_dsn, batches, work, recovered)

    run(scenario())


def test_exchange_commit_batch_finds_every_field_by_its_name(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The document says where each field is in its rows (migration 008; 009 for balances, transfers and rates):
    the same batches with the fields of every kind of row in reverse order store the same rows."""
    work = Workload(SPECS_WITH_BALANCES, seed=31)
    batches = work.batches(600, max_batch=60)
    document = PostgresStore._document

    def reversed_fields(self: PostgresStore, rows: Any, batch: Batch, *, copied: bool) -> str:
        doc = json.loads(document(self, rows, batch, copied=copied))
        for kind, at in doc["fields"].items():
            doc["fields"][kind] = {name: len(at) - 1 - i for name, i in at.items()}
            doc[kind] = [row[::-1] for row in doc[kind]]
        return json.dumps(doc)

    monkeypatch.setattr(PostgresStore, "_document", reversed_fields)

    async def scenario() -> None:
        store = await migrated_store(pg_dsn, SPECS_WITH_BALANCES)
        try:
            for batch in batches:
                await store.commit(batch)
            recovered = await store.load(SPECS_WITH_BALANCES)
        finally:
            await store.stop()
        produced = await assert_stored_exactly(pg_dsn, batches, work, recovered)
        fills = [e for e in produced if type(e).__name__ == "OrderFilled"]
        assert fills
        trades = await fetch(pg_dsn, "SELECT trade_id, price_ticks, qty_lots, maker_order_id FROM trades "
                                     "ORDER BY instrument, trade_id")
        assert sorted((r["price_ticks"], r["qty_lots"], r["maker_order_id"]) for r in trades) == sorted(
            (e.price_ticks, e.qty_lots, e.maker_order_id) for e in fills)
        # the decimal columns the server computes from the steps (base_asset among them)
        spec = SPECS_WITH_BALANCES[-1]
        units = {spec.base_asset: Decimal(spec.lot_size), spec.quote_asset: Decimal(spec.tick_size) * Decimal(
            spec.lot_size)}
        balances = await fetch(pg_dsn, "SELECT * FROM balances")
        assert {r["asset"] for r in balances} == set(units)
        assert all((r["available_amount"], r["reserved_amount"]) == (r["available"] * units[r["asset"]],
                                                                     r["reserved"] * units[r["asset"]])
                   for r in balances)
        transfers = await fetch(pg_dsn, "SELECT * FROM transfers")
        assert all(r["amount"] == r["amount_units"] * units[r["asset"]] for r in transfers if r["asset"])
        assert {r["status"] for r in transfers} == {"applied", "refused"}

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


def test_the_numeric_wire_codec_agrees_with_postgresql(pg_dsn: str) -> None:
    """The store's own NUMERIC codec (pre-encoded prices and sizes) against the server's text form."""
    import random

    from exchange.adapters.postgres.connection import _init_connection
    from exchange.adapters.postgres.numeric import _decode_numeric, _encode_numeric, numeric_binary

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
