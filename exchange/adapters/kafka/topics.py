"""The topics the daemon uses: which ones a configuration needs, creating them, checking them at start.

:func:`daemon_topics` names them (orders, dead letters, order events, trades) with their keys;
:func:`create_topics` (``exchange topics create``) creates the missing ones with the admin client and
reports the ones that exist, unchanged; :func:`check_topics` runs at start-up: a topic that is missing
is fatal when the broker does not create topics itself (``auto.create.topics.enable=false``), and a
warning when it just did (with the broker's default partition count). A broker that does not answer
is :func:`broker_unreachable`. Every failure an operator puts right is a :class:`CannotStart`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError

from exchange.ports import CannotStart
from exchange.settings import KafkaSettings, Settings

__all__ = ["ORDERS_TOPIC_CONFIG", "Topic", "TopicReport", "broker_unreachable", "check_topics", "create_topics",
           "daemon_topics", "missing_topics"]

_log = structlog.get_logger("exchange.kafka")

# Kafka error codes in a metadata or CreateTopics answer
_NONE, _UNKNOWN_TOPIC, _LEADER_NOT_AVAILABLE, _TOPIC_AUTHORIZATION_FAILED, _TOPIC_ALREADY_EXISTS = 0, 3, 5, 29, 36
# the orders topic's time is the broker's: operator signatures are checked against it (README: producer contract)
ORDERS_TOPIC_CONFIG: Mapping[str, str] = {"message.timestamp.type": "LogAppendTime"}
_CREATE = "`exchange topics create --partitions N` (README: Running `exchange run` from nothing, step 5)"


@dataclass(frozen=True, slots=True)
class Topic:
    """One topic of the daemon: its name, what it carries and its key."""

    name: str
    role: str  # orders | dead letters | order events | trades
    key: str


@dataclass(frozen=True, slots=True)
class TopicReport:
    """What ``exchange topics create`` did: the topics it created, and the ones that existed (their partitions)."""

    created: tuple[str, ...]
    existing: Mapping[str, int]


def daemon_topics(settings: Settings) -> list[Topic]:
    """The topics this configuration reads and writes: orders and dead letters with the Kafka source, order
    events with the Kafka publisher, trades with it when ``publish_events`` and ``trades_topic`` are set."""
    k = settings.kafka
    topics = []
    if settings.order_source.kind == "kafka":
        topics += [Topic(k.orders_topic, "orders", "instrument"),
                   Topic(k.dead_letter_topic, "dead letters", "the refused message's key")]
    if settings.publisher.kind == "kafka":
        topics.append(Topic(k.events_topic, "order events", "client id"))
        if k.publish_events and k.trades_topic:
            topics.append(Topic(k.trades_topic, "trades", "instrument"))
    return list({t.name: t for t in topics}.values())


def broker_unreachable(bootstrap_servers: str) -> CannotStart:
    """The one line for a Kafka broker that does not answer at start-up (aiokafka's own error log line before it
    names the address it tried and why; raise it ``from`` aiokafka's error)."""
    return CannotStart(
        f"no Kafka broker answers at {bootstrap_servers}: start one there (`make "
        "run-local` starts a local test broker; `docker compose up -d kafka` the compose stack's), or point [kafka] "
        "bootstrap_servers (EXCHANGE_KAFKA_BOOTSTRAP) at a running broker")


async def _admin(kafka: KafkaSettings, options: Mapping[str, Any], timeout_s: float) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, request_timeout_ms=int(timeout_s * 1000),
                                **options)
    try:
        await admin.start()
    except KafkaConnectionError as exc:
        await admin.close()
        raise broker_unreachable(kafka.bootstrap_servers) from exc
    return admin


async def create_topics(kafka: KafkaSettings, topics: Sequence[Topic], *, partitions: int, replication_factor: int,
                        options: Mapping[str, Any], configs: Mapping[str, Mapping[str, str]] | None = None,
                        timeout_s: float = 30.0) -> TopicReport:
    """Create the topics that do not exist yet, with ``partitions`` partitions and ``replication_factor``
    replicas, and ``configs[name]`` (the orders topic: :data:`ORDERS_TOPIC_CONFIG` unless given); leave
    the existing ones as they are and report their partition counts. Raises :class:`CannotStart` for a
    broker that does not answer, ``KafkaError`` for a creation the broker refuses (its code and message)."""
    if partitions < 1 or replication_factor < 1:
        raise ValueError("the partitions and the replication factor must be at least 1")
    configs = dict(configs or {})
    admin = await _admin(kafka, options, timeout_s)
    try:
        existing = await _partitions(admin, set(await admin.list_topics()) & {t.name for t in topics})
        missing = [t for t in topics if t.name not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(t.name, num_partitions=partitions, replication_factor=replication_factor,
                          topic_configs=dict(configs.get(t.name, ORDERS_TOPIC_CONFIG if t.role == "orders" else {})))
                 for t in missing], timeout_ms=int(timeout_s * 1000))
            raced: set[str] = set()
            for entry in response.topic_errors:
                name, code = str(entry[0]), int(entry[1])
                if code == _TOPIC_ALREADY_EXISTS:  # another creator came first
                    raced.add(name)
                elif code != _NONE:
                    message = entry[2] if len(entry) > 2 and entry[2] else ""
                    raise KafkaError(f"the broker refused to create topic {name!r}: error code {code} {message}"
                                     .rstrip())
            existing |= await _partitions(admin, raced)
        return TopicReport(created=tuple(t.name for t in missing if t.name not in existing), existing=existing)
    finally:
        await admin.close()


async def _partitions(admin: AIOKafkaAdminClient, names: set[str]) -> dict[str, int]:
    if not names:
        return {}
    return {str(d["topic"]): len(d["partitions"]) for d in await admin.describe_topics(sorted(names))}


async def check_topics(kafka: KafkaSettings, topics: Sequence[Topic], *, options: Mapping[str, Any],
                       timeout_s: float = 10.0, settle_s: float = 2.0) -> list[str]:
    """At start-up: every topic exists, or the broker has just created it (returned, and logged as a warning:
    it has the broker's default partition count). A topic the broker does not create (auto-creation off)
    or does not let this client see is a :class:`CannotStart` naming it and saying what to do."""
    if not topics:
        return []
    admin = await _admin(kafka, options, timeout_s)
    try:
        present = set(await admin.list_topics())  # a request for all topics never creates one
        missing = [t for t in topics if t.name not in present]
        if not missing:
            return []
        # a metadata request naming them lets a broker with auto.create.topics.enable create them
        codes = await _metadata_codes(admin, [t.name for t in missing])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle_s
        while any(c == _LEADER_NOT_AVAILABLE for c in codes.values()) and loop.time() < deadline:
            await asyncio.sleep(0.1)  # being created
            codes = await _metadata_codes(admin, [t.name for t in missing])
    finally:
        await admin.close()
    refused = missing_topics(kafka.bootstrap_servers, missing, codes)
    if refused is not None:
        raise refused
    created = [t.name for t in missing]
    _log.warning("topics created by the broker on first use, with its default partition count", topics=created,
                 advice=f"create the topics before the first start with {_CREATE}, choosing the partitions")
    return created


async def _metadata_codes(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    return {str(d["topic"]): int(d["error_code"]) for d in await admin.describe_topics(names)}


def missing_topics(bootstrap_servers: str, missing: Sequence[Topic], codes: Mapping[str, int]) -> CannotStart | None:
    """What a metadata request naming the ``missing`` topics answered (error code per topic), as the line that
    stops the start: a topic still unknown means the broker does not create topics itself; one this client may
    not see needs an ACL. None when the broker created them all (error 0, or 5 while it elects leaders)."""
    absent = [t for t in missing if codes.get(t.name, _UNKNOWN_TOPIC) == _UNKNOWN_TOPIC]
    hidden = [t for t in missing if codes.get(t.name) == _TOPIC_AUTHORIZATION_FAILED]
    problems = []
    if absent:
        problems.append(", ".join(f"topic {t.name!r} ({t.role}, key: {t.key})" for t in absent)
                        + (" does" if len(absent) == 1 else " do") + " not exist and the broker at "
                        f"{bootstrap_servers} does not create topics automatically (auto.create.topics.enable="
                        f"false): create {'it' if len(absent) == 1 else 'them'} with {_CREATE}, then start again")
    if hidden:
        problems.append(", ".join(f"topic {t.name!r} ({t.role})" for t in hidden) + ": topic authorization "
                        "failed: grant this client's user Describe, Read and Write on "
                        + ("it" if len(hidden) == 1 else "them"))
    return CannotStart("; ".join(problems)) if problems else None
