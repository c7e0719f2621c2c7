"""Catch-up is kept out of the live order latency (``exchange.service.daemon.Daemon._on_durable``).

Orders that were already in the orders topic when the daemon was assigned its partitions (a
restart's replay, or what waited while no daemon ran) are timed from their Kafka timestamp: their
latency is how long they waited, so they go to ``exchange_catchup_latency_seconds``, and
``exchange_order_latency_seconds`` counts only what arrived while the daemon was reading.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from exchange.adapters.generator.flow import OrderFlow
from tests.integration.daemon import DaemonProcess, free_port, produce, write_config
from tests.integration.expect import replay_messages, wait_for_seq
from tests.integration.test_operations import INSTRUMENTS, metric
from tests.support.broker import KafkaBroker

pytestmark = pytest.mark.integration


def test_orders_waiting_before_the_start_are_catch_up_and_later_ones_live(kafka: KafkaBroker, pg_dsn: str,
                                                                         tmp_path: Path) -> None:
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 2, f"{topic}.events": 1, f"{topic}.dlq": 1})
    messages: list[dict[str, Any] | bytes] = list(OrderFlow(INSTRUMENTS, seed=7).messages(400))
    waiting, live = messages[:200], messages[200:]
    _, expected_waiting = replay_messages(waiting, INSTRUMENTS)
    _, expected_all = replay_messages(messages, INSTRUMENTS)
    # before any daemon reads the topic. The test broker's end_offsets() is the base offset of a partition's last
    # record batch + 1 (Apache Kafka's is the log end): the last records go one batch each, so that it is the end
    bulk = asyncio.run(produce(kafka.bootstrap_servers, topic, waiting[:-10]))
    alone = {p for msg in waiting[-10:] for p in asyncio.run(produce(kafka.bootstrap_servers, topic, [msg]))}
    assert alone >= set(bulk), "every partition ends with a record of its own"

    port = free_port()
    config = write_config(tmp_path / "d.toml", instruments=INSTRUMENTS, bootstrap=kafka.bootstrap_servers,
                          dsn=pg_dsn, topic=topic, group_id=f"g-{topic}", http_port=port)
    daemon = DaemonProcess(config, port, tmp_path / "d.log")
    daemon.start()
    try:
        daemon.wait_ready(timeout=60)
        wait_for_seq(pg_dsn, {s: e[-1].seq for s, e in expected_waiting.items()}, timeout=60,
                     check=daemon.check_alive)
        text = daemon.get("/metrics")[1]
        catchup = metric(text, "exchange_catchup_latency_seconds_count")
        # one observation per command that caused events, all of them catch-up
        assert len(waiting) * 0.9 < catchup <= len(waiting)
        assert metric(text, "exchange_order_latency_seconds_count") == 0

        asyncio.run(produce(kafka.bootstrap_servers, topic, live))
        wait_for_seq(pg_dsn, {s: e[-1].seq for s, e in expected_all.items()}, timeout=60, check=daemon.check_alive)
        text = daemon.get("/metrics")[1]
        assert metric(text, "exchange_catchup_latency_seconds_count") == catchup
        assert len(live) * 0.9 < metric(text, "exchange_order_latency_seconds_count") <= len(live)
    finally:
        assert daemon.terminate(timeout=60) == 0, daemon.tail()
