"""Every interface between the pipeline and the outside world, and the records that cross them.

The pipeline is source -> loop -> writer -> store -> fan-out (see ``exchange/pipeline``); its
adapters (``exchange/adapters``) implement these protocols, and the composition root
(``exchange/service``) wires them together. Nothing here does I/O.

- :class:`Source`: where commands come from (a Kafka consumer group, or the in-process generator).
- :class:`Store` (and :class:`History`, :class:`InputLedger`, :class:`PublishWatermark`): where the
  journal writer makes batches durable, and what recovery and the fan-out read back.
- :class:`Sink`: where market data goes; :data:`OrderStates` feeds the Kafka order-state records.

The loops run ahead of the database: each applied command becomes an
:class:`Applied` record (its events plus where the command came from). The
journal writer collects records from every loop into a :class:`Batch` (by size
or after a few milliseconds) and commits the whole batch in ONE transaction --
events, trades, order state, positions, snapshots and the input offsets -- via a
:class:`Store`. Only after ``commit`` returns is anything published or any
Kafka offset committed.

Per instrument, records arrive in sequence order, and a batch holds them in
that order. A batch is immutable once handed to ``commit``: a commit that fails
is retried with the very same batch until it succeeds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import msgspec

from exchange.core.events import Event
from exchange.core.instruments import Instrument
from exchange.core.state import EngineState

__all__ = [
    "Applied",
    "Batch",
    "CannotStart",
    "Epochs",
    "Fenced",
    "History",
    "Holder",
    "InputLedger",
    "InputPosition",
    "InputReset",
    "OrderStates",
    "Outgoing",
    "Position",
    "PublishWatermark",
    "Recovered",
    "Sink",
    "SinkUnavailable",
    "SnapshotRequest",
    "Source",
    "Store",
    "StoreCannotOpen",
    "StoreUnavailable",
    "cannot_start",
]


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
    """Everything one transaction makes durable, and the ownership epochs it was prepared under.

    A store writes a batch only while every epoch it carries is still the stored one (see
    :class:`Epochs`): ``epochs`` has one for each instrument with records or snapshots in the batch,
    ``partition_epochs`` one for each partition in ``partitions``.
    """

    applied: Sequence[Applied]
    snapshots: Sequence[SnapshotRequest] = ()
    # per (topic, partition) of the input: an offset every message up to which is durable (or needed nothing),
    # stored as the partition's own input_offsets row (instrument "") with the batch
    partitions: Mapping[tuple[str, int], int] = field(default_factory=dict)
    epochs: Mapping[str, int] = field(default_factory=dict)
    partition_epochs: Mapping[tuple[str, int], int] = field(default_factory=dict)

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


class CannotStart(Exception):
    """A start-up failure an operator puts right outside the process: a database that does not exist, a
    password refused, a server or a broker that does not answer, a topic that is missing. The message names
    what failed and says what to do; the process reports it as one line, without a traceback, and exits 1."""


class StoreCannotOpen(StoreUnavailable, CannotStart):
    """The store cannot be opened (connecting): retriable or not, as any :class:`StoreUnavailable`."""


def cannot_start(exc: BaseException) -> CannotStart | None:
    """The :class:`CannotStart` that ended a start, looking through exception groups (a task group's), or None."""
    if isinstance(exc, CannotStart):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = cannot_start(sub)
            if found is not None:
                return found
    return None


@dataclass(frozen=True, slots=True)
class Epochs:
    """Ownership epochs: per instrument, and per orders partition ``(topic, partition)``.

    Taking an instrument or a partition (:meth:`Store.take`) bumps its epoch in the store; a batch
    carries the epochs its records were prepared under, and the store refuses it (:class:`Fenced`), in
    the transaction that would write it, once another process has taken one of them since.
    """

    instruments: Mapping[str, int] = field(default_factory=dict)
    partitions: Mapping[tuple[str, int], int] = field(default_factory=dict)


class Fenced(Exception):
    """The store refused a batch: another process took some of its instruments or partitions since it was
    prepared. ``current`` holds the stored epochs of exactly those (0: never taken). Nothing was written.

    Not a :class:`StoreUnavailable`: retrying cannot help, and stopping would be wrong. The writer drops what
    belongs to them and commits the rest; the process stops applying them and carries on with the others.
    """

    def __init__(self, current: Epochs) -> None:
        def now(epoch: int) -> str:
            return f"epoch now {epoch}" if epoch else "never taken"

        parts = [f"{symbol} ({now(epoch)})" for symbol, epoch in sorted(current.instruments.items())]
        parts += [f"{topic}[{partition}] ({now(epoch)})"
                  for (topic, partition), epoch in sorted(current.partitions.items())]
        super().__init__("fenced: another process took " + ", ".join(parts))
        self.current = current


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
        """Make the batch durable in one transaction, or raise :class:`StoreUnavailable` or :class:`Fenced`."""
        ...

    async def take(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]], owner: str) -> Epochs:
        """Take ownership: bump the epoch of each instrument and partition (waiting for a commit under the old
        epoch to end) and return the new ones. ``owner`` names the process for operators."""
        ...

    async def epochs(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]]) -> Epochs:
        """The stored epochs of these instruments and partitions (0: never taken)."""
        ...

    async def order_states(self, instrument: str, order_ids: Sequence[int]) -> list[dict[str, Any]]:
        """The stored state of these orders of ``instrument`` (the Kafka publisher's order-state records)."""
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


# -- order sources ---------------------------------------------------------------------------------

# What the daemon needs from an order source, whichever it is.
#
# Two implementations: :class:`exchange.adapters.kafka.OrderSource` (a Kafka
# consumer group) and :class:`exchange.adapters.generator.source.GeneratorSource` (a
# seeded order flow in process, for the embedded default). Either one decodes
# input at the edge, puts :class:`~exchange.pipeline.loop.Inbound` commands with their
# :class:`~exchange.ports.InputPosition` on each instrument's bounded queue
# (waiting when it is full: back-pressure), skips what the store says was already
# applied, and calls back once it has caught up with its input. The matching
# loops and the journal never know which source feeds them.

class Source(Protocol):
    consumed: int  # messages taken from the input
    replayed: int  # of those, applied again after a restart (they were not durable)
    skipped: int  # of those, not applied: already durable before the restart
    dead_lettered: int  # of those, not understood
    caught_up: bool
    wall_clock_timestamps: bool  # do commands carry the time they were sent? (latency = now - ts_ns)

    @property
    def catchup_ends(self) -> Mapping[tuple[str, int], int]:
        """Per input partition, its log end when this process was assigned it: input below it is catch-up (a
        restart's replay, or what waited while no process read it), whose latency from ``ts_ns`` measures the
        wait, not the engine (``exchange_catchup_latency_seconds`` rather than ``exchange_order_latency_seconds``)."""
        ...

    async def start(self) -> None: ...

    async def run(self) -> None:
        """Feed the loops until :meth:`stop_consuming`."""
        ...

    def stop_consuming(self) -> None: ...

    async def stop(self) -> None:
        """Release the input (safe to call twice)."""
        ...

    async def on_published(self, batch: Batch) -> None:
        """The batch is durable and its events are published (the fan-out's listener; the journal writer's
        when nothing is published): the input offsets of its commands may be committed."""
        ...

    def lag(self) -> dict[tuple[str, int], int]:
        """Per input partition: messages waiting to be read (empty when the source has no backlog)."""
        ...


class Holder(Protocol):
    """What a source asks of the process when its input's partitions come and go: take the instruments that live
    on them (recovered, a loop each, under new epochs), give them up (everything of theirs durable and published
    first), and, once an assignment is complete, forget what it did not give back. The daemon's
    :class:`~exchange.service.holdings.Holdings`."""

    async def acquire(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]]
                      ) -> Mapping[str, Mapping[tuple[str, int], int]]:
        """Returns the stored input offsets, ``(topic, partition) -> last applied``, of each instrument loaded from
        the store (one kept from before has none)."""
        ...

    async def release(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]]) -> None: ...

    def keep_only(self, instruments: Iterable[str]) -> None: ...


# -- market data and order events out ----------------------------------------------------------------

Outgoing = tuple[str, str, bytes]  # ("publish", channel, message) or ("set", key, value)
OrderStates = Callable[[str, Sequence[int]], Awaitable[list[dict[str, Any]]]]
"""The stored state of some orders of one instrument (the Kafka publisher's order-state records)."""


class SinkUnavailable(Exception):
    """The market-data sink cannot be reached; the message says where and why (never a secret)."""


class Sink(Protocol):
    """Where market data goes: Redis in production, :class:`MemorySink` in the embedded set-up and tests."""

    async def start(self) -> None:
        """Connect; raises :class:`SinkUnavailable` (the publisher then runs degraded and retries)."""
        ...

    async def stop(self) -> None: ...

    async def ping(self) -> None:
        """Raise :class:`SinkUnavailable` unless the sink is reachable."""
        ...

    async def send(self, commands: Sequence[Outgoing]) -> None:
        """Execute the commands in order (one round trip); raise :class:`SinkUnavailable` on failure."""
        ...


@runtime_checkable
class PublishWatermark(Protocol):
    """Where the "published through seq" watermark lives (PostgreSQL: the ``publish_progress`` table)."""

    async def published_seqs(self) -> dict[str, int]: ...

    async def record_published(self, seqs: Mapping[str, int]) -> None: ...
