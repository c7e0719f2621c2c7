"""What the matching loops hand to durable storage, and the storage interface.

The loops run ahead of the database: each applied command becomes an
:class:`Applied` record (its events plus where the command came from). The
journal writer collects records from every loop into a :class:`Batch` (by size
or after a few milliseconds) and commits the whole batch in ONE transaction —
events, trades, order state, positions, snapshots and the input offsets — via a
:class:`Store`. Only after ``commit`` returns is anything published or any
Kafka offset committed.

Per instrument, records arrive in sequence order, and a batch holds them in
that order. A batch is immutable once handed to ``commit``: a commit that fails
is retried with the very same batch until it succeeds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import msgspec

from exchange.events import Event
from exchange.instruments import Instrument
from exchange.matching import EngineState

__all__ = ["Applied", "Batch", "History", "InputLedger", "InputPosition", "InputReset", "Position", "Recovered",
           "SnapshotRequest", "Store", "StoreUnavailable"]


class InputPosition(msgspec.Struct, frozen=True, gc=False):
    """Where a command came from: a Kafka topic partition and offset."""

    topic: str
    partition: int
    offset: int


class Applied(msgspec.Struct, frozen=True, gc=False):
    """One command's outcome: its events (possibly none) and its input position (None if internal).

    (msgspec Structs rather than frozen dataclasses: one of these is built per command on the hot
    path, and a frozen dataclass costs several times more to construct.)
    """

    instrument: str
    events: Sequence[Event]
    position: InputPosition | None


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """An engine image taken by the loop between two commands; ``state.seq`` is the seq it reflects."""

    instrument: str
    state: EngineState
    state_hash: str


@dataclass(frozen=True, slots=True)
class Batch:
    """Everything one transaction makes durable."""

    applied: Sequence[Applied]
    snapshots: Sequence[SnapshotRequest] = ()
    # per (topic, partition) of the input: an offset every message up to which is durable (or needed nothing),
    # stored as the partition's own input_offsets row (instrument "") with the batch
    partitions: Mapping[tuple[str, int], int] = field(default_factory=dict)

    def last_seq(self) -> dict[str, int]:
        """Highest sequence number per instrument in this batch."""
        out: dict[str, int] = {}
        for item in self.applied:
            if item.events:
                out[item.instrument] = item.events[-1].seq
        return out


@dataclass(frozen=True, slots=True)
class Position:
    """A client's position in one instrument: integers in lots and in tick*lot units.

    ``cost`` is the signed cost of the open quantity (price_ticks * lots summed,
    average-cost method, reduced proportionally with floor division on a
    partial close); ``realized`` is the realized P&L in the same units.
    Multiply by tick_size * lot_size for quote currency.
    """

    net_lots: int = 0
    cost: int = 0
    realized: int = 0


@dataclass(frozen=True, slots=True)
class Recovered:
    """The durable state of one instrument, as storage returns it at start-up."""

    state: EngineState  # rebuilt from the open orders in priority order, counters, dedupe window
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) -> last applied
    positions: dict[str, Position] = field(default_factory=dict)  # client -> position


class StoreUnavailable(Exception):
    """The store cannot be reached or the transaction failed for a transient reason.

    ``retriable`` is data, not a class hierarchy: the writer retries with backoff
    while it is true, and stops the daemon loudly when it is false.

    A commit is refused for good (``retriable=False``) only for what the batch's
    own content causes: a value the store cannot hold, a constraint the rows
    break, a batch that does not continue the stored sequence (another writer),
    stored rows that do not match the event stream. The database going away is
    always transient, whatever exception the driver raises for it (a lost or
    confused connection, a timeout, an error of the server that an operator can
    put right): ``retriable=True``, and the store makes sure the next attempt
    gets a working connection. (The journal writer also retries anything a
    store raises without classifying it.) Outside commits -- opening, migrating,
    loading at start-up -- a store may refuse more for good: a missing schema or
    a wrong password must stop a start loudly.
    """

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class Store(Protocol):
    """Durable storage for the daemon (PostgreSQL in production, SQLite in the embedded default)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied."""
        ...

    async def load(self, instruments: Sequence[Instrument]) -> dict[str, Recovered]:
        """The durable state of each instrument (a fresh one when nothing is stored)."""
        ...

    async def commit(self, batch: Batch) -> None:
        """Make the batch durable in one transaction, or raise :class:`StoreUnavailable`."""
        ...


@runtime_checkable
class History(Protocol):
    """What recovery reads besides :meth:`Store.load`, to check the rebuilt books (see ``recovery/``)."""

    async def latest_snapshot(self, instrument: str, max_seq: int | None = None) -> SnapshotRequest | None:
        """The newest stored snapshot of ``instrument`` (with ``state.seq <= max_seq`` if given), or None."""
        ...

    def read_events(self, instrument: str, after_seq: int, upto_seq: int | None = None) -> AsyncIterator[
            Sequence[Event]]:
        """The stored events of ``instrument`` with ``after_seq < seq <= upto_seq``, in order, in chunks."""
        ...


@dataclass(frozen=True, slots=True)
class InputReset:
    """An operator's request to continue an orders partition from ``offset`` after its log lost data
    (``exchange admin accept-offset``); ``status`` is requested, applied or refused (``note`` says why)."""

    id: int
    topic: str
    partition: int
    offset: int
    operator: str
    reason: str
    status: str = "requested"
    note: str = ""


@runtime_checkable
class InputLedger(Protocol):
    """What the Kafka source keeps in the store besides the batches: partition offsets and input resets.

    ``input_offsets`` are the stored last offsets of ``topic`` per ``(instrument, partition)``; the
    partition's own row (every message up to it durable or dead-lettered) has instrument ``""``.
    """

    async def input_offsets(self, topic: str) -> dict[tuple[str, int], int]: ...

    async def request_input_reset(self, topic: str, partition: int, offset: int, operator: str,
                                  reason: str) -> InputReset: ...

    async def input_resets(self, topic: str, *, pending: bool = True) -> list[InputReset]: ...

    async def apply_input_reset(self, reset: InputReset, note: str) -> None:
        """In one transaction: every stored offset of the partition becomes ``offset - 1``, and the
        request is marked applied with ``note`` (the offsets it replaced and the log it found)."""
        ...

    async def refuse_input_reset(self, reset: InputReset, note: str) -> None: ...
