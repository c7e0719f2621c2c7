"""Nothing that arrives can stop the exchange, or make it skip an order silently.

- The hostile battery: the daemon as a process, fed more than 100,000 hostile messages (every class
  of tests/integration/hostile.py) interleaved with a seeded valid flow over several instruments,
  restarted cleanly and killed (SIGKILL) on the way. It never exits on its own; every refused
  message is dead-lettered exactly once; every instrument stores exactly what the daemon's own
  router and the core make of the input, and the valid instruments exactly what `exchange replay`
  makes of the valid flow alone; `recover --verify` passes; resident memory stays bounded. Three of
  the four instruments keep balances: money messages are hostile too (forged, off-grid, huge, repeated).
- The broker restarted empty under a running daemon: nothing of the new log is applied until an
  operator accepts it (`exchange admin accept-offset`), and then nothing is lost.
- An instrument fed from two partitions: only its own partition's messages, keyed by it, count.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from exchange.adapters.generator.flow import OrderFlow
from exchange.adapters.kafka import partition_for
from exchange.core.commands import Command
from exchange.core.events import Deposited, Event, OrderRejected
from exchange.core.instruments import Instrument
from exchange.core.matching import Exchange
from exchange.core.types import RejectReason
from exchange.pipeline.router import Refusal, SnapshotRequested
from tests.integration.daemon import (
    ADMIN_KEY_ID,
    ADMIN_SECRET,
    DaemonProcess,
    free_port,
    produce,
    read_topic,
    signed,
    write_config,
)
from tests.integration.expect import encoded, replay_messages, stored_progress, stored_state, wait_for_seq
from tests.integration.hostile import HostileFlow, Record, expected_outcomes
from tests.support.broker import KafkaBroker
from tests.support.verify import verify

pytestmark = [pytest.mark.integration]

VALID = (  # balances on two of them and on the target: signed deposits in the valid flow, hostile ones in the rest
    Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001", max_qty="1000", price_band_bps=300,
                             stp_default="cancel_resting", balances=True, maker_fee_bps=1, taker_fee_bps=5),
    Instrument.from_decimals("ETH-USD", tick_size="0.01", lot_size="0.01", max_qty="10000"),
    Instrument.from_decimals("SOL-USD", tick_size="0.001", lot_size="1", max_qty="100000",
                             stp_default="cancel_both", balances=True, maker_fee_bps=-1, taker_fee_bps=2),
)
TARGET = Instrument.from_decimals("HOST-USD", tick_size="0.01", lot_size="1", max_qty="1000", dedupe_window=50,
                                 dedupe_per_client=5, balances=True, taker_fee_bps=3)
INSTRUMENTS = (*VALID, TARGET)
PARTITIONS = 3
KEYS = {ADMIN_KEY_ID: ADMIN_SECRET.encode()}
MAX_MESSAGE_BYTES = 4096  # the battery's input limit: messages above it are cheap to make (and dead-letter)


def _daemon(tmp_path: Path, kafka: KafkaBroker, dsn: str, topic: str, name: str = "d") -> DaemonProcess:
    port = free_port()
    config = write_config(tmp_path / f"{name}.toml", instruments=INSTRUMENTS, bootstrap=kafka.bootstrap_servers,
                          dsn=dsn, topic=topic, group_id=f"g-{topic}", http_port=port, snapshot_interval_s=0.5,
                          max_events=2000, kafka={"max_message_bytes": MAX_MESSAGE_BYTES})
    return DaemonProcess(config, port, tmp_path / f"{name}.log")


async def _produce_records(bootstrap: str, topic: str, items: Sequence[Record | dict[str, Any]]
                           ) -> list[tuple[Record | dict[str, Any], int, int]]:
    """Produce valid messages (dicts: keyed by instrument, the default partitioner) and hostile records as they
    are; each with the partition and offset it got."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024,
                                max_request_size=2_000_000)
    await producer.start()
    try:
        futures = []
        for item in items:
            if isinstance(item, dict):
                futures.append(await producer.send(topic, json.dumps(item).encode(),
                                                   key=item["instrument"].encode(),
                                                   timestamp_ms=item["ts_ns"] // 1_000_000))
            else:
                futures.append(await producer.send(topic, item.value, key=item.key, partition=item.partition,
                                                   timestamp_ms=item.timestamp_ms))
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(item, meta.partition, meta.offset) for item, meta in zip(items, metas, strict=True)]


def _as_record(item: Record | dict[str, Any]) -> Record:
    if isinstance(item, Record):
        return item
    symbol = item["instrument"]
    return Record(json.dumps(item).encode(), symbol.encode(), partition_for(symbol, PARTITIONS),
                  item["ts_ns"] // 1_000_000, "valid")


async def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: (await consumer.committed(TopicPartition(topic, p))) or 0 for p in range(PARTITIONS)}
    finally:
        await consumer.stop()


def _wait_committed(bootstrap: str, group: str, topic: str, ends: dict[int, int], daemon: DaemonProcess,
                    rss: list[int], timeout: float = 240.0) -> None:
    """Until the daemon's group has committed every partition to its end: everything is durable or dead-lettered."""
    deadline = time.monotonic() + timeout
    committed: dict[int, int] = {}
    while time.monotonic() < deadline:
        daemon.check_alive()
        rss.append(daemon.rss_bytes())
        committed = asyncio.run(_committed(bootstrap, group, topic))
        if all(committed.get(p, 0) >= end for p, end in ends.items()):
            return
        time.sleep(0.5)
    raise AssertionError(f"committed {committed}, wanted {ends}; {daemon.tail()}")


def test_a_hostile_battery_never_stops_the_daemon_and_loses_nothing(kafka: KafkaBroker, pg_dsn: str,
                                                                     tmp_path: Path) -> None:
    rng = random.Random(20261204)
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: PARTITIONS, f"{topic}.events": 3, f"{topic}.trades": 1, f"{topic}.dlq": PARTITIONS})
    valid = list(OrderFlow(VALID, seed=7, signer=signed).messages(12_000))
    hostile = HostileFlow(VALID, TARGET, seed=17, partitions=PARTITIONS, key=(ADMIN_KEY_ID, KEYS[ADMIN_KEY_ID]),
                          start_ms=valid[0]["ts_ns"] // 1_000_000, max_message_bytes=MAX_MESSAGE_BYTES)
    chunks: list[list[Record | dict[str, Any]]] = []
    v = iter(valid)
    for size in (40_000, 35_000, 30_000):  # 105,000 hostile messages in three chunks, the valid flow spread over them
        bad = hostile.records(size)
        at = set(rng.sample(range(size + 4_000), 4_000))  # where the valid messages go, in their own order
        chunks.append([next(v) if i in at else next(bad) for i in range(size + 4_000)])

    daemon = _daemon(tmp_path, kafka, pg_dsn, topic)
    group = f"g-{topic}"
    produced: list[tuple[Record | dict[str, Any], int, int]] = []
    ends: dict[int, int] = {}
    rss: list[int] = []

    def send(chunk: list[Record | dict[str, Any]]) -> None:
        got = asyncio.run(_produce_records(kafka.bootstrap_servers, topic, chunk))
        produced.extend(got)
        for _, partition, offset in got:
            ends[partition] = max(ends.get(partition, 0), offset + 1)

    try:
        # chunk 1 with the daemon running, then a clean restart
        daemon.start()
        daemon.wait_ready(timeout=60)
        send(chunks[0])
        _wait_committed(kafka.bootstrap_servers, group, topic, ends, daemon, rss)
        assert daemon.terminate(timeout=60) == 0, daemon.tail()
        # chunk 2 produced while it is down; killed (SIGKILL) while it works through it
        send(chunks[1])
        daemon.start()
        before = sum(asyncio.run(stored_progress(pg_dsn)).values())
        deadline = time.monotonic() + 60
        while sum(asyncio.run(stored_progress(pg_dsn)).values()) == before:
            daemon.check_alive()
            assert time.monotonic() < deadline, daemon.tail()
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.0))
        daemon.kill()
        # chunk 3 while it is down; then it runs to the end
        send(chunks[2])
        daemon.start()
        daemon.wait_ready(timeout=120)
        _wait_committed(kafka.bootstrap_servers, group, topic, ends, daemon, rss)

        # what each message must have become, by the daemon's own router, and the core
        records = [(_as_record(item), p, o) for item, p, o in produced]
        outcomes = expected_outcomes(records, INSTRUMENTS, PARTITIONS, KEYS, MAX_MESSAGE_BYTES)
        refused = {(p, o): outcome for (_, p, o), outcome in zip(records, outcomes, strict=True)
                   if isinstance(outcome, Refusal)}
        exchange = Exchange(INSTRUMENTS)
        expected: dict[str, list[Event]] = {s.symbol: [] for s in INSTRUMENTS}
        commands = sorted(((p, o, outcome) for (_, p, o), outcome in zip(records, outcomes, strict=True)
                           if not isinstance(outcome, Refusal | SnapshotRequested)), key=lambda t: (t[0], t[1]))
        for _, _, command in commands:
            for event in exchange.apply(_command(command)):
                expected[event.instrument].append(event)
        final = {symbol: events[-1].seq for symbol, events in expected.items() if events}
        wait_for_seq(pg_dsn, final, timeout=120, check=daemon.check_alive)
        _, status = daemon.get("/status")
        assert status["input_incidents"] == []
        assert daemon.terminate(timeout=60) == 0, daemon.tail()

    finally:
        daemon.ensure_stopped()

    n_hostile = sum(len(c) for c in chunks) - 12_000
    assert n_hostile >= 100_000
    kinds = Counter(r.kind for r, _, _ in records)
    assert all(kinds[k] > 50 for k in kinds), kinds
    assert len(refused) > 50_000, len(refused)

    # every refused message is on the dead-letter topic exactly once, with its reason
    dead = asyncio.run(read_topic(kafka.bootstrap_servers, f"{topic}.dlq", len(refused), wait_s=120, linger_s=2.0))
    where = [(int(dict(r.headers)["source_partition"]), int(dict(r.headers)["source_offset"])) for r in dead]
    assert len(where) == len(set(where)), f"{len(where) - len(set(where))} dead letters sent twice"
    assert set(where) == set(refused)
    for r in dead:
        headers = dict(r.headers)
        key = (int(headers["source_partition"]), int(headers["source_offset"]))
        assert headers["reason"].decode() == refused[key].reason.value
        assert len(r.value or b"") + sum(len(v) for v in headers.values()) <= 1_000_000
    reasons = Counter(outcome.reason for outcome in refused.values())
    for reason in (RejectReason.MALFORMED, RejectReason.MESSAGE_TOO_LARGE, RejectReason.WRONG_PARTITION,
                   RejectReason.UNKNOWN_INSTRUMENT, RejectReason.INSTRUMENT_REQUIRED, RejectReason.INVALID_TIMESTAMP):
        assert reasons[reason] > 0, reasons

    # every instrument stored exactly what the router and the core make of the input
    state = asyncio.run(stored_state(pg_dsn))
    assert state["events"] == encoded(expected)
    target_events = expected[TARGET.symbol]
    not_authorized = [e for e in target_events if getattr(e, "reason", None) is RejectReason.NOT_AUTHORIZED]
    assert len(not_authorized) > 1000  # the forged and unsigned operator actions, journaled with the claimed operator
    assert {e.client_id for e in not_authorized} >= {"mallory", "ops-anna"}  # type: ignore[attr-defined]
    money = Counter(e.reason for e in target_events
                    if isinstance(e, OrderRejected) and e.command in ("deposit", "withdraw"))
    for reason in (RejectReason.NOT_AUTHORIZED, RejectReason.INVALID_AMOUNT, RejectReason.UNKNOWN_ASSET,
                   RejectReason.DUPLICATE_TRANSFER_ID, RejectReason.MALFORMED):
        assert money[reason] > 0, money
    assert sum(isinstance(e, Deposited) for e in target_events) > 50
    # ... and the valid instruments exactly what `exchange replay` makes of the valid flow alone
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(m) + "\n" for m in valid))
    out = subprocess.run([sys.executable, "-m", "exchange", "replay", "--config", str(daemon.config),
                          str(tmp_path / "valid.jsonl")], capture_output=True, check=True, timeout=300).stdout
    replayed = [e for line in out.splitlines() for e in json.loads(line).get("events", [])]
    _, lib = replay_messages(valid, VALID)  # the same through the library, for the byte comparison
    assert len(replayed) == sum(len(lib[s.symbol]) for s in VALID)
    assert [row for row in state["events"] if row[0] != TARGET.symbol] == encoded(lib)

    report = asyncio.run(verify(pg_dsn, INSTRUMENTS))
    assert report.ok, report.render()
    # bounded: the daemon's resident memory over the run (reported with -s)
    print(f"\nhostile battery: {n_hostile} hostile messages ({len(refused)} dead-lettered), resident memory "
          f"{min(rss) / 2**20:.0f} - {max(rss) / 2**20:.0f} MiB over {len(rss)} samples")
    assert max(rss) < 600 * 2**20
    log = (tmp_path / "d.log").read_text().splitlines()
    assert not [line for line in log if line and not line.startswith("{")][:5], "a log line that is not JSON"


def _command(route: Any) -> Command:
    assert not isinstance(route, Refusal)
    return route  # type: ignore[no-any-return]


# ------------------------------------------------------------------ the broker loses its data


async def _resets(dsn: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch("SELECT * FROM input_resets ORDER BY id")]
    finally:
        await conn.close()


def test_a_broker_restarted_empty_stops_its_partitions_until_an_operator_accepts_them(pg_dsn: str,
                                                                                      tmp_path: Path) -> None:
    specs = VALID[:2]
    with KafkaBroker() as broker:
        topic = f"orders-{uuid.uuid4().hex[:8]}"
        topics = {topic: 2, f"{topic}.events": 1, f"{topic}.trades": 1, f"{topic}.dlq": 2}
        broker.create_topics(topics)
        flow = OrderFlow(specs, seed=5, signer=signed)
        first = list(flow.messages(1500))
        second = list(flow.messages(400))
        port = free_port()
        config = write_config(tmp_path / "d.toml", instruments=specs, bootstrap=broker.bootstrap_servers, dsn=pg_dsn,
                              topic=topic, group_id=f"g-{topic}", http_port=port)
        daemon = DaemonProcess(config, port, tmp_path / "d.log")
        daemon.start()
        try:
            daemon.wait_ready(timeout=60)
            asyncio.run(produce(broker.bootstrap_servers, topic, first))
            _, expected_first = replay_messages(first, specs)
            wait_for_seq(pg_dsn, {s: e[-1].seq for s, e in expected_first.items()}, timeout=60,
                         check=daemon.check_alive)
            progress = asyncio.run(stored_progress(pg_dsn))

            broker.restart()  # the same address, no data: as a Kafka container without its volume
            broker.create_topics(topics)
            deadline = time.monotonic() + 60
            while True:
                daemon.check_alive()
                code, body = daemon.get("/readyz")
                problems = body["problems"] if isinstance(body, dict) else []
                if code == 503 and sum(f"{topic}[" in p and "accept-offset" in p for p in problems) == 2:
                    break
                assert time.monotonic() < deadline, f"no incident in /readyz: {body}\n{daemon.tail()}"
                time.sleep(0.2)
            assert all("below offset" in p or "out of the log" in p for p in problems if f"{topic}[" in p), problems

            # new orders on the new log are not applied, nor skipped: they wait
            asyncio.run(produce(broker.bootstrap_servers, topic, second))
            time.sleep(3)
            daemon.check_alive()
            assert asyncio.run(stored_progress(pg_dsn)) == progress
            assert daemon.get("/readyz")[0] == 503

            for partition in (0, 1):
                accepted = subprocess.run(
                    [sys.executable, "-m", "exchange", "admin", "accept-offset", str(partition), "--offset", "0",
                     "--reason", "test broker restarted without its data", "--operator", "ops-test",
                     "--config", str(config), "--timeout", "60"],
                    capture_output=True, text=True, timeout=120, env={**daemon.env, **_path_env()})
                assert accepted.returncode == 0, accepted.stderr
                assert "applied: continue at offset 0" in accepted.stderr
            _, expected = replay_messages(first + second, specs)
            wait_for_seq(pg_dsn, {s: e[-1].seq for s, e in expected.items()}, timeout=60, check=daemon.check_alive)
            deadline = time.monotonic() + 30
            while daemon.get("/readyz")[0] != 200:
                assert time.monotonic() < deadline, daemon.get("/readyz")
                time.sleep(0.2)
        finally:
            assert daemon.terminate(timeout=60) == 0, daemon.tail()
    state = asyncio.run(stored_state(pg_dsn))
    assert state["events"] == encoded(expected)  # nothing of either log lost, nothing applied twice
    resets = asyncio.run(_resets(pg_dsn))
    assert [(r["partition"], r["to_offset"], r["status"], r["operator"]) for r in resets] == [
        (0, 0, "applied", "ops-test"), (1, 0, "applied", "ops-test")]
    assert all("stored offsets were" in r["note"] for r in resets)
    report = asyncio.run(verify(pg_dsn, specs))
    assert report.ok, report.render()


def _path_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV")}


# ------------------------------------------------------------------ one partition per instrument


def test_an_instrument_is_read_from_its_own_partition_only(kafka: KafkaBroker, pg_dsn: str, tmp_path: Path) -> None:
    specs = VALID[:2]
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 2, f"{topic}.events": 1, f"{topic}.trades": 1, f"{topic}.dlq": 2})
    flow = list(OrderFlow(specs, seed=9, signer=signed).messages(600))
    rng = random.Random(3)
    records: list[Record | dict[str, Any]] = []
    strays: list[Record] = []
    for msg in flow:
        records.append(msg)
        if rng.random() < 0.2:  # the same instrument's message from a producer that partitions otherwise
            symbol = msg["instrument"]
            home = partition_for(symbol, 2)
            value = json.dumps({**msg, "client_order_id": f"stray-{len(strays)}", "op": "place", "side": "buy",
                                "price": "1.00", "qty": specs[0].lots_to_qty(1) if symbol == "BTC-USD" else "0.01",
                                "client_id": "stray"}).encode()
            kind = rng.randrange(3)
            stray = Record(value, symbol.encode() if kind == 0 else (None if kind == 1 else b"crc32-key"),
                           1 - home if kind != 2 else home, msg["ts_ns"] // 1_000_000, "stray")
            strays.append(stray)
            records.append(stray)
    port = free_port()
    config = write_config(tmp_path / "d.toml", instruments=specs, bootstrap=kafka.bootstrap_servers, dsn=pg_dsn,
                          topic=topic, group_id=f"g-{topic}", http_port=port)
    daemon = DaemonProcess(config, port, tmp_path / "d.log")
    daemon.start()
    try:
        daemon.wait_ready(timeout=60)
        asyncio.run(_produce_records(kafka.bootstrap_servers, topic, records))
        _, expected = replay_messages(flow, specs)  # the strays change nothing
        wait_for_seq(pg_dsn, {s: e[-1].seq for s, e in expected.items()}, timeout=60, check=daemon.check_alive)
        dead = asyncio.run(read_topic(kafka.bootstrap_servers, f"{topic}.dlq", len(strays), linger_s=1.0))
    finally:
        assert daemon.terminate(timeout=60) == 0, daemon.tail()
    assert asyncio.run(stored_state(pg_dsn))["events"] == encoded(expected)
    assert len(dead) == len(strays)
    for record in dead:
        headers = dict(record.headers)
        assert headers["reason"] == b"wrong_partition"
        instrument = json.loads(record.value)["instrument"]
        assert int(headers["expected_partition"]) == partition_for(instrument, 2)
    answers = asyncio.run(read_topic(kafka.bootstrap_servers, f"{topic}.events", 1, linger_s=1.0))
    mine = [e for r in answers if r.key == b"stray"
            for e in (lambda v: v["events"] if v.get("type") == "events" else [v])(json.loads(r.value))]
    assert len(mine) >= len(strays)
    assert {e["reason"] for e in mine} == {"wrong_partition"}
    assert all(e["seq"] == 0 for e in mine)
