"""Dead letters exactly once: what the edge refuses goes to the dead-letter topic, once, in offset order.

A refused message goes to the dead-letter topic with the reason code and text in headers
(``reason``, ``text``, ``source_topic``/``source_partition``/``source_offset``,
``expected_partition`` for ``wrong_partition``); when the sender can be identified, it also gets an
unsequenced ``rejected`` event (seq 0) on the events topic, before its dead letter. Neither stops
the consumer.

The dead letters of one orders partition go to one dead-letter partition (``source partition %
partitions``), in offset order, and a refused offset counts as done (stored with the next batch,
committed to Kafka) only once its dead letter is on the broker. After any restart the assignment
reads the dead-letter partition back from its end to find the last offset already dead-lettered
(:meth:`DeadLetters.read_back`), so a crash between the send and the store never sends one twice.
(The sender's seq-0 rejection is at least once: a crash between it and its dead letter sends it
again.)

:class:`DeadLetters` is the one owner of the refusals not yet sent and of how far each partition is
dead-lettered; :class:`~exchange.adapters.kafka.publisher.KafkaEventPublisher` sends them, and
:class:`~exchange.adapters.kafka.logs.LogReader` reads them back.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from exchange.adapters.kafka.accounting import InputAccounting
from exchange.adapters.kafka.logs import LogReader
from exchange.adapters.kafka.publisher import KafkaEventPublisher
from exchange.core.types import RejectReason
from exchange.pipeline.router import Refusal
from exchange.telemetry.metrics import Metrics

__all__ = ["DeadLetters"]

_REFUSED_MAX = 500  # refusals gathered before they are sent (and at the end of every poll)


class _Refused(NamedTuple):
    key: tuple[str, int]
    record: Any
    refusal: Refusal


class DeadLetters:
    """The orders topic's dead letters (see the module docstring): refusals gathered during a poll, sent
    together at its end (or once :attr:`full`), each offset done in ``accounting`` once it is on the broker."""

    def __init__(self, publisher: KafkaEventPublisher, topic: str, accounting: InputAccounting, *,
                 metrics: Metrics, log: Any) -> None:
        self._publisher = publisher
        self.topic = topic
        self._accounting = accounting
        self._metrics = metrics
        self._log = log
        self._pending: list[_Refused] = []  # refusals of the current poll, sent together at its end
        self._through: dict[tuple[str, int], int] = {}  # per partition: dead-lettered through (read back)
        self._dead_log = _RateLimited(log, "message dead-lettered", per_s=10)

    @property
    def pending(self) -> bool:
        """Refusals gathered and not sent yet."""
        return bool(self._pending)

    @property
    def full(self) -> bool:
        """Enough refusals gathered to send them before the poll ends."""
        return len(self._pending) >= _REFUSED_MAX

    def refuse(self, key: tuple[str, int], record: Any, refusal: Refusal) -> bool:
        """Input no loop will see: dead-lettered (and answered) by the next :meth:`send`, exactly once.
        False if it was dead-lettered before a restart (then it is done, and not sent again)."""
        accounting = self._accounting
        accounting.dispatched(key, record.offset)
        if refusal.internal is not None:
            self._log.error("the edge failed on a message; dead-lettered as internal_error", partition=record.partition,
                            offset=record.offset, error=f"{type(refusal.internal).__name__}: {refusal.internal}",
                            exc_info=refusal.internal)
        if record.offset <= self._through.get(key, -1):  # dead-lettered before a restart: not again
            accounting.done(key, record.offset)
            return False
        self._pending.append(_Refused(key, record, refusal))
        return True

    async def send(self) -> int:
        """The refusals gathered: first the senders' rejections (seq 0), then the dead letters, in offset order;
        each offset counts as done once its dead letter is on the broker. Returns how many were sent."""
        refused, self._pending = self._pending, []
        if not refused:
            return 0
        publisher = self._publisher
        await publisher.deliver([publisher.rejection(r.refusal, r.record.timestamp * 1_000_000
                                                     if r.refusal.reason is not RejectReason.INVALID_TIMESTAMP else 0)
                                 for r in refused if r.refusal.client_id])
        await publisher.deliver([publisher.dead_letter(self.topic, r.record, r.refusal) for r in refused])
        for r in refused:
            self._metrics.dead_letters.labels(r.refusal.reason.value).inc()
            self._dead_log.warning(reason=r.refusal.reason.value, text=r.refusal.text, partition=r.record.partition,
                                   offset=r.record.offset)
            self._accounting.done(r.key, r.record.offset)
            if r.record.offset > self._through.get(r.key, -1):
                self._through[r.key] = r.record.offset
        return len(refused)

    async def read_back(self, logs: LogReader | None, tp: TopicPartition, start: int) -> int:
        """How far ``tp`` is dead-lettered already: the highest of its offsets on the dead-letter topic (-1 if
        none at or after ``start``). Its refusals up to there are not sent again."""
        through = await self._dead_lettered_through(logs, tp, start)
        self._through[(tp.topic, tp.partition)] = through
        return through

    async def _dead_lettered_through(self, logs: LogReader | None, tp: TopicPartition, start: int) -> int:
        if logs is None:
            return -1
        try:
            parts = sorted(await self._publisher.partitions(self.topic))
        except KafkaError:
            return -1
        if not parts:
            return -1
        return await logs.dead_lettered_through(TopicPartition(self.topic, parts[tp.partition % len(parts)]), tp, start)

    def forget(self, key: tuple[str, int]) -> None:
        """The partition was revoked, lost to another process, or is read again from an operator's offset: read it
        back next time; its refusals not sent yet are dropped (whoever reads it next refuses them again)."""
        self._through.pop(key, None)
        self._pending = [r for r in self._pending if r.key != key]


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
