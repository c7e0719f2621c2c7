"""The journal writer: group commit of every loop's outcomes.

The matching loops run ahead and put chunks of :class:`~exchange.journal.Applied`
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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from exchange.engine import JournalItem
from exchange.journal import Applied, Batch, SnapshotRequest, Store, StoreUnavailable
from exchange.logging import get_logger

__all__ = ["JournalWriter"]

DurableListener = Callable[[Batch], Awaitable[None]]


class JournalWriter:
    def __init__(self, store: Store, queue: asyncio.Queue[list[JournalItem] | None], *, max_events: int = 5000,
                 linger_ms: float = 2.0, backoff_max_s: float = 5.0,
                 listeners: Sequence[DurableListener] = (), metrics: Any = None) -> None:
        self._store = store
        self._queue = queue
        self._max_events = max_events
        self._linger_s = linger_ms / 1000
        self._backoff_max_s = backoff_max_s
        self._listeners = list(listeners)
        self._metrics = metrics
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
        """Commit batches until a ``None`` sentinel arrives on the queue (after the loops stopped)."""
        queue = self._queue
        done = False
        while not done:
            first = await queue.get()
            if first is None:
                return
            applied: list[Applied] = []
            snapshots: list[SnapshotRequest] = []
            n_events = self._take(first, applied, snapshots)
            deadline = time.monotonic() + self._linger_s
            while n_events < self._max_events:
                if queue.empty():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        chunk = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                else:
                    chunk = queue.get_nowait()
                if chunk is None:
                    done = True
                    break
                n_events += self._take(chunk, applied, snapshots)
            if applied or snapshots:
                await self._commit(Batch(applied, snapshots), n_events)

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
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                await self._store.commit(batch)
            except StoreUnavailable as exc:
                if not exc.retriable:
                    self._log.critical("journal commit failed and cannot be retried; stopping", error=str(exc))
                    raise
                self.degraded = True
                self.last_error = str(exc)
                if self._metrics is not None:
                    self._metrics.commit_failed()
                self._log.warning("journal commit failed; retrying the same batch", attempt=attempt,
                                  retry_in_s=round(delay, 3), error=str(exc), events=n_events)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max_s)
                continue
            elapsed = time.perf_counter() - started
            if elapsed >= 0.1:
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
        for listener in self._listeners:
            await listener(batch)
