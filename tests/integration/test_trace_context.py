"""W3C trace context: an order's ``traceparent`` (and ``tracestate``) reach the records of its events and trades."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from exchange.core.instruments import Instrument
from tests.integration.daemon import DaemonProcess, free_port, read_topic, write_config
from tests.integration.expect import wait_for_seq
from tests.support.broker import KafkaBroker

pytestmark = pytest.mark.integration

BTC = Instrument.from_decimals("BTC-USD", tick_size="0.01", lot_size="0.001", max_qty="1000")
SELL_TRACE = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BUY_TRACE = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
BUY_STATE = b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


async def _produce(bootstrap: str, topic: str, messages: list[tuple[dict[str, Any], list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for msg, headers in messages:
            await (await producer.send(topic, json.dumps(msg).encode(), key=msg["instrument"].encode(),
                                       headers=headers, timestamp_ms=msg["ts_ns"] // 1_000_000))
    finally:
        await producer.stop()


def _events(record: Any) -> list[dict[str, Any]]:
    value = json.loads(record.value)
    return value["events"] if value["type"] == "events" else value["trades"] if value["type"] == "trades" else [value]


@pytest.mark.parametrize("batch_records", [True, False])
def test_an_orders_traceparent_reaches_its_events_and_trades_records(kafka: KafkaBroker, pg_dsn: str, tmp_path: Path,
                                                                     batch_records: bool) -> None:
    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 1, f"{topic}.events": 2, f"{topic}.trades": 1, f"{topic}.dlq": 1})
    ts = time.time_ns() // 1_000_000 * 1_000_000

    def order(client: str, coid: str, side: str, qty: str, n: int) -> dict[str, Any]:
        return {"op": "place", "instrument": "BTC-USD", "client_id": client, "client_order_id": coid, "side": side,
                "price": "500.00", "qty": qty, "ts_ns": ts + n * 1_000_000}

    asyncio.run(_produce(kafka.bootstrap_servers, topic, [
        (order("seller", "s-1", "sell", "1", 0), [("traceparent", SELL_TRACE)]),          # seq 1: accepted
        (order("plain", "p-1", "sell", "1", 1), []),                                     # seq 2: accepted
        (order("buyer", "b-1", "buy", "1.5", 2),                                         # seq 3-5: accepted, 2 fills
         [("traceparent", BUY_TRACE), ("tracestate", BUY_STATE), ("other", b"x")]),
        (order("odd", "o-1", "sell", "0.1", 3), [("traceparent", b"00-not-a-trace")]),     # seq 6: malformed: dropped
        (order("odd", "o-2", "sell", "0.1", 4), [("traceparent", b"\xff" * 55)]),         # seq 7: malformed: dropped
    ]))
    port = free_port()
    config = write_config(tmp_path / "daemon.toml", instruments=(BTC,), bootstrap=kafka.bootstrap_servers,
                          dsn=pg_dsn, topic=topic, group_id=f"g-{topic}", http_port=port,
                          kafka={"batch_records": batch_records})
    daemon = DaemonProcess(config, port, tmp_path / "daemon.log")
    daemon.start()
    try:
        daemon.wait_ready(timeout=60)
        wait_for_seq(pg_dsn, {"BTC-USD": 7}, timeout=60, check=daemon.check_alive)
        # 7 events, the two fills to both sides' keys: 9 on the events topic; 2 trades
        events = asyncio.run(read_topic(kafka.bootstrap_servers, f"{topic}.events", 9, count=lambda r: len(_events(r))))
        trades = asyncio.run(read_topic(kafka.bootstrap_servers, f"{topic}.trades", 2, count=lambda r: len(_events(r))))
    finally:
        assert daemon.terminate(timeout=60) == 0, daemon.tail()

    carried: dict[tuple[str, int], dict[str, bytes]] = {}
    for record in events:
        for event in _events(record):
            carried[(record.key.decode(), event["seq"])] = dict(record.headers)
    assert sorted(carried) == [("buyer", 3), ("buyer", 4), ("buyer", 5), ("odd", 6), ("odd", 7), ("plain", 2),
                               ("plain", 5), ("seller", 1), ("seller", 4)]
    buy = {"traceparent": BUY_TRACE, "tracestate": BUY_STATE}
    assert carried[("seller", 1)] == {"traceparent": SELL_TRACE}
    assert carried[("plain", 2)] == {}
    # the buy's events, the fills sent to the makers' keys among them, carry the buy's context
    assert carried[("buyer", 3)] == carried[("buyer", 4)] == carried[("buyer", 5)] == buy
    assert carried[("seller", 4)] == carried[("plain", 5)] == buy
    assert carried[("odd", 6)] == carried[("odd", 7)] == {}
    for record in trades:
        assert dict(record.headers) == buy
    assert sum(len(_events(r)) for r in trades) == 2
