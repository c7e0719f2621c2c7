"""Which Kafka offsets are safe to commit, and where to start reading after a restart.

Messages of one partition are dispatched in offset order but become durable
out of order (each instrument's loop and batch moves at its own pace). The
:class:`OffsetTracker` keeps, per partition, the offsets dispatched and not yet
durable; the committable position is the lowest of those (or one past the
last dispatched offset when none is pending). Acknowledging is O(1) amortised.

:func:`start_offset` is the read position after a restart: the lowest of
"one past the last applied offset" over the instruments stored for the
partition and the consumer group's committed offset (the beginning when there
is none). Messages an instrument has already applied are skipped by comparing
with that instrument's own stored offset, so nothing is applied twice and
nothing is lost — also for an instrument that had not yet made anything durable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["OffsetTracker", "start_offset"]

TopicPartition = tuple[str, int]


class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[TopicPartition, deque[int]] = {}
        self._done: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}  # one past the last dispatched offset

    def dispatched(self, tp: TopicPartition, offset: int) -> None:
        """A message was handed on; it is not durable yet."""
        self._pending.setdefault(tp, deque()).append(offset)
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

    def in_flight(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions revoked: drop their bookkeeping."""
        for tp in tps:
            self._pending.pop(tp, None)
            self._done.pop(tp, None)
            self._next.pop(tp, None)


def start_offset(applied: Iterable[int], committed: int | None, beginning: int) -> int:
    """Where to start reading a partition after a restart (see the module docstring).

    ``applied`` are the last applied offsets of the instruments stored for this
    partition; ``committed`` is the group's committed offset (None if never).
    """
    candidates = [offset + 1 for offset in applied]
    candidates.append(committed if committed is not None else beginning)
    return max(min(candidates), beginning)
