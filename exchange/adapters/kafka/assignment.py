"""The orders partitions this member holds: planned from the store when assigned, blocked when their log lost data.

**Offsets that go backwards are an incident, never a skip.** The consumer runs with
``auto_offset_reset = "none"`` and seeks every partition itself. At each assignment, and whenever a
fetch shows the log end below the position read so far (or the broker answers that the position is
out of range), the partition is checked against the store
(:func:`exchange.pipeline.offsets.plan_partition`): a log that no longer holds what was applied, or
lost messages not yet read, is paused and reported (:attr:`Assignment.incidents`: ``/readyz``, the
log, a metric), naming the topic, partition and offsets. It stays paused until its log is whole
again, or an operator asks to continue from a stated offset (``exchange admin accept-offset``,
journaled in ``input_resets``; applied once nothing of the partition is in flight).

:class:`Assignment` is the one owner of which assigned partitions are planned (``ready``), which of
those are read (``routable``: no incident, not lost), the incidents, the partitions lost to another
process (``lost``: a fenced commit; not read until the group takes them away), and the back-pressure
pause; where each
is read from is :class:`~exchange.adapters.kafka.accounting.InputAccounting`'s, how far it is
dead-lettered :class:`~exchange.adapters.kafka.deadletters.DeadLetters`'.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer, TopicPartition

from exchange.adapters.kafka.accounting import InputAccounting
from exchange.adapters.kafka.deadletters import DeadLetters
from exchange.adapters.kafka.homes import Homes
from exchange.adapters.kafka.logs import LogReader
from exchange.pipeline.offsets import PartitionPlan, plan_partition
from exchange.ports import InputLedger, InputReset, StoreUnavailable
from exchange.telemetry.metrics import Metrics

__all__ = ["Assignment", "Incident"]


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


class Assignment:
    """The assigned orders partitions (see the module docstring). ``ledger`` is the store's side of the input
    (the partitions' own offsets, operator resets), None in tests that have no store."""

    def __init__(self, *, topic: str, accounting: InputAccounting, dead_letters: DeadLetters, homes: Homes,
                 ledger: InputLedger | None, metrics: Metrics, log: Any) -> None:
        self.topic = topic
        self._accounting = accounting
        self._dead_letters = dead_letters
        self._homes = homes
        self._ledger = ledger
        self._metrics = metrics
        self._log = log
        self.incidents: dict[tuple[str, int], Incident] = {}
        self.ready: set[tuple[str, int]] = set()  # partitions whose assignment plan is in place
        self.routable: set[tuple[str, int]] = set()  # of those, the ones without an incident, not lost
        self.lost: dict[tuple[str, int], float] = {}  # taken by another process (fenced): since when (time.time())
        self._held = False  # paused for back-pressure (a partition planned meanwhile stays paused)

    # ---------------------------------------------------------------- the group assigns and revokes

    async def assign(self, consumer: AIOKafkaConsumer, logs: LogReader | None, partitions: set[TopicPartition]) -> None:
        """Plan each new partition: where to read it from, or the incident that keeps it paused."""
        tps = sorted(partitions)
        accounting = self._accounting
        # Nothing of a new partition is fetched until its plan is in place: paused (and given a position, so the
        # fetcher does not look for one) before the first await, resumed once it is sought to the plan's start.
        consumer.pause(*tps)
        for tp in tps:
            consumer.seek(tp, 0)
        self._homes.counted(len(consumer.partitions_for_topic(self.topic) or ()))
        stored = await self._stored_offsets()
        for tp in tps:
            key = (tp.topic, tp.partition)
            plan, committed, ends = await self._plan(consumer, logs, tp, stored)
            if plan.problem is not None:
                consumer.seek(tp, plan.start)  # a position, so the fetcher leaves it alone while paused
                accounting.seek(key, plan.start)
                self.block(consumer, tp, plan.problem)
                self.ready.add(key)
                continue
            # Read from the plan: what this process routed in an earlier assignment of the partition was made
            # durable before it was given up (or, if that did not finish, its engine was reloaded from the store)
            start = plan.start
            dead_through = await self._dead_letters.read_back(logs, tp, start)
            consumer.seek(tp, start)
            accounting.seek(key, start)
            accounting.replay_to(key, ends)
            self.ready.add(key)
            self.routable.add(key)
            if not self._held:  # (back-pressure resumes it with the rest)
                consumer.resume(tp)
            self._log.info("partition assigned", partition=tp.partition, start_offset=start,
                           committed=committed, end_offset=ends, dead_lettered_through=dead_through)
        for symbol, home, expected in self._homes.moved():
            self._log.warning("an instrument lives on another partition than the producer contract gives it "
                              "(were partitions added to the orders topic?); its messages on any other "
                              "partition are refused", instrument=symbol, stored_partition=home,
                              murmur2_partition=expected, partitions=self._homes.count)

    def unroute(self, keys: Iterable[tuple[str, int]]) -> None:
        """Stop handing on records of these partitions (the group is taking them away)."""
        for key in keys:
            self.routable.discard(key)

    def lose(self, consumer: AIOKafkaConsumer, keys: Iterable[tuple[str, int]]) -> None:
        """Another process owns these partitions now (a commit was fenced): stop reading them, forget what was in
        flight (it is never committed), and wait for the group to take them away."""
        assigned = {(tp.topic, tp.partition): tp for tp in consumer.assignment()}
        keys = [key for key in keys if key not in self.lost]
        for key in keys:
            self.lost[key] = time.time()
            self.routable.discard(key)
            self._dead_letters.forget(key)
            if key in assigned:
                consumer.pause(assigned[key])
        self._accounting.forget(keys)

    @property
    def unread(self) -> set[tuple[str, int]]:
        """The assigned partitions not read: an incident, or lost to another process."""
        return self.incidents.keys() | self.lost.keys()

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._accounting.forget(keys)
        for key in keys:
            self.incidents.pop(key, None)
            self.lost.pop(key, None)
            self._dead_letters.forget(key)
            self.ready.discard(key)
            self.routable.discard(key)

    # ---------------------------------------------------------------- back-pressure

    def hold(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        """Pause fetching every assigned partition (a loop's queue is full); returns what :meth:`release` resumes."""
        assignment = list(consumer.assignment())
        consumer.pause(*assignment)
        self._held = True
        return assignment

    def release(self, consumer: AIOKafkaConsumer, held: Iterable[TopicPartition]) -> None:
        """Resume what :meth:`hold` paused, except the partitions not planned or blocked meanwhile."""
        consumer.resume(*[tp for tp in held if (tp.topic, tp.partition) in self.routable])
        self._held = False

    # ---------------------------------------------------------------- logs that lost data

    def block(self, consumer: AIOKafkaConsumer, tp: TopicPartition, problem: str) -> None:
        """Stop reading ``tp``: its log does not hold what this exchange applied (an incident)."""
        key = (tp.topic, tp.partition)
        if key in self.incidents:
            return
        incident = self.incidents[key] = Incident(tp.topic, tp.partition, problem, time.time())
        self.routable.discard(key)
        if tp in consumer.assignment():
            consumer.pause(tp)
        self._accounting.stop_replay(key)
        self._log.error("orders partition not consumed: its log does not hold what this exchange applied",
                        partition=tp.partition, problem=problem, what_to_do=incident.describe())
        self._metrics.input_incidents.set(len(self.incidents))

    def check_highwater(self, consumer: AIOKafkaConsumer) -> None:
        """A log end below the position read so far means the log lost data while this process ran."""
        position = self._accounting.position
        for tp in consumer.assignment():
            key = (tp.topic, tp.partition)
            high = consumer.highwater(tp)
            read = position.get(key)
            if high is not None and read is not None and high < read and key not in self.incidents:
                self.block(consumer, tp, f"the log now ends at offset {high}, below offset {read}, up to "
                           "which this exchange has read it: the broker lost data (restarted without its volume, "
                           "or the topic was deleted and recreated)")

    async def review(self, consumer: AIOKafkaConsumer, logs: LogReader | None) -> bool:
        """Every few seconds: apply an operator's reset of a blocked partition, or unblock one whose log is
        whole again (the broker got its data back). True if a partition is read again (to replay)."""
        try:
            stored = await self._stored_offsets()
            resets = await self._ledger.input_resets(self.topic) if self._ledger is not None else []
        except StoreUnavailable as exc:
            self._log.warning("checking the blocked partitions failed; will retry", error=str(exc))
            return False
        assigned = {(tp.topic, tp.partition): tp for tp in consumer.assignment()}
        unblocked = False
        for key in list(self.incidents):
            tp = assigned.get(key)
            if tp is None:
                self.incidents.pop(key)
                continue
            reset = next((r for r in resets if r.partition == tp.partition), None)
            if reset is not None:
                unblocked = await self._apply_reset(consumer, logs, tp, reset, stored) or unblocked
                continue
            plan, _, ends = await self._plan(consumer, logs, tp, stored)
            if plan.problem is None:
                self._log.info("orders partition whole again; consuming it", partition=tp.partition,
                               start_offset=plan.start)
                self._unblock(consumer, tp, plan.start, ends)
                unblocked = True
        self._metrics.input_incidents.set(len(self.incidents))
        return unblocked

    async def _apply_reset(self, consumer: AIOKafkaConsumer, logs: LogReader | None, tp: TopicPartition,
                           reset: InputReset, stored: Mapping[tuple[str, int], int]) -> bool:
        key = (tp.topic, tp.partition)
        assert self._ledger is not None
        if self._accounting.in_flight(key):
            return False  # what was dispatched before the incident becomes durable first; next review
        log_start = (await consumer.beginning_offsets([tp]))[tp]
        log_end = (await consumer.end_offsets([tp]))[tp]
        if reset.offset > log_end:
            log_end = max(log_end, await _log_end(logs, tp, reset.offset - 1))
        before = {i or "(partition)": o for (i, p), o in sorted(stored.items()) if p == tp.partition}
        if not log_start <= reset.offset <= log_end:
            note = (f"refused: offset {reset.offset} is outside the log ({log_start} - {log_end}); ask again with an "
                    "offset in it")
            await self._ledger.refuse_input_reset(reset, note)
            self._log.warning("input reset refused", partition=tp.partition, reset_id=reset.id, note=note)
            return False
        note = (f"applied: continue at offset {reset.offset}; stored offsets were {before}; the log held "
                f"{log_start} - {log_end}; {self.incidents[key].problem}")
        await self._ledger.apply_input_reset(reset, note)
        self._accounting.reset(key, reset.offset)
        self._log.warning("input reset applied: continuing the orders partition from the operator's offset",
                          partition=tp.partition, offset=reset.offset, operator=reset.operator, reason=reset.reason,
                          reset_id=reset.id, stored_before=before)
        self._unblock(consumer, tp, reset.offset, log_end)
        return True

    def _unblock(self, consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int) -> None:
        key = (tp.topic, tp.partition)
        self.incidents.pop(key, None)
        self._dead_letters.forget(key)
        self._accounting.restart(key, start, end)
        consumer.seek(tp, start)
        self.routable.add(key)
        consumer.resume(tp)

    # ---------------------------------------------------------------- plans

    async def _stored_offsets(self) -> dict[tuple[str, int], int]:
        """(instrument, partition) -> last offset, the partitions' own rows (instrument "") included: this
        process's view merged with the store's (which has the partitions' rows)."""
        out = {(i, p): o for (i, t, p), o in self._accounting.applied.items() if t == self.topic}
        if self._ledger is not None:
            for key, offset in (await self._ledger.input_offsets(self.topic)).items():
                if offset > out.get(key, -1):
                    out[key] = offset
        return out

    async def _plan(self, consumer: AIOKafkaConsumer, logs: LogReader | None, tp: TopicPartition,
                    stored: Mapping[tuple[str, int], int]) -> tuple[PartitionPlan, int | None, int]:
        applied = [o for (i, p), o in stored.items() if p == tp.partition and i]
        routed = stored.get(("", tp.partition))
        committed = await consumer.committed(tp)
        log_start = (await consumer.beginning_offsets([tp]))[tp]
        log_end = (await consumer.end_offsets([tp]))[tp]
        needed = max([o + 1 for o in applied] + ([routed + 1] if routed is not None else []) + [0])
        if log_end < needed:  # some brokers report the start of the last batch: read what is really there
            log_end = max(log_end, await _log_end(logs, tp, needed - 1))
        plan = plan_partition(applied=applied, routed=routed, committed=committed, log_start=log_start,
                              log_end=log_end)
        return plan, committed, log_end


async def _log_end(logs: LogReader | None, tp: TopicPartition, offset: int) -> int:
    """The partition's real log end if it holds ``offset`` (read back), else -1."""
    return await logs.log_end(tp, offset) if logs is not None else -1
