"""The journal writer's "batch durable" log line (bench/e2e.py measures latency from it)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
import structlog

from exchange.adapters.sqlite import SqliteStore
from exchange.engine import JournalItem
from exchange.journal import Applied, Batch, InputPosition
from exchange.logging import configure_logging
from exchange.matching import MatchingEngine
from exchange.writer import JournalWriter
from tests.unit._helpers import BUY, SELL, make_engine, make_spec, place


async def _write(tmp_path: Path, level: str) -> tuple[list[dict[str, object]], int]:
    stream = io.StringIO()
    saved = structlog.get_config()
    configure_logging(level, "json", stream=stream)
    engine = make_engine()
    chunk: list[JournalItem] = [
        Applied(engine.symbol, engine.apply(command), InputPosition("orders", 0, offset))
        for offset, command in enumerate([place("a", BUY, 100, 5), place("b", SELL, 100, 3, client="bob")])]
    store = SqliteStore(tmp_path / "journal.sqlite", [make_spec()])
    await store.start()
    try:
        await store.migrate()
        await store.load([make_spec()])
        queue: asyncio.Queue[list[JournalItem] | None] = asyncio.Queue()
        await queue.put(chunk)
        await queue.put(None)
        await JournalWriter(store, queue, linger_ms=0).run()
    finally:
        await store.stop()
        structlog.configure(**saved)
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == "batch durable"], engine.seq


@pytest.mark.parametrize("level", ["debug", "info"])
def test_a_durable_batch_is_logged_with_its_last_seq_at_debug_only(tmp_path: Path, level: str) -> None:
    logged, seq = asyncio.run(_write(tmp_path, level))
    if level == "info":
        assert logged == []
        return
    assert len(logged) == 1
    assert seq > 2  # accepted, accepted, filled, ...
    assert logged[0]["last_seq"] == {"T": seq}
    assert logged[0]["events"] == seq
    assert logged[0]["level"] == "debug"


# ----------------------------------------------------------------- one commit in flight, the next prepared


class GatedStore:
    """A store whose commits wait for the test to open their gate; it records what happened, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.gates: list[asyncio.Event] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def migrate(self) -> list[str]:
        return []

    async def load(self, instruments: object) -> dict[str, object]:
        return {}

    def prepare(self, batch: Batch) -> int:
        self.log.append(("prepare", _last(batch)))
        return _last(batch)

    async def commit(self, batch: Batch, prepared: object = None, *, server_side: asyncio.Event | None = None) -> None:
        assert prepared in (None, _last(batch))
        self.log.append(("commit", _last(batch)))
        if server_side is not None:
            server_side.set()  # all that is left is "the server's" (the gate's)
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        self.log.append(("durable", _last(batch)))


def _last(batch: Batch) -> int:
    return max(batch.last_seq().values())


def _chunk(engine: MatchingEngine, n: int) -> list[JournalItem]:
    return [Applied(engine.symbol, engine.apply(place(f"c{engine.seq}", BUY, 100 - engine.seq % 50, 1)), None)
            for _ in range(n)]


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_the_next_full_batch_is_prepared_while_a_commit_is_in_flight_and_listeners_keep_batch_order() -> None:
    async def scenario() -> tuple[list[tuple[str, int]], list[int]]:
        engine = make_engine()
        store = GatedStore()
        heard: list[int] = []

        async def listener(batch: Batch) -> None:
            store.log.append(("listener", _last(batch)))
            heard.append(_last(batch))

        queue: asyncio.Queue[list[JournalItem] | None] = asyncio.Queue()
        writer = JournalWriter(store, queue, max_events=3, linger_ms=0, listeners=[listener])  # type: ignore[arg-type]
        task = asyncio.create_task(writer.run())
        await queue.put(_chunk(engine, 3))  # seq 1-3: committed at once
        await _settle()
        await queue.put(_chunk(engine, 3))  # seq 4-6: full while 1-3 is in flight: prepared now
        await _settle()
        assert store.log == [("prepare", 3), ("commit", 3), ("prepare", 6)]
        store.gates[0].set()
        await _settle()
        # 4-6 commits as soon as 1-3 is durable; 1-3's listeners run while it does
        assert store.log[3:] == [("durable", 3), ("commit", 6), ("listener", 3)]
        await queue.put(_chunk(engine, 1))  # seq 7: not full, keeps gathering while 4-6 is in flight
        await _settle()
        await queue.put(_chunk(engine, 1))  # seq 8
        await _settle()
        assert store.log[6:] == []
        store.gates[1].set()
        await _settle()
        # the idle writer still reports 4-6 durable; 7-8 went out as one batch once 4-6 was durable
        assert store.log[6:] == [("durable", 6), ("listener", 6), ("prepare", 8), ("commit", 8)]
        store.gates[2].set()
        await _settle()
        assert store.log[10:] == [("durable", 8), ("listener", 8)]
        await queue.put(None)
        await task
        return store.log, heard

    _, heard = asyncio.run(scenario())
    assert heard == [3, 6, 8]


class TwoStepStore(GatedStore):
    """Each commit first "sends its rows" (until the test opens ``sent``), then waits for "the server"."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[asyncio.Event] = []

    async def commit(self, batch: Batch, prepared: object = None, *, server_side: asyncio.Event | None = None) -> None:
        self.log.append(("commit", _last(batch)))
        sent = asyncio.Event()
        self.sent.append(sent)
        await sent.wait()
        assert server_side is not None
        server_side.set()
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        self.log.append(("durable", _last(batch)))


def test_listeners_and_the_next_preparation_wait_until_the_commit_in_flight_has_sent_its_rows() -> None:
    """The writer shares its thread with the commit's round trips: its CPU work waits for server-side time."""

    async def scenario() -> list[tuple[str, int]]:
        engine = make_engine()
        store = TwoStepStore()

        async def listener(batch: Batch) -> None:
            store.log.append(("listener", _last(batch)))

        queue: asyncio.Queue[list[JournalItem] | None] = asyncio.Queue()
        writer = JournalWriter(store, queue, max_events=2, linger_ms=0, listeners=[listener])  # type: ignore[arg-type]
        task = asyncio.create_task(writer.run())
        await queue.put(_chunk(engine, 2))
        await queue.put(_chunk(engine, 2))
        await _settle()
        assert store.log == [("prepare", 2), ("commit", 2)]  # 3-4 is waiting, not prepared yet
        store.sent[0].set()
        await _settle()
        assert store.log[2:] == [("prepare", 4)]
        store.gates[0].set()
        await _settle()
        assert store.log[3:] == [("durable", 2), ("commit", 4)]  # 1-2's listeners wait for 3-4's rows to go
        store.sent[1].set()
        await _settle()
        assert store.log[5:] == [("listener", 2)]
        store.gates[1].set()
        await queue.put(None)
        await task
        return store.log

    log = asyncio.run(scenario())
    assert log[-2:] == [("durable", 4), ("listener", 4)]
