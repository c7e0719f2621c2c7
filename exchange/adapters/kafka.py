"""Kafka at the edges: the order source (consumer) and the event publisher (producer).

:class:`OrderSource` consumes the orders topic as a member of a consumer group.
Each message is decoded and validated here, at the edge, and put on its
instrument's bounded queue. When a queue is full the source pauses its
partitions and keeps polling (so the group does not evict it) until there is
room again. Offsets are committed to Kafka only once the commands they carried
are durable (see :mod:`exchange.offsets`).

Operator actions travel in the same topic, keyed by instrument like its orders,
so each lands between exactly the same two orders in every replay: ``halt``,
``resume``, ``clear`` and ``cancel_all`` are commands like any other;
``{"op": "snapshot", "instrument": ...}`` puts a snapshot request in the
instrument's queue (a snapshot is an optimisation: it needs no durability of
its own, its offset counts as done at once).

Messages that cannot become a command go to the dead-letter topic with the
reason in headers; when the sender can be identified, it also gets an
unsequenced ``rejected`` event (seq 0) on the events topic. Neither stops the
consumer.

:class:`KafkaEventPublisher` publishes durable events to the order-events topic,
keyed by client id so that each client's events stay in order (a fill goes to
both its maker's and its taker's key), and every fill to the trades topic keyed
by instrument. It is driven by :class:`exchange.fanout.Publisher`, off the
commit path. When an order is resubmitted (same client
order id), the duplicate is rejected and the sender also gets an
``order_status`` message with the original order's current state, so a producer
that retried learns the outcome of its first submission.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from exchange.codec import WireEncoder, WireError, decode_command, encode, event_to_wire, parse_json
from exchange.engine import Control, Inbound, InstrumentLoop
from exchange.events import OrderFilled, OrderRejected
from exchange.instruments import Instrument
from exchange.journal import Applied, Batch, InputPosition
from exchange.logging import get_logger
from exchange.offsets import OffsetTracker, start_offset
from exchange.settings import KafkaSettings
from exchange.types import RejectReason

__all__ = ["KafkaEventPublisher", "OrderSource", "OrderStates", "client_options"]

OrderStates = Callable[[str, Sequence[int]], Awaitable[list[dict[str, Any]]]]

def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """The aiokafka keyword arguments for authentication and TLS, from ``[kafka]`` settings.

    Shared by the consumer, the producer and ``exchange admin``. SASL credentials
    (PLAIN or SCRAM) are sent only with ``SASL_*`` protocols; the TLS context is
    built only with ``SSL``/``SASL_SSL``: the system CAs unless ``ssl_cafile``,
    a client certificate for mutual TLS when ``ssl_certfile`` is set.
    """
    protocol = kafka.security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        options.update(sasl_mechanism=kafka.sasl_mechanism, sasl_plain_username=kafka.sasl_username,
                       sasl_plain_password=kafka.sasl_password)
    if protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        context = create_ssl_context(cafile=kafka.ssl_cafile or None, certfile=kafka.ssl_certfile or None,
                                     keyfile=kafka.ssl_keyfile or None)
        context.check_hostname = kafka.ssl_check_hostname
        options["ssl_context"] = context
    return options


_POLL_MS = 50
_log = get_logger("exchange.kafka")
_PER_RECORD = 200  # events per batched record: well under the producer's 256 KiB batches
_YIELD_EVERY = 1000  # encoded events between yields to the event loop
_ROUTE_SLICE = 200  # records routed between yields to the event loop
_MAX_RECORDS = 1000  # per poll: bounds how long routing holds the event loop (a few ms)


class OrderSource:
    wall_clock_timestamps = True  # a command's ts_ns is its Kafka message time, set by the producer

    def __init__(self, *, bootstrap_servers: str, topic: str, group_id: str,
                 loops: Mapping[str, InstrumentLoop], instruments: Mapping[str, Instrument],
                 applied_offsets: Mapping[tuple[str, str, int], int], publisher: KafkaEventPublisher,
                 dead_letter_topic: str, client_options: Mapping[str, Any] | None = None,
                 commit_interval_s: float = 1.0, metrics: Any = None,
                 on_caught_up: Callable[[], None] | None = None) -> None:
        self._bootstrap = bootstrap_servers
        self.topic = topic
        self._group_id = group_id
        self._loops = loops
        self._specs = instruments
        self._applied = dict(applied_offsets)  # (instrument, topic, partition) -> last applied offset
        self._publisher = publisher
        self._dlq = dead_letter_topic
        self._options = dict(client_options or {})
        self._commit_interval_s = commit_interval_s
        self._metrics = metrics
        self._on_caught_up = on_caught_up
        self._log = get_logger("exchange.source", topic=topic)
        self.tracker = OffsetTracker()
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        self._paused = False
        self._committed: dict[tuple[str, int], int] = {}
        self._replay_until: dict[tuple[str, int], int] = {}  # end offsets seen at assignment
        self._replay_started = 0.0
        self._next_progress_log = 0.0
        self._position: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self.consumed = 0
        self.replayed = 0
        self.skipped = 0
        self.dead_lettered = 0
        self.caught_up = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._consumer is not None:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=self._group_id,
            **{"enable_auto_commit": False, "auto_offset_reset": "earliest", "fetch_max_wait_ms": 10,
               "max_poll_records": 1000, **self._options},
        )
        await consumer.start()
        consumer.subscribe([self.topic], listener=_Rebalance(self))
        self._consumer = consumer

    def stop_consuming(self) -> None:
        """Stop taking new messages; ``run`` returns after the current one."""
        self._stopping.set()

    async def stop(self) -> None:
        """Commit what is durable and leave the group (safe to call twice)."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            await self._commit(consumer)
        finally:
            await consumer.stop()

    # ---------------------------------------------------------------- running

    async def run(self) -> None:
        """Consume until :meth:`stop_consuming`; commits durable offsets every ``commit_interval_s``."""
        consumer = self._consumer
        assert consumer is not None, "start() first"
        next_commit = time.monotonic() + self._commit_interval_s
        metrics = self._metrics
        while not self._stopping.is_set():
            records = await consumer.getmany(timeout_ms=_POLL_MS, max_records=_MAX_RECORDS)
            if records and metrics is not None:
                now_ms = time.time() * 1000
                for batch in records.values():
                    metrics.consume_delay.observe(max(0.0, now_ms - batch[0].timestamp) / 1000)
            routed = 0
            for tp, batch in records.items():
                for record in batch:
                    pending = self._route(consumer, tp, record)
                    if pending is not None:
                        await pending
                    if self._stopping.is_set():
                        break
                    routed += 1
                    if routed % _ROUTE_SLICE == 0:
                        await asyncio.sleep(0)  # let the journal writer's round trips through
            if not self.caught_up:
                self._check_caught_up(consumer)
            now = time.monotonic()
            if now >= next_commit:
                await self._commit(consumer)
                next_commit = now + self._commit_interval_s

    def _route(self, consumer: AIOKafkaConsumer, tp: TopicPartition, record: Any) -> Coroutine[Any, Any, None] | None:
        """Decode one record and queue it; returns the work still to await, if any (None on the fast path)."""
        key = (tp.topic, tp.partition)
        if record.offset < self._position.get(key, 0):
            # already routed once (fetched again after a seek): applying it twice would duplicate its events
            self.skipped += 1
            return None
        if not self.consumed:
            self._log.info("first message consumed", partition=tp.partition, offset=record.offset)
        self.consumed += 1
        self._position[key] = record.offset + 1
        ts_ns = record.timestamp * 1_000_000
        try:
            msg = parse_json(record.value)
            if msg.get("op") == "snapshot":
                return self._snapshot_request(key, record, msg, ts_ns)
            command = decode_command(msg, self._specs, ts_ns=ts_ns)
        except WireError as exc:
            self.tracker.skipped(key, record.offset)
            return self._refuse(record, exc.text, exc.client_id, exc.client_order_id, exc.instrument,
                                RejectReason.MALFORMED, ts_ns)
        loop = self._loops.get(command.instrument or "")
        if loop is None:
            self.tracker.skipped(key, record.offset)
            if command.instrument is None:
                text, reason = "cancel_all needs an instrument here: orders are keyed by instrument", \
                    RejectReason.MALFORMED
            else:
                text, reason = f"unknown instrument {command.instrument!r}", RejectReason.UNKNOWN_INSTRUMENT
            return self._refuse(record, text, getattr(command, "client_id", None),
                                getattr(command, "client_order_id", None), command.instrument, reason, ts_ns)
        if record.offset <= self._applied.get((loop.symbol, tp.topic, tp.partition), -1):
            self.skipped += 1  # applied and durable before the restart
            self.tracker.skipped(key, record.offset)
            return None
        if not self.caught_up:
            self.replayed += 1
        self.tracker.dispatched(key, record.offset)
        item = Inbound(command, InputPosition(tp.topic, tp.partition, record.offset))
        try:
            loop.queue.put_nowait(item)
            return None
        except asyncio.QueueFull:
            return self._wait_for_room(consumer, loop, item)

    def _snapshot_request(self, key: tuple[str, int], record: Any, msg: dict[str, Any],
                          ts_ns: int) -> Coroutine[Any, Any, None] | None:
        """An operator's "snapshot now": a control in the instrument's queue, in order with its orders."""
        self.tracker.skipped(key, record.offset)
        loop = self._loops.get(msg.get("instrument") or "")
        if loop is None:
            return self._refuse(record, f"snapshot needs an instrument of this engine; got {msg.get('instrument')!r}",
                                None, None, None, RejectReason.UNKNOWN_INSTRUMENT, ts_ns)
        if record.offset <= self._applied.get((loop.symbol, record.topic, record.partition), -1):
            return None  # before the restart
        self._log.info("snapshot requested by an operator", instrument=loop.symbol, offset=record.offset)
        try:
            loop.queue.put_nowait(Control.SNAPSHOT)
            return None
        except asyncio.QueueFull:
            return loop.queue.put(Control.SNAPSHOT)

    async def _refuse(self, record: Any, text: str, client_id: str | None, client_order_id: str | None,
                      instrument: str | None, reason: RejectReason, ts_ns: int) -> None:
        """Input no loop will see: dead-letter it, and tell its sender when there is one."""
        await self._dead_letter(record, text)
        if client_id:
            await self._publisher.reject(client_id, client_order_id, instrument, reason, text, ts_ns)

    async def _wait_for_room(self, consumer: AIOKafkaConsumer, loop: InstrumentLoop, item: Inbound) -> None:
        """Back-pressure: pause fetching, keep the group membership alive, wait for room.

        Short pauses are normal under bursts; only long ones are logged.
        """
        assignment = list(consumer.assignment())
        consumer.pause(*assignment)
        self._paused = True
        if self._metrics is not None:
            self._metrics.consumer_paused(True)
        paused_at = time.monotonic()
        try:
            while True:
                try:
                    await asyncio.wait_for(loop.queue.put(item), timeout=1.0)
                    break
                except TimeoutError:
                    await consumer.getmany(timeout_ms=0)  # keeps the poll interval fresh; paused: no data
                    waited = time.monotonic() - paused_at
                    if waited < 1.5:
                        self._log.warning("consumer paused: the instrument's queue is full (is the journal "
                                          "writer keeping up?)", instrument=loop.symbol, depth=loop.queue.qsize())
        finally:
            consumer.resume(*assignment)
            self._paused = False
            if self._metrics is not None:
                self._metrics.consumer_paused(False)
            waited = time.monotonic() - paused_at
            if waited >= 1.0:
                self._log.info("consumer resumed", instrument=loop.symbol, paused_s=round(waited, 3))

    def _check_caught_up(self, consumer: AIOKafkaConsumer) -> None:
        if not self._replay_until:
            return
        behind = sum(max(0, end - self._position.get(key, 0)) for key, end in self._replay_until.items())
        if self._metrics is not None:
            self._metrics.recovery_replayed.set(self.replayed)
            self._metrics.recovery_behind.set(behind)
        now = time.monotonic()
        if behind and now >= self._next_progress_log:
            self._next_progress_log = now + 1.0
            elapsed = now - self._replay_started
            self._log.info("replaying input", replayed=self.replayed, skipped=self.skipped, behind=behind,
                           rate_per_s=round(self.replayed / elapsed) if elapsed > 0 else None)
        if behind == 0:
            self.caught_up = True
            elapsed = time.monotonic() - self._replay_started
            self._log.info("replay done; caught up with the input", replayed=self.replayed, skipped=self.skipped,
                           elapsed_s=round(elapsed, 3))
            if self._on_caught_up is not None:
                self._on_caught_up()

    def lag(self) -> dict[tuple[str, int], int]:
        """Per assigned partition: messages not yet read (the last fetched high watermark minus the position)."""
        consumer = self._consumer
        if consumer is None:
            return {}
        out: dict[tuple[str, int], int] = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            key = (tp.topic, tp.partition)
            if high is not None and key in self._position:
                out[key] = max(0, high - self._position[key])
        return out

    async def probe(self, timeout_s: float) -> None:
        """Raise if the consumer group's coordinator cannot be reached within ``timeout_s``.

        The request is an OffsetFetch of the orders topic's first partition: a few bytes each way, answered
        by the broker the group's offsets live on. (A metadata request for all topics would grow with the
        cluster, every probe interval.)
        """
        consumer = self._consumer
        if consumer is None:
            raise ConnectionError("the consumer is not started")
        async with asyncio.timeout(timeout_s):
            await consumer.committed(TopicPartition(self.topic, 0))

    async def on_durable(self, batch: Batch) -> None:
        """Writer listener: these commands are durable, their offsets may be committed."""
        tracker = self.tracker
        for item in batch.applied:
            pos = item.position
            if pos is not None:
                tracker.durable((pos.topic, pos.partition), pos.offset)
                key = (item.instrument, pos.topic, pos.partition)
                if pos.offset > self._applied.get(key, -1):
                    self._applied[key] = pos.offset

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        offsets = {TopicPartition(t, p): o for (t, p), o in self.tracker.committable().items()
                   if (t, p) in assigned and self._committed.get((t, p)) != o}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            self._log.warning("offset commit failed; will retry", error=str(exc))
            return
        for tp, offset in offsets.items():
            self._committed[(tp.topic, tp.partition)] = offset

    async def _dead_letter(self, record: Any, reason: str) -> None:
        self.dead_lettered += 1
        if self._metrics is not None:
            self._metrics.dead_letters.inc()
        headers = [("reason", reason.encode()), ("source_topic", record.topic.encode()),
                   ("source_partition", str(record.partition).encode()),
                   ("source_offset", str(record.offset).encode())]
        self._log.warning("message dead-lettered", reason=reason, partition=record.partition, offset=record.offset)
        await self._publisher.send_raw(self._dlq, record.value, record.key, headers)

    async def assigned(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        if not partitions:
            return
        tps = sorted(partitions)
        beginnings = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            applied = [offset for (instrument, topic, partition), offset in self._applied.items()
                       if topic == tp.topic and partition == tp.partition]
            committed = await consumer.committed(tp)
            start = start_offset(applied, committed, beginnings[tp])
            # The fetcher may have delivered records of this partition before this listener ran (they were
            # routed already): continue after them instead of reading them again.
            start = max(start, self._position.get((tp.topic, tp.partition), 0))
            consumer.seek(tp, start)
            self._position[(tp.topic, tp.partition)] = start
            self._replay_until[(tp.topic, tp.partition)] = ends[tp]
            self._log.info("partition assigned", partition=tp.partition, start_offset=start,
                           committed=committed, end_offset=ends[tp])
        self._replay_started = time.monotonic()
        self._next_progress_log = self._replay_started + 1.0
        self.caught_up = False

    def revoked(self, partitions: set[TopicPartition]) -> None:
        self.tracker.forget((tp.topic, tp.partition) for tp in partitions)
        for tp in partitions:
            self._replay_until.pop((tp.topic, tp.partition), None)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: OrderSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        consumer = self._source._consumer
        if consumer is not None:
            await self._source._commit(consumer)
        self._source.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._source._consumer
        if consumer is not None:
            await self._source.assigned(consumer, assigned)


class KafkaEventPublisher:
    """Publishes durable events and trades (and unsequenced rejections, and dead letters) to Kafka."""

    def __init__(self, *, bootstrap_servers: str, events_topic: str, instruments: Mapping[str, Instrument],
                 client_options: Mapping[str, Any] | None = None, publish_events: bool = True,
                 order_states: OrderStates | None = None, metrics: Any = None, trades_topic: str = "",
                 batch_records: bool = True) -> None:
        self._bootstrap = bootstrap_servers
        self._metrics = metrics
        self.batch_records = batch_records
        self.events_topic = events_topic
        self.trades_topic = trades_topic
        self._specs = instruments
        self._options = dict(client_options or {})
        self._publish_events = publish_events
        self._order_states = order_states
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = _CachedPartitioner()
        self._encoders: dict[str, WireEncoder] = {}
        self._partition_cache: dict[str, list[int]] = {}
        self.published = 0

    async def start(self) -> None:
        if self._producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, linger_ms=2, acks=1,
                                        max_batch_size=256 * 1024, **self._options)
            await producer.start()
            self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def _require(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("publisher not started")
        return self._producer

    async def publish(self, applied: Sequence[Applied]) -> None:
        """Publish durable events to their clients' keys and trades keyed by instrument; wait for the acks.

        With ``batch_records`` (the default) one record carries a client's events of the round,
        ``{"type": "events", "events": [...]}`` (and one record an instrument's trades,
        ``{"type": "trades", "instrument": ..., "trades": [...]}``), at most ``_PER_RECORD`` each:
        per-record overhead on the daemon's single thread is what limits a publisher, so records
        are batched like the Redis channels. Without it, one record per event (and per trade).
        Records go into one batch per topic partition (``create_batch``/``send_batch``, the default
        partitioner on the key, as ``send`` would choose). Raises ``KafkaError`` when the broker does
        not take them; the caller sends the same events again (at-least-once: consumers drop what
        they have by ``(instrument, seq)``).
        """
        if not self._publish_events:
            return
        producer = self._require()
        topics = [self.events_topic, *([self.trades_topic] if self.trades_topic else [])]
        out = _Batches(producer, self._partitioner, {t: await self._partitions(t) for t in topics})
        topic, trades_topic = self.events_topic, self.trades_topic
        by_client: dict[str, list[bytes]] = {}
        by_instrument: dict[str, list[bytes]] = {}
        encoders = self._encoders
        encoded = 0
        for item in applied:
            encoder = encoders.get(item.instrument)
            if encoder is None:
                encoder = encoders[item.instrument] = WireEncoder(self._specs[item.instrument])
            encoded += len(item.events)
            if encoded >= _YIELD_EVERY:
                encoded = 0
                await asyncio.sleep(0)  # the daemon's one thread: let the journal writer and the loops run
            for event in item.events:
                value = encoder.encode(event)
                if type(event) is OrderFilled:
                    maker, taker = event.maker_client_id, event.taker_client_id
                    keys = (maker,) if maker == taker else (maker, taker) if maker < taker else (taker, maker)
                    if trades_topic:
                        by_instrument.setdefault(item.instrument, []).append(value)
                else:
                    keys = (event.client_id,)  # type: ignore[union-attr]
                for key in keys:
                    by_client.setdefault(key, []).append(value)
        n = 0
        if self.batch_records:
            for key, values in by_client.items():
                for i in range(0, len(values), _PER_RECORD):
                    await out.add(topic, key.encode(), b'{"type":"events","events":['
                                  + b",".join(values[i: i + _PER_RECORD]) + b"]}", [])
            for instrument, values in by_instrument.items():
                for i in range(0, len(values), _PER_RECORD):
                    await out.add(trades_topic, instrument.encode(), b'{"type":"trades","instrument":'
                                  + encode(instrument) + b',"trades":[' + b",".join(values[i: i + _PER_RECORD])
                                  + b"]}", [])
        else:
            for key, values in by_client.items():
                for value in values:
                    await out.add(topic, key.encode(), value, [])
            for instrument, values in by_instrument.items():
                for value in values:
                    await out.add(trades_topic, instrument.encode(), value, [])
        n = sum(map(len, by_client.values())) + sum(map(len, by_instrument.values()))
        await out.flush()
        self.published += n
        await self._original_outcomes(applied)

    async def _partitions(self, topic: str) -> list[int]:
        parts = self._partition_cache.get(topic)
        if parts is None:
            parts = self._partition_cache[topic] = sorted(await self._require().partitions_for(topic))
        return parts

    async def _original_outcomes(self, applied: Sequence[Applied]) -> None:
        """A resubmitted order is rejected as a duplicate; its sender also gets the original's state again."""
        if self._order_states is None:
            return
        wanted: dict[str, dict[int, str]] = {}
        for item in applied:
            for event in item.events:
                if (type(event) is OrderRejected and event.reason is RejectReason.DUPLICATE_CLIENT_ORDER_ID
                        and event.order_id is not None):
                    wanted.setdefault(item.instrument, {})[event.order_id] = event.client_id
        producer = self._require()
        for instrument, orders in wanted.items():
            for state in await self._order_states(instrument, list(orders)):
                await producer.send(self.events_topic, encode(state), key=orders[state["order_id"]].encode(),
                                    headers=[("instrument", instrument.encode())])

    async def reject(self, client_id: str, client_order_id: str | None, instrument: str | None,
                     reason: RejectReason, text: str, ts_ns: int) -> None:
        """An unsequenced rejection (seq 0) for input no instrument's loop will see."""
        event = OrderRejected(instrument or "", 0, ts_ns, client_id, client_order_id, None, "place", reason, text)
        await self._send_and_wait(self.events_topic, encode(event_to_wire(event, None)), client_id.encode(), [])

    async def send_raw(self, topic: str, value: bytes | None, key: bytes | None,
                       headers: list[tuple[str, bytes]]) -> None:
        await self._send_and_wait(topic, value, key, headers)

    async def _send_and_wait(self, topic: str, value: bytes | None, key: bytes | None,
                             headers: list[tuple[str, bytes]]) -> None:
        """One record, retried while the broker's error is retriable (a leader moving, a topic being created)."""
        delay = 0.05
        for attempt in range(1, 11):
            try:
                await self._require().send_and_wait(topic, value, key=key, headers=headers)
                return
            except KafkaError as exc:
                if not getattr(exc, "retriable", False) or attempt == 10:
                    raise
                _log.warning("producing a record failed; retrying", topic=topic, attempt=attempt, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


class _Batches:
    """One record batch per (topic, partition), sent when full and at :meth:`flush`; acks awaited there."""

    def __init__(self, producer: AIOKafkaProducer, partitioner: _CachedPartitioner,
                 partitions: dict[str, list[int]]) -> None:
        self._producer = producer
        self._partitioner = partitioner
        self._parts = partitions
        self._open: dict[tuple[str, int], Any] = {}
        self._sent: list[Any] = []

    async def add(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        parts = self._parts[topic]
        partition = self._partitioner(key, parts, parts)
        batch = self._open.get((topic, partition))
        if batch is None:
            batch = self._open[(topic, partition)] = self._producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:  # full: send it
            self._sent.append(await self._producer.send_batch(batch, topic, partition=partition))
            batch = self._open[(topic, partition)] = self._producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                raise ValueError(f"a record of {len(value)} bytes does not fit a producer batch")

    async def flush(self) -> None:
        for (topic, partition), batch in self._open.items():
            if batch.record_count():
                self._sent.append(await self._producer.send_batch(batch, topic, partition=partition))
        self._open.clear()
        if self._sent:
            await asyncio.gather(*self._sent)


class _CachedPartitioner:
    """The default partitioner (murmur2 of the key, as Java clients), remembered per key: keys repeat a lot."""

    def __init__(self) -> None:
        self._hash = DefaultPartitioner()
        self._known: dict[tuple[bytes, int], int] = {}

    def __call__(self, key: bytes, partitions: list[int], available: list[int]) -> int:
        found = self._known.get((key, len(partitions)))
        if found is None:
            if len(self._known) >= 100_000:
                self._known.clear()
            found = self._known[(key, len(partitions))] = self._hash(key, partitions, available)
        return found
