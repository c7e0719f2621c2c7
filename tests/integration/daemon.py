"""Run ``exchange run`` as a separate process for system tests, and feed it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from exchange.core.instruments import Instrument
from exchange.wire.auth import sign


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, *, instruments: Sequence[Instrument], bootstrap: str, dsn: str, topic: str,
                 group_id: str, http_port: int, snapshot_interval_s: float = 60.0, max_events: int = 5000,
                 linger_ms: float = 2.0, publish_events: bool = True, queue_size: int = 10_000,
                 journal_queue: int = 256, fetch_max_wait_ms: int = 10, redis_url: str | None = None,
                 redis: dict[str, Any] | None = None, log_level: str = "info",
                 kafka: dict[str, Any] | None = None) -> Path:
    """A daemon configuration; ``redis_url`` turns market data on (``redis``: more ``[redis]`` keys);
    ``kafka``: more ``[kafka]`` keys."""
    lines = []
    for spec in instruments:
        lines += [
            "[[instruments]]",
            f'symbol = "{spec.symbol}"',
            f'tick_size = "{spec.tick_size}"',
            f'lot_size = "{spec.lot_size}"',
            f'min_qty = "{spec.lots_to_qty(spec.min_qty_lots)}"',
            f'max_qty = "{spec.lots_to_qty(spec.max_qty_lots)}"',
            f'max_price = "{spec.ticks_to_price(spec.max_price_ticks)}"',
            f'stp_default = "{spec.stp_default.value}"',
            f"dedupe_window = {spec.dedupe_window}",
            f"dedupe_per_client = {spec.dedupe_per_client}",
        ]
        if spec.price_band_bps is not None:
            lines.append(f"price_band_bps = {spec.price_band_bps}")
        if spec.balances:
            lines += ["balances = true", f'base_asset = "{spec.base_asset}"', f'quote_asset = "{spec.quote_asset}"',
                      f"maker_fee_bps = {spec.maker_fee_bps}", f"taker_fee_bps = {spec.taker_fee_bps}"]
        lines.append("")
    lines += [
        "[kafka]",
        f'bootstrap_servers = "{bootstrap}"',
        f'orders_topic = "{topic}"',
        f'events_topic = "{topic}.events"',
        f'dead_letter_topic = "{topic}.dlq"',
        f'trades_topic = "{topic}.trades"',
        f'group_id = "{group_id}"',
        f"publish_events = {'true' if publish_events else 'false'}",
        "session_timeout_ms = 1000",
        f"fetch_max_wait_ms = {fetch_max_wait_ms}",
        "heartbeat_interval_ms = 100",
        *[f"{key} = {json.dumps(value)}" for key, value in (kafka or {}).items()],
        "",
        "[postgres]",
        f'dsn = "{dsn}"',
        "",
        "[journal]",
        f"max_events = {max_events}",
        f"linger_ms = {linger_ms}",
        f"queue_size = {journal_queue}",
        "",
        "[engine]",
        f"snapshot_interval_s = {snapshot_interval_s}",
        f"queue_size = {queue_size}",
        "shutdown_timeout_s = 30",
        "",
        "[http]",
        f"port = {http_port}",
        "",
        "[log]",
        'format = "json"',
        f'level = "{log_level}"',
    ]
    if redis_url is not None:
        lines += ["", "[redis]", "enabled = true", f'url = "{redis_url}"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in (redis or {}).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


ADMIN_KEY_ID = "test-ops"
ADMIN_SECRET = "0f3c8a1e5b7d92c46e1a0b3f5d7c9e21"
ADMIN_KEYS = f"{ADMIN_KEY_ID}:{ADMIN_SECRET}"  # EXCHANGE_ADMIN_KEYS of every test daemon (and exchange admin)


def signed(msg: dict[str, Any]) -> dict[str, Any]:
    """``msg`` signed with the test daemons' key at its own time (``ts_ns``, its Kafka timestamp in
    :func:`produce`): an OrderFlow's ``signer`` for the deposits and withdrawals it sends."""
    return sign(msg, ADMIN_KEY_ID, ADMIN_SECRET.encode(), msg["ts_ns"] // 1_000_000)


class DaemonProcess:
    def __init__(self, config: Path, http_port: int, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = {"EXCHANGE_ADMIN_KEYS": ADMIN_KEYS, **(env or {})}
        self.http_port = http_port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._start_offset = 0  # where this run's part of the log begins

    def start(self) -> None:
        env = {**os.environ, **self.env}
        self._log = self.log_path.open("ab")
        self._start_offset = self._log.tell()
        self.proc = subprocess.Popen([sys.executable, "-m", "exchange", "run", "--config", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as resp:
                body = resp.read()
                return resp.status, json.loads(body) if path not in ("/metrics", "/healthz") else body.decode()
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status, _ = self.get("/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready within {timeout}s; log: {self.tail()}")

    def wait_log(self, text: str, timeout: float) -> None:
        """Wait until this run's log mentions ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with self.log_path.open("rb") as f:
                f.seek(self._start_offset)
                if text.encode() in f.read():
                    return
            time.sleep(0.005)
        raise AssertionError(f"{text!r} not logged within {timeout}s; log: {self.tail()}")

    def rss_bytes(self) -> int:
        """The daemon's resident memory now (VmRSS)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}; log: {self.tail()}")

    def ensure_stopped(self) -> None:
        """Kill the daemon if it still runs (a test that failed half-way must not leave it behind)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; a daemon that does not stop in time is killed and the test fails."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"daemon did not stop within {timeout}s of SIGTERM; log: {self.tail()}") from None
        finally:
            self._log.close()
        return code

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


async def read_topic(bootstrap: str, topic: str, expect_at_least: int, *, wait_s: float = 20.0,
                     count: Callable[[Any], int] | None = None, linger_s: float = 0.0) -> list[Any]:
    """Every record of ``topic`` from its start, until ``count`` (default: one per record) adds up to
    ``expect_at_least`` and ``linger_s`` more have passed (for duplicates that may follow), or ``wait_s``."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=10, group_id=None)
    await consumer.start()
    records: list[Any] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        seen = 0
        enough_at = None
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
                seen += sum(count(r) for r in recs) if count else len(recs)
            if seen >= expect_at_least:
                enough_at = enough_at if enough_at is not None else loop.time()
                if loop.time() >= enough_at + linger_s:
                    break
    finally:
        await consumer.stop()
    return records


async def produce(bootstrap: str, topic: str, messages: Iterable[dict[str, Any] | bytes]) -> dict[int, int]:
    """Produce wire messages keyed by instrument, with the message's ts_ns as the Kafka timestamp.

    Returns the last offset written per partition.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=512 * 1024)
    await producer.start()
    last: dict[int, int] = {}
    try:
        futures = []
        for msg in messages:
            if isinstance(msg, bytes):
                futures.append(await producer.send(topic, msg, key=b"garbage"))
                continue
            value = json.dumps(msg).encode()
            key = str(msg.get("instrument", "")).encode()
            futures.append(await producer.send(topic, value, key=key, timestamp_ms=msg["ts_ns"] // 1_000_000))
        for meta in await asyncio.gather(*futures):
            last[meta.partition] = max(last.get(meta.partition, -1), meta.offset)
    finally:
        await producer.stop()
    return last
