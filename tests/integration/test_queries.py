"""The tables as an operator queries them in psql (migration 011_queries, the README's Storage section).

Events read as JSON through ``order_events_json`` while ``order_events.payload`` keeps the engine's exact bytes;
the generated timestamps equal the stored nanoseconds (to the microsecond); a client's trades and the trades of a
time range are found through their indexes, with the README's queries, on a table large enough that the planner
chooses them over a sequential scan.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest

from exchange.adapters.postgres import PostgresStore
from exchange.core.events import Event
from tests.integration._workload import SPECS_WITH_BALANCES, Workload

pytestmark = pytest.mark.integration

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The README's queries (Storage), with parameters where it has literals.
CLIENT_TRADES = """
SELECT instrument, trade_id, traded_at, price, qty, maker_client_id, taker_client_id
FROM trades
WHERE (maker_client_id = $1 OR taker_client_id = $1)
  AND traded_at >= $2 AND traded_at < $3
ORDER BY traded_at"""
TRADES_IN_RANGE = """
SELECT instrument, trade_id, traded_at, price, qty
FROM trades
WHERE traded_at >= $1 AND traded_at < $2
ORDER BY traded_at"""


def at_us(ts: datetime) -> int:
    """A timestamptz as microseconds since the epoch, exactly."""
    return (ts - EPOCH) // timedelta(microseconds=1)


def index_names(plan: Any) -> tuple[set[str], set[str]]:
    """The indexes an EXPLAIN (FORMAT JSON) plan reads, and its node types."""
    names: set[str] = set()
    nodes: set[str] = set()

    def walk(node: dict[str, Any]) -> None:
        nodes.add(node["Node Type"])
        if "Index Name" in node:
            names.add(node["Index Name"])
        for child in node.get("Plans", []):
            walk(child)

    walk(json.loads(plan)[0]["Plan"])
    return names, nodes


@pytest.mark.parametrize("one_statement_max_events", [1000, 0], ids=["one-statement", "copy"])
def test_events_read_as_json_and_times_as_timestamps(pg_dsn: str, one_statement_max_events: int) -> None:
    work = Workload(SPECS_WITH_BALANCES, seed=11)
    batches = work.batches(400, max_batch=100)

    async def scenario() -> None:
        store = PostgresStore(pg_dsn, SPECS_WITH_BALANCES, pool_size=2,
                              one_statement_max_events=one_statement_max_events)
        await store.start()
        try:
            assert "011_queries" in await store.migrate()
            await store.take([spec.symbol for spec in SPECS_WITH_BALANCES], [], "test")
            await store.load(SPECS_WITH_BALANCES)
            for batch in batches:
                await store.commit(batch)
        finally:
            await store.stop()
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = await conn.fetch(
                "SELECT e.payload AS raw, e.ts_ns, e.event_at, j.payload AS doc, j.event_at AS view_at, j.type "
                "FROM order_events AS e JOIN order_events_json AS j USING (instrument, seq) "
                "ORDER BY e.instrument, e.seq")
            orders = await conn.fetch("SELECT created_ts_ns, created_at, updated_ts_ns, updated_at FROM orders")
            # the view's payload is jsonb: operators can use its operators
            canceled = await conn.fetchval(
                "SELECT count(*) FROM order_events_json WHERE payload @> '{\"type\": \"canceled\"}'")
        finally:
            await conn.close()
        produced = sorted((e for b in batches for a in b.applied for e in a.events),
                          key=lambda e: (e.instrument, e.seq))
        assert len(rows) == len(produced) > 100
        # the table keeps the engine's bytes; the view shows the same document as jsonb
        assert [msgspec.json.decode(r["raw"], type=Event) for r in rows] == produced
        assert [json.loads(r["doc"]) for r in rows] == [json.loads(r["raw"]) for r in rows]
        assert [json.loads(r["doc"])["type"] for r in rows] == [r["type"] for r in rows]
        assert canceled == sum(1 for r in rows if r["type"] == "canceled") > 0
        assert [at_us(r["event_at"]) for r in rows] == [r["ts_ns"] // 1000 for r in rows]
        assert [r["view_at"] for r in rows] == [r["event_at"] for r in rows]
        assert orders
        assert [(at_us(r["created_at"]), at_us(r["updated_at"])) for r in orders] == [
            (r["created_ts_ns"] // 1000, r["updated_ts_ns"] // 1000) for r in orders]

    asyncio.run(scenario())


def test_a_clients_trades_and_a_time_range_are_found_through_indexes(pg_dsn: str) -> None:
    """60,000 trades over 3 instruments, 600 clients, one trade every 10 ms: one client's trades and one minute of
    trades are a small part of the table, so the planner reads them through the new indexes; the answers are the
    ones the rows give."""
    start_ns = 1_700_000_000_000_000_000

    async def scenario() -> None:
        async with PostgresStore(pg_dsn, SPECS_WITH_BALANCES) as store:
            await store.migrate()
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f"""
                INSERT INTO trades (instrument, trade_id, seq, ts_ns, price_ticks, qty_lots, price, qty, aggressor_side,
                                    maker_order_id, maker_client_id, maker_client_order_id, taker_order_id,
                                    taker_client_id, taker_client_order_id)
                SELECT (ARRAY['AAA-USD', 'BBB-USD', 'CCC-USD'])[1 + i % 3], i, 2 * i, {start_ns} + i::bigint * 10000000,
                       100, 1, 1.00, 0.1, 'buy', 2 * i, 'c' || (i % 600), 'm' || i, 2 * i + 1,
                       'c' || ((i * 7 + 1) % 600), 't' || i
                FROM generate_series(1, 60000) AS i""")
            await conn.execute("ANALYZE trades")
            begin = EPOCH + timedelta(microseconds=start_ns // 1000) + timedelta(minutes=3)
            end = begin + timedelta(minutes=1)
            everything = await conn.fetch("SELECT trade_id, traded_at, maker_client_id, taker_client_id FROM trades")

            mine = await conn.fetch(CLIENT_TRADES, "c42", EPOCH, end)
            assert sorted(r["trade_id"] for r in mine) == sorted(
                r["trade_id"] for r in everything
                if "c42" in (r["maker_client_id"], r["taker_client_id"]) and r["traded_at"] < end)
            assert len(mine) == 80  # 40 as maker, 40 as taker
            in_range = await conn.fetch(TRADES_IN_RANGE, begin, end)
            assert [r["trade_id"] for r in in_range] == sorted(
                r["trade_id"] for r in everything if begin <= r["traded_at"] < end)
            assert len(in_range) == 6000

            names, nodes = index_names(await conn.fetchval("EXPLAIN (FORMAT JSON)" + CLIENT_TRADES, "c42", begin, end))
            assert {"trades_maker_client_idx", "trades_taker_client_idx"} <= names, (names, nodes)
            assert "Seq Scan" not in nodes
            names, nodes = index_names(await conn.fetchval("EXPLAIN (FORMAT JSON)" + TRADES_IN_RANGE, begin, end))
            assert names == {"trades_traded_at_idx"}, (names, nodes)
            assert "Seq Scan" not in nodes
        finally:
            await conn.close()

    asyncio.run(scenario())
