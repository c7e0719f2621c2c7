"""Scale-out: several daemon processes in one consumer group, one writer per instrument, fenced in PostgreSQL.

Three ``exchange run`` processes share one database, one group and an orders topic of eight partitions,
one instrument on each. A seeded flow with cancels and amends is produced in chunks while they run, and:

- one process is killed with SIGKILL: its instruments resume on the others (the time it takes is
  printed: the group's session timeout plus their recovery);
- one is frozen with SIGSTOP well past the session timeout while the other takes its instruments, then
  resumed: it finds it lost them (a fenced commit, or its lease check), publishes nothing for them, and
  rejoins the group;
- a fourth process joins late and takes a share.

At the end every stored event, trade, order, position and counter equals one uninterrupted run of the same
input (the in-process replay, stored by the same store code in a database of its own), ``recover --verify``
passes, and neither the market-data subscribers (Redis) nor a reader of the events topic (Kafka) saw a
sequence gap after deduplication.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from exchange.adapters.generator.flow import OrderFlow
from exchange.adapters.kafka import partition_for
from exchange.adapters.postgres import PostgresStore
from exchange.core.instruments import Instrument
from exchange.ports import Applied, Batch
from tests.integration.daemon import DaemonProcess, free_port, produce, read_topic, write_config
from tests.integration.expect import encoded, replay_messages, stored_state, wait_for_seq
from tests.integration.test_fanout import REDIS_OPTIONS, Followers
from tests.support.broker import KafkaBroker
from tests.support.redis_server import RedisServer
from tests.support.verify import verify

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# one instrument on each of the eight partitions (murmur2 of the name, as producers place them)
INSTRUMENTS = (
    Instrument.from_decimals("ETH-USD", tick_size="0.01", lot_size="0.01", max_qty="10000",
                             stp_default="cancel_incoming"),
    Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001", max_qty="1000", price_band_bps=300,
                             stp_default="cancel_resting"),
    Instrument.from_decimals("APT-USD", tick_size="0.001", lot_size="0.1", max_qty="100000"),
    Instrument.from_decimals("AVAX-USD", tick_size="0.01", lot_size="0.1", max_qty="100000"),
    Instrument.from_decimals("DOT-USD", tick_size="0.001", lot_size="1", max_qty="100000", stp_default="cancel_both"),
    Instrument.from_decimals("BNB-USD", tick_size="0.01", lot_size="0.01", max_qty="10000"),
    Instrument.from_decimals("DOGE-USD", tick_size="0.00001", lot_size="10", max_qty="10000000"),
    Instrument.from_decimals("ATOM-USD", tick_size="0.001", lot_size="0.1", max_qty="100000"),
)
SYMBOLS = [spec.symbol for spec in INSTRUMENTS]
PARTITIONS = 8
N_MESSAGES = 16_000
SEED = 20261207
SESSION_TIMEOUT_S = 1.0  # write_config's [kafka] session_timeout_ms


class Cluster:
    """Daemon processes of one group, each with its own HTTP port and log."""

    def __init__(self, tmp_path: Path, kafka: KafkaBroker, dsn: str, topic: str, redis_url: str) -> None:
        self.tmp_path, self.kafka, self.dsn, self.topic, self.redis_url = tmp_path, kafka, dsn, topic, redis_url
        self.members: dict[str, DaemonProcess] = {}

    def start(self, name: str) -> DaemonProcess:
        port = free_port()
        config = write_config(self.tmp_path / f"{name}.toml", instruments=INSTRUMENTS,
                              bootstrap=self.kafka.bootstrap_servers, dsn=self.dsn, topic=self.topic,
                              group_id=f"g-{self.topic}", http_port=port, redis_url=self.redis_url,
                              redis=REDIS_OPTIONS, max_events=500, snapshot_interval_s=0.5)
        daemon = self.members[name] = DaemonProcess(config, port, self.tmp_path / f"{name}.log")
        daemon.start()
        return daemon

    def owned(self, name: str) -> dict[str, int]:
        """The instruments ``name`` owns with their epochs (its /readyz), or {} while it does not answer."""
        try:
            _, body = self.members[name].get("/readyz")
        except OSError:
            return {}
        return {symbol: entry["epoch"] for symbol, entry in (body or {}).get("instruments", {}).items()}

    def settled(self, names: list[str]) -> bool:
        """Every instrument owned by exactly one of ``names``, and each of them ready."""
        owners: list[str] = []
        for name in names:
            self.members[name].check_alive()
            status, body = self.members[name].get("/readyz")
            if status != 200:
                return False
            owners += list(body["instruments"])
        return sorted(owners) == sorted(SYMBOLS)

    def wait_settled(self, names: list[str], timeout: float = 60.0) -> float:
        """Seconds until :meth:`settled`."""
        started = time.monotonic()
        while not self._quietly(lambda: self.settled(names)):
            assert time.monotonic() - started < timeout, {n: self.members[n].tail(15) for n in names}
            time.sleep(0.02)
        return time.monotonic() - started

    @staticmethod
    def _quietly(check: Callable[[], bool]) -> bool:
        try:
            return check()
        except OSError:
            return False

    def check(self, names: list[str]) -> Callable[[], None]:
        def alive() -> None:
            for name in names:
                self.members[name].check_alive()

        return alive


def _stored_uninterrupted(dsn: str, expected: dict[str, list[Any]]) -> None:
    """The replay's events stored by the store, in one process that owns everything: the uninterrupted run."""

    async def store_all() -> None:
        async with PostgresStore(dsn, INSTRUMENTS) as store:
            await store.migrate()
            epochs = (await store.take(SYMBOLS, [], "uninterrupted")).instruments
            await store.load(INSTRUMENTS)
            for symbol, events in expected.items():
                for i in range(0, len(events), 2000):
                    chunk = events[i:i + 2000]
                    await store.commit(Batch([Applied(symbol, chunk, None)], epochs={symbol: epochs[symbol]}))

    asyncio.run(store_all())


def test_processes_share_the_instruments_and_survive_a_kill_a_freeze_and_a_late_joiner(
        kafka: KafkaBroker, pg_factory: Callable[[], str], redis_server: RedisServer, tmp_path: Path) -> None:
    assert sorted(partition_for(s, PARTITIONS) for s in SYMBOLS) == list(range(PARTITIONS))
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: PARTITIONS, f"{topic}.events": 3, f"{topic}.trades": 2, f"{topic}.dlq": PARTITIONS})
    messages: list[dict[str, Any] | bytes] = list(OrderFlow(INSTRUMENTS, seed=SEED).messages(N_MESSAGES))
    exchange, expected = replay_messages(messages, INSTRUMENTS)
    final = {symbol: events[-1].seq for symbol, events in expected.items()}
    chunks = [messages[i * len(messages) // 6: (i + 1) * len(messages) // 6] for i in range(6)]

    def seqs_after(n: int) -> dict[str, int]:
        _, upto = replay_messages([m for chunk in chunks[:n] for m in chunk], INSTRUMENTS)
        return {symbol: events[-1].seq for symbol, events in upto.items() if events}

    def send(chunk: list[dict[str, Any] | bytes]) -> None:
        asyncio.run(produce(kafka.bootstrap_servers, topic, chunk))

    dsn = pg_factory()
    cluster = Cluster(tmp_path, kafka, dsn, topic, redis_server.url)
    followers = None
    try:
        for name in ("a", "b", "c"):
            cluster.start(name)
        cluster.wait_settled(["a", "b", "c"])
        assert all(cluster.owned(name) for name in ("a", "b", "c")), "each of three takes a share of eight"
        followers = Followers(redis_server.url, keep_messages=True, symbols=SYMBOLS)
        send(chunks[0])
        wait_for_seq(dsn, seqs_after(1), timeout=120, check=cluster.check(["a", "b", "c"]))

        # --- SIGKILL mid-flow: c's instruments resume on a and b
        killed = cluster.owned("c")
        send(chunks[1])
        cluster.members["c"].kill()
        resumed_s = cluster.wait_settled(["a", "b"])
        print(f"SIGKILL: {sorted(killed)} resumed on the others after {resumed_s:.2f} s "
              f"(session timeout {SESSION_TIMEOUT_S:.0f} s plus recovery)")
        wait_for_seq(dsn, seqs_after(2), timeout=120, check=cluster.check(["a", "b"]))

        # --- SIGSTOP past the session timeout: a takes b's instruments; b, resumed, finds it was fenced
        frozen = cluster.owned("b")
        assert frozen
        send(chunks[2])
        cluster.members["b"].proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        took_s = cluster.wait_settled(["a"])
        assert sorted(cluster.owned("a")) == sorted(SYMBOLS)
        send(chunks[3])
        wait_for_seq(dsn, seqs_after(4), timeout=120, check=cluster.check(["a"]))
        print(f"SIGSTOP: a owned every instrument {took_s:.2f} s after b froze")
        epochs_while_frozen = cluster.owned("a")
        cluster.members["b"].proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        cluster.members["b"].wait_log("ownership lost", timeout=30)
        cluster.wait_settled(["a", "b"])
        assert all(cluster.owned(name) for name in ("a", "b")), "b rejoined and took a share again"

        # --- a late joiner takes a share
        cluster.start("d")
        cluster.wait_settled(["a", "b", "d"])
        assert cluster.owned("d"), "the late joiner owns something"
        send(chunks[4])
        send(chunks[5])
        wait_for_seq(dsn, final, timeout=180, check=cluster.check(["a", "b", "d"]))
        followers.wait_for(final, timeout=60, check=cluster.check(["a", "b", "d"]))
        for name in ("a", "b", "d"):
            assert cluster.members[name].terminate(timeout=60) == 0, cluster.members[name].tail()
    finally:
        if followers is not None:
            followers.stop()
        for daemon in cluster.members.values():
            daemon.ensure_stopped()

    # b's writer: every commit it attempted for what it lost was refused; it published nothing for them
    b_log = [json.loads(line) for line in (tmp_path / "b.log").read_text().splitlines() if line.startswith("{")]
    lost = [line for line in b_log if line["event"] == "ownership lost: another process took these; this one stops "
            "applying and publishing them"]
    assert lost, "b never noticed it lost its instruments"
    assert set(lost[0]["instruments"]) <= set(frozen), lost
    for line in b_log:
        if line["event"] == "journal commit fenced: another process took instruments of this batch; their records " \
                            "are dropped (never published, their input offsets never committed) and the rest of the " \
                            "batch is committed":
            assert set(line["instruments"]) <= set(frozen)
    assert {s: e for s, e in epochs_while_frozen.items() if s in frozen}, "a took b's instruments under new epochs"
    taken = []
    for name in ("a", "b", "c", "d"):
        log = [json.loads(line) for line in (tmp_path / f"{name}.log").read_text().splitlines()
               if line.startswith("{")]
        assert any(line["event"] == "partitions assigned" for line in log), f"{name} never logged its assignment"
        taken += [line for line in log if line["event"] == "instruments taken"]
    # a partition a rebalance gives back to the same process keeps its book: nothing is loaded again
    assert any(line["kept"] for line in taken), "no book was kept across a rebalance"

    # the database equals one uninterrupted run of the same input
    clean_dsn = pg_factory()
    _stored_uninterrupted(clean_dsn, expected)
    stored, clean = asyncio.run(stored_state(dsn)), asyncio.run(stored_state(clean_dsn))
    assert stored["events"] == encoded(expected), "events differ from the replay"
    for table in ("trades", "orders", "positions", "progress"):
        assert stored[table] == clean[table], f"{table} differ from the uninterrupted run"
    report = asyncio.run(verify(dsn, INSTRUMENTS))
    assert report.ok, report.render()
    for rep in report.instruments:
        assert {r.state_hash for r in rep.results} == {exchange.engines[rep.instrument].state_hash()}

    # market data (Redis): no gap after deduplication, every trade once, heartbeats never behind what was sent
    for symbol, follower in followers.by_symbol.items():
        assert follower.sync.gaps == 0, f"{symbol}: {list(follower.notes)}"
        assert follower.received is not None
        seq = 0
        for msg in (m for m in follower.received if m["type"] == "l2"):
            if msg["seq"] <= seq:
                continue
            assert msg["prev_seq"] <= seq, f"{symbol}: gap after seq {seq}: {msg['prev_seq']}"
            seq = msg["seq"]
        trades = sorted({t["trade_id"] for m in follower.received if m["type"] == "trades" for t in m["trades"]})
        assert trades == [e.trade_id for e in expected[symbol] if type(e).__name__ == "OrderFilled"]
        # a stale owner's heartbeat would go back in seq: none did (b, frozen, published nothing when it woke)
        beats = [(m["seq"], m["time_ns"]) for m in follower.received if m["type"] == "heartbeat"]
        back = [(a, b) for a, b in pairwise(beats) if b[0] < a[0]]
        assert not back, f"{symbol}: a heartbeat went back in seq: {back[:3]}"
    # order events (Kafka): every seq of every instrument, none missing after deduplication
    records = asyncio.run(read_topic(kafka.bootstrap_servers, f"{topic}.events", sum(final.values()), wait_s=60.0,
                                     count=lambda r: len(json.loads(r.value).get("events", ())), linger_s=1.0))
    seen: dict[str, set[int]] = {symbol: set() for symbol in SYMBOLS}
    for record in records:
        for event in json.loads(record.value).get("events", ()):
            if event["seq"]:
                seen[event["instrument"]].add(event["seq"])
    for symbol in SYMBOLS:
        assert seen[symbol] == set(range(1, final[symbol] + 1)), f"{symbol}: seqs missing on the events topic"
