"""Which Kafka offsets are safe to commit, and where to start reading after a restart.

Messages of one partition are dispatched in offset order but become durable
out of order (each instrument's loop and batch moves at its own pace). The
:class:`OffsetTracker` keeps, per partition, the offsets dispatched and not yet
durable; the committable position is the lowest of those (or one past the
last dispatched offset when none is pending). Acknowledging is O(1) amortised.

:func:`plan_partition` is the read position after a restart or an assignment:
one past the partition's own stored offset (every message up to it is durable
or dead-lettered; the journal stores it with each batch), checked against the
log the broker has now. Messages an instrument has already applied are skipped
by comparing with that instrument's own stored offset, so nothing is applied
twice and nothing is lost — also for an instrument that had not yet made
anything durable. A log that lost what the store says was there is a problem
to report, never a position to jump to.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["OffsetTracker", "PartitionPlan", "plan_partition"]

TopicPartition = tuple[str, int]


class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[TopicPartition, deque[int]] = {}
        self._done: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}  # one past the last dispatched offset

    def dispatched(self, tp: TopicPartition, offset: int) -> None:
        """A message was handed on; it is not durable yet."""
        pending = self._pending.get(tp)
        if pending is None:  # (not setdefault: that would build a deque for every message)
            pending = self._pending[tp] = deque()
        pending.append(offset)
        self._next[tp] = offset + 1

    def durable(self, tp: TopicPartition, offset: int) -> None:
        """The message at ``offset`` is durable (or needs nothing more, e.g. dead-lettered)."""
        pending = self._pending.get(tp)
        if not pending:
            return
        if pending[0] == offset:
            pending.popleft()
            done = self._done.get(tp)
            while done and pending and pending[0] in done:
                done.discard(pending.popleft())
        else:
            self._done.setdefault(tp, set()).add(offset)

    def skipped(self, tp: TopicPartition, offset: int) -> None:
        """A message that needs no work (already applied before a restart)."""
        if not self._pending.get(tp):
            self._next[tp] = offset + 1
        else:
            self.dispatched(tp, offset)
            self.durable(tp, offset)

    def committable(self) -> dict[TopicPartition, int]:
        """Per partition, the offset to commit (the next message to read after a restart)."""
        out: dict[TopicPartition, int] = {}
        for tp, nxt in self._next.items():
            pending = self._pending.get(tp)
            out[tp] = pending[0] if pending else nxt
        return out

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        """Messages dispatched and not yet durable (of one partition, or of all)."""
        if tp is not None:
            return len(self._pending.get(tp, ()))
        return sum(len(p) for p in self._pending.values())

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions revoked: drop their bookkeeping."""
        for tp in tps:
            self._pending.pop(tp, None)
            self._done.pop(tp, None)
            self._next.pop(tp, None)


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    """Where to read an orders partition from, or why it must not be read (``problem``)."""

    start: int
    problem: str | None = None


def plan_partition(*, applied: Iterable[int], routed: int | None, committed: int | None, log_start: int,
                   log_end: int) -> PartitionPlan:
    """Where to start reading a partition, checked against the log the broker has now.

    ``applied``: the last offset each instrument of this partition applied (from the store); ``routed``:
    the partition's own stored offset (every message up to it is durable or dead-lettered), or None;
    ``committed``: the consumer group's committed offset, or None; ``log_start``/``log_end``: the
    partition's first offset and the offset after its last message.

    The read position is ``routed + 1``, or, with no partition offset stored, the lowest of (applied +
    1) and the committed offset; nothing stored at all: the committed offset, else the log start. A
    log that no longer holds what this exchange applied (``log_end`` at or below a stored offset), or
    that lost messages it has not read (``log_start`` above the read position, unless the group
    committed past them: then they were dead letters, or applied by an instrument that is ahead), is a
    problem: offsets that went backwards mean the broker lost data, and reading on would skip or
    re-interpret messages silently.
    """
    applied = list(applied)
    if routed is not None:
        start = routed + 1
    elif applied:
        start = min([offset + 1 for offset in applied] + ([committed] if committed is not None else []))
    else:
        start = committed if committed is not None else log_start
        if committed is not None and committed > log_end:
            return PartitionPlan(start, f"the consumer group's committed offset {committed} is beyond the log end "
                                 f"{log_end}: the topic was recreated or the broker lost data")
        return PartitionPlan(max(start, log_start))
    reached = max([offset + 1 for offset in applied] + ([routed + 1] if routed is not None else []))
    if log_end < reached:
        return PartitionPlan(start, f"the log ends at offset {log_end}, below offset {reached - 1}, which this "
                             "exchange has already applied: the broker lost data (restarted without its volume, "
                             "or the topic was deleted and recreated)")
    if log_start > start:
        if committed is not None and committed >= log_start:
            return PartitionPlan(log_start)  # what was deleted had been handled: the group committed past it
        return PartitionPlan(start, f"the log starts at offset {log_start}, above offset {start}, the next this "
                             f"exchange needs: messages {start} - {log_start - 1} were deleted (retention) before "
                             "they were applied")
    return PartitionPlan(start)
