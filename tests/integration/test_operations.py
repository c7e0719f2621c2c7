"""Operations against a running daemon: /metrics, /healthz, /status, /readyz, and `exchange admin`.

The daemon runs as a process against real PostgreSQL and the test's Kafka-protocol
broker. After some orders, the named metrics exist with values that follow
from the input; operator actions travel through the orders topic and their
outcome is durable; a database that stops accepting connections shows up by
name in /readyz while the daemon is idle, and goes away when it is back.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from exchange.adapters.generator.flow import OrderFlow
from exchange.core.instruments import Instrument
from tests.integration.daemon import ADMIN_KEYS, DaemonProcess, free_port, produce, read_topic, write_config
from tests.integration.expect import replay_messages, wait_for_seq
from tests.integration.test_db_outage import _set_reachable
from tests.support.broker import KafkaBroker

pytestmark = pytest.mark.integration

INSTRUMENTS = (
    Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001", max_qty="1000"),
    Instrument.from_decimals("ETH-USD", tick_size="0.01", lot_size="0.01", max_qty="10000"),
)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text exposition (AssertionError if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if m and m[1] == name and ",".join(sorted((m[2] or "").split(","))) == wanted:
            return float(m[3])
    raise AssertionError(f"no sample {name}{{{wanted}}} in /metrics")


def admin(config: Path, *args: str, keys: str = ADMIN_KEYS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exchange", "admin", *args, "--config", str(config),
                           "--operator", "ops-test", "--timeout", "60"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "EXCHANGE_ADMIN_KEYS": keys})


async def stored_events(dsn: str, instrument: str, after_seq: int) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT convert_from(payload, 'UTF8')::jsonb AS e FROM order_events "
                                "WHERE instrument = $1 AND seq > $2 ORDER BY seq", instrument, after_seq)
    finally:
        await conn.close()
    import json

    return [json.loads(r["e"]) for r in rows]


def wait_until(what: str, check: Any, daemon: DaemonProcess, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        daemon.check_alive()
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what} not seen within {timeout}s\n{daemon.tail()}"
        time.sleep(0.1)


def test_metrics_health_status_admin_and_readiness(kafka: KafkaBroker, pg_dsn: str, tmp_path: Path) -> None:
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 2, f"{topic}.events": 1, f"{topic}.dlq": 1})
    messages: list[dict[str, Any] | bytes] = list(OrderFlow(INSTRUMENTS, seed=11).messages(400))
    _, expected = replay_messages(messages, INSTRUMENTS)
    seqs = {s: e[-1].seq for s, e in expected.items()}
    trades = {s: sum(1 for ev in e if type(ev).__name__ == "OrderFilled") for s, e in expected.items()}

    port = free_port()
    config = write_config(tmp_path / "d.toml", instruments=INSTRUMENTS, bootstrap=kafka.bootstrap_servers,
                          dsn=pg_dsn, topic=topic, group_id=f"g-{topic}", http_port=port)
    daemon = DaemonProcess(config, port, tmp_path / "d.log")
    daemon.start()
    try:
        daemon.wait_ready(timeout=60)
        assert daemon.get("/healthz")[0] == 200
        asyncio.run(produce(kafka.bootstrap_servers, topic, messages))
        wait_for_seq(pg_dsn, seqs, timeout=60, check=daemon.check_alive)

        # --- /metrics after the orders: names exist, values follow from the input
        _, text = daemon.get("/metrics")
        for symbol, events in expected.items():
            commands = sum(1 for m in messages if isinstance(m, dict) and m.get("instrument") == symbol)
            assert metric(text, "exchange_orders_received_total", instrument=symbol) == commands
            assert metric(text, "exchange_trades_total", instrument=symbol) == trades[symbol]
            assert metric(text, "exchange_events_total", instrument=symbol) == len(events)
            assert metric(text, "exchange_orders_matched_total", instrument=symbol) >= 1
            assert metric(text, "exchange_instrument_seq", instrument=symbol) == seqs[symbol]
            assert metric(text, "exchange_instrument_halted", instrument=symbol) == 0
            assert metric(text, "exchange_queue_depth", instrument=symbol) == 0
            depth = metric(text, "exchange_book_depth_lots", instrument=symbol, side="bid")
            assert depth > 0
        # one observation per command that caused events (a cancel-all of nothing causes none)
        assert len(messages) * 0.9 < metric(text, "exchange_order_latency_seconds_count") <= len(messages)
        assert metric(text, "exchange_journal_batch_events_count") >= 1
        assert metric(text, "exchange_journal_commit_seconds_count") >= 1
        assert metric(text, "exchange_recovery_instruments_done") == len(INSTRUMENTS)
        assert metric(text, "exchange_ready") == 1
        lags = [metric(text, "exchange_consumer_lag_messages", topic=topic, partition=str(p)) for p in (0, 1)]
        assert all(lag >= 0 for lag in lags)
        assert "exchange_orders_rejected_total" in text
        wait_until("dependencies probed up", lambda: all(
            metric(daemon.get("/metrics")[1], "exchange_dependency_up", dependency=d) == 1
            for d in ("postgres", "kafka")), daemon)

        # --- /status
        status, body = daemon.get("/status")
        assert status == 200
        btc = body["instruments"]["BTC-USD"]
        assert (btc["seq"], btc["halted"], btc["queue_depth"]) == (seqs["BTC-USD"], False, 0)
        assert btc["resting_orders"] > 0
        assert btc["best_bid"] is not None
        assert isinstance(btc["consumer_lag"], int)

        # --- operator actions, in order with the orders, durable
        halted = admin(config, "halt", "BTC-USD", "--text", "test halt")
        assert halted.returncode == 0, halted.stderr
        assert '"type":"halted"' in halted.stdout
        assert "applied (halted)" in halted.stderr
        again = admin(config, "halt", "BTC-USD")
        assert again.returncode == 1
        assert "rejected (instrument_halted" in again.stderr
        forged = admin(config, "resume", "BTC-USD", keys="test-ops:not-the-daemons-secret")
        assert forged.returncode == 1
        assert "rejected (not_authorized: the signature does not match" in forged.stderr
        assert daemon.get("/status")[1]["instruments"]["BTC-USD"]["halted"] is True
        seq_halted = daemon.get("/status")[1]["instruments"]["BTC-USD"]["seq"]
        assert daemon.get("/status")[1]["instruments"]["BTC-USD"]["halted"] is True
        order = {"op": "place", "instrument": "BTC-USD", "client_id": "late", "client_order_id": "l-1",
                 "side": "buy", "price": "1.00", "qty": "0.001", "ts_ns": time.time_ns()}
        asyncio.run(produce(kafka.bootstrap_servers, topic, [order]))
        wait_for_seq(pg_dsn, {"BTC-USD": seq_halted + 1}, timeout=30, check=daemon.check_alive)
        [refused] = asyncio.run(stored_events(pg_dsn, "BTC-USD", seq_halted))
        assert (refused["type"], refused["reason"], refused["client_id"]) == (
            "rejected", "instrument_halted", "late")
        assert admin(config, "resume", "BTC-USD").returncode == 0
        assert metric(daemon.get("/metrics")[1], "exchange_instrument_halted", instrument="BTC-USD") == 0

        snap = admin(config, "snapshot", "ETH-USD")
        assert snap.returncode == 0, snap.stderr
        wait_until("snapshot", lambda: daemon.get("/status")[1]["instruments"]["ETH-USD"]["last_snapshot_age_s"]
                   is not None, daemon)
        seq_before = daemon.get("/status")[1]["instruments"]["ETH-USD"]["seq"]
        cleared = admin(config, "cancel-all", "ETH-USD")
        assert cleared.returncode == 0, cleared.stderr
        assert daemon.get("/status")[1]["instruments"]["ETH-USD"]["resting_orders"] == 0
        stored = asyncio.run(stored_events(pg_dsn, "ETH-USD", seq_before))
        n_cleared = sum(1 for e in stored if e["type"] == "canceled" and e["reason"] == "cleared")
        assert n_cleared > 0  # (GTD orders past their expiry expire first, as for any input)
        assert f"applied ({n_cleared} orders canceled)" in cleared.stderr
        assert cleared.stdout.count('"reason":"cleared"') == n_cleared
        [audit] = [e for e in stored if e["type"] == "cleared"]  # the operator's clear, journaled
        assert (audit["client_id"], audit["orders"]) == ("ops-test", n_cleared)

        # --- a dependency that cannot be reached is named in /readyz, while the daemon is idle
        database = pg_dsn.rpartition("/")[2]
        asyncio.run(_set_reachable(database, False))
        try:
            body = wait_until("postgres in /readyz", lambda: (lambda r: r[0] == 503 and r[1])(daemon.get("/readyz")),
                              daemon)
            assert body["unreachable"] == ["postgres"]
            assert any(p.startswith("postgres: ") for p in body["problems"])
            assert metric(daemon.get("/metrics")[1], "exchange_dependency_up", dependency="postgres") == 0
            assert daemon.get("/healthz")[0] == 200  # alive all the same
        finally:
            asyncio.run(_set_reachable(database, True))
        wait_until("ready again", lambda: daemon.get("/readyz")[0] == 200, daemon)
    finally:
        assert daemon.terminate(timeout=60) == 0, daemon.tail()
    log = (tmp_path / "d.log").read_text()
    assert "dependency unreachable" in log
    assert "dependency reachable again" in log


def test_money_through_the_daemon_admin_deposit_status_and_each_clients_own_balances(
        kafka: KafkaBroker, pg_dsn: str, tmp_path: Path) -> None:
    """Deposits and withdrawals are signed operator actions sent with `exchange admin`; an order the client cannot
    pay for is refused; /status sums the balances; on the events topic each side of a fill sees only its own."""
    spec = Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001", max_qty="1000", balances=True,
                                    maker_fee_bps=1, taker_fee_bps=5)
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 1, f"{topic}.events": 1, f"{topic}.trades": 1, f"{topic}.dlq": 1})
    port = free_port()
    config = write_config(tmp_path / "d.toml", instruments=[spec], bootstrap=kafka.bootstrap_servers, dsn=pg_dsn,
                          topic=topic, group_id=f"g-{topic}", http_port=port)
    daemon = DaemonProcess(config, port, tmp_path / "d.log")
    daemon.start()
    try:
        daemon.wait_ready(timeout=60)
        for client, asset, amount, transfer in (("alice", "USD", "1000.00", "bank-1"), ("bob", "BTC", "1", "bank-2")):
            done = admin(config, "deposit", "BTC-USD", "--client", client, "--asset", asset, "--amount", amount,
                         "--transfer-id", transfer)
            assert done.returncode == 0, done.stderr
            assert '"type":"deposited"' in done.stdout
            assert "applied (deposited)" in done.stderr
        again = admin(config, "deposit", "BTC-USD", "--client", "alice", "--asset", "USD", "--amount", "1000.00",
                      "--transfer-id", "bank-1")
        assert again.returncode == 1
        assert "duplicate_transfer_id" in again.stderr
        assert "deposited 1000.00000 USD for alice at seq 1" in again.stderr

        ts = time.time_ns() // 1_000_000 * 1_000_000
        orders = [
            {"op": "place", "instrument": "BTC-USD", "client_id": "bob", "client_order_id": "b-1", "side": "sell",
             "price": "500.00", "qty": "0.5", "ts_ns": ts},
            {"op": "place", "instrument": "BTC-USD", "client_id": "alice", "client_order_id": "a-1", "side": "buy",
             "price": "500.00", "qty": "0.2", "ts_ns": ts + 1_000_000},
            {"op": "place", "instrument": "BTC-USD", "client_id": "alice", "client_order_id": "a-2", "side": "buy",
             "price": "500.00", "qty": "5", "ts_ns": ts + 2_000_000},  # 2,500 USD: more than alice has
        ]
        asyncio.run(produce(kafka.bootstrap_servers, topic, orders))
        wait_for_seq(pg_dsn, {"BTC-USD": 7}, timeout=60, check=daemon.check_alive)
        events = asyncio.run(stored_events(pg_dsn, "BTC-USD", 3))
        assert [e["type"] for e in events] == ["accepted", "accepted", "filled", "rejected"]
        assert events[-1]["reason"] == "insufficient_funds"

        _, status = daemon.get("/status")
        btc = status["instruments"]["BTC-USD"]
        assert btc["accounts"] == 2
        # alice: 1000 - 100 - 0.05 taker fee; bob: 0.5 BTC reserved + 0.3 resting, 100 - 0.01 maker fee
        assert status["assets"]["USD"] == {"available": "999.94000", "fees": "0.06000", "reserved": "0.00000"}
        assert status["assets"]["BTC"] == {"available": "0.700", "reserved": "0.300"}

        def fills_by_key() -> dict[bytes, list[dict[str, Any]]]:
            import json

            records = asyncio.run(read_topic(kafka.bootstrap_servers, f"{topic}.events", 1, wait_s=5, linger_s=1))
            out: dict[bytes, list[dict[str, Any]]] = {}
            for r in records:
                for e in json.loads(r.value).get("events", []):
                    if e["type"] == "filled":
                        out.setdefault(r.key, []).append(e)
            return out

        fills = wait_until("the fill on the events topic", lambda: len(fills_by_key()) == 2 and fills_by_key(), daemon)
        for key, (fill,) in fills.items():
            assert {b["client_id"] for b in fill["balances"]} == {key.decode()}  # its own, nobody else's
            assert (fill["maker_fee"], fill["taker_fee"]) == ("0.01000", "0.05000")
        assert daemon.terminate(timeout=60) == 0, daemon.tail()
    finally:
        daemon.ensure_stopped()
