"""How far each orders partition is read, handed on, durable and committed, and how far each instrument is stored.

:class:`InputAccounting` is the one owner of the order source's offset state:

- ``position``: per partition, the next offset to read (a record below it was routed once already:
  fetched again after a seek, it is skipped, never applied twice);
- ``applied``: per (instrument, topic, partition), the last offset the store has for it (start-up,
  then every published batch): a record at or below it was applied before a restart and is skipped;
- two offset trackers (:class:`~exchange.pipeline.offsets.OffsetTracker`) of the same dispatched
  offsets: ``tracker`` advances when a batch is published (what may be committed to Kafka),
  ``batched`` when the journal writer takes it into a batch (the partition's own stored row,
  :meth:`InputAccounting.partition_progress`); a skipped record, or a refused one once its dead
  letter is on the broker, counts as done in both;
- ``committed``: what was last committed to Kafka, so an unchanged offset is not committed again;
- ``replay_until``: per partition, the log end seen when it was assigned (or unblocked): the source
  has caught up once it has read that far on every partition without an incident (:meth:`behind`).

Nothing here talks to Kafka; :class:`~exchange.adapters.kafka.source.OrderSource` and
:class:`~exchange.adapters.kafka.assignment.Assignment` move it, through these methods only.
"""

from __future__ import annotations

from collections.abc import Collection, Container, Iterable, Mapping, Sequence

from exchange.pipeline.offsets import OffsetTracker
from exchange.ports import Applied, Batch

__all__ = ["InputAccounting"]

Key = tuple[str, int]  # (topic, partition)


class InputAccounting:
    """The order source's offsets (see the module docstring). ``applied_offsets``: the store's progress at
    start-up, ``(instrument, topic, partition) -> last applied offset``."""

    def __init__(self, topic: str, applied_offsets: Mapping[tuple[str, str, int], int]) -> None:
        self.topic = topic
        self.applied = dict(applied_offsets)  # (instrument, topic, partition) -> last applied offset
        self.tracker = OffsetTracker()  # what may be committed to Kafka: durable and, with fan-out, published
        self.batched = OffsetTracker()  # what the journal writer has taken into a batch (Batch.partitions)
        self.position: dict[Key, int] = {}  # next offset to read, per partition
        self.committed: dict[Key, int] = {}  # last committed to Kafka
        self.replay_until: dict[Key, int] = {}  # end offsets seen at assignment

    # ---------------------------------------------------------------- one record

    def read(self, key: Key, offset: int) -> None:
        """The record at ``offset`` was taken from the partition: the next one to read follows it."""
        self.position[key] = offset + 1

    def is_applied(self, instrument: str, key: Key, offset: int) -> bool:
        """Was ``offset`` applied to ``instrument`` and made durable before the restart?"""
        return offset <= self.applied.get((instrument, key[0], key[1]), -1)

    def dispatched(self, key: Key, offset: int) -> None:
        """The record went on (to a loop, or to the dead-letter topic): it is not done yet."""
        self.tracker.dispatched(key, offset)
        self.batched.dispatched(key, offset)

    def skipped(self, key: Key, offset: int) -> None:
        """The record needs no work (applied before the restart, or a snapshot request)."""
        self.tracker.skipped(key, offset)
        self.batched.skipped(key, offset)

    def done(self, key: Key, offset: int) -> None:
        """A dispatched record needs nothing more: its dead letter is on the broker."""
        self.tracker.durable(key, offset)
        self.batched.durable(key, offset)

    # ---------------------------------------------------------------- batches

    def partition_progress(self, applied: Sequence[Applied], incidents: Container[Key]) -> dict[Key, int]:
        """The journal writer forms a batch of ``applied``: per partition read here, the offset every message
        up to which is in this batch or an earlier one, or needed nothing (skipped, dead-lettered). Once the
        batch is durable, so is everything up to it: the journal stores it with the batch (the partition's
        own row), and a restart reads on after it. A partition with an incident is left out."""
        batched = self.batched
        for item in applied:
            pos = item.position
            if pos is not None:
                batched.durable((pos.topic, pos.partition), pos.offset)
        return {tp: offset - 1 for tp, offset in batched.committable().items()
                if tp not in incidents and offset > 0}

    def published(self, batch: Batch, homed: Container[str]) -> list[tuple[str, int]]:
        """The batch is published: its offsets may be committed, and the store has its instruments' offsets.
        Returns ``(instrument, partition)`` for each instrument of this topic not in ``homed`` whose first
        offset the batch stored (the partition it lives on from now)."""
        tracker = self.tracker
        applied = self.applied
        topic = self.topic
        homes: list[tuple[str, int]] = []
        for item in batch.applied:
            pos = item.position
            if pos is not None:
                tracker.durable((pos.topic, pos.partition), pos.offset)
                key = (item.instrument, pos.topic, pos.partition)
                if pos.offset > applied.get(key, -1):
                    applied[key] = pos.offset
                    if pos.topic == topic and item.instrument not in homed:
                        homes.append((item.instrument, pos.partition))
        return homes

    # ---------------------------------------------------------------- commits to Kafka

    def committable(self, assigned: Collection[Key], incidents: Container[Key]) -> dict[Key, int]:
        """The offsets to commit now: assigned partitions without an incident, where the offset moved."""
        committed = self.committed
        return {key: offset for key, offset in self.tracker.committable().items()
                if key in assigned and key not in incidents and committed.get(key) != offset}

    def was_committed(self, offsets: Mapping[Key, int]) -> None:
        self.committed.update(offsets)

    # ---------------------------------------------------------------- partitions come and go

    def seek(self, key: Key, start: int) -> None:
        """The partition is read from ``start`` (its plan at assignment, or where it was blocked)."""
        self.position[key] = start

    def replay_to(self, key: Key, end: int) -> None:
        """Caught up only once the partition is read up to ``end`` (its log end at assignment)."""
        self.replay_until[key] = end

    def restart(self, key: Key, start: int, end: int) -> None:
        """A blocked partition is read again from ``start``: what was in flight before it is forgotten."""
        self.tracker.forget([key])
        self.batched.forget([key])
        self.position[key] = start
        self.replay_until[key] = end

    def adopt(self, offsets: Mapping[str, Mapping[Key, int]]) -> None:
        """Instruments taken from the store: their stored offsets, ``instrument -> (topic, partition) -> last
        applied``, replace what this process knew of them (another process may have moved them since)."""
        for instrument, stored in offsets.items():
            for key in [k for k in self.applied if k[0] == instrument]:
                del self.applied[key]
            for (topic, partition), offset in stored.items():
                self.applied[(instrument, topic, partition)] = offset

    def reset(self, key: Key, offset: int) -> None:
        """An operator's reset: every instrument of the partition continues at ``offset``."""
        topic, partition = key
        for applied_key in [k for k in self.applied if k[1] == topic and k[2] == partition]:
            self.applied[applied_key] = offset - 1

    def stop_replay(self, key: Key) -> None:
        """The partition is not read (an incident): caught up does not wait for it."""
        self.replay_until.pop(key, None)

    def forget(self, keys: Iterable[Key]) -> None:
        """The partitions were revoked (or lost to another process): where they are read from next time is
        planned from the store."""
        keys = list(keys)
        self.tracker.forget(keys)
        self.batched.forget(keys)
        for key in keys:
            self.replay_until.pop(key, None)
            self.position.pop(key, None)

    # ---------------------------------------------------------------- reporting

    def behind(self, incidents: Container[Key]) -> int:
        """Messages still to read before the source has caught up (partitions with an incident left out)."""
        position = self.position
        return sum(max(0, end - position.get(key, 0)) for key, end in self.replay_until.items()
                   if key not in incidents)

    def in_flight(self, key: Key) -> int:
        """The partition's records dispatched and not yet published."""
        return self.tracker.in_flight(key)
