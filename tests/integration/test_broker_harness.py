"""Integration tests for the Tansu broker harness, exercised with aiokafka.

Plain ``def`` tests driving ``asyncio.run`` (no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from tests.support.broker import BrokerStartError, KafkaBroker

pytestmark = pytest.mark.integration

# Tansu group timing (observed): the first JoinGroup of a group is answered after
# ~max(1s, session_timeout/2) (10s default -> 5s), and a member joining right after
# another left waited ~4s when the leaver had a 2s session timeout but ~1s with 1s.
GROUP_OPTS: dict[str, int] = {"session_timeout_ms": 1000, "heartbeat_interval_ms": 100}
TEST_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    with KafkaBroker() as b:
        yield b


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT_S))


async def _drain(
    consumer: AIOKafkaConsumer, count: int, deadline_s: float = 10.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Poll until exactly ``count`` records arrived (fail on timeout)."""
    out: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + deadline_s
    while len(out) < count:
        assert time.monotonic() < deadline, f"got {len(out)}/{count} records"
        batches = await consumer.getmany(timeout_ms=100)
        for records in batches.values():
            out.extend(records)
    return out


# --------------------------------------------------------------------------- #
# Harness behaviour
# --------------------------------------------------------------------------- #


def test_start_stop_idempotent_and_restart_keeps_port() -> None:
    b = KafkaBroker()
    b.start()
    b.start()  # no-op
    pid, servers = b.pid, b.bootstrap_servers
    assert b.is_running
    assert servers.startswith("127.0.0.1:")
    b.stop()
    b.stop()  # no-op
    assert not b.is_running
    assert b.pid is None
    b.start()  # fresh process, same port
    try:
        assert b.bootstrap_servers == servers
        assert b.pid != pid
    finally:
        b.stop()


def test_port_conflict_fails_fast_with_broker_output(broker: KafkaBroker) -> None:
    clash = KafkaBroker(port=broker.port, startup_timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(BrokerStartError, match="Address in use"):
        clash.start()
    assert time.monotonic() - t0 < 3
    assert not clash.is_running
    assert broker.is_running  # the original is untouched


# --------------------------------------------------------------------------- #
# aiokafka against the broker
# --------------------------------------------------------------------------- #


def test_consumer_group_commit_then_second_consumer_sees_only_new(
    broker: KafkaBroker,
) -> None:
    topic, group = _name("orders"), _name("grp")
    broker.create_topics({topic: 3})
    tps = [TopicPartition(topic, p) for p in range(3)]

    async def body() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        await producer.start()
        try:
            futs = [await producer.send(topic, f"m{i}".encode(), key=f"k{i % 37}".encode()) for i in range(1000)]
            await producer.flush()
            metas = [await f for f in futs]
        finally:
            await producer.stop()
        assert {m.partition for m in metas} == {0, 1, 2}

        c1 = AIOKafkaConsumer(
            topic,
            bootstrap_servers=broker.bootstrap_servers,
            group_id=group,
            fetch_max_wait_ms=10,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **GROUP_OPTS,
        )
        await c1.start()
        try:
            records = await _drain(c1, 1000)
            assert sorted(r.value for r in records) == sorted(f"m{i}".encode() for i in range(1000))
            # Keyed: one partition per key, per-key order preserved, offsets dense.
            by_key: dict[bytes, list[ConsumerRecord[bytes, bytes]]] = defaultdict(list)
            by_part: dict[int, list[int]] = defaultdict(list)
            for r in records:
                assert r.key is not None
                by_key[r.key].append(r)
                by_part[r.partition].append(r.offset)
            for recs in by_key.values():
                assert len({r.partition for r in recs}) == 1
                seq = [int(r.value[1:]) for r in recs]
                assert seq == sorted(seq)
            for offsets in by_part.values():
                assert offsets == list(range(len(offsets)))
            assert sum(len(o) for o in by_part.values()) == 1000

            await c1.commit()
            for tp in tps:
                assert await c1.committed(tp) == len(by_part[tp.partition])
        finally:
            await c1.stop()

        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        await producer.start()
        try:
            for i in range(60):
                await producer.send(topic, f"new{i}".encode(), key=f"k{i}".encode())
            await producer.flush()
        finally:
            await producer.stop()

        c2 = AIOKafkaConsumer(
            topic,
            bootstrap_servers=broker.bootstrap_servers,
            group_id=group,
            fetch_max_wait_ms=10,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **GROUP_OPTS,
        )
        await c2.start()
        try:
            fresh = await _drain(c2, 60)
            extra = await c2.getmany(timeout_ms=300)
            assert not any(extra.values()), "consumer re-read committed records"
            assert sorted(r.value for r in fresh) == sorted(f"new{i}".encode() for i in range(60))
            for r in fresh:
                assert r.offset >= len(by_part[r.partition])
        finally:
            await c2.stop()

    _run(body())


def test_assign_and_seek_rereads_from_offset(broker: KafkaBroker) -> None:
    topic = _name("seek")
    broker.create_topics({topic: 3})
    tp = TopicPartition(topic, 1)
    base_ts = 1_700_000_000_000

    async def body() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        await producer.start()
        try:
            for i in range(30):
                md = await producer.send_and_wait(topic, f"v{i}".encode(), partition=1, timestamp_ms=base_ts + i)
                assert md.offset == i
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap_servers,
            fetch_max_wait_ms=10,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            consumer.assign([tp])
            first = await _drain(consumer, 30)
            assert [r.offset for r in first] == list(range(30))
            assert [r.value for r in first] == [f"v{i}".encode() for i in range(30)]
            # The producer's CreateTime timestamps are preserved.
            assert [r.timestamp for r in first] == [base_ts + i for i in range(30)]
            assert {r.timestamp_type for r in first} == {0}

            consumer.seek(tp, 12)
            again = await _drain(consumer, 18)
            assert [r.offset for r in again] == list(range(12, 30))
            assert [r.value for r in again] == [f"v{i}".encode() for i in range(12, 30)]

            consumer.seek(tp, 0)
            assert (await _drain(consumer, 30))[0].value == b"v0"
            assert await consumer.position(tp) == 30
        finally:
            await consumer.stop()

    _run(body())
