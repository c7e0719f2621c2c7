"""PostgresStore against a real PostgreSQL: migrations, both commit paths under a lost connection, NUMERIC codec.

The store contract both stores share is tested in ``test_stores.py``.
"""

from __future__ import annotations

import asyncio
import itertools
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from exchange import Instrument
from exchange.adapters import postgres
from exchange.adapters.postgres import PostgresStore
from exchange.migrations import available
from exchange.ports import Batch, Position, StoreUnavailable
from tests.integration._workload import SPECS, Workload, positions_from_fills
from tests.support.commits import commit_two_in_flight, until_sent

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
# migrations 003 and 005; it needs the instrument's counters loaded, as the daemon's recovery does), and the
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


# ------------------------------------------------------- failures and retries
# (the store contract -- exact rows, round trips, lost acknowledgements, gaps, halts, history -- runs
# against both stores and both PostgreSQL commit paths in test_stores.py; what is PostgreSQL's own is here)


async def assert_stored_exactly(dsn: str, batches: list[Batch], work: Workload, recovered: dict[str, Any]) -> list[Any]:
    """Every event once, the recovered books equal the engines', positions equal the fills'; the events."""
    produced = [e for b in batches for a in b.applied for e in a.events]
    rows = await fetch(dsn, "SELECT instrument, seq FROM order_events ORDER BY instrument, seq")
    assert [(r["instrument"], r["seq"]) for r in rows] == sorted((e.instrument, e.seq) for e in produced)
    for spec in SPECS:
        assert recovered[spec.symbol].state == work.engines[spec.symbol].export_state()
    stored = {(r["instrument"], r["client_id"]): Position(int(r["net_lots"]), int(r["cost"]), int(r["realized"]))
              for r in await fetch(dsn, "SELECT * FROM positions")}
    assert stored == positions_from_fills(produced)
    return produced


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
        await assert_stored_exactly(pg_dsn, batches, work, recovered)

    run(scenario())


async def commit_one_ahead(store: PostgresStore, batches: list[Batch]) -> None:
    """As the journal writer does under load: each batch is prepared before the previous one commits."""
    prepared = [store.prepare(batches[0])] if batches else []
    for i, batch in enumerate(batches):
        if i + 1 < len(batches):
            prepared.append(store.prepare(batches[i + 1]))
        await store.commit(batch, prepared[i])


def test_batches_prepared_ahead_write_what_batches_committed_one_by_one_write(pg_dsn: str) -> None:
    """Rows derived while the previous batch is still uncommitted continue its counters and positions;
    a retried commit reuses them; a preparation whose basis went away (here: the acknowledgement of a
    commit was lost, so the store dropped its cached state) is derived again, never written as it was."""
    work = Workload(seed=11)
    batches = work.batches(900, max_batch=80)
    half = len(batches) // 2

    async def scenario() -> None:
        writer = await migrated_store(pg_dsn)
        ahead = await migrated_store(pg_dsn)
        try:
            await ahead.load(SPECS)
            await commit_one_ahead(ahead, batches[:half])
            # another store commits the next batch: `ahead` then commits it again as if its acknowledgement
            # had been lost, with the following batch already prepared on top of it
            await writer.load(SPECS)
            await writer.commit(batches[half])
            first = ahead.prepare(batches[half])
            second = ahead.prepare(batches[half + 1])
            assert first is not None
            assert second is not None
            await ahead.commit(batches[half], first)  # already durable: nothing written, caches dropped
            assert not ahead._usable(second)
            await ahead.commit(batches[half + 1], second)  # stale basis: derived again from the database
            # a commit that fails after its rows were prepared is retried with the same preparation
            rest = batches[half + 2:]
            retried = ahead.prepare(rest[0])
            await ahead.stop()
            with pytest.raises(StoreUnavailable) as info:
                await ahead.commit(rest[0], retried)
            assert info.value.retriable
            await ahead.start()
            await ahead.commit(rest[0], retried)
            await commit_one_ahead(ahead, rest[1:])
            assert ahead._ahead == []  # nothing prepared is left lying over the committed state
            recovered = await ahead.load(SPECS)
        finally:
            await writer.stop()
            await ahead.stop()
        produced = await assert_stored_exactly(pg_dsn, batches, work, recovered)
        fills = [e for e in produced if type(e).__name__ == "OrderFilled"]
        assert fills
        assert len(await fetch(pg_dsn, "SELECT trade_id FROM trades")) == len(fills)

    run(scenario())


def test_a_batch_started_while_the_one_before_commits_becomes_durable_after_it(pg_dsn: str,
                                                                               commit_path: str) -> None:
    """A batch sends its new rows while the commit before it is in flight (by COPY, or inside
    exchange_commit_batch, which then waits for its turn), and writes the rest only once that one is
    durable; if it is not (failed, or durable without the state the rows continue), nothing of the
    batch is written and it is derived again."""
    work = Workload(seed=17)
    batches = work.batches(1200, max_batch=80)
    third = len(batches) // 3

    async def scenario() -> None:
        store = await migrated_store(pg_dsn)
        other = await migrated_store(pg_dsn)
        try:
            await store.load(SPECS)
            await commit_two_in_flight(store, batches[:third])
            # all but the first, except batches with snapshots (they take the ordinary path) and the batches
            # after them (a commit with snapshots has sent its rows only when it ends)
            expected = sum(1 for before, batch in itertools.pairwise(batches[:third])
                           if not batch.snapshots and not before.snapshots)
            if commit_path == "copy":
                assert store.overlapped_commits == expected > 0
            else:  # a small commit may end before the one behind it starts: then there is nothing to overlap
                assert 0 < store.overlapped_commits <= expected
            # the commit before fails: the batch started behind it writes nothing, and goes through later
            a, b = batches[third], batches[third + 1]
            prepared_a, prepared_b = store.prepare(a), store.prepare(b)
            prepared_a.sent = True  # as if its commit had gone ahead with these rows: b goes behind it
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            started = asyncio.create_task(store.commit(b, prepared_b, after=failed))
            await asyncio.sleep(0.2)  # its new rows are in (COPY, or the server's statement), it waits
            assert not started.done()
            if commit_path == "one-statement":  # in the server, for the stored sequence to reach its start
                waiting = await fetch(pg_dsn, "SELECT count(*) AS n FROM pg_stat_activity "
                                              "WHERE state = 'active' AND query LIKE 'SELECT exchange_commit_batch%'")
                assert waiting[0]["n"] == 1
            failed.set_exception(StoreUnavailable("lost", retriable=True))
            with pytest.raises(StoreUnavailable) as info:
                await started
            assert info.value.retriable
            stored = await fetch(pg_dsn, "SELECT count(*) AS n FROM order_events")
            assert stored[0]["n"] == sum(len(x.events) for batch in batches[:third] for x in batch.applied)
            await store.commit(a, prepared_a)
            await store.commit(b, prepared_b)
            overlapped = store.overlapped_commits
            # the batch before was not prepared, so the rows of the one behind it continue the state before
            # it: they are derived again once it is durable (written as they were, the batch is refused)
            c, d = batches[third + 2], batches[third + 3]
            prepared_d = store.prepare(d)
            first = asyncio.create_task(store.commit(c))
            await store.commit(d, prepared_d, after=first)
            await first
            # the commit before is acknowledged without writing (its acknowledgement was lost, another
            # store wrote it): the store drops its caches, and the batch behind it is derived again
            e, f = batches[third + 4], batches[third + 5]
            await other.load(SPECS)
            await other.commit(e)
            first = asyncio.create_task(store.commit(e, store.prepare(e)))
            await store.commit(f, store.prepare(f), after=first)
            await first
            assert store.overlapped_commits == overlapped
            await commit_two_in_flight(store, batches[third + 6:])
            assert store._ahead == []
            recovered = await store.load(SPECS)
        finally:
            await store.stop()
            await other.stop()
        await assert_stored_exactly(pg_dsn, batches, work, recovered)

    run(scenario())


def test_a_batch_behind_a_commit_that_does_not_end_waits_for_it_without_writing(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch sent behind a commit that does not end in time: a one-statement batch gives up in the
    server after its wait (nothing of it written, no statement left running), a COPY-path batch waits
    in the store with its rows uncommitted; either goes through once that commit has ended."""
    monkeypatch.setattr(postgres, "_BEHIND_WAIT_MS", 200)
    work = Workload(seed=29)
    batches = work.batches(300, max_batch=60)

    async def scenario() -> None:
        store = await migrated_store(pg_dsn)
        try:
            await store.load(SPECS)
            await commit_two_in_flight(store, batches[:-2])
            a, b = batches[-2:]
            prepared_a, prepared_b = store.prepare(a), store.prepare(b)
            assert prepared_a is not None
            assert prepared_b is not None
            prepared_a.sent = True  # as if its commit had gone ahead with these rows: b goes behind it
            slow: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            started = asyncio.create_task(store.commit(b, prepared_b, after=slow))
            await asyncio.sleep(0.6)  # past the server's wait: the store waits for `slow`
            assert not started.done()
            active = await fetch(pg_dsn, "SELECT count(*) AS n FROM pg_stat_activity "
                                         "WHERE state = 'active' AND query LIKE 'SELECT exchange_commit_batch%'")
            assert active[0]["n"] == 0
            stored = await fetch(pg_dsn, "SELECT count(*) AS n FROM order_events")
            assert stored[0]["n"] == sum(len(x.events) for batch in batches[:-2] for x in batch.applied)
            await store.commit(a, prepared_a)
            slow.set_result(None)
            await started
            assert store.overlapped_commits < len(batches) - 2
            recovered = await store.load(SPECS)
        finally:
            await store.stop()
        await assert_stored_exactly(pg_dsn, batches, work, recovered)

    run(scenario())


def test_rows_prepared_on_a_batch_that_is_derived_again_are_derived_again_too(pg_dsn: str, commit_path: str) -> None:
    """A batch prepared while an unprepared one commits continues a stale state; it is derived again
    when its turn comes, with the same seqs (they are its events') but other positions. A batch prepared
    on its rows meanwhile must not be written as prepared (by the server's sequence check alone, or the
    COPY path's check of the counters): its positions would continue rows that were never written."""
    work = Workload(seed=23)
    batches = work.batches(900, max_batch=60)
    start = len(batches) // 2

    async def scenario() -> None:
        store = await migrated_store(pg_dsn)
        try:
            await store.load(SPECS)
            await commit_two_in_flight(store, batches[:start])
            end = start + (len(batches) - start) // 3 * 3
            for k in range(start, end, 3):
                h, i, j = batches[k:k + 3]
                first = asyncio.create_task(store.commit(h))  # not prepared
                prepared_i = store.prepare(i)  # on the state before h: derived again
                prepared_j = store.prepare(j)  # on prepared_i's rows
                sent = asyncio.Event()
                second = asyncio.create_task(store.commit(i, prepared_i, server_side=sent, after=first))
                await until_sent(sent, second)
                await store.commit(j, prepared_j, after=second)
                await asyncio.gather(first, second)
            await commit_two_in_flight(store, batches[end:])
            recovered = await store.load(SPECS)
        finally:
            await store.stop()
        await assert_stored_exactly(pg_dsn, batches, work, recovered)

    run(scenario())


def test_a_pool_of_one_connection_never_overlaps_commits(pg_dsn: str) -> None:
    """A batch started behind another holds a connection while it waits; with one connection, a retry of the
    commit before it could never get one, so such a store commits one batch at a time."""
    work = Workload(seed=19)
    batches = work.batches(400, max_batch=80)

    async def scenario() -> None:
        store = PostgresStore(pg_dsn, SPECS, pool_size=1, one_statement_max_events=_commit_path["max"])
        await store.start()
        try:
            await store.migrate()
            await store.load(SPECS)
            await commit_two_in_flight(store, batches)
            assert store.overlapped_commits == 0
            recovered = await store.load(SPECS)
        finally:
            await store.stop()
        await assert_stored_exactly(pg_dsn, batches, work, recovered)

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
