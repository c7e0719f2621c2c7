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
from exchange.journal import Applied, InputPosition
from exchange.logging import configure_logging
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
