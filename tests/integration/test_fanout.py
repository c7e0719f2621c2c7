"""Market-data fan-out against real Redis, the Kafka-protocol broker, PostgreSQL and the daemon process.

Subscribers are :class:`exchange.cli.watch.Follower` (what ``exchange watch`` runs): they follow the
documented sync procedure. Each test starts its OWN redis-server on a free port (never the shared
one), so that it can restart it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from exchange.adapters.generator.flow import OrderFlow
from exchange.cli.watch import Follower
from exchange.core.instruments import Instrument
from exchange.core.matching import Exchange
from exchange.settings import RedisSettings
from tests.integration.daemon import DaemonProcess, free_port, produce, read_topic, write_config
from tests.integration.expect import replay_messages, stored_progress, wait_for_seq
from tests.support.broker import KafkaBroker
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INSTRUMENTS = (
    Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001", max_qty="1000",
                             price_band_bps=300, stp_default="cancel_resting"),
    Instrument.from_decimals("ETH-USD", tick_size="0.01", lot_size="0.01", max_qty="10000"),
    Instrument.from_decimals("SOL-USD", tick_size="0.001", lot_size="1", max_qty="100000",
                             stp_default="cancel_both"),
)
SYMBOLS = [s.symbol for s in INSTRUMENTS]
REDIS_OPTIONS = {"heartbeat_interval_s": 0.2, "book_refresh_ms": 20.0}


class Followers:
    """Followers of every instrument, running in their own thread and event loop."""

    def __init__(self, url: str, *, keep_messages: bool = False, symbols: list[str] = SYMBOLS) -> None:
        settings = RedisSettings(enabled=True, url=url)
        self.by_symbol = {sym: Follower(settings, sym, keep_messages=keep_messages) for sym in symbols}
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(10)
        deadline = time.monotonic() + 30
        while not all(f.sync.synced for f in self.by_symbol.values()):
            assert time.monotonic() < deadline, "followers did not sync from the book keys"
            time.sleep(0.02)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            self._started.set()
            await asyncio.gather(*(f.run(self._stop) for f in self.by_symbol.values()))

        self._loop.run_until_complete(main())
        self._loop.close()

    def stop(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        assert not self._thread.is_alive(), "followers did not stop"

    def wait_for(self, final: dict[str, int], timeout: float, check: Any = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check is not None:
                check()
            if all(f.sync.seq == final[sym] for sym, f in self.by_symbol.items()):
                return
            time.sleep(0.05)
        state = {sym: (f.sync.seq, final[sym], list(f.notes)) for sym, f in self.by_symbol.items()}
        raise AssertionError(f"followers did not reach the final seqs within {timeout}s: {state}")


def engine_levels(exchange: Exchange, symbol: str, buy: bool) -> list[tuple[str, str]]:
    engine = exchange.engines[symbol]
    spec = engine.spec
    levels = engine.book.bids if buy else engine.book.asks
    return [(spec.ticks_to_price(lv.price), spec.lots_to_qty(lv.total_lots)) for lv in levels.values()]


def assert_books_equal(followers: Followers, exchange: Exchange) -> None:
    for sym, f in followers.by_symbol.items():
        assert f.sync.levels(True) == engine_levels(exchange, sym, True), f"{sym} bids differ"
        assert f.sync.levels(False) == engine_levels(exchange, sym, False), f"{sym} asks differ"
        assert f.sync.seq == exchange.engines[sym].seq


def _setup(kafka: KafkaBroker, tmp_path: Path, dsn: str, redis_url: str, n: int, seed: int,
           snapshot_interval_s: float = 60.0) -> tuple[str, DaemonProcess, list[dict[str, Any]], Path]:
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 3, f"{topic}.events": 1, f"{topic}.trades": 1, f"{topic}.dlq": 1})
    port = free_port()
    config = write_config(tmp_path / "daemon.toml", instruments=INSTRUMENTS, bootstrap=kafka.bootstrap_servers,
                          dsn=dsn, topic=topic, group_id=f"g-{topic}", http_port=port, redis_url=redis_url,
                          redis=REDIS_OPTIONS, max_events=500, snapshot_interval_s=snapshot_interval_s)
    messages = list(OrderFlow(INSTRUMENTS, seed=seed).messages(n))
    return topic, DaemonProcess(config, port, tmp_path / "daemon.log"), messages, config


def _final(messages: list[dict[str, Any]]) -> tuple[Exchange, dict[str, int]]:
    exchange, expected = replay_messages(messages, INSTRUMENTS)
    return exchange, {sym: evs[-1].seq if evs else 0 for sym, evs in expected.items()}


def test_subscribers_end_with_the_engines_books_also_when_joining_mid_stream(
        kafka: KafkaBroker, pg_dsn: str, redis_server: RedisServer, tmp_path: Path) -> None:
    topic, daemon, messages, config = _setup(kafka, tmp_path, pg_dsn, redis_server.url, 6000, seed=41)
    half = len(messages) // 2
    _, half_seq = _final(messages[:half])
    exchange, final = _final(messages)
    daemon.start()
    early = late = None
    try:
        daemon.wait_ready(timeout=60)
        early = Followers(redis_server.url)
        asyncio.run(produce(kafka.bootstrap_servers, topic, messages[:half]))
        wait_for_seq(pg_dsn, half_seq, timeout=120, check=daemon.check_alive)
        late = Followers(redis_server.url)  # joins in the middle of the stream
        asyncio.run(produce(kafka.bootstrap_servers, topic, messages[half:]))
        wait_for_seq(pg_dsn, final, timeout=120, check=daemon.check_alive)
        early.wait_for(final, timeout=60, check=daemon.check_alive)
        late.wait_for(final, timeout=60, check=daemon.check_alive)
        assert_books_equal(early, exchange)
        assert_books_equal(late, exchange)
        for f in early.by_symbol.values():
            assert f.sync.gaps == 0, list(f.notes)
            assert f.sync.missed_trades == 0

        # exchange watch --check: the followed book equals the persisted one
        ok = _watch_check(config, "BTC-USD")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "equals the persisted book" in ok.stdout
    finally:
        for group in (early, late):
            if group is not None:
                group.stop()
        code = daemon.terminate(timeout=60)
    assert code == 0, daemon.tail()

    # a book key that differs from what the engine persisted: --check says so and exits 1
    client = redis.Redis(port=redis_server.port)
    key = "md.ETH-USD.book"
    image = json.loads(client.get(key) or b"null")
    assert image["seq"] == final["ETH-USD"]
    price, qty = image["bids"][0]
    image["bids"][0] = [price, str(float(qty) + 1)]
    client.set(key, json.dumps(image))
    bad = _watch_check(config, "ETH-USD")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"bid {price}" in bad.stdout


def _watch_check(config: Path, symbol: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exchange", "watch", symbol, "--check", "--seconds", "0.5",
                           "--config", str(config)], capture_output=True, text=True, timeout=120)


def test_redis_restarted_mid_stream_subscribers_resync_and_end_equal(
        kafka: KafkaBroker, pg_dsn: str, redis_server: RedisServer, tmp_path: Path) -> None:
    topic, daemon, messages, _ = _setup(kafka, tmp_path, pg_dsn, redis_server.url, 6000, seed=42)
    third = len(messages) // 3
    _, first_seq = _final(messages[:third])
    exchange, final = _final(messages)
    daemon.start()
    followers = None
    try:
        daemon.wait_ready(timeout=60)
        followers = Followers(redis_server.url)
        asyncio.run(produce(kafka.bootstrap_servers, topic, messages[:third]))
        wait_for_seq(pg_dsn, first_seq, timeout=120, check=daemon.check_alive)
        followers.wait_for(first_seq, timeout=60, check=daemon.check_alive)

        redis_server.kill()
        # matching and persistence go on; health and metrics show the degradation
        asyncio.run(produce(kafka.bootstrap_servers, topic, messages[third: 2 * third]))
        _, second_seq = _final(messages[: 2 * third])
        wait_for_seq(pg_dsn, second_seq, timeout=120, check=daemon.check_alive)
        _wait_health(daemon, "degraded: market data")
        _, metrics = daemon.get("/metrics")
        assert "exchange_marketdata_up 0.0" in metrics
        redis_server.start()
        _wait_health(daemon, "ok")

        asyncio.run(produce(kafka.bootstrap_servers, topic, messages[2 * third:]))
        wait_for_seq(pg_dsn, final, timeout=120, check=daemon.check_alive)
        followers.wait_for(final, timeout=60, check=daemon.check_alive)
        assert_books_equal(followers, exchange)
        for f in followers.by_symbol.values():
            assert f.sync.resyncs >= 1, "the lost subscription should have been resynced"
    finally:
        if followers is not None:
            followers.stop()
        code = daemon.terminate(timeout=60)
    assert code == 0, daemon.tail()


def _wait_health(daemon: DaemonProcess, prefix: str, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        daemon.check_alive()
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/healthz", timeout=2) as resp:
            body = resp.read().decode()
        if body.startswith(prefix):
            return
        time.sleep(0.05)
    raise AssertionError(f"/healthz said {body!r}, not {prefix!r}, within {timeout}s")


def test_daemon_killed_mid_stream_consumers_see_no_gap_and_every_trade_once(
        kafka: KafkaBroker, pg_dsn: str, redis_server: RedisServer, tmp_path: Path) -> None:
    republished = _kill_and_restart(kafka, pg_dsn, redis_server, tmp_path)
    print(f"events re-published after the kills: {republished}")


def _kill_and_restart(kafka: KafkaBroker, pg_dsn: str, redis_server: RedisServer, tmp_path: Path) -> int:
    topic, daemon, messages, _ = _setup(kafka, tmp_path, pg_dsn, redis_server.url, 9000, seed=43,
                                        snapshot_interval_s=0.2)
    exchange, final = _final(messages)
    _, expected = replay_messages(messages, INSTRUMENTS)
    trades = {(sym, e.trade_id) for sym, evs in expected.items() for e in evs if type(e).__name__ == "OrderFilled"}
    daemon.start()
    followers = None
    try:
        daemon.wait_ready(timeout=60)
        followers = Followers(redis_server.url, keep_messages=True)
        chunks = 3
        size = len(messages) // chunks
        for i in range(chunks):
            chunk = messages[i * size: (i + 1) * size if i < chunks - 1 else len(messages)]
            asyncio.run(produce(kafka.bootstrap_servers, topic, chunk))
            if i == chunks - 1:
                break
            before = sum(asyncio.run(stored_progress(pg_dsn)).values())
            deadline = time.monotonic() + 60
            while sum(asyncio.run(stored_progress(pg_dsn)).values()) < before + 500:  # mid-stream
                daemon.check_alive()
                assert time.monotonic() < deadline, daemon.tail()
                time.sleep(0.01)
            daemon.kill()
            daemon.start()
            daemon.wait_ready(timeout=60)
        wait_for_seq(pg_dsn, final, timeout=180, check=daemon.check_alive)
        followers.wait_for(final, timeout=60, check=daemon.check_alive)
        assert_books_equal(followers, exchange)
        for sym, f in followers.by_symbol.items():
            assert f.sync.gaps == 0, f"{sym}: {list(f.notes)}"
            assert f.sync.resyncs == 0
            assert f.sync.missed_trades == 0
            assert f.received is not None
            # l2 and l3 after dropping what is at or below what was applied: a chain without gaps
            for kind in ("l2", "l3"):
                seq = 0
                for msg in (m for m in f.received if m["type"] == kind):
                    if msg["seq"] <= seq:
                        continue
                    assert msg["prev_seq"] <= seq, f"{sym} {kind}: gap after seq {seq}: {msg['prev_seq']}"
                    seq = msg["seq"]
            # every trade exactly once after dropping repeated trade ids, none missing
            seen = [t["trade_id"] for m in f.received if m["type"] == "trades" for t in m["trades"]]
            deduped = sorted(set(seen))
            assert deduped == sorted(tid for s, tid in trades if s == sym)
        republished = daemon.get("/status")[1]["publishing"]["republished_events"]
    finally:
        if followers is not None:
            followers.stop()
        code = daemon.terminate(timeout=60)
    assert code == 0, daemon.tail()
    # the trades topic (keyed by instrument): every trade at least once, exactly once after deduplication
    records = asyncio.run(read_topic(kafka.bootstrap_servers, f"{topic}.trades", len(trades), wait_s=30.0,
                                     count=lambda r: len(json.loads(r.value)["trades"]), linger_s=1.0))
    values = [json.loads(r.value) for r in records]
    assert all(v["type"] == "trades" and v["instrument"] == r.key.decode() for r, v in zip(records, values,
                                                                                            strict=True))
    seen_kafka = [(v["instrument"], t["trade_id"]) for v in values for t in v["trades"]]
    assert set(seen_kafka) == trades
    assert all(t["type"] == "filled" for v in values for t in v["trades"])
    return republished


