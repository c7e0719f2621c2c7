"""The journal writer: group commit of every loop's outcomes, one commit in flight.

The matching loops run ahead and put chunks of :class:`~exchange.ports.Applied`
records (and snapshot requests) on one bounded queue. The writer takes what is
there and commits it as ONE batch in ONE transaction through the store. While
that commit is in flight the loops keep going and the writer gathers the next
batch, so the next batch is naturally bigger when the load is higher; it starts
committing once the commit in flight has ended, never before. A batch goes when
it holds ``max_events`` events (it then waits for the commit in flight, and the
queue fills behind it), or as soon as the commit in flight ends (it has gathered
for a whole commit: lingering on would only add latency), or, for a writer that
was idle, ``linger_ms`` after its first item. So batches become durable one
after the other, in order, and only the task of the one commit in flight holds
state about it.

Each chunk carries the ownership epoch its loop runs under, and the batch carries
the epochs of its chunks (and those of its partitions' rows, from the process's
:class:`~exchange.pipeline.ownership.Ownership`). A commit the store refuses as
:class:`~exchange.ports.Fenced` -- another process took some of its instruments
since -- is not retried as it is: what belongs to them is dropped (never published,
its input offsets never committed), the process is told (it stops applying
them), and the rest of the batch is committed. Chunks still queued under the
fenced epochs are dropped as they come.

A :class:`~exchange.pipeline.loop.Flush` on the queue ends the batch it falls in;
it is resolved once that batch is durable and its listeners ran: giving an
instrument up waits for its last outcomes this way.

A failed commit is retried with the very same batch, with exponential backoff,
for as long as the error is retriable; nothing is dropped. Meanwhile the queue
fills, the loops block on it, their queues fill, and the consumer pauses: that
is the back-pressure chain. Only after ``commit`` returns does the writer tell
its listeners (offset tracking, publishers) that the batch is durable; they run
once per batch, in batch order, before the next commit starts.

The database going away is always transient here: the only failure that stops
the writer (and the daemon) is a :class:`~exchange.ports.StoreUnavailable`
with ``retriable`` false, which a store raises only for what the batch's own
content causes. Anything else a commit raises -- a store error marked retriable,
an exception the store did not classify, a cancellation that nobody asked for
(a race inside a driver, not the writer being stopped) -- is retried the same
way, logged, and shows in ``degraded`` and ``last_error`` (``/readyz``) until a
commit succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from exchange.pipeline.loop import Chunk, Flush, JournalQueue
from exchange.pipeline.ownership import Ownership
from exchange.ports import Applied, Batch, Epochs, Fenced, SnapshotRequest, Store, StoreUnavailable
from exchange.telemetry.logging import get_logger
from exchange.telemetry.metrics import Metrics, discarded

__all__ = ["JournalWriter"]

DurableListener = Callable[[Batch], Awaitable[None]]
# a commit is logged as slow past 100 ms plus 20 us per event (200 ms for a full batch of 5,000): catching up,
# full batches take 100 - 200 ms each here, and a warning for every one of them would only be noise
_SLOW_S = 0.1
_SLOW_PER_EVENT_S = 20e-6


def _transient(exc: BaseException) -> str | None:
    """What to report for a failed commit that is retried, or None if it must not be: a store error not
    marked retriable, the writer's own task being cancelled, or the interpreter stopping."""
    if isinstance(exc, StoreUnavailable):
        return str(exc) if exc.retriable else None
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is None or task.cancelling():
            return None  # the writer is stopping
        return "a cancellation inside the store, nobody asked for it (a race in its driver)"
    if isinstance(exc, Exception):
        return f"the store raised {type(exc).__name__}: {exc}"
    return None  # KeyboardInterrupt, SystemExit


class _Gathered:
    """The next batch while it is gathered: records, snapshots, the epoch of each instrument, flush markers."""

    __slots__ = ("applied", "epochs", "flushes", "n_events", "snapshots")

    def __init__(self) -> None:
        self.applied: list[Applied] = []
        self.snapshots: list[SnapshotRequest] = []
        self.epochs: dict[str, int] = {}
        self.flushes: list[Flush] = []
        self.n_events = 0


class JournalWriter:
    """``ownership``: the process's epochs (its partitions' for the partition rows; fenced commits are reported to
    it); None where the writer runs alone (tests, tools), and then no partition rows are stored."""

    def __init__(self, store: Store, queue: JournalQueue, *, max_events: int = 5000,
                 linger_ms: float = 2.0, backoff_max_s: float = 5.0,
                 listeners: Sequence[DurableListener] = (), metrics: Metrics | None = None,
                 ownership: Ownership | None = None) -> None:
        self._store = store
        self._queue = queue
        self._ownership = ownership
        self._fenced: set[tuple[str, int]] = set()  # (instrument, epoch) refused by the store: dropped on sight
        self._carry: Chunk | None = None  # a chunk under another epoch than its instrument's in the batch gathered
        self._max_events = max_events
        self._linger_s = linger_ms / 1000
        self._backoff_max_s = backoff_max_s
        self._listeners = list(listeners)
        # the input's per-partition offsets that a batch completes (the source's), stored with it (Batch.partitions)
        self.partition_progress: Callable[[Sequence[Applied]], Mapping[tuple[str, int], int]] | None = None
        self._metrics = metrics if metrics is not None else discarded()
        self._log = get_logger("exchange.journal")
        self.batches = 0
        self.events = 0
        self.degraded = False  # true while commits are failing
        # at [log] level "debug", one line per durable batch: when, and the last seq of each instrument
        # (bench/e2e.py measures produce-to-durable latency from these lines)
        self._log_batches = self._log.is_enabled_for(logging.DEBUG)
        self.last_error: str | None = None

    def add_listener(self, listener: DurableListener) -> None:
        self._listeners.append(listener)

    async def flush(self) -> None:
        """Return once everything put on the journal queue before this call is durable (or fenced) and its
        listeners ran."""
        marker = Flush()
        await self._queue.put(marker)
        await marker.done

    async def run(self) -> None:
        """Commit batches until a ``None`` sentinel arrives on the queue (after the loops stopped).

        The commit in flight (with its listeners) is one task; the writer gathers the next batch
        meanwhile (:meth:`_gather`) and starts its commit only once that task has ended. A commit that
        failed for good raises here, and the writer stops; stopping the writer cancels the commit in
        flight.
        """
        committing: asyncio.Task[None] | None = None
        end = False
        try:
            while not end:
                gathered, end = await self._gather(committing)
                if committing is not None:
                    await committing  # raises if that commit failed for good
                    committing = None
                if gathered.applied or gathered.snapshots:
                    committing = asyncio.create_task(self._commit(self._batch(gathered), gathered.n_events,
                                                                  gathered.flushes), name="journal-commit")
                else:
                    _resolve(gathered.flushes)  # nothing of its own: what came before it is durable already
            if committing is not None:
                await committing
                committing = None
        finally:
            if committing is not None and not committing.done():
                committing.cancel()
                await asyncio.gather(committing, return_exceptions=True)

    def _batch(self, gathered: _Gathered) -> Batch:
        """The batch of what was gathered, with its epochs and its partitions' rows (those this process holds)."""
        partitions: Mapping[tuple[str, int], int] = {}
        partition_epochs: dict[tuple[str, int], int] = {}
        if self.partition_progress is not None:
            partitions = self.partition_progress(gathered.applied)
            held = self._ownership.partitions if self._ownership is not None else {}
            partitions = {key: offset for key, offset in partitions.items() if key in held}
            partition_epochs = {key: held[key] for key in partitions}
        return Batch(gathered.applied, gathered.snapshots, partitions, gathered.epochs, partition_epochs)

    async def _gather(self, committing: asyncio.Task[None] | None) -> tuple[_Gathered, bool]:
        """The next batch's records, and whether the queue has ended.

        It is complete when it holds ``max_events`` events, or when ``committing`` (the commit in flight)
        ends -- then possibly empty, so that the caller takes that commit's outcome at once -- or, if no
        commit was in flight when its first item came, ``linger_ms`` after that item; or at a flush
        marker, or at a chunk of an instrument it holds under another epoch (that chunk begins the next).
        """
        queue = self._queue
        gathered = _Gathered()
        deadline: float | None = None  # the idle writer's linger: from the batch's first item
        if self._carry is not None:
            chunk, self._carry = self._carry, None
            self._take(chunk, gathered)
        while gathered.n_events < self._max_events:
            if committing is not None and committing.done():
                break
            item: Chunk | Flush | None
            if not queue.empty():
                item = queue.get_nowait()
            elif committing is not None:
                getter = asyncio.ensure_future(queue.get())
                try:
                    await asyncio.wait((getter, committing), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()  # Queue.get takes the item only when it resumes: nothing is lost
                if not getter.done() or getter.cancelled():
                    continue  # the commit ended first
                item = getter.result()
            elif deadline is None:
                item = await queue.get()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            if item is None:
                return gathered, True
            if type(item) is Flush:
                gathered.flushes.append(item)
                break
            assert type(item) is Chunk
            if not self._take(item, gathered):
                self._carry = item
                break
            if deadline is None and committing is None:
                deadline = time.monotonic() + self._linger_s
        return gathered, False

    async def _notify(self, batch: Batch) -> None:
        for listener in self._listeners:
            await listener(batch)

    def _take(self, chunk: Chunk, gathered: _Gathered) -> bool:
        """Add ``chunk`` to the batch gathered; False if it belongs to the next (its instrument is in this one
        under another epoch). A chunk under a fenced epoch is dropped."""
        symbol, epoch = chunk.instrument, chunk.epoch
        held = gathered.epochs.get(symbol)
        if held is not None and held != epoch:
            return False
        if (symbol, epoch) in self._fenced:
            return True
        gathered.epochs[symbol] = epoch
        applied, snapshots = gathered.applied, gathered.snapshots
        n = 0
        for item in chunk.items:
            if type(item) is Applied:
                applied.append(item)
                n += len(item.events)
            else:
                snapshots.append(item)  # type: ignore[arg-type]
        gathered.n_events += n
        return True

    async def _commit(self, batch: Batch, n_events: int, flushes: Sequence[Flush] = ()) -> None:
        """Commit ``batch``, retrying while retriable, without what was fenced; then tell the listeners and
        resolve the batch's flush markers."""
        try:
            await self._commit_batch(batch, n_events)
        finally:
            _resolve(flushes)

    async def _commit_batch(self, batch: Batch, n_events: int) -> None:
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                await self._store.commit(batch)
            except Fenced as exc:
                batch = await self._without_fenced(batch, exc.current)
                n_events = sum(len(item.events) for item in batch.applied)
                if not batch.applied and not batch.snapshots:
                    return
                continue
            except BaseException as exc:
                error = _transient(exc)
                if error is None:
                    if isinstance(exc, StoreUnavailable):
                        self._log.critical("journal commit failed and cannot be retried; stopping", error=str(exc))
                    raise
                self.degraded = True
                self.last_error = error
                self._metrics.commit_failed()
                self._log.warning("journal commit failed; retrying the same batch", attempt=attempt,
                                  retry_in_s=round(delay, 3), error=error, events=n_events)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max_s)
                continue
            elapsed = time.perf_counter() - started
            if elapsed >= _SLOW_S + n_events * _SLOW_PER_EVENT_S:
                self._log.warning("slow journal commit", commit_ms=round(elapsed * 1000, 1), events=n_events,
                                  snapshots=len(batch.snapshots))
            if self.degraded:
                self._log.info("journal commits resumed", attempts=attempt)
                self._metrics.reconnected("postgres")
            self.degraded = False
            self.last_error = None
            break
        if self._log_batches:
            self._log.debug("batch durable", last_seq=batch.last_seq(), events=n_events,
                            commit_ms=round(elapsed * 1000, 2))
        self.batches += 1
        self.events += n_events
        self._metrics.batch_committed(n_events, elapsed)
        await self._notify(batch)

    async def _without_fenced(self, batch: Batch, current: Epochs) -> Batch:
        """The store fenced ``batch``: forget what it holds of the instruments and partitions another process
        took (``current``: their stored epochs), tell the ownership, and return the rest of it."""
        stale = Epochs({s: batch.epochs[s] for s in current.instruments if s in batch.epochs},
                       {k: batch.partition_epochs[k] for k in current.partitions if k in batch.partition_epochs})
        if not stale.instruments and not stale.partitions:
            raise StoreUnavailable(f"the store fenced a batch for what it does not hold: {current}", retriable=False)
        self._fenced.update(stale.instruments.items())
        dropped = sum(1 for item in batch.applied if item.instrument in stale.instruments)
        self._log.error("journal commit fenced: another process took instruments of this batch; their records "
                        "are dropped (never published, their input offsets never committed) and the rest of the "
                        "batch is committed", instruments=sorted(stale.instruments),
                        partitions=sorted(f"{t}[{p}]" for t, p in stale.partitions), records_dropped=dropped)
        if self._ownership is not None:
            await self._ownership.fenced(stale, current)
        lost, lost_parts = stale.instruments, stale.partitions
        return Batch([item for item in batch.applied if item.instrument not in lost],
                     [snap for snap in batch.snapshots if snap.instrument not in lost],
                     {k: o for k, o in batch.partitions.items() if k not in lost_parts},
                     {s: e for s, e in batch.epochs.items() if s not in lost},
                     {k: e for k, e in batch.partition_epochs.items() if k not in lost_parts})


def _resolve(flushes: Sequence[Flush]) -> None:
    for marker in flushes:
        if not marker.done.done():
            marker.done.set_result(None)
