"""The fan-out task's own logic, with the in-memory sink: back-pressure, retries, heartbeats, outages.

The outputs here are in-process stand-ins (the in-memory sink, an output whose
``publish`` waits or fails on demand): what is tested is the fan-out's queueing
and retrying, not Kafka or Redis (``tests/integration/test_fanout.py`` does that).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from exchange.core.events import Event
from exchange.pipeline.fanout import _ROUND_EVENTS, FanOut, MemorySink
from exchange.pipeline.ownership import Ownership
from exchange.ports import Applied, Batch, Epochs, SinkUnavailable
from exchange.settings import ConfigError, RedisSettings, load_settings
from tests.integration._workload import SPECS, Workload


class SlowOutput:
    """Takes events only while ``open`` is set; fails ``failures`` times first."""

    def __init__(self, failures: int = 0) -> None:
        self.open = asyncio.Event()
        self.failures = failures
        self.seqs: list[tuple[str, int]] = []

    async def publish(self, applied: Sequence[Applied]) -> None:
        await self.open.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker went away")
        self.seqs += [(a.instrument, e.seq) for a in applied for e in a.events]


class FlakySink(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def ping(self) -> None:
        if self.down:
            raise SinkUnavailable("memory sink switched off")

    async def send(self, commands: Sequence[tuple[str, str, bytes]]) -> None:
        await self.ping()
        await super().send(commands)


async def _until(condition: Any) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached within 10 s")


def _names(kind: str, symbol: str) -> str:
    return RedisSettings().channel(kind, symbol)


def _batches(n: int) -> tuple[Workload, list[Batch]]:
    work = Workload(seed=5)
    return work, work.batches(n, max_batch=8, snapshot_every=0)


async def _fan_out(output: Any, sink: MemorySink | None, queue_size: int) -> FanOut:
    pub = FanOut({s.symbol: s for s in SPECS}, kafka=output, sink=sink, names=_names, queue_size=queue_size,
                    heartbeat_s=0.01, book_refresh_s=0.0)
    await pub.prepare({s.symbol: Workload(seed=0).engines[s.symbol].export_state() for s in SPECS})
    await pub.start()
    return pub


def test_a_slow_output_blocks_the_writer_and_loses_nothing() -> None:
    async def main() -> None:
        work, batches = _batches(300)
        output = SlowOutput(failures=2)
        pub = await _fan_out(output, MemorySink(), queue_size=4)
        task = asyncio.create_task(pub.run())
        handed = 0

        async def writer() -> None:
            nonlocal handed
            for batch in batches:
                await pub.on_durable(batch)
                handed += 1

        writing = asyncio.create_task(writer())
        await asyncio.sleep(0.05)
        # the publisher holds one round, the queue holds 4: the writer waits for room
        assert not writing.done()
        assert handed <= 4 + 64
        output.open.set()
        await writing
        await pub.close()
        await task
        want = [(e.instrument, e.seq) for e in work.events]
        assert sorted(output.seqs) == sorted(want)  # nothing dropped despite two failed attempts
        for symbol in pub.published:
            assert pub.published[symbol] == work.engines[symbol].seq
        assert pub.kafka_error is None

    asyncio.run(main())


class RoundOutput:
    """Records how many events each publish call (one round) carried."""

    def __init__(self) -> None:
        self.rounds: list[int] = []

    async def publish(self, applied: Sequence[Applied]) -> None:
        self.rounds.append(sum(len(a.events) for a in applied))


class BuggyOutput(RoundOutput):
    """Fails its second round with an error no retry can fix (a bug on the way to the broker)."""

    async def publish(self, applied: Sequence[Applied]) -> None:
        if len(self.rounds) == 1 and not getattr(self, "failed", False):
            self.failed = True
            raise ValueError("a bug in the encoder")
        await super().publish(applied)


def test_a_round_that_can_never_be_published_is_dropped_not_retried_forever() -> None:
    async def main() -> None:
        work = Workload(seed=6)
        batches = work.batches(1500, max_batch=100, snapshot_every=0)
        output = BuggyOutput()
        pub = await _fan_out(output, MemorySink(), queue_size=len(batches) + 1)
        for batch in batches:
            await pub.on_durable(batch)
        await pub.close()
        await asyncio.wait_for(pub.run(), 30)  # returns: nothing loops on the bad round
        total = sum(len(a.events) for b in batches for a in b.applied)
        assert 0 < sum(output.rounds) < total  # the other rounds went out
        for symbol in pub.published:  # and the watermark moved past the dropped one
            assert pub.published[symbol] == work.engines[symbol].seq

    asyncio.run(main())


def test_a_backlog_is_published_in_rounds_of_bounded_size() -> None:
    """A round runs on the daemon's one thread; a backlog must not become one long round."""
    async def main() -> None:
        work = Workload(seed=5)
        batches = work.batches(3000, max_batch=200, snapshot_every=0)  # fewer than _MAX_ROUND batches
        output = RoundOutput()
        pub = await _fan_out(output, MemorySink(), queue_size=len(batches) + 1)
        for batch in batches:  # the whole backlog is queued before the publisher runs
            await pub.on_durable(batch)
        await pub.close()
        await pub.run()
        total = sum(len(a.events) for b in batches for a in b.applied)
        assert sum(output.rounds) == total > 4000
        biggest_batch = max(sum(len(a.events) for a in b.applied) for b in batches)
        assert len(output.rounds) > 1
        assert max(output.rounds) < _ROUND_EVENTS + biggest_batch
        for symbol in pub.published:
            assert pub.published[symbol] == work.engines[symbol].seq

    asyncio.run(main())


class EventHistory:
    """The stored events of a workload, no snapshots (what :meth:`FanOut.adopt` rebuilds a view from)."""

    def __init__(self, work: Workload) -> None:
        self._events = work.events

    async def latest_snapshot(self, instrument: str, max_seq: int | None = None) -> None:
        return None

    async def read_events(self, instrument: str, after_seq: int,
                          upto_seq: int | None = None) -> AsyncIterator[Sequence[Event]]:
        yield [e for e in self._events if e.instrument == instrument and after_seq < e.seq
               and (upto_seq is None or e.seq <= upto_seq)]


class Watermarks:
    def __init__(self, seqs: dict[str, int]) -> None:
        self.seqs = seqs

    async def published_seqs(self) -> dict[str, int]:
        return dict(self.seqs)

    async def record_published(self, seqs: Mapping[str, int]) -> None:
        self.seqs.update(seqs)


def test_an_instrument_adopted_during_a_tick_sends_no_heartbeat_behind_its_previous_owner() -> None:
    """Taken from another process, an instrument's view starts at the stored watermark, behind what that
    process published: its heartbeat and book key wait until the stored events are re-published."""
    async def main() -> None:
        work, _ = _batches(300)
        symbol = SPECS[0].symbol
        durable = work.engines[symbol].seq
        assert durable > 20
        gate = asyncio.Event()
        reads = 0

        async def read(instruments: Sequence[str], partitions: Sequence[tuple[str, int]]) -> Epochs:
            nonlocal reads
            reads += 1
            await gate.wait()
            return Epochs(dict.fromkeys(instruments, 1), {})

        ownership = Ownership(read, lease_s=60.0)
        ownership.hold(Epochs({s.symbol: 1 for s in SPECS}, {}))
        sink = MemorySink()
        beats = sink.subscribe(_names("heartbeat", symbol))
        pub = FanOut({s.symbol: s for s in SPECS}, kafka=RoundOutput(), sink=sink, names=_names,
                     heartbeat_s=0.01, book_refresh_s=0.0, progress=Watermarks({symbol: durable // 2}),
                     ownership=ownership)
        history = EventHistory(work)
        await pub.prepare({s.symbol: Workload(seed=0).engines[s.symbol].export_state() for s in SPECS[1:]},
                          history)
        await pub.start()
        task = asyncio.create_task(pub.run())
        await _until(lambda: reads == 1)  # the first tick waits for its confirmation
        await pub.adopt(symbol, work.engines[symbol].export_state())
        gate.set()
        await _until(lambda: pub.published.get(symbol) == durable and beats.qsize() > 0)
        await pub.close()
        await task
        seqs = []
        while not beats.empty():
            seqs.append(json.loads(await beats.get())["seq"])
        assert seqs, "no heartbeat"
        assert set(seqs) == {durable}, seqs
        assert json.loads(sink.keys[_names("book", symbol)])["seq"] == durable

    asyncio.run(main())


def test_sink_outage_degrades_then_resumes_with_fresh_book_keys() -> None:
    async def main() -> None:
        work, batches = _batches(200)
        sink = FlakySink()
        output = SlowOutput()
        output.open.set()
        pub = await _fan_out(output, sink, queue_size=8)
        symbol = SPECS[0].symbol
        l2 = sink.subscribe(_names("l2", symbol))
        task = asyncio.create_task(pub.run())
        half = len(batches) // 2
        for batch in batches[:half]:
            await pub.on_durable(batch)
        sink.down = True
        for batch in batches[half:]:
            await pub.on_durable(batch)
        await _until(lambda: not pub.sink_up)
        assert pub.sink_error is not None
        assert "switched off" in pub.sink_error
        before = l2.qsize()
        sink.down = False
        await _until(lambda: pub.sink_up)
        await pub.close()
        await task
        # everything went to Kafka; market data resumed with a book key at the current seq
        assert len(output.seqs) == len(work.events)
        image = json.loads(sink.keys[_names("book", symbol)])
        assert image["seq"] == work.engines[symbol].seq
        assert before > 0  # market data flowed before the outage

    asyncio.run(main())


def test_redis_settings(tmp_path: Any) -> None:
    base = '[[instruments]]\nsymbol = "X"\ntick_size = "0.01"\nlot_size = "1"\n'
    path = tmp_path / "c.toml"
    path.write_text(base + '[redis]\nenabled = true\nprefix = "feed:"\nl2_channel = "{prefix}{instrument}:book"\n'
                    'url = "redis://user:secret@host:6380/0"\n')
    s = load_settings(path, env={"EXCHANGE_REDIS_PASSWORD": "from-env"})
    assert s.redis.channel("l2", "X") == "feed:X:book"
    assert s.redis.channel("book", "X") == "feed:X.book"
    assert s.redis.password == "from-env"
    assert "secret" not in s.redis.redacted_url()
    path.write_text(base + '[redis]\nl2_channel = "md.l2"\n')
    with pytest.raises(ConfigError, match="l2_channel"):
        load_settings(path, env={})
    path.write_text(base + '[redis]\ntrades_channel = "{instrument}.{oops}"\n')
    with pytest.raises(ConfigError, match="trades_channel"):
        load_settings(path, env={})
    path.write_text(base + '[redis]\nbook_dept = 5\n')
    with pytest.raises(ConfigError, match="book_dept"):
        load_settings(path, env={})


def test_wire_encoder_gives_the_same_bytes_as_encode_event() -> None:
    from exchange.wire.codec import WireEncoder, encode_event

    work = Workload(seed=11)
    for _ in range(600):
        work.apply(work.command())
    encoders = {s.symbol: WireEncoder(s) for s in SPECS}
    specs = {s.symbol: s for s in SPECS}
    for event in work.events:
        assert encoders[event.instrument].encode(event) == encode_event(event, specs[event.instrument])
