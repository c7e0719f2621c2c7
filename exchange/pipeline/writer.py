"""The journal writer: group commit of every loop's outcomes.

The matching loops run ahead and put chunks of :class:`~exchange.ports.Applied`
records (and snapshot requests) on one bounded queue. The writer takes what is
there, waits at most ``linger_ms`` for more while the batch is below
``max_events``, and commits the batch in ONE transaction through the store.
While a commit is in flight the loops keep going, so the next batch is
naturally bigger when the load is higher.

A failed commit is retried with the very same batch, with exponential backoff,
for as long as the error is retriable; nothing is dropped. Meanwhile the queue
fills, the loops block on it, their queues fill, and the consumer pauses: that
is the back-pressure chain. Only after ``commit`` returns does the writer tell
its listeners (offset tracking, publishers) that the batch is durable.

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
from typing import Any, NamedTuple, cast

from exchange.pipeline.loop import JournalItem
from exchange.ports import Applied, Batch, PreparingStore, SnapshotRequest, Store, StoreUnavailable
from exchange.telemetry.logging import get_logger

__all__ = ["JournalWriter"]

DurableListener = Callable[[Batch], Awaitable[None]]
_SETTLED = object()  # _get_or_settle: the commit in flight ended before a chunk came
_LINGERED = object()  # _get_or_settle: neither came within the batch's linger
# a commit is logged as slow past 100 ms plus 20 us per event (200 ms for a full batch of 5,000): catching up,
# full batches take 100 - 200 ms each here, and a warning for every one of them would only be noise
_SLOW_S = 0.1
_SLOW_PER_EVENT_S = 20e-6


class _InFlight(NamedTuple):
    task: asyncio.Task[None]
    batch: Batch


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
                 listeners: Sequence[DurableListener] = (), metrics: Any = None) -> None:
        self._store = store
        self._preparing = store if isinstance(store, PreparingStore) else None
        self._queue = queue
        self._max_events = max_events
        self._linger_s = linger_ms / 1000
        self._backoff_max_s = backoff_max_s
        self._listeners = list(listeners)
        # the input's per-partition offsets that a batch completes (the source's), stored with it (Batch.partitions)
        self.partition_progress: Callable[[Sequence[Applied]], Mapping[tuple[str, int], int]] | None = None
        self._metrics = metrics
        self._log = get_logger("exchange.journal")
        self.batches = 0
        self.events = 0
        self.degraded = False  # true while commits are failing
        # at [log] level "debug", one line per durable batch: when, and the last seq of each instrument
        # (bench/e2e.py measures produce-to-durable latency from these lines)
        self._log_batches = self._log.is_enabled_for(logging.DEBUG)
        self.last_error: str | None = None
        self._durable_at = 0.0  # perf_counter() when the last commit ended

    def add_listener(self, listener: DurableListener) -> None:
        self._listeners.append(listener)

    async def run(self) -> None:
        """Commit batches until a ``None`` sentinel arrives on the queue (after the loops stopped).

        Each commit runs as a task. Once it has sent its rows and what is left is the server's work
        (a :class:`~exchange.ports.PreparingStore` says when), the writer runs the previous batch's
        listeners and gathers the next batch. That batch goes when it is full, or when the commit in
        flight ends (it has gathered for a whole commit: lingering on would only add latency), or
        ``linger_ms`` after its first item, whichever comes first. (An idle writer, too, waits up to
        ``linger_ms`` after a batch's first item.) If the commit before is still in flight then, the
        store prepares the new batch's rows, so their CPU work overlaps the database's work on the
        batch before, and starts committing it at once with ``after`` set to the commit in flight:
        the store sends the new batch's rows while the server finishes the one before, and makes the
        new batch durable only after it (so at most two commits are in flight, and they end in
        order). (CPU work any earlier would hold up the commit's own round trips: the writer shares
        one thread with the matching loops.) Listeners run once per batch, in batch order, after its
        commit.
        """
        queue = self._queue
        prepare = self._preparing.prepare if self._preparing is not None else None
        inflight: _InFlight | None = None
        previous: _InFlight | None = None  # the commit before ``inflight`` while both are in flight
        done = False
        try:
            while not done:
                first: object
                if inflight is None:
                    first = await queue.get()
                else:
                    first, inflight = await self._get_or_settle(inflight)
                    if first is _SETTLED:
                        continue
                if first is None:
                    break
                applied: list[Applied] = []
                snapshots: list[SnapshotRequest] = []
                n_events = self._take(cast(list[JournalItem], first), applied, snapshots)
                deadline = time.monotonic() + self._linger_s
                while n_events < self._max_events:
                    chunk: object
                    if not queue.empty():
                        chunk = queue.get_nowait()
                    elif inflight is not None:  # keep gathering while the previous commit runs ...
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break  # ... for at most the linger: then this batch goes behind it
                        chunk, inflight = await self._get_or_settle(inflight, remaining)
                        if chunk is _SETTLED:  # it ended: this batch gathered for as long; it goes now
                            deadline = time.monotonic()
                            continue
                        if chunk is _LINGERED:
                            break
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        try:
                            chunk = await asyncio.wait_for(queue.get(), remaining)
                        except TimeoutError:
                            break
                    if chunk is None:
                        done = True
                        break
                    n_events += self._take(cast(list[JournalItem], chunk), applied, snapshots)
                if not applied and not snapshots:
                    continue
                batch = Batch(applied, snapshots,
                              self.partition_progress(applied) if self.partition_progress is not None else {})
                prepared = None
                if prepare is not None:
                    try:
                        prepared = prepare(batch)  # overlaps the commit in flight, if any
                    except Exception:  # the commit derives the rows again and reports the error
                        prepared = None
                previous = inflight
                # a prepared batch may start while the commit before it finishes (the store keeps the order)
                after = previous.task if previous is not None and prepared is not None else None
                if previous is not None and after is None:
                    await previous.task  # raises if that commit failed for good
                server_side = asyncio.Event()
                inflight = _InFlight(asyncio.create_task(self._commit(batch, n_events, prepared, server_side, after),
                                                         name="journal-commit"), batch)
                # CPU work here (listeners, preparing the next batch) would hold up the commit's round trips
                # while the server has nothing to do; so it waits until the server is busy with the rest
                await server_side.wait()
                if previous is not None:
                    settled, previous = previous, None
                    await settled.task  # done by now, unless this commit failed early; raises if it failed
                    await self._notify(settled.batch)  # while the server works on the next commit
            if inflight is not None:
                await inflight.task
                await self._notify(inflight.batch)
                inflight = None
        finally:
            running = [c.task for c in (previous, inflight) if c is not None and not c.task.done()]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _get_or_settle(self, inflight: _InFlight,
                             within_s: float | None = None) -> tuple[object, _InFlight | None]:
        """The next chunk from the queue, or, if the commit in flight ends first, ``_SETTLED``: that
        commit's outcome is raised if it failed for good, else its listeners have run; ``_LINGERED``
        if neither came within ``within_s`` seconds."""
        queue = self._queue
        if not queue.empty():
            return queue.get_nowait(), inflight
        if not inflight.task.done():
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait((getter, inflight.task), timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()  # Queue.get takes the item only when it resumes: nothing is lost
            if getter.done() and not getter.cancelled():
                return getter.result(), inflight
            if not inflight.task.done():
                return _LINGERED, inflight
        await inflight.task
        await self._notify(inflight.batch)
        return _SETTLED, None

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

    async def _commit(self, batch: Batch, n_events: int, prepared: object = None,
                      server_side: asyncio.Event | None = None, after: asyncio.Task[None] | None = None) -> None:
        """Commit ``batch``, retrying while retriable; ``server_side`` is set once what is left of the
        commit is the server's work (a preparing store says when), or an attempt failed, or it ended.
        ``after``: the commit before, still in flight (the store makes this batch durable after it)."""
        try:
            await self._commit_retrying(batch, n_events, prepared, server_side, after)
        finally:
            if server_side is not None:
                server_side.set()

    async def _commit_retrying(self, batch: Batch, n_events: int, prepared: object,
                               server_side: asyncio.Event | None, after: asyncio.Task[None] | None) -> None:
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                if self._preparing is not None:
                    await self._preparing.commit(batch, prepared, server_side=server_side, after=after)
                else:
                    if server_side is not None:
                        server_side.set()
                    await self._store.commit(batch)
            except BaseException as exc:
                if server_side is not None:
                    server_side.set()  # backing off (or stopping): nothing to hold the listeners for
                error = _transient(exc)
                if error is None:
                    if isinstance(exc, StoreUnavailable):
                        self._log.critical("journal commit failed and cannot be retried; stopping", error=str(exc))
                    raise
                self.degraded = True
                self.last_error = error
                if self._metrics is not None:
                    self._metrics.commit_failed()
                self._log.warning("journal commit failed; retrying the same batch", attempt=attempt,
                                  retry_in_s=round(delay, 3), error=error, events=n_events)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max_s)
                continue
            ended = time.perf_counter()
            # a commit started behind the one before it counts from when that one was durable: the time
            # this batch added (what throughput and the commit-time metric are about)
            elapsed = ended - max(started, self._durable_at)
            self._durable_at = ended
            if elapsed >= _SLOW_S + n_events * _SLOW_PER_EVENT_S:
                self._log.warning("slow journal commit", commit_ms=round(elapsed * 1000, 1), events=n_events,
                                  snapshots=len(batch.snapshots))
            if self.degraded:
                self._log.info("journal commits resumed", attempts=attempt)
                if self._metrics is not None:
                    self._metrics.reconnected("postgres")
            self.degraded = False
            self.last_error = None
            break
        if self._log_batches:
            self._log.debug("batch durable", last_seq=batch.last_seq(), events=n_events,
                            commit_ms=round(elapsed * 1000, 2))
        self.batches += 1
        self.events += n_events
        if self._metrics is not None:
            self._metrics.batch_committed(n_events, elapsed)
