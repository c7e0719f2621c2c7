"""The composition root: the adapters the settings choose, built and wired to the pipeline.

Everything that knows a concrete adapter lives here; the pipeline and the daemon's lifecycle
(:mod:`exchange.service.daemon`) see only the interfaces of :mod:`exchange.ports`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from exchange.adapters.kafka import KafkaEventPublisher, OrderSource, client_options
from exchange.adapters.postgres import PostgresStore, connect_options
from exchange.adapters.sqlite import SqliteStore
from exchange.pipeline.fanout import FanOut, MemorySink
from exchange.pipeline.loop import InstrumentLoop
from exchange.pipeline.ownership import Ownership
from exchange.ports import Holder, InputLedger, PublishWatermark, Sink, Source, Store
from exchange.settings import Settings
from exchange.telemetry.logging import get_logger
from exchange.telemetry.metrics import Metrics
from exchange.wire.auth import ENV_KEYS, Verifier

__all__ = ["kafka_publisher", "make_fanout", "make_source", "make_store", "store_probe"]


def make_store(settings: Settings, *, engine: bool = False) -> PostgresStore | SqliteStore:
    """The store the settings choose (``[storage] kind``): PostgreSQL or one SQLite file.

    Both implement :class:`~exchange.ports.Store`, :class:`~exchange.ports.History` and
    :class:`~exchange.ports.InputLedger`; PostgreSQL also keeps the publishing watermark. ``engine``: the
    store of an engine process (the daemon, not a tool), which holds a SQLite file exclusively.
    """
    if settings.storage.kind == "sqlite":
        return SqliteStore(settings.storage.path, settings.instruments, snapshot_keep=settings.engine.snapshot_keep,
                           synchronous=settings.storage.synchronous, exclusive=engine)
    return PostgresStore(settings.postgres.dsn, settings.instruments, pool_size=settings.postgres.pool_size,
                         snapshot_keep=settings.engine.snapshot_keep,
                         connect_options=connect_options(settings.postgres))


def store_probe(store: Store) -> tuple[str, Callable[[], Awaitable[Any]]] | None:
    """The store's reachability check for /readyz, by dependency name (a local SQLite file has none)."""
    return ("postgres", store.ping) if isinstance(store, PostgresStore) else None


def kafka_publisher(settings: Settings, store: Store, metrics: Metrics) -> KafkaEventPublisher | None:
    """The Kafka producer (events, order states, trades, dead letters) when ``[publisher] kind = "kafka"``."""
    s = settings
    if s.publisher.kind != "kafka":
        return None
    return KafkaEventPublisher(bootstrap_servers=s.kafka.bootstrap_servers, events_topic=s.kafka.events_topic,
                               instruments=s.instrument_map(), publish_events=s.kafka.publish_events,
                               client_options=client_options(s.kafka), metrics=metrics,
                               order_states=store.order_states, trades_topic=s.kafka.trades_topic,
                               batch_records=s.kafka.batch_records, max_record_bytes=s.kafka.max_record_bytes)


def make_fanout(settings: Settings, store: Store, kafka: KafkaEventPublisher | None, memory: MemorySink | None,
                metrics: Metrics, *, ownership: Ownership | None = None) -> FanOut | None:
    """The fan-out task's set-up; None when nothing is published (no Kafka events, no market data).

    Market data goes to Redis or to the in-process bus ``memory``; either way the channel and key names,
    depth, refresh and heartbeat come from ``[redis]``. The bus keeps nothing across a restart (its
    consumers start from the book key), so it alone needs no watermark and nothing is re-published.
    """
    r = settings.redis
    if kafka is None or not settings.kafka.publish_events:
        kafka = None
    sink: Sink | None = memory
    if r.enabled:
        from exchange.adapters.redis import RedisSink

        sink = RedisSink(r)
    if kafka is None and sink is None:
        return None
    if sink is not None:
        metrics.marketdata_up.set(1)
    needs_watermark = kafka is not None or r.enabled
    watermark = store if needs_watermark and isinstance(store, PublishWatermark) else None
    return FanOut(settings.instrument_map(), kafka=kafka, sink=sink,
                  names=r.channel, depth=r.book_depth, queue_size=settings.journal.publish_queue_size,
                  heartbeat_s=r.heartbeat_interval_s, book_refresh_s=r.book_refresh_ms / 1000,
                  progress=watermark, metrics=metrics, ownership=ownership)


def make_source(settings: Settings, *, loops: Mapping[str, InstrumentLoop],
                applied_offsets: dict[tuple[str, str, int], int], publisher: KafkaEventPublisher | None,
                store: Store, metrics: Metrics, admin_keys: Mapping[str, bytes],
                on_caught_up: Callable[[], None], holder: Holder | None = None, ownership: Ownership | None = None,
                on_fatal: Callable[[BaseException], None] | None = None) -> Source:
    """The order source the settings choose: the Kafka consumer group (it takes the instruments of the partitions
    the group assigns through ``holder``), or the in-process generator (its instruments are taken already)."""
    s = settings
    specs = s.instrument_map()
    if s.order_source.kind == "generator":
        from exchange.adapters.generator.source import GeneratorSource

        return GeneratorSource(loops=loops, instruments=specs, applied_offsets=applied_offsets,
                               seed=s.order_source.seed, rate=s.order_source.rate,
                               clients=s.order_source.clients, metrics=metrics, on_caught_up=on_caught_up)
    assert publisher is not None, "the settings require the Kafka publisher with the Kafka source"
    verifier = Verifier(admin_keys)
    log = get_logger("exchange.daemon")
    if verifier.key_ids:
        log.info("operator actions: signed ones are applied", key_ids=verifier.key_ids)
    else:
        log.warning(f"no operator keys ({ENV_KEYS}): halt, resume, clear and snapshot requests are "
                    "refused (not_authorized); set it to key_id:secret to allow signed ones")
    return OrderSource(
        bootstrap_servers=s.kafka.bootstrap_servers, topic=s.kafka.orders_topic,
        group_id=s.kafka.group_id, loops=loops, instruments=specs, applied_offsets=applied_offsets,
        publisher=publisher, dead_letter_topic=s.kafka.dead_letter_topic, metrics=metrics,
        client_options={**client_options(s.kafka), "session_timeout_ms": s.kafka.session_timeout_ms,
                        "fetch_max_wait_ms": s.kafka.fetch_max_wait_ms,
                        "heartbeat_interval_ms": s.kafka.heartbeat_interval_ms},
        on_caught_up=on_caught_up, verifier=verifier, max_message_bytes=s.kafka.max_message_bytes,
        ledger=store if isinstance(store, InputLedger) else None, holder=holder, ownership=ownership,
        on_fatal=on_fatal)
