"""The test broker alone: what delivery through it costs, and how that changes over a run.

    python bench/broker.py                       # 5,000 records/s for 24 s, one consumer
    python bench/broker.py --no-consumer         # the producer alone

A producer lingering 5 ms sends ``--rate`` small records per second, keyed over
three partitions, to a fresh Tansu broker (memory storage, as the tests and
``bench/e2e.py`` use it); a consumer (``fetch_max_wait_ms`` 10, as the daemon's
default) reads them. Per window of ``--window`` seconds it prints the broker's
CPU (share of one core, from /proc) and the delivery latency from ``send`` to
the consumer (p50, p99). No daemon, no database: this is the floor that
``bench/e2e.py``'s latency stands on, and how it moves as the broker stores more.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.support.broker import KafkaBroker


def cpu_ticks(pid: int) -> int:
    """User plus system CPU of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(args: argparse.Namespace, bootstrap: str, pid: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    delays: list[float] = []
    stop = asyncio.Event()

    async def consume() -> None:
        consumer = AIOKafkaConsumer("t", bootstrap_servers=bootstrap, group_id="bench", fetch_max_wait_ms=10,
                                    auto_offset_reset="earliest", session_timeout_ms=1000)
        await consumer.start()
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=100)
                now_ms = time.time() * 1000
                for records in batches.values():
                    delays.extend(now_ms - r.timestamp for r in records)
        finally:
            await consumer.stop()

    reader = None if args.no_consumer else asyncio.create_task(consume())
    await asyncio.sleep(2)  # the consumer's group join
    hz = os.sysconf("SC_CLK_TCK")
    print(f"{'seconds':>8} {'broker CPU':>11} {'delivery p50':>13} {'p99 ms':>7}")
    start = time.perf_counter()
    window_start, ticks = start, cpu_ticks(pid)
    i = 0
    while (now := time.perf_counter()) - start < args.seconds:
        delay = start + i / args.rate - now
        if delay > 0.0005:
            await asyncio.sleep(delay)
        await producer.send("t", b"x" * 200, key=str(i % 3).encode(), timestamp_ms=int(time.time() * 1000))
        i += 1
        if now - window_start >= args.window:
            used = (cpu_ticks(pid) - ticks) / hz / (now - window_start)
            window, delays[:] = list(delays), []
            p50, p99 = (f"{pct(window, 0.5):.1f}", f"{pct(window, 0.99):.1f}") if window else ("-", "-")
            print(f"{now - start:>8.0f} {used:>10.0%} {p50:>13} {p99:>7}", flush=True)
            window_start, ticks = now, cpu_ticks(pid)
    stop.set()
    await producer.stop()
    if reader is not None:
        await reader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=5000, help="records per second")
    parser.add_argument("--seconds", type=float, default=24)
    parser.add_argument("--window", type=float, default=4, help="seconds per printed line")
    parser.add_argument("--no-consumer", action="store_true", help="only produce")
    args = parser.parse_args()
    with KafkaBroker() as broker:
        broker.create_topics({"t": 3})
        assert broker.pid is not None
        asyncio.run(run(args, broker.bootstrap_servers, broker.pid))


if __name__ == "__main__":
    main()
