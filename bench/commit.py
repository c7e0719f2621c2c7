"""Commit benchmark: how long the PostgreSQL store takes to make one journal batch durable.

    python bench/commit.py                       # batch sizes 20..2000, both commit paths
    python bench/commit.py --preload 200000 --batches 200

A fresh database gets ``--preload`` seeded orders first (big batches), so the
tables and indexes have a realistic size; then, per batch size and per commit
path ("one-statement": the ``exchange_commit_batch`` function, one round trip;
"copy": BEGIN, COPYs, set-based statements, COMMIT), ``--batches`` batches of the
continuing flow are committed one after another, as the journal writer commits
them, and the time of each ``store.commit`` is reported (mean, p50, p99; events/s
is the store's capacity at that batch size). Only the store is measured: no
broker, no daemon. PostgreSQL must be running (``scripts/services.sh``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg

from exchange.adapters.generator.flow import OrderFlow
from exchange.adapters.postgres import PostgresStore
from exchange.core.matching import Exchange
from exchange.ports import Applied, Batch, InputPosition
from exchange.wire.codec import decode_command

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import INSTRUMENTS  # the same three instruments as the end-to-end benchmark


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Feed:
    """The seeded flow through real engines, cut into batches of about ``events`` events."""

    def __init__(self, seed: int) -> None:
        self.flow = OrderFlow(INSTRUMENTS, seed=seed)
        self.exchange = Exchange(INSTRUMENTS)
        self.specs = {s.symbol: s for s in INSTRUMENTS}
        self.offset = -1

    def batch(self, events: int) -> Batch:
        applied: list[Applied] = []
        n = 0
        while n < events:
            msg = self.flow.next()
            self.offset += 1
            command = decode_command(msg, self.specs, ts_ns=msg["ts_ns"])
            out = self.exchange.apply(command)
            if out:
                applied.append(Applied(out[0].instrument, out, InputPosition("orders", 0, self.offset)))
                n += len(out)
        return Batch(applied, epochs={spec.symbol: 1 for spec in INSTRUMENTS})  # the first take's epochs


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preload", type=int, default=100_000, help="events committed before measuring")
    parser.add_argument("--batches", type=int, default=100, help="batches per size and path")
    parser.add_argument("--sizes", default="20,80,300,1000,2000", help="events per batch")
    parser.add_argument("--pg", default="postgresql://127.0.0.1:5432/test", help="admin DSN of the server")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()

    db = f"exchange_bench_{uuid.uuid4().hex[:8]}"
    dsn = args.pg.rpartition("/")[0] + "/" + db
    admin = await asyncpg.connect(args.pg)
    await admin.execute(f'CREATE DATABASE "{db}"')
    try:
        store = PostgresStore(dsn, INSTRUMENTS)
        await store.start()
        await store.migrate()
        await store.take([spec.symbol for spec in INSTRUMENTS], [], "bench")
        await store.load(INSTRUMENTS)
        feed = Feed(args.seed)
        done = 0
        while done < args.preload:
            batch = feed.batch(5000)
            await store.commit(batch)
            done += sum(len(a.events) for a in batch.applied)
        say(f"preloaded {done:,} events")
        print(f"{'events/batch':>12} {'path':>13} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'events/s':>10}")
        for size in (int(s) for s in args.sizes.split(",")):
            for path, limit in (("one-statement", 1 << 30), ("copy", 0)):
                store.one_statement_max_events = limit
                batches = [feed.batch(size) for _ in range(args.batches)]
                n_events = sum(len(a.events) for batch in batches for a in batch.applied)
                times: list[float] = []
                for batch in batches:
                    started = time.perf_counter()
                    await store.commit(batch)
                    times.append(time.perf_counter() - started)
                total = sum(times)
                times.sort()
                print(f"{size:>12} {path:>13} {sum(times) / len(times) * 1000:>8.2f} "
                      f"{times[len(times) // 2] * 1000:>8.2f} {times[int(len(times) * 0.99)] * 1000:>8.2f} "
                      f"{n_events / total:>10,.0f}", flush=True)
        await store.stop()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
