"""The matching loop's cooperation with the other tasks of the daemon's one event loop."""

from __future__ import annotations

import asyncio
from itertools import pairwise

from exchange.pipeline.loop import Control, Inbound, InstrumentLoop, JournalQueue
from tests.unit._helpers import BUY, SELL, make_engine, place


def test_a_loop_with_a_backlog_yields_between_chunks() -> None:
    """``queue.get()`` on a non-empty queue and ``put()`` with room never suspend: without an explicit
    yield, a loop with 5,000 commands waiting would apply all of them before any other task ran (the
    journal writer's round trips to the database waited behind it)."""

    async def scenario() -> tuple[list[int], int]:
        journal: JournalQueue = asyncio.Queue()
        loop = InstrumentLoop(make_engine(), journal, queue_size=10_000)
        for i in range(5000):
            side = BUY if i % 2 else SELL
            loop.queue.put_nowait(Inbound(place(f"o{i}", side, 100 + (i % 7) * (1 if side is SELL else -1), 1,
                                                client=f"c{i % 5}"), None))
        loop.queue.put_nowait(Control.STOP)
        applied_seen: list[int] = []  # commands applied so far, each time the other task got to run

        async def other_task() -> None:
            while True:
                applied_seen.append(loop.applied)
                await asyncio.sleep(0)

        other = asyncio.create_task(other_task())
        await asyncio.sleep(0)
        await loop.run()
        other.cancel()
        return applied_seen, loop.applied

    seen, total = asyncio.run(scenario())
    assert total == 5000
    during = sorted({n for n in seen if 0 < n < total})
    assert len(during) >= 5000 // 512  # it ran between the chunks, not only before and after
    assert all(b - a <= 512 for a, b in pairwise(during))
