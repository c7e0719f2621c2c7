"""The event publisher: durable events and trades, dead letters and seq-0 rejections, to Kafka.

:class:`KafkaEventPublisher` publishes durable events to the order-events topic,
keyed by client id so that each client's events stay in order (a fill goes to
both its maker's and its taker's key; on an instrument that keeps balances each
copy carries only that client's balances), and every fill to the trades topic keyed
by instrument. It is driven by :class:`exchange.pipeline.fanout.FanOut`, off the
commit path. When an order is resubmitted (same client
order id), the duplicate is rejected and the sender also gets an
``order_status`` message with the original order's current state, so a producer
that retried learns the outcome of its first submission.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnsupportedForMessageFormatError,
)
from aiokafka.partitioner import DefaultPartitioner

from exchange.adapters.kafka.topics import broker_unreachable
from exchange.adapters.kafka.tracing import Headers, TraceContexts
from exchange.core.events import OrderFilled, OrderRejected
from exchange.core.instruments import Instrument
from exchange.core.types import RejectReason
from exchange.pipeline.router import Refusal
from exchange.ports import Applied, OrderStates
from exchange.telemetry.logging import get_logger
from exchange.telemetry.metrics import Metrics, discarded
from exchange.wire.codec import MAX_TS_NS, WireEncoder, encode, event_to_wire

__all__ = ["KafkaEventPublisher", "OutRecord"]


_log = get_logger("exchange.kafka")
_PER_RECORD = 200  # events per batched record at most (and at most the record budget in bytes)
_YIELD_EVERY = 1000  # encoded events between yields to the event loop
_BATCH_BYTES = 256 * 1024  # the producer's batch size: an events record must fit one
_RECORD_OVERHEAD = 1024  # record framing, key and headers beside a value
_TEXT_BYTES = 512  # of a refusal's text in a dead letter's header (the texts are bounded already)
_KEY_BYTES = 1024  # of a refused message's key kept in its dead letter


class OutRecord(NamedTuple):
    """A record the daemon produces outside the event batches: a dead letter or a seq-0 rejection.

    ``source_partition``: a dead letter goes to the dead-letter partition ``source_partition % n`` (so
    each orders partition's dead letters are in one partition, in order: see
    :meth:`OrderSource._dead_lettered_through`); None: the default partitioner on the key.
    """

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    source_partition: int | None = None


class KafkaEventPublisher:
    """Publishes durable events and trades (and unsequenced rejections, and dead letters) to Kafka.

    Every record it produces stays under ``max_record_bytes`` (event records are split by size as well
    as by count; a dead letter's value is cut to fit, saying so in a header). A record the broker
    refuses for what it is (too large, corrupt, an invalid topic) is dropped with an error log and
    ``exchange_records_dropped_total``, never retried forever; anything else (the broker away, a leader
    moving, authorization) is retried with backoff, which holds the pipeline back until it is fixed.
    """

    def __init__(self, *, bootstrap_servers: str, events_topic: str, instruments: Mapping[str, Instrument],
                 client_options: Mapping[str, Any] | None = None, publish_events: bool = True,
                 order_states: OrderStates | None = None, metrics: Metrics | None = None, trades_topic: str = "",
                 batch_records: bool = True, max_record_bytes: int = 1_000_000) -> None:
        self._bootstrap = bootstrap_servers
        self._metrics = metrics if metrics is not None else discarded()
        self.batch_records = batch_records
        self.events_topic = events_topic
        self.trades_topic = trades_topic
        self._specs = instruments
        self._options = dict(client_options or {})
        self._publish_events = publish_events
        self._order_states = order_states
        self.max_record_bytes = max_record_bytes
        # an events record holds at most this many bytes of events: it must fit one producer batch
        self._record_budget = min(max_record_bytes, _BATCH_BYTES) - _RECORD_OVERHEAD
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = _CachedPartitioner()
        self._encoders: dict[str, WireEncoder] = {}
        self._partition_cache: dict[str, list[int]] = {}
        self.traces = TraceContexts()  # filled by the order source, read and emptied here
        self.published = 0
        self.dropped = 0

    async def start(self) -> None:
        if self._producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, linger_ms=2, acks=1,
                                        max_batch_size=_BATCH_BYTES,
                                        max_request_size=max(1_048_576, self.max_record_bytes + _RECORD_OVERHEAD),
                                        **self._options)
            try:
                await producer.start()
            except KafkaConnectionError as exc:  # at start-up: the one line that says what to do
                await producer.stop()
                raise broker_unreachable(self._bootstrap) from exc
            self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def _require(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("publisher not started")
        return self._producer

    async def publish(self, applied: Sequence[Applied]) -> None:  # noqa: C901 - one pass over a round's events
        """Publish durable events to their clients' keys and trades keyed by instrument; wait for the acks.

        With ``batch_records`` (the default) one record carries a client's events of the round,
        ``{"type": "events", "events": [...]}`` (and one record an instrument's trades,
        ``{"type": "trades", "instrument": ..., "trades": [...]}``), at most ``_PER_RECORD`` events and
        ``max_record_bytes`` each: per-record overhead on the daemon's single thread is what limits a
        publisher, so records are batched like the Redis channels. Without it, one record per event
        (and per trade). Records go into one batch per topic partition (``create_batch``/``send_batch``,
        the default partitioner on the key, as ``send`` would choose). Raises ``KafkaError`` when the
        broker does not take them for a reason that may pass; the caller sends the same events again
        (at-least-once: consumers drop what they have by ``(instrument, seq)``).
        """
        if not self._publish_events:
            return
        producer = self._require()
        topics = [self.events_topic, *([self.trades_topic] if self.trades_topic else [])]
        out = _Batches(producer, self._partitioner, {t: await self._partitions(t) for t in topics}, self)
        topic, trades_topic = self.events_topic, self.trades_topic
        by_client: dict[str, list[bytes]] = {}
        by_instrument: dict[str, list[bytes]] = {}
        traces = self.traces
        traced: dict[str, list[_Traced]] = {}  # per key: the runs of its values that carry trace headers
        encoders = self._encoders
        encoded = 0
        for item in applied:
            trace = traces.get(item.position) if traces else None
            if trace is not None:  # where this input's values start, per key it adds to
                starts = {k: len(by_client.get(k, ())) for k in _clients(item.events)}
                starts_i = {item.instrument: len(by_instrument.get(item.instrument, ()))}
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
                    if event.balances:  # each side sees its own balances, nobody the other's or the venue's
                        if trades_topic:
                            by_instrument.setdefault(item.instrument, []).append(
                                encoder.encode(msgspec.structs.replace(event, balances=[])))
                        for key in keys:
                            by_client.setdefault(key, []).append(encoder.encode(msgspec.structs.replace(
                                event, balances=[b for b in event.balances if b[0] == key])))
                        continue
                    if trades_topic:
                        by_instrument.setdefault(item.instrument, []).append(value)
                else:
                    keys = (event.client_id,)  # type: ignore[union-attr]
                for key in keys:
                    by_client.setdefault(key, []).append(value)
            if trace is not None:
                _mark(traced, "c", by_client, starts, trace)
                _mark(traced, "i", by_instrument, starts_i, trace)
        if self.batch_records:
            for key, values in by_client.items():
                for run, headers in _runs(values, traced.get("c" + key)):
                    for chunk in self._chunks(run):
                        await out.add(topic, key.encode(), b'{"type":"events","events":[' + b",".join(chunk) + b"]}",
                                      headers)
            for instrument, values in by_instrument.items():
                head = b'{"type":"trades","instrument":' + encode(instrument) + b',"trades":['
                for run, headers in _runs(values, traced.get("i" + instrument)):
                    for chunk in self._chunks(run):
                        await out.add(trades_topic, instrument.encode(), head + b",".join(chunk) + b"]}", headers)
        else:
            for key, values in by_client.items():
                for run, headers in _runs(values, traced.get("c" + key)):
                    for value in run:
                        await out.add(topic, key.encode(), value, headers)
            for instrument, values in by_instrument.items():
                for run, headers in _runs(values, traced.get("i" + instrument)):
                    for value in run:
                        await out.add(trades_topic, instrument.encode(), value, headers)
        n = sum(map(len, by_client.values())) + sum(map(len, by_instrument.values()))
        await out.flush()
        self.published += n
        if traces:
            traces.forget(item.position for item in applied)
        await self._original_outcomes(applied)

    def _chunks(self, values: list[bytes]) -> Iterator[list[bytes]]:
        """``values`` in runs of at most ``_PER_RECORD`` and of at most the record budget in bytes."""
        budget = self._record_budget
        chunk: list[bytes] = []
        size = 0
        for value in values:
            if chunk and (len(chunk) >= _PER_RECORD or size + len(value) + 1 > budget):
                yield chunk
                chunk, size = [], 0
            chunk.append(value)
            size += len(value) + 1
        if chunk:
            yield chunk

    async def partitions(self, topic: str) -> list[int]:
        """The topic's partitions (cached: the daemon's topics do not change partitions under it)."""
        return await self._partitions(topic)

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
        records: list[OutRecord] = []
        for instrument, orders in wanted.items():
            states = await self._order_states(instrument, list(orders))
            records.extend(OutRecord(self.events_topic, orders[state["order_id"]].encode(), encode(state),
                                     [("instrument", instrument.encode())]) for state in states)
        await self.deliver(records)

    def rejection(self, refusal: Refusal, ts_ns: int) -> OutRecord:
        """The unsequenced rejection (seq 0) that answers a refused message's sender, keyed by its client id."""
        assert refusal.client_id is not None
        wire = event_to_wire(OrderRejected(refusal.instrument or "", 0, ts_ns if 0 <= ts_ns <= MAX_TS_NS else 0,
                                           refusal.client_id, refusal.client_order_id, None, refusal.command,
                                           refusal.reason, refusal.text), None)
        if refusal.instrument is None:
            wire["instrument"] = None
        if refusal.expected_partition is not None:
            wire["expected_partition"] = refusal.expected_partition
        return OutRecord(self.events_topic, refusal.client_id.encode(), encode(wire), [])

    def dead_letter(self, topic: str, record: Any, refusal: Refusal) -> OutRecord:
        """The dead letter of ``record``: its key and value, the reason code and text and where it came from in
        headers; a value too large for ``max_record_bytes`` is cut, with its length in a ``truncated`` header."""
        headers = [("reason", refusal.reason.value.encode()), ("text", refusal.text.encode()[:_TEXT_BYTES]),
                   ("source_topic", record.topic.encode()), ("source_partition", str(record.partition).encode()),
                   ("source_offset", str(record.offset).encode()),
                   ("source_timestamp", str(record.timestamp).encode())]
        if refusal.expected_partition is not None:
            headers.append(("expected_partition", str(refusal.expected_partition).encode()))
        key = record.key[:_KEY_BYTES] if record.key is not None else None
        value = record.value if record.value is not None else b""
        room = self.max_record_bytes - _RECORD_OVERHEAD - len(key or b"") - sum(len(k) + len(v) for k, v in headers)
        if len(value) > room:
            headers.append(("truncated", str(len(value)).encode()))
            value = value[:max(0, room - 64)]
        return OutRecord(topic, key, value, headers, record.partition)

    async def deliver(self, records: Sequence[OutRecord]) -> None:
        """Produce ``records`` in order and wait until the broker has them all. Never raises for a record: one
        the broker refuses for what it is is dropped (logged, counted); the rest is retried until taken."""
        pending = list(records)
        delay = 0.05
        while pending:
            producer = self._require()
            futures: list[asyncio.Future[Any]] = []
            for r in pending:
                try:
                    partition = None
                    if r.source_partition is not None:
                        parts = await self._partitions(r.topic)
                        partition = parts[r.source_partition % len(parts)]
                    futures.append(await producer.send(r.topic, r.value, key=r.key, headers=r.headers,
                                                       partition=partition))
                except KafkaError as exc:  # refused before it was sent (too large for the producer, say)
                    futures.append(_failed(exc))
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            retry: list[OutRecord] = []
            for r, outcome in zip(pending, outcomes, strict=True):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                if isinstance(outcome, _UNDELIVERABLE):
                    self._drop(r, outcome)
                elif isinstance(outcome, BaseException):
                    retry.append(r)
            if not retry:
                return
            _log.warning("producing records failed; retrying", topic=retry[0].topic, records=len(retry),
                         retry_in_s=round(delay, 3), error=next(
                             f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            pending = retry

    def _drop(self, record: OutRecord, error: BaseException) -> None:
        self.dropped += 1
        self._metrics.records_dropped.labels(record.topic).inc()
        _log.error("the broker refused a record for what it is; dropped (the input stays on its topic)",
                   topic=record.topic, bytes=len(record.value), headers=dict(record.headers) or None,
                   error=f"{type(error).__name__}: {error}")


class _Traced(NamedTuple):
    """Values ``start:end`` of one key's list came from an input with trace headers."""

    start: int
    end: int
    headers: Headers


def _mark(traced: dict[str, list[_Traced]], kind: str, by_key: dict[str, list[bytes]], starts: dict[str, int],
          headers: Headers) -> None:
    """After one traced input: note, per key it added values to, the run it added."""
    for key, start in starts.items():
        end = len(by_key.get(key, ()))
        if end > start:
            traced.setdefault(kind + key, []).append(_Traced(start, end, headers))


def _clients(events: Sequence[Any]) -> set[str]:
    """The keys an input's events go to on the events topic."""
    keys: set[str] = set()
    for event in events:
        if type(event) is OrderFilled:
            keys.update((event.maker_client_id, event.taker_client_id))
        else:
            keys.add(event.client_id)
    return keys


def _runs(values: list[bytes], traced: list[_Traced] | None) -> Iterator[tuple[list[bytes], Headers]]:
    """``values`` split into runs, in order: the traced runs with their headers, the rest with none."""
    if traced is None:
        yield values, ()
        return
    at = 0
    for run in traced:
        if run.start > at:
            yield values[at:run.start], ()
        yield values[run.start:run.end], run.headers
        at = run.end
    if at < len(values):
        yield values[at:], ()


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


# what a broker (or the producer) says about a record itself: sending it again gives the same answer
_UNDELIVERABLE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError, CorruptRecordException,
                  InvalidTopicError, UnsupportedForMessageFormatError)


class _Batches:
    """One record batch per (topic, partition), sent when full and at :meth:`flush`; acks awaited there.

    A batch the broker refuses for what it holds is sent again record by record (``deliver``), so one
    bad record costs only itself."""

    def __init__(self, producer: AIOKafkaProducer, partitioner: _CachedPartitioner,
                 partitions: dict[str, list[int]], publisher: KafkaEventPublisher) -> None:
        self._producer = producer
        self._partitioner = partitioner
        self._parts = partitions
        self._publisher = publisher
        self._open: dict[tuple[str, int], tuple[Any, list[OutRecord]]] = {}
        self._sent: list[tuple[Any, list[OutRecord]]] = []

    async def add(self, topic: str, key: bytes, value: bytes, headers: Headers = ()) -> None:
        parts = self._parts[topic]
        partition = self._partitioner(key, parts, parts)
        opened = self._open.get((topic, partition))
        if opened is None:
            opened = self._open[(topic, partition)] = (self._producer.create_batch(), [])
        record = OutRecord(topic, key, value, list(headers))
        if opened[0].append(key=key, value=value, timestamp=None, headers=record.headers) is None:  # full: send it
            self._sent.append((await self._producer.send_batch(opened[0], topic, partition=partition), opened[1]))
            opened = self._open[(topic, partition)] = (self._producer.create_batch(), [])
            if opened[0].append(key=key, value=value, timestamp=None, headers=record.headers) is None:
                await self._publisher.deliver([record])  # larger than a batch: on its own
                return
        opened[1].append(record)

    async def flush(self) -> None:
        for (topic, partition), (batch, records) in self._open.items():
            if batch.record_count():
                self._sent.append((await self._producer.send_batch(batch, topic, partition=partition), records))
        self._open.clear()
        if not self._sent:
            return
        outcomes = await asyncio.gather(*(future for future, _ in self._sent), return_exceptions=True)
        for outcome, (_, records) in zip(outcomes, self._sent, strict=True):
            if isinstance(outcome, _UNDELIVERABLE):
                await self._publisher.deliver(records)
            elif isinstance(outcome, BaseException):
                raise outcome


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
