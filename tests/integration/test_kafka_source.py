"""The order source's dependency probe against a real broker: up, then stopped."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import aiokafka.client
import pytest
from aiokafka.errors import KafkaError

from exchange.adapters.kafka import OrderSource
from tests.support.broker import KafkaBroker

pytestmark = pytest.mark.integration


def test_probe_passes_while_the_broker_answers_and_fails_within_its_timeout_once_it_is_gone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def every_topic(*_: Any) -> None:
        raise AssertionError("the probe asked for every topic's metadata: that grows with the cluster")

    monkeypatch.setattr(aiokafka.client.AIOKafkaClient, "fetch_all_metadata", every_topic)

    async def scenario(broker: KafkaBroker) -> None:
        source = OrderSource(bootstrap_servers=broker.bootstrap_servers, topic="orders", group_id="probe",
                             loops={}, instruments={}, applied_offsets={}, publisher=cast(Any, None),
                             dead_letter_topic="orders.dlq", client_options={"session_timeout_ms": 1000})
        await source.start()
        try:
            await source.probe(10.0)  # the first finds the coordinator
            started = time.monotonic()
            await source.probe(2.0)
            assert time.monotonic() - started < 1.0
            broker.stop()
            started = time.monotonic()
            with pytest.raises((TimeoutError, KafkaError, OSError)):
                await source.probe(1.0)
            assert time.monotonic() - started < 3.0
        finally:
            await source.stop()

    with KafkaBroker() as broker:
        broker.create_topics({"orders": 2})
        asyncio.run(scenario(broker))
