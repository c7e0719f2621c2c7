"""The async shell around one instrument's matching engine.

An :class:`InstrumentLoop` is the only code that touches its engine. It takes
:class:`Inbound` commands (and controls: snapshot, stop) from its bounded queue
in order, applies them, and hands the outcomes to the journal writer in
:class:`Chunk` s, each stamped with the ownership epoch the loop runs under (a
loop lives for one ownership of its instrument: taking the instrument again makes
a new loop). Controls travel in the same queue as orders, so a snapshot reflects
exactly the commands before it.

An exception escaping ``engine.apply`` is a bug in the core: the loop logs it
with context and re-raises, which stops the daemon; recovery brings it back
consistent (nothing after the last durable batch was published).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum

import msgspec

from exchange.core.commands import Command
from exchange.core.matching import MatchingEngine
from exchange.ports import Applied, InputPosition, SnapshotRequest
from exchange.telemetry.logging import get_logger
from exchange.telemetry.metrics import Metrics, discarded

__all__ = ["Chunk", "Control", "Flush", "Inbound", "InstrumentLoop", "JournalItem", "JournalQueue"]

JournalItem = Applied | SnapshotRequest
_CHUNK = 128  # commands applied per wake-up before yielding to the event loop


@dataclass(frozen=True, slots=True)
class Chunk:
    """Outcomes of one instrument's loop for the journal writer, in order, under the ownership epoch they were
    prepared under (the batch that holds them carries it: see :class:`~exchange.ports.Batch`)."""

    instrument: str
    epoch: int
    items: list[JournalItem]


@dataclass(eq=False, slots=True)
class Flush:
    """A marker on the journal queue: ``done`` is resolved once everything put on the queue before it is durable
    and its listeners ran (or was dropped, fenced). How giving an instrument up waits for its last outcomes."""

    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


JournalQueue = asyncio.Queue[Chunk | Flush | None]  # None: the loops have stopped, the writer ends


class Inbound(msgspec.Struct, frozen=True, gc=False):
    """A decoded command and where it came from."""

    command: Command
    position: InputPosition | None


class Control(Enum):
    SNAPSHOT = "snapshot"
    STOP = "stop"  # take a final snapshot, then end the loop


class InstrumentLoop:
    """Applies one instrument's commands in order; the single writer of its book."""

    def __init__(self, engine: MatchingEngine, journal: JournalQueue, *, epoch: int = 0, queue_size: int = 10_000,
                 metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.symbol = engine.symbol
        self.epoch = epoch
        self.queue: asyncio.Queue[Inbound | Control] = asyncio.Queue(queue_size)
        self._journal = journal
        self._metrics = metrics if metrics is not None else discarded()
        self._log = get_logger("exchange.engine", instrument=self.symbol)
        self.applied = 0
        self._snapshot_seq = -1  # seq of the last snapshot taken; an unchanged book is not taken again

    def snapshot(self) -> SnapshotRequest:
        state = self.engine.export_state(window=False)  # the orders table keeps the dedupe window
        self._snapshot_seq = state.seq
        return SnapshotRequest(self.symbol, state, self.engine.state_hash())

    async def run(self) -> None:
        queue = self.queue
        apply = self.engine.apply
        while True:
            item = await queue.get()
            out: list[JournalItem] = []
            stop = False
            while True:
                if type(item) is Inbound:
                    try:
                        events = apply(item.command)
                    except Exception:
                        self._log.critical("engine.apply raised; stopping so recovery can restore a consistent "
                                           "state", seq=self.engine.seq, command=repr(item.command),
                                           position=repr(item.position), exc_info=True)
                        raise
                    out.append(Applied(self.symbol, events, item.position))
                elif item is Control.SNAPSHOT:
                    if self.engine.seq != self._snapshot_seq:
                        out.append(self.snapshot())
                elif item is Control.STOP:
                    if self.engine.seq != self._snapshot_seq:
                        out.append(self.snapshot())
                    stop = True
                    break
                if len(out) >= _CHUNK or queue.empty():
                    break
                item = queue.get_nowait()
            applied = sum(1 for x in out if type(x) is Applied)
            self.applied += applied
            self._metrics.commands_applied(self.symbol, applied, queue.qsize())
            if out:
                journal = self._journal
                chunk = Chunk(self.symbol, self.epoch, out)
                if journal.full():
                    await journal.put(chunk)  # back-pressure: waits for the writer
                else:
                    journal.put_nowait(chunk)
                    # yield: neither put() with room nor get() on a non-empty queue suspends, so without
                    # this a loop with a backlog would apply all of it in one go, holding up every other
                    # task (the journal writer's round trips above all) for tens of milliseconds
                    await asyncio.sleep(0)
            if stop:
                return
