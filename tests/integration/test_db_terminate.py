"""The database ends the store's sessions, again and again (``pg_terminate_backend``): nothing stops.

asyncpg does not always report a session the server ended as a lost connection. If the server's
FATAL message arrives while a pooled connection is idle, the connection is left in a state no
statement can run in until the socket's end is read, and the next statement on it raises
``InternalClientError`` ("cannot switch to state 12; another operation (2) is in progress"); a
connection ended while it goes back to the pool raises "release() called on a free connection
holder". The store drops such a connection (it is never handed out again) and the journal writer
retries the batch, as for any other lost connection. These tests end the sessions dozens of times
at seeded random moments, against the store driven by the journal writer and against the daemon
as a process fed over Kafka, and require every batch to be stored exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from exchange.adapters.generator.flow import OrderFlow
from exchange.adapters.postgres import PostgresStore
from exchange.core.instruments import Instrument
from exchange.pipeline.loop import Chunk, JournalQueue
from exchange.pipeline.writer import JournalWriter
from exchange.ports import Batch, StoreUnavailable
from tests.integration._workload import SPECS, Workload
from tests.integration.conftest import ADMIN_DSN
from tests.integration.daemon import DaemonProcess, free_port, produce, write_config
from tests.integration.expect import encoded, replay_messages, stored_progress, stored_state, wait_for_seq
from tests.integration.test_postgres_store import assert_stored_exactly, fetch
from tests.support.broker import KafkaBroker
from tests.support.verify import verify

pytestmark = pytest.mark.integration


async def _terminate(admin: asyncpg.Connection, database: str, application_name: str) -> int:
    """End every session of ``application_name`` on ``database``; how many there were."""
    ended = await admin.fetchval(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = $1 AND application_name = $2 AND pid <> pg_backend_pid()", database, application_name)
    return int(ended or 0)


class RecordingStore(PostgresStore):
    """A PostgresStore that notes what each failed commit attempt raised (the driver's exception) and the verdict."""

    failures: collections.Counter[tuple[str, bool]]

    async def commit(self, batch: Batch) -> None:
        try:
            await super().commit(batch)
        except StoreUnavailable as exc:
            cause = exc.__cause__
            self.failures[(type(cause).__name__ if cause is not None else str(exc)[:60], exc.retriable)] += 1
            raise


# ------------------------------------------------------------------ the store under the journal writer


def test_every_batch_commits_exactly_once_while_the_stores_sessions_are_ended_again_and_again(pg_dsn: str) -> None:
    """The journal writer over a 4-connection store, both commit paths (small batches in one statement,
    larger ones and snapshots by COPY), other users of the pool and a busy
    event loop, while another task ends all of the store's sessions 80 times at seeded random moments;
    afterwards every batch is stored exactly once and every connection of the pool works."""
    database = pg_dsn.rpartition("/")[2]
    name = f"exchange-{uuid.uuid4().hex[:8]}"
    work = Workload(seed=41)
    batches = work.batches(6000, max_batch=60, snapshot_every=7)
    moments = random.Random(41)  # when the sessions are ended
    jitter = random.Random(42)  # everything else

    async def scenario() -> tuple[RecordingStore, list[int], JournalWriter]:
        store = RecordingStore(pg_dsn, SPECS, pool_size=4, application_name=name, one_statement_max_events=100)
        store.failures = collections.Counter()
        await store.start()
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await store.migrate()
            epochs = (await store.take([spec.symbol for spec in SPECS], [], "test")).instruments
            await store.load(SPECS)
            queue: JournalQueue = asyncio.Queue(maxsize=4)
            writer = JournalWriter(store, queue, max_events=160, linger_ms=1.0, backoff_max_s=0.2)
            writing = asyncio.create_task(writer.run())

            async def feed() -> None:
                for batch in batches:
                    for spec in SPECS:
                        items = [*(a for a in batch.applied if a.instrument == spec.symbol),
                                 *(s for s in batch.snapshots if s.instrument == spec.symbol)]
                        if items:
                            await queue.put(Chunk(spec.symbol, epochs[spec.symbol], items))
                    if jitter.random() < 0.5:
                        await asyncio.sleep(jitter.uniform(0, 0.003))
                await queue.put(None)

            feeding = asyncio.create_task(feed())
            pinged: collections.Counter[str] = collections.Counter()

            async def ping() -> None:  # another user of the pool (the daemon's readiness probe, lookups)
                while not writing.done():
                    try:
                        await store.ping()
                        pinged["ok"] += 1
                    except Exception as exc:
                        pinged[type(exc.__cause__ or exc).__name__] += 1
                    await asyncio.sleep(jitter.uniform(0, 0.002))

            async def match() -> None:  # the matching loops share the thread: callbacks run late, in bunches
                while not writing.done():
                    until = time.perf_counter() + jitter.uniform(0.0002, 0.0015)
                    while time.perf_counter() < until:
                        pass
                    await asyncio.sleep(0)

            helpers = [asyncio.create_task(ping()), asyncio.create_task(ping()), asyncio.create_task(match())]
            ended: list[int] = []
            while len(ended) < 80 and not writing.done():
                await asyncio.sleep(moments.uniform(0.005, 0.12))
                ended.append(await _terminate(admin, database, name))
            await asyncio.wait_for(asyncio.gather(feeding, writing), 120)  # a writer that stopped fails the test
            await asyncio.gather(*helpers)
            print("pings:", dict(pinged))
            # the pool is whole again: every connection can run a statement, several at once
            await asyncio.gather(*(store.ping() for _ in range(8)))
            recovered = await store.load(SPECS)
            await assert_stored_exactly(pg_dsn, batches, work, recovered)
            return store, ended, writer
        finally:
            await admin.close()
            await store.stop()

    store, ended, writer = asyncio.run(scenario())
    print(f"\nsessions ended: {sum(ended)} in {len(ended)} rounds; failed commit attempts: {dict(store.failures)}")
    assert sum(1 for n in ended if n) >= 40, ended  # most rounds found sessions to end
    assert store.failures, "no commit was hit: the test did not test anything"
    assert all(retriable for _, retriable in store.failures), store.failures
    assert not writer.degraded
    assert writer.last_error is None


def test_a_failed_block_never_gives_its_connection_back_and_leaves_nothing_running(pg_dsn: str) -> None:
    """A block that fails (here: its task is cancelled in the middle of a statement) closes its connection:
    the statement is cancelled in the server before the lease ends, and the pool opens a fresh session."""
    name = f"exchange-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        store = PostgresStore(pg_dsn, SPECS, pool_size=1, application_name=name)
        await store.start()
        try:
            pool = store._require_pool()
            async with store._lease(pool) as conn:
                first = await conn.fetchval("SELECT pg_backend_pid()")

            async def slow() -> None:
                async with store._lease(pool) as conn:
                    await conn.fetchval("SELECT pg_sleep(30)")

            task = asyncio.create_task(slow())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            running = await fetch(pg_dsn, "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = $1",
                                  name)
            assert [r for r in running if r["state"] == "active"] == []  # the sleep was cancelled, not orphaned
            async with store._lease(pool) as conn:
                assert await conn.fetchval("SELECT pg_backend_pid()") != first
            second = await _fail_in_a_lease(store)  # any failure at all: the connection is not reused
            async with store._lease(pool) as conn:
                assert await conn.fetchval("SELECT pg_backend_pid()") != second
        finally:
            await store.stop()

    asyncio.run(scenario())


async def _fail_in_a_lease(store: PostgresStore) -> int:
    """Lease a connection and fail in the block (not a database error at all); the connection's backend pid."""
    pid = 0
    try:
        async with store._lease(store._require_pool()) as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            raise ZeroDivisionError
    except ZeroDivisionError:
        pass
    assert pid
    return pid


# ------------------------------------------------------------------------------------- the daemon

INSTRUMENTS = (
    Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001", max_qty="1000"),
    Instrument.from_decimals("ETH-USD", tick_size="0.01", lot_size="0.01", max_qty="10000"),
)


def test_the_daemon_never_stops_while_its_database_sessions_are_ended_dozens_of_times(
        kafka: KafkaBroker, pg_dsn: str, tmp_path: Path) -> None:
    """A backlog waits in Kafka; the daemon starts, and from the moment it starts recovering its sessions
    are ended three times within 0.1 s (while it loads the stored state: start-up retries a store that
    went away), ten more within 3 s (while the source joins its group, the first commits go and it
    catches up), then about forty times more under live load, at seeded random moments. It never
    exits, and in the end the stored events are exactly what ``exchange replay`` makes of the flow."""
    database = pg_dsn.rpartition("/")[2]
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 2, f"{topic}.events": 1, f"{topic}.trades": 1, f"{topic}.dlq": 1})
    flow = OrderFlow(INSTRUMENTS, seed=15)
    backlog: list[dict[str, Any] | bytes] = list(flow.messages(10_000))
    live: list[dict[str, Any] | bytes] = list(flow.messages(10_000))
    _, expected = replay_messages(backlog + live, INSTRUMENTS)
    rng = random.Random(15)

    port = free_port()
    # batches of up to 300 events: small ones take the one-statement path, full ones the COPY path
    config = write_config(tmp_path / "d.toml", instruments=INSTRUMENTS, bootstrap=kafka.bootstrap_servers,
                          dsn=pg_dsn, topic=topic, group_id=f"g-{topic}", http_port=port, queue_size=200,
                          max_events=300, publish_events=False, journal_queue=4)
    daemon = DaemonProcess(config, port, tmp_path / "d.log")
    asyncio.run(produce(kafka.bootstrap_servers, topic, backlog))
    ended: list[tuple[float, int]] = []  # (seconds after recovery started, sessions ended)

    async def storm() -> None:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            started = time.monotonic()

            async def end_sessions() -> None:
                daemon.check_alive()
                ended.append((round(time.monotonic() - started, 3), await _terminate(admin, database, "exchange")))

            # while it recovers; right after: while the source joins its group, the first commits, the catch-up
            for at in [0.0, 0.03, 0.1, *sorted(rng.uniform(0.1, 3.0) for _ in range(10))]:
                await asyncio.sleep(max(0.0, started + at - time.monotonic()))
                await end_sessions()
            # under live load: the rest of the flow arrives at a steady rate while sessions keep being ended
            producing = asyncio.create_task(_produce_steadily(kafka.bootstrap_servers, topic, live, per_s=1500))
            while not producing.done() or len(ended) < 50:
                await asyncio.sleep(rng.uniform(0.03, 0.3))
                await end_sessions()
            await producing
        finally:
            await admin.close()

    daemon.start()
    try:
        daemon.wait_log("recovery started", timeout=60)
        asyncio.run(storm())
        wait_for_seq(pg_dsn, {s: e[-1].seq for s, e in expected.items()}, timeout=60, check=daemon.check_alive)
        deadline = time.monotonic() + 15
        while (status := daemon.get("/readyz"))[0] != 200:  # the probe sees the database again
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
    finally:
        code = daemon.terminate(timeout=60)
    log = (tmp_path / "d.log").read_text()
    print(f"\nsessions ended (s after recovery, count): {ended}")
    print(f"failed commit attempts: {log.count('journal commit failed; retrying the same batch')}, "
          f"of them InternalClientError: {log.count('InternalClientError')}")
    assert code == 0, daemon.tail()
    assert sum(1 for _, n in ended if n) >= 30, ended
    assert "cannot be retried" not in log
    assert "journal commit failed; retrying the same batch" in log
    assert "journal commits resumed" in log
    assert asyncio.run(stored_state(pg_dsn))["events"] == encoded(expected)
    assert asyncio.run(stored_progress(pg_dsn)) == {s: e[-1].seq for s, e in expected.items()}
    report = asyncio.run(verify(pg_dsn, INSTRUMENTS))
    assert report.ok, report.render()


async def _produce_steadily(bootstrap: str, topic: str, messages: list[dict[str, Any] | bytes], *,
                            per_s: float) -> None:
    """Produce ``messages`` (as :func:`~tests.integration.daemon.produce` does) at about ``per_s`` a second."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        started = time.monotonic()
        futures = []
        for i, msg in enumerate(messages):
            assert isinstance(msg, dict)
            key = str(msg.get("instrument", "")).encode()
            futures.append(await producer.send(topic, json.dumps(msg).encode(), key=key,
                                               timestamp_ms=msg["ts_ns"] // 1_000_000))
            if i % 50 == 49:
                await asyncio.sleep(max(0.0, started + (i + 1) / per_s - time.monotonic()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
