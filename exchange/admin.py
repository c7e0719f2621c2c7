"""``exchange admin``: operator actions, sent in order with the instrument's orders.

An action is a message on the orders topic keyed by the instrument, exactly as
an order for that instrument would be, so it lands in the same partition and
the instrument's loop applies it between the same two orders in every run,
recovery and replay (see the README for why not a separate topic):

- ``halt`` / ``resume``: ``{"op": "halt", "instrument", "client_id": operator, "text"}``;
- ``cancel-all``: ``{"op": "clear", "instrument"}`` (every order, reason
  ``cleared``), or with ``--client`` ``{"op": "cancel_all", "instrument", "client_id"}``;
- ``snapshot``: ``{"op": "snapshot", "instrument"}``.

Then it waits (``--timeout``) until the daemon's consumer group has committed
an offset past the message, which the daemon does only once the command is
durable, and prints the events it caused from the events topic (their
``ts_ns`` is the message's timestamp).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from exchange.adapters.kafka import client_options
from exchange.codec import encode, parse_json
from exchange.settings import Settings

__all__ = ["ACTIONS", "AdminOutcome", "admin_message", "run_admin"]

ACTIONS = ("halt", "resume", "snapshot", "cancel-all")


@dataclass(frozen=True, slots=True)
class AdminOutcome:
    applied: bool  # the daemon committed past the message: it was applied and is durable
    partition: int
    offset: int
    events: list[dict[str, Any]]


def admin_message(action: str, instrument: str, *, operator: str, client: str | None = None,
                  text: str = "") -> dict[str, Any]:
    """The wire message for one action (see the module docstring)."""
    if action in ("halt", "resume"):
        return {"op": action, "instrument": instrument, "client_id": operator, "text": text}
    if action == "snapshot":
        return {"op": "snapshot", "instrument": instrument}
    if action == "cancel-all":
        if client:
            return {"op": "cancel_all", "instrument": instrument, "client_id": client}
        return {"op": "clear", "instrument": instrument}
    raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")


def _wanted(message: dict[str, Any], ts_ns: int) -> Callable[[dict[str, Any]], bool]:
    """Which events on the events topic this message caused."""
    op, instrument = message["op"], message["instrument"]

    def match(event: dict[str, Any]) -> bool:
        if event.get("instrument") != instrument or event.get("ts_ns") != ts_ns:
            return False
        kind = event.get("type")
        if kind == "rejected":
            return bool(event.get("command") == op and event.get("seq"))
        if op in ("halt", "resume"):
            return bool(kind == ("halted" if op == "halt" else "resumed"))
        if op == "clear":
            return bool(kind == "canceled" and event.get("reason") == "cleared")
        if op == "cancel_all":
            return bool(kind == "canceled" and event.get("reason") == "requested"
                        and event.get("client_id") == message["client_id"])
        return False

    return match


async def _read(consumer: AIOKafkaConsumer, match: Callable[[dict[str, Any]], bool],
                timeout_ms: int) -> list[dict[str, Any]]:
    out = []
    for records in (await consumer.getmany(timeout_ms=timeout_ms)).values():
        for record in records:
            try:
                value = parse_json(record.value)
            except ValueError:
                continue
            # the daemon batches a client's events of a publishing round into one record
            events = value.get("events", ()) if value.get("type") == "events" else (value,)
            out += [event for event in events if isinstance(event, dict) and match(event)]
    return out


async def _read_to_end(consumer: AIOKafkaConsumer, partitions: list[TopicPartition],
                       match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Read until every partition's position has reached its current end and a fetch brings nothing new."""
    if not partitions:
        return []
    ends = await consumer.end_offsets(partitions)
    out: list[dict[str, Any]] = []
    while True:
        got = await _read(consumer, match, 200)
        out += got
        positions = [await consumer.position(tp) for tp in partitions]
        if not got and all(pos >= ends[tp] for pos, tp in zip(positions, partitions, strict=True)):
            return out


async def run_admin(settings: Settings, message: dict[str, Any], *, timeout_s: float = 30.0) -> AdminOutcome:
    """Send ``message`` and wait for the daemon to apply it; see the module docstring."""
    k = settings.kafka
    options = client_options(k)
    events_consumer = AIOKafkaConsumer(bootstrap_servers=k.bootstrap_servers, enable_auto_commit=False,
                                       fetch_max_wait_ms=k.fetch_max_wait_ms, **options)
    group = AIOKafkaConsumer(bootstrap_servers=k.bootstrap_servers, group_id=k.group_id, enable_auto_commit=False,
                             **options)  # never subscribes: only reads the daemon group's committed offsets
    producer = AIOKafkaProducer(bootstrap_servers=k.bootstrap_servers, acks="all", **options)
    await events_consumer.start()
    await group.start()
    await producer.start()
    try:
        await events_consumer.topics()  # fresh metadata, so partitions_for_topic knows the events topic
        partitions = [TopicPartition(k.events_topic, p)
                      for p in sorted(events_consumer.partitions_for_topic(k.events_topic) or ())]
        events_consumer.assign(partitions)
        if partitions:
            ends = await events_consumer.end_offsets(partitions)
            for tp in partitions:
                events_consumer.seek(tp, ends[tp])
        ts_ms = time.time_ns() // 1_000_000
        meta = await producer.send_and_wait(k.orders_topic, encode(message), key=message["instrument"].encode(),
                                            timestamp_ms=ts_ms)
        sent = TopicPartition(k.orders_topic, meta.partition)
        match = _wanted(message, ts_ms * 1_000_000)
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        applied = False
        while time.monotonic() < deadline:
            if not applied:
                committed = await group.committed(sent)
                applied = committed is not None and committed > meta.offset
            events += await _read(events_consumer, match, 200)
            if applied:
                # the daemon commits an input offset only after the batch's events were published:
                # everything the message caused is on the events topic now
                events += await _read_to_end(events_consumer, partitions, match)
                break
            await asyncio.sleep(0.1)
        return AdminOutcome(applied, meta.partition, meta.offset, events)
    finally:
        for client in (producer, group, events_consumer):
            await client.stop()
