"""The Kafka order source: the orders topic as a member of a consumer group, into the instruments' loops.

:class:`OrderSource` consumes the orders topic as a member of a consumer group.
Each message is decoded and validated here, at the edge, and put on its
instrument's bounded queue. When a queue is full the source pauses its
partitions and keeps polling (so the group does not evict it) until there is
room again. Offsets are committed to Kafka only once the commands they carried
are durable (see :mod:`exchange.pipeline.offsets`).

Operator actions travel in the same topic, keyed by instrument like its orders,
so each lands between exactly the same two orders in every replay: ``halt``,
``resume``, ``clear`` and ``cancel_all`` are commands like any other;
``{"op": "snapshot", "instrument": ...}`` puts a snapshot request in the
instrument's queue (a snapshot is an optimisation: it needs no durability of
its own, its offset counts as done at once).

Every message goes through :class:`exchange.pipeline.router.Router`, the edge's one
guard: it yields a command, a snapshot request or a refusal, and never raises.
A refused message goes to the dead-letter topic with the reason code and text in
headers (``reason``, ``text``, ``source_topic``/``source_partition``/
``source_offset``, ``expected_partition`` for ``wrong_partition``); when the
sender can be identified, it also gets an unsequenced ``rejected`` event (seq 0)
on the events topic, before its dead letter. Neither stops the consumer.

**Dead letters exactly once.** The dead letters of one orders partition go to
one dead-letter partition (``source partition % partitions``), in offset order,
and a refused offset counts as done (stored with the next batch, committed to
Kafka) only once its dead letter is on the broker. After any restart the
assignment reads the dead-letter partition back from its end to find the last
offset already dead-lettered, so a crash between the send and the store never
sends one twice. (The sender's seq-0 rejection is at least once: a crash between
it and its dead letter sends it again.)

**One partition per instrument.** An instrument lives on the orders partition
stored with its progress, or, before anything is stored, the one murmur2 of its
name gives (the producer contract: key = instrument, Kafka's default
partitioner). Its messages on another partition, or not keyed by it, are
refused ``wrong_partition``: its order can never depend on two partitions'
fetch timing.

**Offsets that go backwards are an incident, never a skip.** The consumer runs
with ``auto_offset_reset = "none"`` and seeks every partition itself. At each
assignment, and whenever a fetch shows the log end below the position read so
far (or the broker answers that the position is out of range), the partition is
checked against the store (:func:`exchange.pipeline.offsets.plan_partition`): a log that
no longer holds what was applied, or lost messages not yet read, is paused and
reported (``incidents``: ``/readyz``, the log, a metric), naming the topic,
partition and offsets. It stays paused until its log is whole again, or an
operator asks to continue from a stated offset (``exchange admin
accept-offset``, journaled in ``input_resets``; the daemon applies it once
nothing of the partition is in flight).

One class owns all of a partition's state here (read position, the two offset trackers, incidents,
dead letters read back, the instruments' partitions), which is why it is longer than a module should
be; :mod:`.logs` reads the broker's logs for it, :mod:`.publisher` sends what it refuses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from exchange.adapters.kafka.logs import LogReader
from exchange.adapters.kafka.options import partition_for
from exchange.adapters.kafka.publisher import KafkaEventPublisher
from exchange.core.commands import Command
from exchange.core.instruments import Instrument
from exchange.core.types import RejectReason
from exchange.pipeline.loop import Control, Inbound, InstrumentLoop
from exchange.pipeline.offsets import OffsetTracker, PartitionPlan, plan_partition
from exchange.pipeline.router import DEFAULT_MAX_MESSAGE_BYTES, Refusal, Router, SnapshotRequested
from exchange.ports import Applied, Batch, InputLedger, InputPosition, InputReset, StoreUnavailable
from exchange.telemetry.logging import get_logger
from exchange.wire.auth import Verifier

__all__ = ["Incident", "OrderSource"]

_POLL_MS = 50
_ROUTE_SLICE = 200  # records routed between yields to the event loop
_MAX_RECORDS = 1000  # per poll: bounds how long routing holds the event loop (a few ms)
_REFUSED_MAX = 500  # refusals gathered before they are sent (and at the end of every poll)
_REVIEW_S = 2.0  # how often blocked partitions are looked at again (an operator's reset, a log that came back)


class Incident(NamedTuple):
    """An orders partition that is not read: its log does not hold what the store says it should."""

    topic: str
    partition: int
    problem: str  # what was found (plan_partition's text)
    since: float  # time.time() when it was found

    def describe(self) -> str:
        return (f"{self.topic}[{self.partition}]: {self.problem}. Nothing of this partition is consumed; check the "
                f"topic, then continue from a stated offset with `exchange admin accept-offset {self.partition} "
                "--offset N`")


class _Refused(NamedTuple):
    key: tuple[str, int]
    record: Any
    refusal: Refusal


class OrderSource:
    """The Kafka order source (see the module docstring).

    ``verifier`` checks operator actions (the default refuses them all: no keys); ``ledger`` is the
    store's side of the input (the partitions' own offsets, operator resets; see
    :class:`~exchange.ports.InputLedger`), None in tests that have no store.
    """

    wall_clock_timestamps = True  # a command's ts_ns is its Kafka message time, set by the producer

    def __init__(self, *, bootstrap_servers: str, topic: str, group_id: str,
                 loops: Mapping[str, InstrumentLoop], instruments: Mapping[str, Instrument],
                 applied_offsets: Mapping[tuple[str, str, int], int], publisher: KafkaEventPublisher,
                 dead_letter_topic: str, client_options: Mapping[str, Any] | None = None,
                 commit_interval_s: float = 1.0, metrics: Any = None,
                 on_caught_up: Callable[[], None] | None = None, verifier: Verifier | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, ledger: InputLedger | None = None) -> None:
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
        self._ledger = ledger
        self._log = get_logger("exchange.source", topic=topic)
        self.tracker = OffsetTracker()  # what may be committed to Kafka: durable and, with fan-out, published
        self._batched = OffsetTracker()  # what the journal writer has taken into a batch (Batch.partitions)
        self._consumer: AIOKafkaConsumer | None = None
        self._logs: LogReader | None = None  # no group: reads the dead-letter topic and checks logs
        self._stopping = asyncio.Event()
        self._paused = False
        self._committed: dict[tuple[str, int], int] = {}
        self._replay_until: dict[tuple[str, int], int] = {}  # end offsets seen at assignment
        self._replay_started = 0.0
        self._next_progress_log = 0.0
        self._position: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self._home = _homes(self._applied, topic)  # instrument -> the orders partition it lives on (stored)
        self._n_partitions = 0  # of the orders topic, once known: murmur2 places instruments not yet stored
        self._murmur: dict[tuple[str, int], int] = {}  # configured instruments only: the router asks for no other
        self._partitions: dict[str, int] = {}  # configured instrument -> partition_of(it), for the router
        self._refresh_partitions()
        self._router = Router(instruments, verifier=verifier or Verifier({}), max_message_bytes=max_message_bytes,
                              partitions=self._partitions)
        self._refused: list[_Refused] = []  # refusals of the current poll, sent together at its end
        self._dead_through: dict[tuple[str, int], int] = {}  # per partition: dead-lettered through (read back)
        self.incidents: dict[tuple[str, int], Incident] = {}
        self._ready: set[tuple[str, int]] = set()  # partitions whose assignment plan is in place
        self._routable: set[tuple[str, int]] = set()  # of those, the ones without an incident
        self._assigning = False
        self._dead_log = _RateLimited(self._log, "message dead-lettered", per_s=10)
        self.consumed = 0
        self.replayed = 0
        self.skipped = 0
        self.dead_lettered = 0
        self.caught_up = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._consumer is not None:
            return
        # auto_offset_reset "none": a position the log does not have is an error to report (an incident),
        # never a silent jump to the earliest or latest offset. Every partition is sought explicitly.
        options = {"enable_auto_commit": False, "auto_offset_reset": "none", "fetch_max_wait_ms": 10,
                   "max_poll_records": 1000, **self._options}
        logs = LogReader(self._bootstrap, self._options)
        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=self._group_id, **options)
        await logs.start()
        try:
            await consumer.start()
        except BaseException:
            await logs.stop()
            raise
        consumer.subscribe([self.topic], listener=_Rebalance(self))
        self._consumer, self._logs = consumer, logs

    def stop_consuming(self) -> None:
        """Stop taking new messages; ``run`` returns after the current one."""
        self._stopping.set()

    async def stop(self) -> None:
        """Commit what is durable and leave the group (safe to call twice)."""
        consumer, self._consumer = self._consumer, None
        logs, self._logs = self._logs, None
        try:
            if consumer is not None:
                try:
                    await self._commit(consumer)
                finally:
                    await consumer.stop()
        finally:
            if logs is not None:
                await logs.stop()

    # ---------------------------------------------------------------- routing

    def partition_of(self, instrument: str) -> int | None:
        """The orders partition ``instrument`` lives on: the one stored with its progress, else the one
        the producer contract gives (murmur2 of the instrument over the topic's partitions)."""
        home = self._home.get(instrument)
        if home is not None:
            return home
        if not self._n_partitions:
            return None
        found = self._murmur.get((instrument, self._n_partitions))
        if found is None:  # murmur2 in Python costs microseconds: once per instrument
            found = self._murmur[(instrument, self._n_partitions)] = partition_for(instrument, self._n_partitions)
        return found

    def _refresh_partitions(self) -> None:
        """The router's mapping, after the topic's partitions became known or an instrument's was stored."""
        for symbol in self._specs:
            partition = self.partition_of(symbol)
            if partition is None:
                self._partitions.pop(symbol, None)
            else:
                self._partitions[symbol] = partition

    def partition_progress(self, applied: Sequence[Applied]) -> dict[tuple[str, int], int]:
        """The journal writer forms a batch of ``applied``: per partition read here, the offset every message
        up to which is in this batch or an earlier one, or needed nothing (skipped, dead-lettered). Once the
        batch is durable, so is everything up to it: the journal stores it with the batch (the partition's
        own row), and a restart reads on after it."""
        batched = self._batched
        for item in applied:
            pos = item.position
            if pos is not None:
                batched.durable((pos.topic, pos.partition), pos.offset)
        return {tp: offset - 1 for tp, offset in batched.committable().items()
                if tp not in self.incidents and offset > 0}

    async def run(self) -> None:
        """Consume until :meth:`stop_consuming`; commits durable offsets every ``commit_interval_s``."""
        consumer = self._consumer
        assert consumer is not None, "start() first"
        next_commit = time.monotonic() + self._commit_interval_s
        next_review = time.monotonic() + _REVIEW_S
        metrics = self._metrics
        while not self._stopping.is_set():
            records = await self._fetch(consumer)
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
                    if len(self._refused) >= _REFUSED_MAX:
                        await self._send_refused()
            await self._send_refused()
            self._check_highwater(consumer)
            if not self.caught_up:
                self._check_caught_up(consumer)
            now = time.monotonic()
            if now >= next_review:
                next_review = now + _REVIEW_S
                if self.incidents:
                    await self._review_incidents(consumer)
            if now >= next_commit:
                await self._commit(consumer)
                next_commit = now + self._commit_interval_s

    async def _fetch(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, list[Any]]:
        """The next records; an error of the fetch is reported and handled here, never raised."""
        try:
            records: dict[TopicPartition, list[Any]] = await consumer.getmany(timeout_ms=_POLL_MS,
                                                                              max_records=_MAX_RECORDS)
            return records
        except OffsetOutOfRangeError as exc:  # a broker that lost data answers this for our position
            for tp, offset in (exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}).items():
                self._block(consumer, tp, f"offset {offset}, the next this exchange needs, is out of the log's "
                            "range: the broker lost data (restarted without its volume, or the topic was deleted "
                            "and recreated)")
        except NoOffsetForPartitionError as exc:  # a partition without a position: where this process left it
            for tp in exc.args[:1]:
                key = (tp.topic, tp.partition) if isinstance(tp, TopicPartition) else None
                if key in self._ready and key in self._position and tp in consumer.assignment():
                    consumer.seek(tp, self._position[key])
            await asyncio.sleep(0.01)  # (the assignment listener gives new partitions their position)
        except KafkaError as exc:  # e.g. not authorized to read the topic: say so, keep the group membership
            self._log.error("fetching orders failed; retrying", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1.0)
        return {}

    def _route(self, consumer: AIOKafkaConsumer, tp: TopicPartition, record: Any) -> Coroutine[Any, Any, None] | None:
        """Route one record; returns the work still to await, if any (None on the fast path)."""
        key = (tp.topic, tp.partition)
        if key not in self._routable:
            # fetched before the assignment's plan was in place (read again from the plan's start), or before
            # the partition was paused for an incident (read again once it is resolved)
            return None
        offset = record.offset
        position = self._position.get(key, 0)
        if offset != position:
            if offset < position:
                # already routed once (fetched again after a seek): applying it twice would duplicate its events
                self.skipped += 1
                return None
            self._log.warning("offsets of the orders partition were not delivered (transaction markers or "
                              "compaction; if neither is in use, the broker lost data)", partition=tp.partition,
                              missing_from=position, missing_to=offset - 1)
        if not self.consumed:
            self._log.info("first message consumed", partition=tp.partition, offset=offset)
        self.consumed += 1
        self._position[key] = offset + 1
        ts_ms = record.timestamp
        route = self._router.route(record.value, ts_ms * 1_000_000 if ts_ms is not None and ts_ms >= 0 else -1,
                                   key=record.key, partition=tp.partition)
        if type(route) is Refusal:
            self._refuse(key, record, route)
            return None
        if type(route) is SnapshotRequested:
            return self._snapshot_request(key, record, route)
        command: Command = route  # type: ignore[assignment]
        loop = self._loops.get(command.instrument or "")
        if loop is None:  # the router routes only to configured instruments; this engine runs them all
            self._refuse(key, record, Refusal(RejectReason.INTERNAL_ERROR, f"no matching loop for "
                                              f"{command.instrument!r}", instrument=command.instrument))
            return None
        if record.offset <= self._applied.get((loop.symbol, tp.topic, tp.partition), -1):
            self.skipped += 1  # applied and durable before the restart
            self._skipped(key, record.offset)
            return None
        if not self.caught_up:
            self.replayed += 1
        self.tracker.dispatched(key, record.offset)
        self._batched.dispatched(key, record.offset)
        item = Inbound(command, InputPosition(tp.topic, tp.partition, record.offset))
        try:
            loop.queue.put_nowait(item)
            return None
        except asyncio.QueueFull:
            return self._wait_for_room(consumer, loop, item)

    def _snapshot_request(self, key: tuple[str, int], record: Any,
                          route: SnapshotRequested) -> Coroutine[Any, Any, None] | None:
        """An operator's "snapshot now": a control in the instrument's queue, in order with its orders."""
        self._skipped(key, record.offset)  # a snapshot needs no durability of its own
        loop = self._loops.get(route.instrument or "")
        if loop is None:
            return None
        if record.offset <= self._applied.get((loop.symbol, record.topic, record.partition), -1):
            return None  # before the restart
        self._log.info("snapshot requested by an operator", instrument=loop.symbol, operator=route.operator,
                       offset=record.offset)
        try:
            loop.queue.put_nowait(Control.SNAPSHOT)
            return None
        except asyncio.QueueFull:
            return loop.queue.put(Control.SNAPSHOT)

    def _refuse(self, key: tuple[str, int], record: Any, refusal: Refusal) -> None:
        """Input no loop will see: dead-lettered (and answered) at the end of this poll, exactly once."""
        self.tracker.dispatched(key, record.offset)
        self._batched.dispatched(key, record.offset)
        if refusal.internal is not None:
            self._log.error("the edge failed on a message; dead-lettered as internal_error", partition=record.partition,
                            offset=record.offset, error=f"{type(refusal.internal).__name__}: {refusal.internal}",
                            exc_info=refusal.internal)
        if record.offset <= self._dead_through.get(key, -1):  # dead-lettered before a restart: not again
            self.skipped += 1
            self.tracker.durable(key, record.offset)
            self._batched.durable(key, record.offset)
            return
        self._refused.append(_Refused(key, record, refusal))

    async def _send_refused(self) -> None:
        """This poll's refusals: first the senders' rejections (seq 0), then the dead letters, in offset order;
        each offset counts as done once its dead letter is on the broker."""
        refused, self._refused = self._refused, []
        if not refused:
            return
        publisher = self._publisher
        await publisher.deliver([publisher.rejection(r.refusal, r.record.timestamp * 1_000_000
                                                     if r.refusal.reason is not RejectReason.INVALID_TIMESTAMP else 0)
                                 for r in refused if r.refusal.client_id])
        await publisher.deliver([publisher.dead_letter(self._dlq, r.record, r.refusal) for r in refused])
        for r in refused:
            self.dead_lettered += 1
            if self._metrics is not None:
                self._metrics.dead_letters.labels(r.refusal.reason.value).inc()
            self._dead_log.warning(reason=r.refusal.reason.value, text=r.refusal.text, partition=r.record.partition,
                                   offset=r.record.offset)
            self.tracker.durable(r.key, r.record.offset)
            self._batched.durable(r.key, r.record.offset)
            if r.record.offset > self._dead_through.get(r.key, -1):
                self._dead_through[r.key] = r.record.offset

    async def _wait_for_room(self, consumer: AIOKafkaConsumer, loop: InstrumentLoop, item: Inbound) -> None:
        """Back-pressure: pause fetching, keep the group membership alive, wait for room.

        Short pauses are normal under bursts; only long ones are logged.
        """
        await self._send_refused()  # what this poll refused so far need not wait for the queue
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
            consumer.resume(*[tp for tp in assignment if (tp.topic, tp.partition) not in self.incidents
                              and (tp.topic, tp.partition) in self._ready])
            self._paused = False
            if self._metrics is not None:
                self._metrics.consumer_paused(False)
            waited = time.monotonic() - paused_at
            if waited >= 1.0:
                self._log.info("consumer resumed", instrument=loop.symbol, paused_s=round(waited, 3))

    def _check_caught_up(self, consumer: AIOKafkaConsumer) -> None:
        if not self._replay_until or self._assigning:
            return
        behind = sum(max(0, end - self._position.get(key, 0)) for key, end in self._replay_until.items()
                     if key not in self.incidents)
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
                    if pos.topic == self.topic and item.instrument not in self._home:
                        self._home[item.instrument] = pos.partition  # stored with this batch
                        self._refresh_partitions()

    def _skipped(self, key: tuple[str, int], offset: int) -> None:
        self.tracker.skipped(key, offset)
        self._batched.skipped(key, offset)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        offsets = {TopicPartition(t, p): o for (t, p), o in self.tracker.committable().items()
                   if (t, p) in assigned and (t, p) not in self.incidents and self._committed.get((t, p)) != o}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            self._log.warning("offset commit failed; will retry", error=str(exc))
            return
        for tp, offset in offsets.items():
            self._committed[(tp.topic, tp.partition)] = offset

    # ------------------------------------------------------- assignment, and logs that lost data

    async def assigned(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        if not partitions:
            return
        tps = sorted(partitions)
        # Nothing of a new partition is fetched until its plan is in place: paused (and given a position, so the
        # fetcher does not look for one) before the first await, resumed once it is sought to the plan's start.
        consumer.pause(*tps)
        for tp in tps:
            consumer.seek(tp, self._position.get((tp.topic, tp.partition), 0))
        self._assigning = True  # caught up only once every new partition is planned
        self.caught_up = False
        try:
            await self._plan_assigned(consumer, tps)
        finally:
            self._assigning = False

    async def _plan_assigned(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        self._n_partitions = len(consumer.partitions_for_topic(self.topic) or ()) or self._n_partitions
        self._refresh_partitions()
        stored = await self._stored_offsets()
        for tp in tps:
            key = (tp.topic, tp.partition)
            plan, committed, ends = await self._plan(consumer, tp, stored)
            if plan.problem is not None:
                consumer.seek(tp, plan.start)  # a position, so the fetcher leaves it alone while paused
                self._position[key] = plan.start
                self._block(consumer, tp, plan.problem)
                self._ready.add(key)
                continue
            # Records this process routed in an earlier assignment of the partition are not read again.
            start = max(plan.start, self._position.get(key, 0))
            dead_through = await self._dead_lettered_through(tp, start)
            consumer.seek(tp, start)
            self._position[key] = start
            self._replay_until[key] = ends
            self._dead_through[key] = dead_through
            self._ready.add(key)
            self._routable.add(key)
            if not self._paused:  # (back-pressure resumes it with the rest)
                consumer.resume(tp)
            self._log.info("partition assigned", partition=tp.partition, start_offset=start,
                           committed=committed, end_offset=ends, dead_lettered_through=dead_through)
        for symbol, home in sorted(self._home.items()):
            expected = partition_for(symbol, self._n_partitions) if self._n_partitions else home
            if expected != home:
                self._log.warning("an instrument lives on another partition than the producer contract gives it "
                                  "(were partitions added to the orders topic?); its messages on any other "
                                  "partition are refused", instrument=symbol, stored_partition=home,
                                  murmur2_partition=expected, partitions=self._n_partitions)
        self._replay_started = time.monotonic()
        self._next_progress_log = self._replay_started + 1.0
        self.caught_up = False

    async def _stored_offsets(self) -> dict[tuple[str, int], int]:
        """(instrument, partition) -> last offset, the partitions' own rows (instrument "") included: this
        process's view merged with the store's (which has the partitions' rows)."""
        out = {(i, p): o for (i, t, p), o in self._applied.items() if t == self.topic}
        if self._ledger is not None:
            for key, offset in (await self._ledger.input_offsets(self.topic)).items():
                if offset > out.get(key, -1):
                    out[key] = offset
        return out

    async def _plan(self, consumer: AIOKafkaConsumer, tp: TopicPartition,
                    stored: Mapping[tuple[str, int], int]) -> tuple[PartitionPlan, int | None, int]:
        applied = [o for (i, p), o in stored.items() if p == tp.partition and i]
        routed = stored.get(("", tp.partition))
        committed = await consumer.committed(tp)
        log_start = (await consumer.beginning_offsets([tp]))[tp]
        log_end = (await consumer.end_offsets([tp]))[tp]
        needed = max([o + 1 for o in applied] + ([routed + 1] if routed is not None else []) + [0])
        if log_end < needed:  # some brokers report the start of the last batch: read what is really there
            log_end = max(log_end, await self._log_end(tp, needed - 1))
        plan = plan_partition(applied=applied, routed=routed, committed=committed, log_start=log_start,
                              log_end=log_end)
        return plan, committed, log_end

    async def _log_end(self, tp: TopicPartition, offset: int) -> int:
        """The partition's real log end if it holds ``offset`` (read back), else -1."""
        return await self._logs.log_end(tp, offset) if self._logs is not None else -1

    async def _dead_lettered_through(self, tp: TopicPartition, start: int) -> int:
        """The highest offset of ``tp`` already on the dead-letter topic (-1 if none at or after ``start``)."""
        if self._logs is None:
            return -1
        try:
            parts = sorted(await self._publisher.partitions(self._dlq))
        except KafkaError:
            return -1
        if not parts:
            return -1
        return await self._logs.dead_lettered_through(TopicPartition(self._dlq, parts[tp.partition % len(parts)]),
                                                      tp, start)

    def _block(self, consumer: AIOKafkaConsumer, tp: TopicPartition, problem: str) -> None:
        key = (tp.topic, tp.partition)
        if key in self.incidents:
            return
        incident = self.incidents[key] = Incident(tp.topic, tp.partition, problem, time.time())
        self._routable.discard(key)
        if tp in consumer.assignment():
            consumer.pause(tp)
        self._replay_until.pop(key, None)
        self._log.error("orders partition not consumed: its log does not hold what this exchange applied",
                        partition=tp.partition, problem=problem, what_to_do=incident.describe())
        if self._metrics is not None:
            self._metrics.input_incidents.set(len(self.incidents))

    def _check_highwater(self, consumer: AIOKafkaConsumer) -> None:
        """A log end below the position read so far means the log lost data while this process ran."""
        for tp in consumer.assignment():
            key = (tp.topic, tp.partition)
            high = consumer.highwater(tp)
            position = self._position.get(key)
            if high is not None and position is not None and high < position and key not in self.incidents:
                self._block(consumer, tp, f"the log now ends at offset {high}, below offset {position}, up to "
                            "which this exchange has read it: the broker lost data (restarted without its volume, "
                            "or the topic was deleted and recreated)")

    async def _review_incidents(self, consumer: AIOKafkaConsumer) -> None:
        """Every few seconds: apply an operator's reset of a blocked partition, or unblock one whose log is
        whole again (the broker got its data back)."""
        try:
            stored = await self._stored_offsets()
            resets = await self._ledger.input_resets(self.topic) if self._ledger is not None else []
        except StoreUnavailable as exc:
            self._log.warning("checking the blocked partitions failed; will retry", error=str(exc))
            return
        assigned = {(tp.topic, tp.partition): tp for tp in consumer.assignment()}
        for key in list(self.incidents):
            tp = assigned.get(key)
            if tp is None:
                self.incidents.pop(key)
                continue
            reset = next((r for r in resets if r.partition == tp.partition), None)
            if reset is not None:
                await self._apply_reset(consumer, tp, reset, stored)
                continue
            plan, _, ends = await self._plan(consumer, tp, stored)
            if plan.problem is None:
                self._log.info("orders partition whole again; consuming it", partition=tp.partition,
                               start_offset=plan.start)
                self._unblock(consumer, tp, plan.start, ends)
        if self._metrics is not None:
            self._metrics.input_incidents.set(len(self.incidents))

    async def _apply_reset(self, consumer: AIOKafkaConsumer, tp: TopicPartition, reset: InputReset,
                           stored: Mapping[tuple[str, int], int]) -> None:
        key = (tp.topic, tp.partition)
        assert self._ledger is not None
        if self.tracker.in_flight(key):
            return  # what was dispatched before the incident becomes durable first; next review
        log_start = (await consumer.beginning_offsets([tp]))[tp]
        log_end = (await consumer.end_offsets([tp]))[tp]
        if reset.offset > log_end:
            log_end = max(log_end, await self._log_end(tp, reset.offset - 1))
        before = {i or "(partition)": o for (i, p), o in sorted(stored.items()) if p == tp.partition}
        if not log_start <= reset.offset <= log_end:
            note = (f"refused: offset {reset.offset} is outside the log ({log_start} - {log_end}); ask again with an "
                    "offset in it")
            await self._ledger.refuse_input_reset(reset, note)
            self._log.warning("input reset refused", partition=tp.partition, reset_id=reset.id, note=note)
            return
        note = (f"applied: continue at offset {reset.offset}; stored offsets were {before}; the log held "
                f"{log_start} - {log_end}; {self.incidents[key].problem}")
        await self._ledger.apply_input_reset(reset, note)
        for applied_key in [k for k in self._applied if k[1] == tp.topic and k[2] == tp.partition]:
            self._applied[applied_key] = reset.offset - 1
        self._log.warning("input reset applied: continuing the orders partition from the operator's offset",
                          partition=tp.partition, offset=reset.offset, operator=reset.operator, reason=reset.reason,
                          reset_id=reset.id, stored_before=before)
        self._unblock(consumer, tp, reset.offset, log_end)

    def _unblock(self, consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int) -> None:
        key = (tp.topic, tp.partition)
        self.incidents.pop(key, None)
        self.tracker.forget([key])
        self._batched.forget([key])
        self._dead_through.pop(key, None)
        self._position[key] = start
        consumer.seek(tp, start)
        self._routable.add(key)
        consumer.resume(tp)
        self._replay_until[key] = end
        self.caught_up = False

    def revoked(self, partitions: set[TopicPartition]) -> None:
        self.tracker.forget([(tp.topic, tp.partition) for tp in partitions])
        self._batched.forget([(tp.topic, tp.partition) for tp in partitions])
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._replay_until.pop(key, None)
            self.incidents.pop(key, None)
            self._dead_through.pop(key, None)
            self._ready.discard(key)
            self._routable.discard(key)


def _homes(applied: Mapping[tuple[str, str, int], int], topic: str) -> dict[str, int]:
    """instrument -> its stored orders partition. An instrument stored on several (fed from two partitions
    before that was refused) keeps the one it reached furthest on."""
    best: dict[str, tuple[int, int]] = {}
    for (instrument, t, partition), offset in applied.items():
        if t == topic and instrument and (instrument not in best or offset > best[instrument][1]):
            best[instrument] = (partition, offset)
    return {instrument: partition for instrument, (partition, _) in best.items()}


class _RateLimited:
    """One log line per event up to ``per_s`` a second, then one summary line per second of how many more."""

    def __init__(self, log: Any, event: str, per_s: int) -> None:
        self._log, self._event, self._per_s = log, event, per_s
        self._second = 0
        self._count = 0
        self._suppressed = 0

    def warning(self, **fields: Any) -> None:
        now = int(time.monotonic())
        if now != self._second:
            if self._suppressed:
                self._log.warning(f"{self._event} (more, not logged one by one)", count=self._suppressed)
            self._second, self._count, self._suppressed = now, 0, 0
        self._count += 1
        if self._count <= self._per_s:
            self._log.warning(self._event, **fields)
        else:
            self._suppressed += 1


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: OrderSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        consumer = self._source._consumer
        if consumer is not None:
            await self._source._send_refused()
            await self._source._commit(consumer)
        self._source.revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._source._consumer
        if consumer is not None:
            await self._source.assigned(consumer, assigned)
