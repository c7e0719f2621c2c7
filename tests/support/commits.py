"""Driving a store as the journal writer does under load (tests and ``bench/commit.py``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from exchange.ports import Batch, PreparingStore

__all__ = ["commit_two_in_flight", "until_sent"]


async def commit_two_in_flight(store: PreparingStore, batches: Sequence[Batch],
                               times: list[float] | None = None) -> None:
    """Commit ``batches`` in order with two commits in flight: each batch is prepared and its commit
    started while the commit before it is still in flight, once that one has sent its rows (as
    :class:`~exchange.pipeline.writer.JournalWriter` does when batches come faster than commits end).
    ``times`` gets each batch's seconds from its start to its durable commit, in the order they end."""
    before: asyncio.Task[None] | None = None
    for batch in batches:
        sent = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(store.commit(batch, store.prepare(batch), server_side=sent, after=before))
        if times is not None:
            task.add_done_callback(_timer(times, started))
        if before is not None:
            await before
        await until_sent(sent, task)
        before = task
    if before is not None:
        await before


async def until_sent(sent: asyncio.Event, commit: asyncio.Task[None]) -> None:
    """Wait until ``commit`` has sent its rows (its ``server_side`` event) or has ended without."""
    waiter = asyncio.create_task(sent.wait())
    try:
        await asyncio.wait((waiter, commit), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def _timer(times: list[float], started: float) -> Callable[[asyncio.Task[None]], None]:
    def done(_: asyncio.Task[None]) -> None:
        times.append(time.perf_counter() - started)
    return done
