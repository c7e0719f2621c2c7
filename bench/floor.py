"""The floor under bench/e2e.py: the issue's reference loop, with no matching, on this machine today.

    python bench/floor.py                    # both phases, the same defaults as bench/e2e.py
    python bench/floor.py --seconds 10

The daemon's speed targets were set against "a consume-decode-COPY-commit loop
with no matching". This is that loop, so the targets can be checked against what
the same machine, broker and database give on the same day:

- one aiokafka consumer (``fetch_max_wait_ms`` 10, as the daemon's default) on a
  fresh test broker (Tansu, memory storage, 3 partitions);
- each ``getmany`` result is decoded with msgspec, COPYed into one table (offset,
  instrument, ts, payload) and committed in one transaction together with the
  partitions' last offsets: the same durability the daemon gives, nothing else.

Phase 1 preloads ``--orders`` messages of bench/e2e.py's seeded flow and reports
messages per second from the first consumed to the last committed. Phase 2 offers
``--rate`` messages per second for ``--seconds`` from a producer lingering 5 ms
(GC off, messages encoded beforehand, as bench/e2e.py does) and reports the latency
from ``send`` to the acknowledged commit of the transaction holding the message:
p50, p99, max and the p99 per second.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.e2e import INSTRUMENTS, _admin, preload, say
from exchange.adapters.generator.flow import OrderFlow
from tests.support.broker import KafkaBroker

TOPIC = "orders"
SCHEMA = """
CREATE TABLE inputs (partition integer NOT NULL, "offset" bigint NOT NULL, instrument text NOT NULL,
                     ts_ns bigint NOT NULL, payload bytea NOT NULL, PRIMARY KEY (partition, "offset"));
CREATE TABLE offsets (partition integer PRIMARY KEY, last_offset bigint NOT NULL);
"""


class Message(msgspec.Struct):
    instrument: str
    ts_ns: int


class Loop:
    """consume -> decode -> COPY -> commit, one transaction per fetch; commit times per message."""

    def __init__(self, conn: asyncpg.Connection, consumer: AIOKafkaConsumer) -> None:
        self.conn = conn
        self.consumer = consumer
        self.decoder = msgspec.json.Decoder(Message)
        self.committed = 0
        self.first_at: float | None = None
        self.last_at = 0.0
        self.acks: dict[tuple[int, int], float] = {}  # (partition, offset) -> wall-clock commit time
        self.record_acks = False

    async def run(self, until: int) -> None:
        while self.committed < until:
            batches = await self.consumer.getmany(timeout_ms=100)
            if not batches:
                continue
            if self.first_at is None:
                self.first_at = time.time()
            rows = []
            last: list[tuple[int, int]] = []
            for tp, records in batches.items():
                for r in records:
                    msg = self.decoder.decode(r.value)
                    rows.append((tp.partition, r.offset, msg.instrument, msg.ts_ns, r.value))
                last.append((tp.partition, records[-1].offset))
            async with self.conn.transaction():
                await self.conn.copy_records_to_table("inputs", records=rows)
                await self.conn.executemany(
                    "INSERT INTO offsets VALUES ($1, $2) ON CONFLICT (partition) DO UPDATE "
                    "SET last_offset = EXCLUDED.last_offset", last)
            now = time.time()
            self.last_at = now
            self.committed += len(rows)
            if self.record_acks:
                for row in rows:
                    self.acks[(row[0], row[1])] = now


async def run(args: argparse.Namespace, bootstrap: str, dsn: str) -> None:
    flow = OrderFlow(INSTRUMENTS, seed=args.seed, start_ts_ns=time.time_ns() // 1_000_000 * 1_000_000)
    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA)
    messages = list(flow.messages(args.orders))
    say(f"phase 1: preloading {len(messages):,} messages")
    await preload(bootstrap, TOPIC, messages)
    consumer = AIOKafkaConsumer(TOPIC, bootstrap_servers=bootstrap, group_id="floor", fetch_max_wait_ms=10,
                                auto_offset_reset="earliest", enable_auto_commit=False, session_timeout_ms=1000)
    await consumer.start()
    loop = Loop(conn, consumer)
    try:
        await loop.run(len(messages))
        assert loop.first_at is not None
        rate = len(messages) / (loop.last_at - loop.first_at)
        print(f"floor throughput: {len(messages):,} messages in {loop.last_at - loop.first_at:.3f} s = "
              f"{rate:,.0f} messages/s (first consumed to last committed)", flush=True)
        if args.seconds > 0:
            await latency(args, bootstrap, flow, loop)
    finally:
        await consumer.stop()
        await conn.close()


async def latency(args: argparse.Namespace, bootstrap: str, flow: OrderFlow, loop: Loop) -> None:
    total = int(args.rate * args.seconds)
    tail = args.rate // 2  # as bench/e2e.py: the broker holds back a partition's last batch; not measured
    values = [json.dumps(flow.next()).encode() for _ in range(total + tail)]
    keys = [json.loads(v)["instrument"].encode() for v in values]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    loop.record_acks = True
    reader = asyncio.create_task(loop.run(loop.committed + total + tail))
    sent: list[tuple[float, Any]] = []
    say(f"phase 2: {args.rate:,} messages/s for {args.seconds}s ({total:,}), producer linger 5 ms")
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        await asyncio.sleep(0.5)
        start = time.perf_counter()
        start_wall = time.time()
        for i, (value, key) in enumerate(zip(values, keys, strict=True)):
            delay = start + i / args.rate - time.perf_counter()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            future = await producer.send(TOPIC, value, key=key)
            if i < total:
                sent.append((time.time(), future))
        await reader
    finally:
        gc.enable()
        gc.unfreeze()
        await producer.stop()
    latencies = []
    by_second: dict[int, list[float]] = {}
    for t_sent, future in sent:
        meta = future.result()
        ms = (loop.acks[(meta.partition, meta.offset)] - t_sent) * 1000
        latencies.append(ms)
        by_second.setdefault(int(t_sent - start_wall), []).append(ms)
    say("phase 2 by second (send time): " + ", ".join(
        f"{sec}s p99 {sorted(v)[int(len(v) * 0.99)]:.0f}" for sec, v in sorted(by_second.items())))
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    print(f"floor latency at {args.rate:,} messages/s offered: p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms, "
          f"max {latencies[-1]:.1f} ms (send to durable commit)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=200_000, help="messages preloaded for phase 1")
    parser.add_argument("--rate", type=int, default=5000, help="offered messages per second in phase 2")
    parser.add_argument("--seconds", type=float, default=20, help="length of phase 2 (0: none)")
    parser.add_argument("--pg", default="postgresql://127.0.0.1:5432/test", help="admin DSN of the PostgreSQL server")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    db = f"exchange_floor_{uuid.uuid4().hex[:8]}"
    dsn = args.pg.rpartition("/")[0] + "/" + db
    asyncio.run(_admin(args.pg, f'CREATE DATABASE "{db}"'))
    try:
        with KafkaBroker() as broker:
            broker.create_topics({TOPIC: 3})
            asyncio.run(run(args, broker.bootstrap_servers, dsn))
    finally:
        asyncio.run(_admin(args.pg, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
