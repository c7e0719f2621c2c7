"""PostgreSQL goes away under load: the daemon holds back, retries, and resumes by itself, losing nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from exchange.adapters.generator.flow import OrderFlow
from exchange.core.instruments import Instrument
from tests.integration.conftest import ADMIN_DSN
from tests.integration.daemon import DaemonProcess, free_port, produce, write_config
from tests.integration.expect import encoded, replay_messages, stored_progress, stored_state, wait_for_seq
from tests.support.broker import KafkaBroker

pytestmark = pytest.mark.integration

INSTRUMENTS = (
    Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001", max_qty="1000"),
    Instrument.from_decimals("ETH-USD", tick_size="0.01", lot_size="0.01", max_qty="10000"),
)


async def _set_reachable(database: str, reachable: bool) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {"true" if reachable else "false"}')
        if not reachable:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                               database)
    finally:
        await conn.close()


def test_database_outage_applies_back_pressure_and_recovers(kafka: KafkaBroker, pg_dsn: str,
                                                            tmp_path: Path) -> None:
    database = pg_dsn.rpartition("/")[2]
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 2, f"{topic}.events": 1, f"{topic}.trades": 1, f"{topic}.dlq": 1})
    flow = OrderFlow(INSTRUMENTS, seed=3)
    first: list[dict[str, Any] | bytes] = list(flow.messages(1000))
    second: list[dict[str, Any] | bytes] = list(flow.messages(4000))
    _, expected = replay_messages(first + second, INSTRUMENTS)

    port = free_port()
    # batches of up to 300 events: full ones take the COPY path (over 250 events), small ones the one-statement
    # path, so the outage hits both
    config = write_config(tmp_path / "d.toml", instruments=INSTRUMENTS, bootstrap=kafka.bootstrap_servers,
                          dsn=pg_dsn, topic=topic, group_id=f"g-{topic}", http_port=port, queue_size=100,
                          max_events=300, publish_events=False, journal_queue=2)
    daemon = DaemonProcess(config, port, tmp_path / "d.log")
    asyncio.run(produce(kafka.bootstrap_servers, topic, first))
    daemon.start()
    try:
        daemon.wait_ready(timeout=60)
        _, after_first = replay_messages(first, INSTRUMENTS)
        wait_for_seq(pg_dsn, {s: e[-1].seq for s, e in after_first.items()}, timeout=60, check=daemon.check_alive)

        asyncio.run(_set_reachable(database, False))
        try:
            asyncio.run(produce(kafka.bootstrap_servers, topic, second))
            deadline = time.monotonic() + 30
            while True:  # the outage shows in /readyz, and the consumer pauses once the queues are full
                daemon.check_alive()
                status, body = daemon.get("/readyz")
                _, metrics = daemon.get("/metrics")
                if status == 503 and any("postgres" in p for p in body["problems"]) \
                        and "exchange_consumer_paused 1.0" in metrics:
                    break
                assert time.monotonic() < deadline, f"no degradation visible: {status} {body}\n{daemon.tail()}"
                time.sleep(0.1)
            time.sleep(1.0)  # a while longer with the writer retrying
        finally:
            asyncio.run(_set_reachable(database, True))

        wait_for_seq(pg_dsn, {s: e[-1].seq for s, e in expected.items()}, timeout=90, check=daemon.check_alive)
        status, body = daemon.get("/readyz")
        assert status == 200, body
    finally:
        assert daemon.terminate(timeout=60) == 0, daemon.tail()
    assert asyncio.run(stored_state(pg_dsn))["events"] == encoded(expected)
    assert asyncio.run(stored_progress(pg_dsn)) == {s: e[-1].seq for s, e in expected.items()}
    assert "journal commits resumed" in (tmp_path / "d.log").read_text()
