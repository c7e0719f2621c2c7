"""The daemon as a separate process: Kafka in, PostgreSQL durable, exact results, clean shutdown."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from exchange.adapters.generator.flow import OrderFlow
from exchange.core.events import OrderFilled, OrderRejected
from exchange.core.instruments import Instrument
from exchange.core.types import RejectReason
from tests.integration.daemon import DaemonProcess, free_port, produce, read_topic, write_config
from tests.integration.expect import encoded, replay_messages, stored_state, wait_for_seq
from tests.support.broker import KafkaBroker
from tests.support.verify import verify

pytestmark = pytest.mark.integration

INSTRUMENTS = (
    Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001", max_qty="1000",
                             price_band_bps=300, stp_default="cancel_resting"),
    Instrument.from_decimals("ETH-USD", tick_size="0.01", lot_size="0.01", max_qty="10000"),
    Instrument.from_decimals("SOL-USD", tick_size="0.001", lot_size="1", max_qty="100000",
                             stp_default="cancel_both"),
)


def _events_in(record: Any) -> int:
    value = json.loads(record.value)
    return len(value["events"]) if value["type"] == "events" else 1


def test_daemon_applies_stores_publishes_and_stops_cleanly(kafka: KafkaBroker, pg_dsn: str,
                                                            tmp_path: Path) -> None:
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 3, f"{topic}.events": 3, f"{topic}.trades": 1, f"{topic}.dlq": 1})
    messages: list[dict[str, Any] | bytes] = list(OrderFlow(INSTRUMENTS, seed=11, malformed_every=500).messages(3000))
    messages[100:100] = [b"this is not json", b'{"op": "place", "client_id": "zed"}']
    asyncio.run(produce(kafka.bootstrap_servers, topic, messages))
    _, expected = replay_messages(messages, INSTRUMENTS)

    port = free_port()
    config = write_config(tmp_path / "daemon.toml", instruments=INSTRUMENTS, bootstrap=kafka.bootstrap_servers,
                          dsn=pg_dsn, topic=topic, group_id=f"g-{topic}", http_port=port,
                          snapshot_interval_s=0.5)
    daemon = DaemonProcess(config, port, tmp_path / "daemon.log")
    daemon.start()
    try:
        daemon.wait_ready(timeout=60)
        wait_for_seq(pg_dsn, {sym: evs[-1].seq for sym, evs in expected.items()}, timeout=120,
                     check=daemon.check_alive)
        status, body = daemon.get("/status")
        assert status == 200
        assert body["instruments"]["BTC-USD"]["seq"] == expected["BTC-USD"][-1].seq
        status, metrics = daemon.get("/metrics")
        assert "exchange_events_total" in metrics
    finally:
        code = daemon.terminate(timeout=60)
    assert code == 0, daemon.tail()
    log = [json.loads(line) for line in (tmp_path / "daemon.log").read_text().splitlines() if line.startswith("{")]
    summaries = [entry for entry in log if entry.get("event") == "stopped"]
    assert len(summaries) == 1, daemon.tail()

    state = asyncio.run(stored_state(pg_dsn))
    assert state["events"] == encoded(expected)
    report = asyncio.run(verify(pg_dsn, INSTRUMENTS))
    assert report.ok, report.render()
    cli = subprocess.run([sys.executable, "-m", "exchange", "recover", "--verify", "--config", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "verdict: OK" in cli.stdout

    # undecodable and unknown-instrument messages went to the dead-letter topic; the identifiable
    # sender of a malformed message got a rejection on the events topic
    n_bad = 2 + sum(1 for m in messages if isinstance(m, dict) and m.get("instrument") == "NOPE-USD")
    dead = asyncio.run(read_topic(kafka.bootstrap_servers, f"{topic}.dlq", n_bad))
    assert len(dead) == n_bad
    assert all(dict(r.headers).get("reason") for r in dead)
    published = sum(len({e.maker_client_id, e.taker_client_id}) if isinstance(e, OrderFilled) else 1
                    for evs in expected.values() for e in evs)
    duplicates = [e for evs in expected.values() for e in evs
                  if isinstance(e, OrderRejected) and e.reason is RejectReason.DUPLICATE_CLIENT_ORDER_ID]
    assert duplicates, "the flow should resubmit some orders"
    records = asyncio.run(read_topic(kafka.bootstrap_servers, f"{topic}.events", published + 1 + len(duplicates),
                                    count=_events_in))
    # a record carries one client's events of a publishing round ({"type": "events", "events": [...]})
    keyed = [(r.key.decode(), v) for r in records
             for v in (lambda obj: obj["events"] if obj["type"] == "events" else [obj])(json.loads(r.value))]
    assert sum(1 for _, v in keyed if v["seq"] > 0 and v["type"] != "order_status") == published
    assert all(key in (v.get("client_id"), v.get("maker_client_id"), v.get("taker_client_id"))
               for key, v in keyed if v["type"] != "order_status")
    # a resubmitted order is rejected, and its sender hears the original order's state again
    statuses = {(key, v["order_id"]) for key, v in keyed if v["type"] == "order_status"}
    assert {(d.client_id, d.order_id) for d in duplicates} <= statuses
    rejections = [v for key, v in keyed if key == "zed"]
    assert rejections, "the sender of a malformed order got no rejection"
    assert rejections[0]["type"] == "rejected"
    assert rejections[0]["seq"] == 0
