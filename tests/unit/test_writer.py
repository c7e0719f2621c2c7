"""The journal writer: one commit in flight, retries, its "batch durable" log line (bench/e2e.py measures latency
from it), fenced commits and flushes."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from exchange.adapters.sqlite import SqliteStore
from exchange.core.matching import MatchingEngine
from exchange.pipeline.loop import Chunk, JournalQueue
from exchange.pipeline.ownership import Ownership
from exchange.pipeline.writer import JournalWriter
from exchange.ports import Applied, Batch, Epochs, Fenced, InputPosition, StoreUnavailable
from exchange.telemetry.logging import configure_logging
from tests.unit._helpers import BUY, SELL, make_engine, make_spec, place


async def _write(tmp_path: Path, level: str) -> tuple[list[dict[str, object]], int]:
    stream = io.StringIO()
    saved = structlog.get_config()
    configure_logging(level, "json", stream=stream)
    engine = make_engine()
    items = [Applied(engine.symbol, engine.apply(command), InputPosition("orders", 0, offset))
             for offset, command in enumerate([place("a", BUY, 100, 5), place("b", SELL, 100, 3, client="bob")])]
    store = SqliteStore(tmp_path / "journal.sqlite", [make_spec()])
    await store.start()
    try:
        await store.migrate()
        epochs = await store.take([engine.symbol], [], "test")
        await store.load([make_spec()])
        queue: JournalQueue = asyncio.Queue()
        await queue.put(Chunk(engine.symbol, epochs.instruments[engine.symbol], items))
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


# ----------------------------------------------------------------- one commit in flight, the next gathered


class GatedStore:
    """A store whose commits wait for the test to open their gate; it records what happened, in order,
    and notes a commit that starts while another is in flight."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.gates: list[asyncio.Event] = []
        self.in_flight = 0

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def migrate(self) -> list[str]:
        return []

    async def load(self, instruments: object) -> dict[str, object]:
        return {}

    async def commit(self, batch: Batch) -> None:
        if self.in_flight:
            self.log.append(("second commit in flight", _last(batch)))
        self.in_flight += 1
        try:
            self.log.append(("commit", _last(batch)))
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
            self.log.append(("durable", _last(batch)))
        finally:
            self.in_flight -= 1


def _run_writer(store: object, **options: Any) -> tuple[JournalQueue, asyncio.Task[None]]:
    """A writer over ``store`` running as a task (call it inside the event loop), with its queue."""
    queue: JournalQueue = asyncio.Queue()
    writer = JournalWriter(store, queue, **options)  # type: ignore[arg-type]
    return queue, asyncio.create_task(writer.run())


def _last(batch: Batch) -> int:
    return max(batch.last_seq().values())


def _chunk(engine: MatchingEngine, n: int, epoch: int = 1) -> Chunk:
    return Chunk(engine.symbol, epoch, [
        Applied(engine.symbol, engine.apply(place(f"c{engine.seq}", BUY, 100 - engine.seq % 50, 1)), None)
        for _ in range(n)])


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_the_next_batch_is_gathered_while_a_commit_is_in_flight_and_commits_only_after_it() -> None:
    """Never two commits at once: a batch that fills up while a commit is in flight waits for it; what
    arrives meanwhile goes as one batch once it is durable; its listeners run before the next commit."""

    async def scenario() -> tuple[list[tuple[str, int]], list[int]]:
        engine = make_engine()
        store = GatedStore()
        heard: list[int] = []

        async def listener(batch: Batch) -> None:
            store.log.append(("listener", _last(batch)))
            heard.append(_last(batch))

        queue, task = _run_writer(store, max_events=3, linger_ms=300, listeners=[listener])
        await queue.put(_chunk(engine, 3))  # seq 1-3: full, committed at once
        await _settle()
        await queue.put(_chunk(engine, 3))  # seq 4-6: full while 1-3 is in flight: it waits
        await _settle()
        assert store.log == [("commit", 3)]
        store.gates[0].set()
        await _settle()
        # 1-3 is durable and its listeners have run; then 4-6 goes
        assert store.log[1:] == [("durable", 3), ("listener", 3), ("commit", 6)]
        await queue.put(_chunk(engine, 1))  # seq 7: not full, keeps gathering while 4-6 is in flight (< 300 ms)
        await _settle()
        await queue.put(_chunk(engine, 1))  # seq 8
        await _settle()
        assert store.log[4:] == []
        store.gates[1].set()
        await _settle()
        # 7-8 went out as one batch once 4-6 was durable
        assert store.log[4:] == [("durable", 6), ("listener", 6), ("commit", 8)]
        await queue.put(_chunk(engine, 1))  # seq 9, and the end of the queue, while 7-8 is in flight
        await queue.put(None)
        await _settle()
        assert store.log[7:] == []
        store.gates[2].set()
        await _settle()
        assert store.log[7:] == [("durable", 8), ("listener", 8), ("commit", 9)]
        store.gates[3].set()
        await asyncio.wait_for(task, 5)
        return store.log, heard

    log, heard = asyncio.run(scenario())
    assert log[-2:] == [("durable", 9), ("listener", 9)]
    assert heard == [3, 6, 8, 9]


def test_a_batch_gathered_while_a_commit_was_in_flight_goes_as_soon_as_that_commit_ends() -> None:
    """It has gathered for a whole commit already: lingering on would only add latency. (An idle writer
    still lingers for the first item's batch.)"""

    async def scenario() -> list[tuple[str, int]]:
        engine = make_engine()
        store = GatedStore()
        queue, task = _run_writer(store, max_events=100, linger_ms=300)
        await queue.put(_chunk(engine, 1))
        await asyncio.sleep(0.1)
        await queue.put(_chunk(engine, 1))  # within the idle writer's linger: the same batch
        await asyncio.sleep(0.3)
        assert store.log == [("commit", 2)]
        await queue.put(_chunk(engine, 1))  # gathered while 1-2 is in flight
        await _settle()
        store.gates[0].set()
        await _settle()
        log = list(store.log)  # a few event-loop turns later, far less than the linger
        store.gates[1].set()
        await queue.put(None)
        await task
        return log

    assert asyncio.run(scenario())[1:] == [("durable", 2), ("commit", 3)]


def test_a_batch_gathered_while_a_commit_is_in_flight_waits_for_it_past_the_linger() -> None:
    """linger_ms bounds only an idle writer's wait: behind a slow commit the next batch keeps gathering."""

    async def scenario() -> list[tuple[str, int]]:
        engine = make_engine()
        store = GatedStore()
        queue, task = _run_writer(store, max_events=100, linger_ms=50)
        await queue.put(_chunk(engine, 2))
        await asyncio.sleep(0.1)  # the idle writer's linger: 1-2 goes alone
        assert store.log == [("commit", 2)]
        await queue.put(_chunk(engine, 1))
        await asyncio.sleep(0.1)  # twice the linger
        await queue.put(_chunk(engine, 1))
        await _settle()
        assert store.log == [("commit", 2)]
        store.gates[0].set()
        await _settle()
        store.gates[1].set()
        await queue.put(None)
        await task
        return store.log

    assert asyncio.run(scenario()) == [("commit", 2), ("durable", 2), ("commit", 4), ("durable", 4)]


class FailingFirstStore(GatedStore):
    """The first commit fails for good once the test opens its gate."""

    async def commit(self, batch: Batch) -> None:
        if _last(batch) == 2:
            self.log.append(("commit", 2))
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
            raise StoreUnavailable("disk full", retriable=False)
        await super().commit(batch)


def test_a_commit_that_fails_for_good_stops_the_writer_before_the_next_batch_commits() -> None:
    async def scenario() -> tuple[FailingFirstStore, list[int], BaseException | None]:
        engine = make_engine()
        store = FailingFirstStore()
        heard: list[int] = []

        async def listener(batch: Batch) -> None:
            heard.append(_last(batch))

        queue, task = _run_writer(store, max_events=2, linger_ms=0, listeners=[listener])
        await queue.put(_chunk(engine, 2))
        await _settle()
        await queue.put(_chunk(engine, 2))  # 3-4 is gathered while 1-2 is in flight
        await _settle()
        store.gates[0].set()  # 1-2 fails for good
        error: BaseException | None = None
        try:
            await asyncio.wait_for(task, 5)
        except StoreUnavailable as exc:
            error = exc
        return store, heard, error

    store, heard, error = asyncio.run(scenario())
    assert error is not None
    assert "disk full" in str(error)
    assert heard == []
    assert store.log == [("commit", 2)]


def test_a_commit_is_slow_past_100_ms_plus_20_us_per_event() -> None:
    """A full batch while catching up is not "slow" at 110 ms; a batch of one event is."""

    async def scenario() -> list[dict[str, object]]:
        stream = io.StringIO()
        saved = structlog.get_config()
        configure_logging("info", "json", stream=stream)
        try:
            engine = make_engine()
            store = GatedStore()
            queue, task = _run_writer(store, max_events=10_000, linger_ms=0)
            await queue.put(_chunk(engine, 1))
            await _settle()
            await asyncio.sleep(0.15)
            store.gates[0].set()  # 150 ms for one event: slow
            await _settle()
            await queue.put(_chunk(engine, 3000))
            await _settle()
            await asyncio.sleep(0.11)
            store.gates[1].set()  # 110 ms for 3,000 events: its bound is 160 ms
            await queue.put(None)
            await task
        finally:
            structlog.configure(**saved)
        return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]

    slow = [line for line in asyncio.run(scenario()) if line["event"] == "slow journal commit"]
    assert [line["events"] for line in slow] == [1]


# --------------------------------------------------------------- only the batch's own content stops the writer


class FlakyStore(GatedStore):
    """Each commit raises the next of ``failures`` (then succeeds), and notes the writer's readiness
    (``degraded``, ``last_error``) as each attempt begins."""

    def __init__(self, failures: list[BaseException | None]) -> None:
        super().__init__()
        self.failures = failures
        self.writer: JournalWriter | None = None
        self.seen: list[tuple[bool, str | None]] = []

    async def commit(self, batch: Batch) -> None:
        assert self.writer is not None
        self.seen.append((self.writer.degraded, self.writer.last_error))
        failure = self.failures.pop(0) if self.failures else None
        if isinstance(failure, asyncio.CancelledError):
            inner: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            inner.cancel()  # a future inside the "driver" cancelled by someone else: not this task
            await inner
        if failure is not None:
            raise failure
        self.log.append(("durable", _last(batch)))


def test_a_commit_failing_for_any_reason_but_its_content_is_retried_and_shows_in_readiness() -> None:
    """A retriable store error, an exception the store did not classify, and a CancelledError from inside the
    store that is no cancellation of the writer: each is retried with the same batch, and readiness names it
    until a commit succeeds."""

    async def scenario() -> tuple[FlakyStore, JournalWriter, list[int]]:
        engine = make_engine()
        store = FlakyStore([StoreUnavailable("connection lost", retriable=True),
                            RuntimeError("cannot switch to state 12; another operation (2) is in progress"),
                            asyncio.CancelledError(), None])
        heard: list[int] = []

        async def listener(batch: Batch) -> None:
            heard.append(_last(batch))

        queue: JournalQueue = asyncio.Queue()
        writer = store.writer = JournalWriter(store, queue, linger_ms=0, backoff_max_s=0.05,  # type: ignore[arg-type]
                                              listeners=[listener])
        await queue.put(_chunk(engine, 3))
        await queue.put(None)
        await asyncio.wait_for(writer.run(), 5)
        return store, writer, heard

    store, writer, heard = asyncio.run(scenario())
    assert heard == [3]
    assert store.log == [("durable", 3)]  # the same batch, committed four times
    assert [degraded for degraded, _ in store.seen] == [False, True, True, True]
    errors = [error or "" for _, error in store.seen[1:]]
    assert "connection lost" in errors[0]
    assert "RuntimeError" in errors[1]
    assert "cancellation" in errors[2]
    assert not writer.degraded
    assert writer.last_error is None


def test_a_writer_cancelled_in_the_middle_of_a_commit_stops_and_does_not_retry() -> None:
    async def scenario() -> GatedStore:
        engine = make_engine()
        store = GatedStore()
        queue, task = _run_writer(store, linger_ms=0)
        await queue.put(_chunk(engine, 2))
        await _settle()
        assert store.log == [("commit", 2)]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        return store

    store = asyncio.run(scenario())
    assert store.log == [("commit", 2)]  # no second attempt


# --------------------------------------------------------------- fenced commits, flushes, epochs


class FencingStore(GatedStore):
    """Commits at once; refuses a batch holding ``X`` under epoch 1 as fenced (another process holds epoch 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[Batch] = []

    async def commit(self, batch: Batch) -> None:
        if batch.epochs.get("X") == 1:
            raise Fenced(Epochs({"X": 2}))
        self.batches.append(batch)


def test_a_fenced_commit_drops_the_lost_instrument_and_commits_the_rest() -> None:
    """Another process took X: its records in the batch and every later chunk of X under the old epoch are dropped
    (never handed to the listeners), the ownership hears of it, and T's records are committed."""

    async def scenario() -> tuple[FencingStore, list[Batch], list[Epochs], Ownership]:
        t, x = make_engine(), make_engine(symbol="X")
        store = FencingStore()
        heard: list[Batch] = []
        lost: list[Epochs] = []

        async def listener(batch: Batch) -> None:
            heard.append(batch)

        async def read(instruments: Any, partitions: Any) -> Epochs:
            return Epochs({"T": 1, "X": 2})

        async def on_lost(epochs: Epochs) -> None:
            lost.append(epochs)

        ownership = Ownership(read, lease_s=10)
        ownership.hold(Epochs({"T": 1, "X": 1}))
        ownership.on_lost = on_lost
        queue, task = _run_writer(store, linger_ms=0, listeners=[listener], ownership=ownership)
        await queue.put(_chunk(t, 2))
        await queue.put(_chunk(x, 3))
        await _settle()
        await queue.put(_chunk(x, 1))  # queued after the fence: dropped on sight
        await queue.put(_chunk(t, 1))
        await queue.put(None)
        await asyncio.wait_for(task, 5)
        return store, heard, lost, ownership

    store, heard, lost, ownership = asyncio.run(scenario())
    assert lost == [Epochs({"X": 1})]
    assert ownership.instruments == {"T": 1}
    assert [item.instrument for batch in store.batches for item in batch.applied] == ["T", "T", "T"]
    assert [batch.epochs for batch in store.batches] == [{"T": 1}, {"T": 1}]
    assert [item.instrument for batch in heard for item in batch.applied] == ["T", "T", "T"]


def test_a_flush_returns_once_everything_before_it_is_durable_and_heard() -> None:
    async def scenario() -> list[tuple[str, int]]:
        engine = make_engine()
        store = GatedStore()

        async def listener(batch: Batch) -> None:
            store.log.append(("listener", _last(batch)))

        queue: JournalQueue = asyncio.Queue()
        writer = JournalWriter(store, queue, linger_ms=300, listeners=[listener])  # type: ignore[arg-type]
        task = asyncio.create_task(writer.run())
        await queue.put(_chunk(engine, 2))
        flushed = asyncio.create_task(writer.flush())  # ends the batch at once: no linger
        await _settle()
        assert store.log == [("commit", 2)]
        assert not flushed.done()
        store.gates[0].set()
        await asyncio.wait_for(flushed, 5)
        store.log.append(("flushed", 0))
        await asyncio.wait_for(writer.flush(), 5)  # nothing queued: at once
        await queue.put(None)
        await asyncio.wait_for(task, 5)
        return store.log

    assert asyncio.run(scenario()) == [("commit", 2), ("durable", 2), ("listener", 2), ("flushed", 0)]


def test_an_instrument_under_two_epochs_never_shares_a_batch() -> None:
    """Taken again (a new loop, a new epoch) while outcomes of the old loop were still queued: each epoch's records
    go in a batch of their own, so each batch carries the one epoch it was prepared under."""

    async def scenario() -> list[Batch]:
        engine = make_engine()
        store = FencingStore()
        queue, task = _run_writer(store, linger_ms=50)
        await queue.put(_chunk(engine, 2, epoch=3))
        await queue.put(_chunk(engine, 1, epoch=4))
        await queue.put(None)
        await asyncio.wait_for(task, 5)
        return store.batches

    batches = asyncio.run(scenario())
    assert [(dict(b.epochs), _last(b)) for b in batches] == [({"T": 3}, 2), ({"T": 4}, 3)]
