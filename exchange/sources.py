"""What the daemon needs from an order source, whichever it is.

Two implementations: :class:`exchange.adapters.kafka.OrderSource` (a Kafka
consumer group) and :class:`exchange.adapters.generator.GeneratorSource` (a
seeded order flow in process, for the embedded default). Either one decodes
input at the edge, puts :class:`~exchange.engine.Inbound` commands with their
:class:`~exchange.journal.InputPosition` on each instrument's bounded queue
(waiting when it is full: back-pressure), skips what the store says was already
applied, and calls back once it has caught up with its input. The matching
loops and the journal never know which source feeds them.
"""

from __future__ import annotations

from typing import Protocol

from exchange.journal import Batch

__all__ = ["Source"]


class Source(Protocol):
    consumed: int  # messages taken from the input
    replayed: int  # of those, applied again after a restart (they were not durable)
    skipped: int  # of those, not applied: already durable before the restart
    dead_lettered: int  # of those, not understood
    caught_up: bool
    wall_clock_timestamps: bool  # do commands carry the time they were sent? (latency = now - ts_ns)

    async def start(self) -> None: ...

    async def run(self) -> None:
        """Feed the loops until :meth:`stop_consuming`."""
        ...

    def stop_consuming(self) -> None: ...

    async def stop(self) -> None:
        """Release the input (safe to call twice)."""
        ...

    async def on_durable(self, batch: Batch) -> None:
        """Writer listener: the batch's commands are durable."""
        ...

    def lag(self) -> dict[tuple[str, int], int]:
        """Per input partition: messages waiting to be read (empty when the source has no backlog)."""
        ...
