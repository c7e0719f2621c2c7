"""``exchange admin``: operator actions, sent in order with the instrument's orders.

An action is a message on the orders topic keyed by the instrument and sent to
the instrument's partition (murmur2 of the key, as for its orders: the same
:func:`~exchange.adapters.kafka.partition_for` the daemon checks), so the
instrument's loop applies it between the same two orders in every run, recovery
and replay (see the README for why not a separate topic):

- ``halt`` / ``resume``: ``{"op": "halt", "instrument", "client_id": operator, "text"}``;
- ``cancel-all``: ``{"op": "clear", "instrument", "client_id": operator, "text"}``
  (every order, reason ``cleared``), or with ``--client``
  ``{"op": "cancel_all", "instrument", "client_id": client, "operator"}``;
- ``snapshot``: ``{"op": "snapshot", "instrument", "client_id": operator}``;
- ``deposit`` / ``withdraw`` (money in and out of a client's balances, on an instrument that keeps
  them): ``{"op": "deposit", "instrument", "client_id": client, "asset", "amount", "transfer_id"}``.

Every action is signed (:mod:`exchange.wire.auth`) with a key from
``EXCHANGE_ADMIN_KEYS`` (``--key-id`` picks one when there are several), its
signing time the message's Kafka timestamp. Then it waits (``--timeout``) until
the daemon's consumer group has committed an offset past the message, which the
daemon does only once the command is durable, and prints the events it caused
from the events topic (their ``ts_ns`` is the message's timestamp).

``accept-offset`` is different: it is for an orders partition the daemon does not
read because its log lost data (``/readyz`` names it). It records the operator's
request to continue that partition from a stated offset in the store, waits
until the daemon has applied (or refused) it, and prints the outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from exchange.adapters.kafka import client_options, partition_for
from exchange.ports import InputLedger, InputReset
from exchange.settings import ConfigError, Settings
from exchange.wire.auth import ENV_KEYS, parse_keys, sign
from exchange.wire.codec import encode, parse_json

__all__ = ["ACTIONS", "AdminOutcome", "admin_message", "run_accept_offset", "run_admin", "signing_key"]

ACTIONS = ("halt", "resume", "snapshot", "cancel-all", "deposit", "withdraw")


@dataclass(frozen=True, slots=True)
class AdminOutcome:
    applied: bool  # the daemon committed past the message: it was applied and is durable
    partition: int
    offset: int
    events: list[dict[str, Any]]


def admin_message(action: str, instrument: str, *, operator: str, client: str | None = None,
                  text: str = "", asset: str | None = None, amount: str | None = None,
                  transfer_id: str | None = None) -> dict[str, Any]:
    """The wire message for one action (see the module docstring), unsigned."""
    if action in ("deposit", "withdraw"):
        if not (client and asset and amount and transfer_id):
            raise ValueError(f"{action} needs a client, an asset, an amount and a transfer id")
        return {"op": action, "instrument": instrument, "client_id": client, "asset": asset, "amount": amount,
                "transfer_id": transfer_id}
    if action in ("halt", "resume"):
        return {"op": action, "instrument": instrument, "client_id": operator, "text": text}
    if action == "snapshot":
        return {"op": "snapshot", "instrument": instrument, "client_id": operator}
    if action == "cancel-all":
        if client:
            return {"op": "cancel_all", "instrument": instrument, "client_id": client, "operator": operator}
        return {"op": "clear", "instrument": instrument, "client_id": operator, "text": text}
    raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")


def operator_name(given: str | None, env: Mapping[str, str]) -> str:
    """Who asks, as journaled with the action: ``--operator``, else ``$USER``, else ``$LOGNAME``; never a guess."""
    if given is not None:
        if not given.strip():
            raise ConfigError("--operator is empty: pass who asks, e.g. --operator alice (it is journaled with the "
                              "action)")
        return given.strip()
    for name in (env.get("USER"), env.get("LOGNAME")):
        if name is not None and name.strip():
            return name.strip()
    raise ConfigError("who is asking? $USER and $LOGNAME are both unset: pass --operator NAME (it is journaled "
                      "with the action)")


def signing_key(env: Mapping[str, str], key_id: str | None) -> tuple[str, bytes]:
    """The key ``exchange admin`` signs with: ``key_id``, or the only one in ``EXCHANGE_ADMIN_KEYS``."""
    keys = parse_keys(env.get(ENV_KEYS))
    if not keys:
        raise ConfigError(f"{ENV_KEYS} is not set: operator actions must be signed with a key the daemon also has "
                          "(key_id:secret)")
    if key_id is None:
        if len(keys) > 1:
            raise ConfigError(f"{ENV_KEYS} holds several keys ({', '.join(sorted(keys))}): pick one with --key-id")
        key_id = next(iter(keys))
    if key_id not in keys:
        raise ConfigError(f"--key-id {key_id!r} is not in {ENV_KEYS} ({', '.join(sorted(keys))})")
    return key_id, keys[key_id]


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
            return bool(kind == "cleared" or (kind == "canceled" and event.get("reason") == "cleared"))
        if op == "cancel_all":
            return bool(kind == "canceled" and event.get("reason") == "requested"
                        and event.get("client_id") == message["client_id"])
        if op in ("deposit", "withdraw"):
            return bool(kind == ("deposited" if op == "deposit" else "withdrawn")
                        and event.get("transfer_id") == message["transfer_id"])
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


async def run_admin(settings: Settings, message: dict[str, Any], *, timeout_s: float = 30.0,
                    key: tuple[str, bytes] | None = None) -> AdminOutcome:
    """Sign ``message`` with ``key`` (unsigned if None), send it to its instrument's partition and wait for the
    daemon to apply it; see the module docstring."""
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
        if key is not None:
            message = sign(message, key[0], key[1], ts_ms)
        parts = sorted(await producer.partitions_for(k.orders_topic))
        meta = await producer.send_and_wait(k.orders_topic, encode(message), key=message["instrument"].encode(),
                                            partition=parts[partition_for(message["instrument"], len(parts))],
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


async def run_accept_offset(ledger: InputLedger, topic: str, partition: int, offset: int, *, operator: str,
                            reason: str, timeout_s: float = 30.0) -> InputReset:
    """Record the request and wait until the daemon decided it (status ``applied`` or ``refused``); the
    request as it then stands (still ``requested`` if no daemon decided it in time)."""
    reset = await ledger.request_input_reset(topic, partition, offset, operator, reason)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        for row in await ledger.input_resets(topic, pending=False):
            if row.id == reset.id and row.status != "requested":
                return row
    return reset
