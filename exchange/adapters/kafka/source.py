"""The Kafka order source: the orders topic as a member of a consumer group, into the instruments' loops.

:class:`OrderSource` consumes the orders topic as a member of a consumer group.
Each message is decoded and validated here, at the edge, and put on its
instrument's bounded queue. When a queue is full the source pauses its
partitions and keeps polling (so the group does not evict it) until there is
room again. Offsets are committed to Kafka only once the commands they carried
are durable and, with a fan-out, published (see :mod:`exchange.pipeline.offsets`).

Operator actions travel in the same topic, keyed by instrument like its orders,
so each lands between exactly the same two orders in every replay: ``halt``,
``resume``, ``clear`` and ``cancel_all`` are commands like any other;
``{"op": "snapshot", "instrument": ...}`` puts a snapshot request in the
instrument's queue (a snapshot is an optimisation: it needs no durability of
its own, its offset counts as done at once).

Every message goes through :class:`exchange.pipeline.router.Router`, the edge's one
guard: it yields a command, a snapshot request or a refusal, and never raises.
A refused message is dead-lettered, exactly once, and answered when the sender
is known; neither stops the consumer.

Ownership follows the group's assignment (several engine processes may share one
group): the partitions assigned are planned only after the process has taken the
instruments that live on them (:class:`~exchange.ports.Holder`: new epochs, each
book recovered from the store); the partitions taken away are handed back only
after everything of theirs is durable and published and their offsets committed.
A partition whose instruments another process took meanwhile (a fenced commit) is
no longer read (:meth:`OrderSource.lose`) until the group takes it away. The
assignor is sticky, so a member joining or leaving moves only the partitions it
must.

The source is split by role, one owner for each piece of its state:

- here: the consumer client and its lifecycle, the poll loop, each record's way to its loop
  (back-pressure included), the commits to Kafka, and the counters and caught-up flag of
  :class:`~exchange.ports.Source`;
- :mod:`.accounting`: how far each partition is read, dispatched, durable and committed, and how
  far each instrument is stored (skips and the replay follow from it);
- :mod:`.deadletters`: the refusals not yet sent and how far each partition is dead-lettered;
- :mod:`.homes`: the orders partition each instrument lives on (the router's partition check);
- :mod:`.assignment`: the assigned partitions' plans, incidents (offsets that went backwards)
  and operator resets;
- :mod:`.rebalance`: the group's listener; :mod:`.logs` reads the broker's logs,
  :mod:`.publisher` sends what is refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import KafkaConnectionError, KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from exchange.adapters.kafka.accounting import InputAccounting
from exchange.adapters.kafka.assignment import Assignment, Incident
from exchange.adapters.kafka.deadletters import DeadLetters
from exchange.adapters.kafka.homes import Homes
from exchange.adapters.kafka.logs import LogReader
from exchange.adapters.kafka.publisher import KafkaEventPublisher
from exchange.adapters.kafka.rebalance import Rebalance
from exchange.adapters.kafka.topics import broker_unreachable
from exchange.adapters.kafka.tracing import TraceContexts
from exchange.core.commands import Command
from exchange.core.instruments import Instrument
from exchange.core.types import RejectReason
from exchange.pipeline.loop import Control, Inbound, InstrumentLoop
from exchange.pipeline.ownership import Ownership
from exchange.pipeline.router import DEFAULT_MAX_MESSAGE_BYTES, Refusal, Router, SnapshotRequested
from exchange.ports import Applied, Batch, Holder, InputLedger, InputPosition, StoreUnavailable
from exchange.telemetry.logging import get_logger
from exchange.telemetry.metrics import Metrics, discarded
from exchange.wire.auth import Verifier

__all__ = ["OrderSource"]

_POLL_MS = 50
_STOP_STEP_S = 3.0  # each step of a stop: committing the offsets, leaving the group
_ROUTE_SLICE = 200  # records routed between yields to the event loop
_MAX_RECORDS = 1000  # per poll: bounds how long routing holds the event loop (a few ms)
_REVIEW_S = 2.0  # how often blocked partitions are looked at again (an operator's reset, a log that came back)
# sticky: a member joining or leaving moves only the partitions it must (the others keep their books). One assignor
# only: aiokafka (0.14) sends one JoinGroup request per configured assignor at every rebalance, and a broker holds
# each of them for a join round. Every member of the group must name it (README: scale-out, upgrades).
_ASSIGNORS = (StickyPartitionAssignor,)


class OrderSource:
    """The Kafka order source (see the module docstring).

    ``verifier`` checks operator actions (the default refuses them all: no keys); ``ledger`` is the
    store's side of the input (the partitions' own offsets, operator resets; see
    :class:`~exchange.ports.InputLedger`), None in tests that have no store. ``holder`` takes and gives up
    the instruments of the partitions assigned and revoked (None: ``loops`` holds every instrument, as in
    tests with one consumer); ``ownership`` confirms this process's epochs before dead letters go out.
    ``on_fatal`` gets what a rebalance listener could not handle (aiokafka would only log it): the daemon
    stops on it.
    """

    wall_clock_timestamps = True  # a command's ts_ns is its Kafka message time, set by the producer

    @property
    def catchup_ends(self) -> Mapping[tuple[str, int], int]:
        """See :class:`~exchange.ports.Source`: the log ends seen at assignment (or when a blocked partition is
        read again), kept after the catch-up."""
        return self._accounting.replay_until

    def __init__(self, *, bootstrap_servers: str, topic: str, group_id: str,
                 loops: Mapping[str, InstrumentLoop], instruments: Mapping[str, Instrument],
                 applied_offsets: Mapping[tuple[str, str, int], int], publisher: KafkaEventPublisher,
                 dead_letter_topic: str, client_options: Mapping[str, Any] | None = None,
                 commit_interval_s: float = 1.0, metrics: Metrics | None = None,
                 on_caught_up: Callable[[], None] | None = None, verifier: Verifier | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, ledger: InputLedger | None = None,
                 holder: Holder | None = None, ownership: Ownership | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self._bootstrap = bootstrap_servers
        self.topic = topic
        self._group_id = group_id
        self._loops = loops
        self._options = dict(client_options or {})
        self._commit_interval_s = commit_interval_s
        self._metrics = metrics if metrics is not None else discarded()
        self._on_caught_up = on_caught_up
        self._log = get_logger("exchange.source", topic=topic)
        self._accounting = InputAccounting(topic, applied_offsets)
        self._homes = Homes(instruments, applied_offsets, topic)
        self._traces = publisher.traces if publisher is not None else TraceContexts()
        self._dead_letters = DeadLetters(publisher, dead_letter_topic, self._accounting, metrics=self._metrics,
                                         log=self._log)
        self._assignment = Assignment(topic=topic, accounting=self._accounting, dead_letters=self._dead_letters,
                                      homes=self._homes, ledger=ledger, metrics=self._metrics, log=self._log)
        self._router = Router(instruments, verifier=verifier or Verifier({}), max_message_bytes=max_message_bytes,
                              partitions=self._homes.router_view)
        self._ledger = ledger
        self._holder = holder
        self._ownership = ownership
        self._on_fatal = on_fatal
        self._owned: dict[tuple[str, int], list[str]] = {}  # assigned partition -> the instruments taken for it
        self._assigned_once = False  # caught up only after the first assignment
        self.rebalancing_since: float | None = None  # monotonic: partitions revoked, the new assignment not in place
        self._consumer: AIOKafkaConsumer | None = None
        self._logs: LogReader | None = None  # no group: reads the dead-letter topic and checks logs
        self._stopping = asyncio.Event()
        self._assigning = False  # caught up only once every new partition is planned
        self._replay_started = 0.0
        self._next_progress_log = 0.0
        self.consumed = 0
        self.replayed = 0
        self.skipped = 0
        self.dead_lettered = 0
        self.caught_up = False

    @property
    def incidents(self) -> Mapping[tuple[str, int], Incident]:
        """The orders partitions not read because their log lost data (``/readyz``, ``/status``)."""
        return self._assignment.incidents

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._consumer is not None:
            return
        # auto_offset_reset "none": a position the log does not have is an error to report (an incident),
        # never a silent jump to the earliest or latest offset. Every partition is sought explicitly.
        options = {"enable_auto_commit": False, "auto_offset_reset": "none", "fetch_max_wait_ms": 10,
                   "max_poll_records": 1000, "partition_assignment_strategy": _ASSIGNORS, **self._options}
        logs = LogReader(self._bootstrap, self._options)
        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=self._group_id, **options)
        try:
            await logs.start()
        except KafkaConnectionError as exc:  # at start-up: the one line that says what to do
            raise broker_unreachable(self._bootstrap) from exc
        try:
            await consumer.start()
        except BaseException as exc:
            await logs.stop()
            if isinstance(exc, KafkaConnectionError):
                raise broker_unreachable(self._bootstrap) from exc
            raise
        consumer.subscribe([self.topic], listener=Rebalance(self))
        self._consumer, self._logs = consumer, logs

    def stop_consuming(self) -> None:
        """Stop taking new messages; ``run`` returns after the current one."""
        self._stopping.set()

    async def stop(self) -> None:
        """Commit what is durable and leave the group (safe to call twice). Each step is bounded: a stop that
        meets a rebalance (the group's coordinator waits for it; a commit waits for the coordinator) must not
        keep the process alive; what is not committed is read again from the offsets stored with the data."""
        consumer, self._consumer = self._consumer, None
        logs, self._logs = self._logs, None
        self._stopping.set()
        try:
            if consumer is not None:
                for step, closing in (("committing the offsets", self._commit(consumer)),
                                      ("leaving the group", consumer.stop())):
                    try:
                        async with asyncio.timeout(_STOP_STEP_S):
                            await closing
                    except TimeoutError:
                        self._log.warning(f"{step} at stop did not finish in time; going on (a rebalance under "
                                          "way?); the next owner reads on from the offsets stored with the data",
                                          timeout_s=_STOP_STEP_S)
        finally:
            if logs is not None:
                await logs.stop()

    # ---------------------------------------------------------------- routing

    def partition_of(self, instrument: str) -> int | None:
        """The orders partition ``instrument`` lives on (see :mod:`.homes`)."""
        return self._homes.partition_of(instrument)

    def partition_progress(self, applied: Sequence[Applied]) -> dict[tuple[str, int], int]:
        """The journal writer forms a batch of ``applied``: per partition read here, the offset every message
        up to which is in this batch or an earlier one, or needed nothing (skipped, dead-lettered); see
        :meth:`.accounting.InputAccounting.partition_progress`."""
        return self._accounting.partition_progress(applied, self._assignment.unread)

    async def run(self) -> None:
        """Consume until :meth:`stop_consuming`; commits published offsets every ``commit_interval_s``."""
        consumer = self._consumer
        assert consumer is not None, "start() first"
        next_commit = time.monotonic() + self._commit_interval_s
        next_review = time.monotonic() + _REVIEW_S
        metrics = self._metrics
        dead_letters = self._dead_letters
        while not self._stopping.is_set():
            records = await self._fetch(consumer)
            if records:
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
                    if dead_letters.full:
                        await self._send_refused()
            await self._send_refused()
            self._assignment.check_highwater(consumer)
            if not self.caught_up:
                self._check_caught_up()
            now = time.monotonic()
            if now >= next_review:
                next_review = now + _REVIEW_S
                if self._assignment.incidents and await self._assignment.review(consumer, self._logs):
                    self.caught_up = False  # a partition read again replays first
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
                self._assignment.block(consumer, tp, f"offset {offset}, the next this exchange needs, is out of the "
                                       "log's range: the broker lost data (restarted without its volume, or the "
                                       "topic was deleted and recreated)")
        except NoOffsetForPartitionError as exc:  # a partition without a position: where this process left it
            position = self._accounting.position
            for tp in exc.args[:1]:
                key = (tp.topic, tp.partition) if isinstance(tp, TopicPartition) else None
                if key in self._assignment.ready and key in position and tp in consumer.assignment():
                    consumer.seek(tp, position[key])
            await asyncio.sleep(0.01)  # (the assignment listener gives new partitions their position)
        except KafkaError as exc:  # e.g. not authorized to read the topic: say so, keep the group membership
            self._log.error("fetching orders failed; retrying", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1.0)
        return {}

    def _route(self, consumer: AIOKafkaConsumer, tp: TopicPartition, record: Any) -> Coroutine[Any, Any, None] | None:
        """Route one record; returns the work still to await, if any (None on the fast path)."""
        key = (tp.topic, tp.partition)
        if key not in self._assignment.routable:
            # fetched before the assignment's plan was in place (read again from the plan's start), or before
            # the partition was paused for an incident (read again once it is resolved)
            return None
        accounting = self._accounting
        offset = record.offset
        position = accounting.position.get(key, 0)
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
        accounting.read(key, offset)
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
        if accounting.is_applied(loop.symbol, key, offset):
            self.skipped += 1  # applied and durable before the restart
            accounting.skipped(key, offset)
            return None
        if not self.caught_up:
            self.replayed += 1
        accounting.dispatched(key, offset)
        where = InputPosition(tp.topic, tp.partition, offset)
        item = Inbound(command, where)
        if record.headers:  # a gateway's trace context goes on to the records of this command's events
            self._traces.keep(where, record.headers)
        try:
            loop.queue.put_nowait(item)
            return None
        except asyncio.QueueFull:
            return self._wait_for_room(consumer, loop, item)

    def _snapshot_request(self, key: tuple[str, int], record: Any,
                          route: SnapshotRequested) -> Coroutine[Any, Any, None] | None:
        """An operator's "snapshot now": a control in the instrument's queue, in order with its orders."""
        self._accounting.skipped(key, record.offset)  # a snapshot needs no durability of its own
        loop = self._loops.get(route.instrument or "")
        if loop is None:
            return None
        if self._accounting.is_applied(loop.symbol, key, record.offset):
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
        if not self._dead_letters.refuse(key, record, refusal):
            self.skipped += 1  # dead-lettered before a restart

    async def _send_refused(self) -> None:
        if self._ownership is not None and self._dead_letters.pending and not await self._ownership.confirm():
            return  # nothing goes out before this process knows it still owns its partitions; next poll
        self.dead_lettered += await self._dead_letters.send()

    async def _wait_for_room(self, consumer: AIOKafkaConsumer, loop: InstrumentLoop, item: Inbound) -> None:
        """Back-pressure: pause fetching, keep the group membership alive, wait for room.

        Short pauses are normal under bursts; only long ones are logged.
        """
        await self._send_refused()  # what this poll refused so far need not wait for the queue
        held = self._assignment.hold(consumer)
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
            self._assignment.release(consumer, held)
            self._metrics.consumer_paused(False)
            waited = time.monotonic() - paused_at
            if waited >= 1.0:
                self._log.info("consumer resumed", instrument=loop.symbol, paused_s=round(waited, 3))

    def _check_caught_up(self) -> None:
        accounting = self._accounting
        if not self._assigned_once or self._assigning or self.rebalancing_since is not None:
            return  # (between partitions revoked and the new ones assigned there is nothing to catch up with)
        behind = accounting.behind(self._assignment.unread)
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
        position = self._accounting.position
        out: dict[tuple[str, int], int] = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            key = (tp.topic, tp.partition)
            if high is not None and key in position:
                out[key] = max(0, high - position[key])
        return out

    async def probe(self, timeout_s: float) -> None:
        """Raise if the consumer group's coordinator cannot be reached within ``timeout_s``.

        The request is an OffsetFetch of the orders topic's first partition: a few bytes each way, answered
        by the broker the group's offsets live on. (A metadata request for all topics would grow with the
        cluster, every probe interval.) While the group is joining (at start-up, in a rebalance) aiokafka holds
        an OffsetFetch until the join is done, seconds on some brokers, which is no failure: then the request is
        a ListOffsets of that partition, answered by its leader.
        """
        consumer = self._consumer
        if consumer is None:
            raise ConnectionError("the consumer is not started")
        tp = TopicPartition(self.topic, 0)
        async with asyncio.timeout(timeout_s):
            if not self._assigned_once or self.rebalancing_since is not None:
                await consumer.end_offsets([tp])
            else:
                await consumer.committed(tp)

    async def on_published(self, batch: Batch) -> None:
        """Listener (of the fan-out, or of the journal writer when nothing is published): the batch's events
        are durable and published, so the offsets of its commands may be committed."""
        for instrument, partition in self._accounting.published(batch, self._homes.stored):
            self._homes.learned(instrument, partition)  # stored with this batch

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        offsets = self._accounting.committable(assigned, self._assignment.unread)
        if not offsets:
            return
        try:
            await consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except KafkaError as exc:
            self._log.warning("offset commit failed; will retry", error=str(exc))
            return
        self._accounting.was_committed(offsets)

    # ------------------------------------------------------- the group's rebalances (see :mod:`.rebalance`)

    async def revoking(self, partitions: set[TopicPartition]) -> None:
        """The group takes ``partitions`` away: stop handing their records on, give their instruments up (all of
        their outcomes durable and published), dead-letter and commit what is done, then drop them."""
        consumer = self._consumer
        if consumer is None:
            return
        keys = sorted((tp.topic, tp.partition) for tp in partitions)
        self.caught_up = False
        self.rebalancing_since = time.monotonic()
        self._metrics.rebalances.inc()
        self._assignment.unroute(keys)
        instruments = [symbol for key in keys for symbol in self._owned.pop(key, ())]
        self._log.info("partitions revoked", partitions=[p for _, p in keys], instruments=instruments)
        try:
            if self._holder is not None and (instruments or keys) and not self._stopping.is_set():
                await self._holder.release(instruments, keys)
            await self._send_refused()
            await self._commit(consumer)
        except Exception as exc:  # aiokafka would only log it
            self._fatal(exc)
        finally:
            self._assignment.revoked(partitions)

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        """The group gives this member ``partitions``: take their instruments, plan them, then replay up to their
        log ends."""
        consumer = self._consumer
        if consumer is None or self._stopping.is_set():
            return
        self._assigning = True  # caught up only once every new partition is planned
        self.caught_up = False
        try:
            await self._take(consumer, partitions)
            if self._stopping.is_set():  # the daemon began to stop meanwhile: nothing more is read
                return
            if partitions:
                await self._retrying("planning the assigned partitions",
                                     lambda: self._assignment.assign(consumer, self._logs, partitions))
            self._assigned_once = True
            self._replay_started = time.monotonic()
            self._next_progress_log = self._replay_started + 1.0
            self.caught_up = False
        except Exception as exc:  # aiokafka would only log it
            self._fatal(exc)
        finally:
            self._assigning = False
            if self.rebalancing_since is not None:
                self._metrics.rebalance_pause.observe(time.monotonic() - self.rebalancing_since)
                self.rebalancing_since = None

    async def _take(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        """Take the instruments of ``partitions`` before anything of them is read (they stay paused meanwhile)."""
        tps = sorted(partitions)
        consumer.pause(*tps)
        for tp in tps:  # a position, so the fetcher does not look for one while the partition waits for its plan
            consumer.seek(tp, 0)
        keys = [(tp.topic, tp.partition) for tp in tps]
        self._homes.counted(len(consumer.partitions_for_topic(self.topic) or ()))
        ledger = self._ledger
        if ledger is not None:
            self._homes.refresh(await self._retrying("reading the stored input offsets",
                                                     lambda: ledger.input_offsets(self.topic)))
        by_partition = {key: self._homes.instruments_on([key[1]]) for key in keys}
        instruments = [symbol for key in keys for symbol in by_partition[key]]
        self._log.info("partitions assigned", partitions=[p for _, p in keys], instruments=instruments)
        if self._holder is not None:
            offsets = await self._holder.acquire(instruments, keys)
            self._holder.keep_only(instruments)
            self._accounting.adopt(offsets)
        self._owned.update(by_partition)

    async def _retrying(self, doing: str, attempt: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """``attempt()``, again while the store answers with a transient error (the database restarting)."""
        delay = 0.1
        while True:
            try:
                return await attempt()
            except StoreUnavailable as exc:
                if not exc.retriable or self._stopping.is_set():
                    raise
                self._log.warning(f"{doing} failed; retrying", retry_in_s=round(delay, 2), error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _fatal(self, exc: BaseException) -> None:
        self._log.critical("taking or giving up partitions failed", error=f"{type(exc).__name__}: {exc}")
        if self._on_fatal is not None:
            self._on_fatal(exc)
        else:
            raise exc

    async def lose(self, partitions: Iterable[tuple[str, int]], instruments: Iterable[str]) -> None:
        """Another process took these (a fenced commit): their partitions -- with the instruments' own -- are not
        read, and nothing of them is committed, until the group takes them away."""
        keys = set(partitions) | {key for key, symbols in self._owned.items() if set(symbols) & set(instruments)}
        consumer = self._consumer
        if consumer is None or not keys:
            return
        self._assignment.lose(consumer, keys)
        self._log.error("orders partitions lost to another process; not read until the consumer group takes them "
                        "away", partitions=sorted(p for _, p in keys))

    @property
    def lost(self) -> Mapping[tuple[str, int], float]:
        """Assigned partitions another process owns now (``/readyz``): since when (``time.time()``)."""
        return self._assignment.lost

    def owned(self) -> dict[str, int]:
        """Each instrument taken for an assigned partition, and that partition."""
        return {symbol: partition for (_, partition), symbols in self._owned.items() for symbol in symbols}
