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

from exchange.pipeline.loop import JournalItem
from exchange.ports import Applied, Batch, SnapshotRequest, Store, StoreUnavailable
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


class JournalWriter:
    def __init__(self, store: Store, queue: asyncio.Queue[list[JournalItem] | None], *, max_events: int = 5000,
                 linger_ms: float = 2.0, backoff_max_s: float = 5.0,
                 listeners: Sequence[DurableListener] = (), metrics: Metrics | None = None) -> None:
        self._store = store
        self._queue = queue
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
                applied, snapshots, n_events, end = await self._gather(committing)
                if committing is not None:
                    await committing  # raises if that commit failed for good
                    committing = None
                if applied or snapshots:
                    batch = Batch(applied, snapshots,
                                  self.partition_progress(applied) if self.partition_progress is not None else {})
                    committing = asyncio.create_task(self._commit(batch, n_events), name="journal-commit")
            if committing is not None:
                await committing
                committing = None
        finally:
            if committing is not None and not committing.done():
                committing.cancel()
                await asyncio.gather(committing, return_exceptions=True)

    async def _gather(self, committing: asyncio.Task[None] | None,
                      ) -> tuple[list[Applied], list[SnapshotRequest], int, bool]:
        """The next batch's records, snapshot requests and event count, and whether the queue has ended.

        It is complete when it holds ``max_events`` events, or when ``committing`` (the commit in flight)
        ends -- then possibly empty, so that the caller takes that commit's outcome at once -- or, if no
        commit was in flight when its first item came, ``linger_ms`` after that item.
        """
        queue = self._queue
        applied: list[Applied] = []
        snapshots: list[SnapshotRequest] = []
        n_events = 0
        deadline: float | None = None  # the idle writer's linger: from the batch's first item
        while n_events < self._max_events:
            if committing is not None and committing.done():
                break
            chunk: list[JournalItem] | None
            if not queue.empty():
                chunk = queue.get_nowait()
            elif committing is not None:
                getter = asyncio.ensure_future(queue.get())
                try:
                    await asyncio.wait((getter, committing), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()  # Queue.get takes the item only when it resumes: nothing is lost
                if not getter.done() or getter.cancelled():
                    continue  # the commit ended first
                chunk = getter.result()
            elif deadline is None:
                chunk = await queue.get()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    chunk = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            if chunk is None:
                return applied, snapshots, n_events, True
            if deadline is None and committing is None:
                deadline = time.monotonic() + self._linger_s
            n_events += self._take(chunk, applied, snapshots)
        return applied, snapshots, n_events, False

    async def _notify(self, batch: Batch) -> None:
        for listener in self._listeners:
            await listener(batch)

    @staticmethod
    def _take(chunk: list[JournalItem], applied: list[Applied], snapshots: list[SnapshotRequest]) -> int:
        n = 0
        for item in chunk:
            if type(item) is Applied:
                applied.append(item)
                n += len(item.events)
            else:
                snapshots.append(item)  # type: ignore[arg-type]
        return n

    async def _commit(self, batch: Batch, n_events: int) -> None:
        """Commit ``batch``, retrying while retriable; then tell the listeners."""
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                await self._store.commit(batch)
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
