"""The in-process generator source: deterministic, resumable from stored offsets, back-pressured."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from exchange.adapters.generator.source import GENERATOR_TOPIC, GeneratorSource, generated_commands
from exchange.core.matching import MatchingEngine
from exchange.pipeline.loop import Inbound, InstrumentLoop, JournalQueue
from exchange.ports import Applied, Batch
from exchange.settings import load_instruments
from exchange.wire.codec import decode_command

DEMO = Path(__file__).parents[2] / "exchange" / "defaults" / "demo.toml"
SPECS = {spec.symbol: spec for spec in load_instruments(DEMO)}


def make_loops(queue_size: int = 100_000) -> dict[str, InstrumentLoop]:
    journal: JournalQueue = asyncio.Queue()
    return {symbol: InstrumentLoop(MatchingEngine(spec), journal, queue_size=queue_size)
            for symbol, spec in SPECS.items()}


def drain(loops: dict[str, InstrumentLoop]) -> list[Inbound]:
    """Everything queued, in offset order."""
    items = []
    for lp in loops.values():
        while not lp.queue.empty():
            item = lp.queue.get_nowait()
            assert isinstance(item, Inbound)
            items.append(item)
    return sorted(items, key=lambda i: i.position.offset if i.position else -1)


async def generate(count: int, *, seed: int = 7, applied: dict[tuple[str, str, int], int] | None = None,
                   queue_size: int = 100_000) -> tuple[GeneratorSource, list[Inbound]]:
    """Run a source until it has sent ``count`` messages (counting fast-forwarded ones); return what it queued."""
    loops = make_loops(queue_size)
    ready: list[bool] = []
    source = GeneratorSource(loops=loops, instruments=SPECS, applied_offsets=applied or {}, seed=seed,
                             rate=1_000_000, on_caught_up=lambda: ready.append(True))
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(source.run())
        while source.next_offset < count:  # noqa: ASYNC110 - a counter the source does not signal
            await asyncio.sleep(0.001)
        source.stop_consuming()
        await task
    assert ready == [True]
    assert source.caught_up
    return source, [i for i in drain(loops) if i.position is not None and i.position.offset < count]


def test_the_same_seed_queues_the_same_commands_and_they_are_the_flows() -> None:
    _, first = asyncio.run(generate(3_000))
    _, again = asyncio.run(generate(3_000))
    _, other = asyncio.run(generate(3_000, seed=8))
    assert first == again
    assert [i.command for i in first] != [i.command for i in other]
    assert [i.position.offset for i in first if i.position] == list(range(3_000))  # every message, in order
    assert {i.position.topic for i in first if i.position} == {GENERATOR_TOPIC}
    flow = generated_commands(SPECS, 7)
    expected = []
    for _ in range(3_000):
        msg = flow.next()
        expected.append(decode_command(msg, SPECS, ts_ns=msg["ts_ns"]))
    assert [i.command for i in first] == expected
    kinds = {type(i.command).__name__ for i in first}
    assert {"PlaceOrder", "CancelOrder", "AmendOrder", "CancelAll"} <= kinds


def test_a_restart_resumes_after_each_instruments_stored_offset() -> None:
    _, full = asyncio.run(generate(4_000))
    # what each instrument had made durable before the "crash": different offsets per instrument
    last = {symbol: max(i.position.offset for i in full if i.command.instrument == symbol and i.position
                        and i.position.offset < cut)
            for symbol, cut in zip(SPECS, (1_000, 1_700, 2_500), strict=True)}
    applied = {(symbol, GENERATOR_TOPIC, 0): offset for symbol, offset in last.items()}
    source, resumed = asyncio.run(generate(4_000, applied=applied))
    expected = [i for i in full if i.position and i.position.offset > last[i.command.instrument or ""]]
    assert resumed == expected  # exactly what was not durable, the same commands at the same offsets
    assert source.skipped == 4_000 - len(expected)
    assert source.replayed == sum(1 for i in expected if i.position and i.position.offset <= max(last.values()))
    assert source.consumed == source.next_offset - (min(last.values()) + 1)  # fast-forwarded ones are not


def test_a_full_queue_holds_the_generator_back_without_losing_a_message() -> None:
    async def scenario() -> list[int]:
        loops = make_loops(queue_size=4)
        source = GeneratorSource(loops=loops, instruments=SPECS, applied_offsets={}, seed=3, rate=1_000_000)
        seen: list[int] = []
        depths: list[int] = []

        async def slow_consumer(producer: asyncio.Task[None]) -> None:
            while not producer.done():  # keeps taking until the source has returned, as the loops do
                depths.append(max(lp.queue.qsize() for lp in loops.values()))
                for lp in loops.values():
                    if not lp.queue.empty():
                        item = lp.queue.get_nowait()
                        assert isinstance(item, Inbound)
                        assert item.position is not None
                        seen.append(item.position.offset)
                if len(seen) >= 500:
                    source.stop_consuming()
                await asyncio.sleep(0)

        async with asyncio.TaskGroup() as tg:
            producer = tg.create_task(source.run())
            tg.create_task(slow_consumer(producer))
        assert max(depths) == 4  # the queues filled up, and no further
        seen.extend(i.position.offset for i in drain(loops) if i.position)
        return sorted(seen)

    offsets = asyncio.run(scenario())
    assert offsets == list(range(len(offsets)))  # no gap: nothing dropped while waiting for room
    assert len(offsets) >= 500


def test_published_batches_give_sent_to_published_latencies() -> None:
    async def scenario() -> GeneratorSource:
        source, queued = await generate(50)
        batch = Batch([Applied(i.command.instrument or "", [], i.position) for i in queued])
        await source.on_published(batch)
        await source.on_published(batch)  # a batch seen twice is measured once
        return source

    source = asyncio.run(scenario())
    assert len(source.latencies) == 50
    assert all(ns >= 0 for _, ns in source.latencies)
    assert {symbol for symbol, _ in source.latencies} <= set(SPECS)


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rate"):
        GeneratorSource(loops={}, instruments=SPECS, applied_offsets={}, rate=0)
