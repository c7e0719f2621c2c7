"""Fan-out of durable batches: Kafka order events and trades, market data to Redis (or memory).

The journal writer hands every durable batch to :meth:`FanOut.on_durable`,
which puts it on a BOUNDED queue and returns; the fan-out task does the rest,
off the commit path. When the queue is full the writer waits, the loops' journal
queue fills, the loops block and the consumer pauses: a slow Kafka slows
matching down and nothing is dropped.

Each round the task takes every batch waiting (so rounds grow with the load),
and per instrument

1. feeds the events to the instrument's :class:`~exchange.projections.marketdata.MarketData`
   and sends its messages (and, at most every ``book_refresh_s``, the book key
   before them) to the sink in one pipeline;
2. publishes the events and trades to Kafka and waits for the acks, sending the
   same events again on an error until the broker takes them;
3. advances the instrument's "published through seq" watermark, which is stored
   (``publish_progress`` in PostgreSQL) at most every ``progress_interval_s``.

Every ``heartbeat_s`` it publishes a heartbeat per instrument, rewrites book keys
that are behind, and, while the sink is down, tries to reach it again; when it is
back every book key is rewritten before anything else, so subscribers resync
from fresh images.

Re-publication after a restart, or when this process takes an instrument
another one published: the watermark is written only after both outputs took
the events, so every event after it may not have gone out. :meth:`FanOut.adopt`
rebuilds the instrument's market-data view at the watermark (the latest snapshot
at or below it plus the stored events up to it), and :meth:`FanOut.run` publishes
the stored events from the watermark to the durable seq again, with their own
sequence numbers, before any new batch of it. Consumers drop what they already
have by sequence number (trades by trade id).

Instruments come and go (:meth:`FanOut.adopt`, :meth:`FanOut.park`,
:meth:`FanOut.drop`): only those this process owns are published, heartbeats
included, and with an :class:`~exchange.pipeline.ownership.Ownership` nothing
goes out unless it confirms the process's epochs (its lease): a process that
lost an instrument while it was frozen sends nothing for it when it wakes.
:meth:`FanOut.flush` returns once everything queued before it is published and
the watermark stored.

A sink failure never stops the daemon: market data is degraded (``sink_up`` is
false, metrics and ``/healthz`` show it) while matching, persistence and Kafka
go on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from exchange.core.events import Event
from exchange.core.instruments import Instrument
from exchange.core.state import EngineState
from exchange.pipeline.loop import Flush
from exchange.pipeline.ownership import Ownership
from exchange.ports import Applied, Batch, History, Outgoing, PublishWatermark, Sink, SinkUnavailable
from exchange.projections.marketdata import MarketData
from exchange.telemetry.logging import get_logger
from exchange.telemetry.metrics import Metrics, discarded
from recovery.rebuild import replay_stored

__all__ = ["FanOut", "MemorySink"]

ChannelNames = Callable[[str, str], str]  # (kind, instrument) -> channel or key name ("book" is the key)
_MAX_ROUND = 64  # batches taken per round at most (bounds one round's work)
# A round stops taking batches once it holds this many events. A round's work runs on the daemon's one
# thread between awaits, and the journal writer waits behind it: short rounds, a yield after an
# instrument's market data of at least _YIELD_EVERY events, and one every 1,000 events the Kafka
# publisher encodes (exchange/adapters/kafka/publisher.py) keep the commit path moving.
_ROUND_EVENTS = 2000
_YIELD_EVERY = 1000


def _transient(exc: BaseException) -> bool:
    """Might sending the same round again succeed? A broker's error (it carries ``retriable``: even one that is
    not, such as a missing authorization, is the deployment's to fix, and then it goes through), a timeout, a
    lost connection: yes. Anything else is a bug on the way to the broker."""
    return isinstance(exc, TimeoutError | OSError | ConnectionError) or hasattr(exc, "retriable")


class MemorySink:
    """An in-process sink: the book keys in a dict, messages to in-process subscribers' queues."""

    def __init__(self, keep: int = 0) -> None:
        self.keys: dict[str, bytes] = {}
        self.sent: list[tuple[str, bytes]] = []  # the last ``keep`` messages (all with keep=0 ... none kept)
        self._keep = keep
        self._subscribers: dict[str, list[asyncio.Queue[bytes]]] = {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def subscribe(self, *channels: str, maxsize: int = 10_000) -> asyncio.Queue[bytes]:
        """A queue that gets every message published to any of ``channels`` from now on, in the order
        published (like one Redis subscription; so a heartbeat never overtakes the ``l2`` before it).
        When the queue is full messages are dropped: the subscriber sees a gap and resyncs."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize)
        for channel in channels:
            self._subscribers.setdefault(channel, []).append(queue)
        return queue

    async def send(self, commands: Sequence[Outgoing]) -> None:
        for op, name, data in commands:
            if op == "set":
                self.keys[name] = data
                continue
            if self._keep:
                self.sent.append((name, data))
                del self.sent[:-self._keep]
            for queue in self._subscribers.get(name, ()):
                if not queue.full():  # like pub/sub: a slow subscriber loses messages and resyncs
                    queue.put_nowait(data)


class FanOut:
    """The fan-out task (see the module docstring)."""

    def __init__(self, specs: Mapping[str, Instrument], *, kafka: Any = None, sink: Sink | None = None,
                 names: ChannelNames | None = None, depth: int = 0, queue_size: int = 64,
                 heartbeat_s: float = 1.0, book_refresh_s: float = 0.1, progress: PublishWatermark | None = None,
                 progress_interval_s: float = 0.5, metrics: Metrics | None = None,
                 clock_ns: Callable[[], int] = time.time_ns, ownership: Ownership | None = None) -> None:
        if sink is not None and names is None:
            raise ValueError("a sink needs channel names")
        self._specs = dict(specs)
        self._kafka = kafka  # KafkaEventPublisher or None
        self._sink = sink
        self._names = names
        self._depth = depth
        self._queue: asyncio.Queue[Batch | Flush | None] = asyncio.Queue(queue_size)
        self._ownership = ownership
        self._heartbeat_s = heartbeat_s
        self._book_refresh_s = book_refresh_s
        self._progress = progress
        self._progress_interval_s = progress_interval_s
        self._metrics = metrics if metrics is not None else discarded()
        self._clock_ns = clock_ns
        self._log = get_logger("exchange.fanout")
        self.builders: dict[str, MarketData] = {}  # the instruments published (owned), their market-data views
        self._parked: dict[str, MarketData] = {}  # given up, maybe taken again at the next assignment
        self._backlog: dict[str, tuple[int, int]] = {}  # instrument -> (watermark, durable seq) to re-publish
        self._recovered: dict[str, EngineState] = {}
        self._history: History | None = None
        self.published: dict[str, int] = {}  # instrument -> published through seq
        self._stored: dict[str, int] = {}  # the watermark as last stored
        self._next_store = 0.0
        self._key_seq: dict[str, int] = {}  # seq of the book image last written per instrument
        self._key_at: dict[str, float] = {}
        self.sink_up = sink is not None
        self.sink_error: str | None = None
        self.kafka_error: str | None = None
        self.republished = 0
        self.rounds = 0
        self._listeners: list[Callable[[Batch], Awaitable[None]]] = []

    # ---------------------------------------------------------------- start-up

    async def prepare(self, states: Mapping[str, EngineState], history: History | None = None) -> None:
        """Adopt every instrument of ``states`` (the recovered engine images): see :meth:`adopt`."""
        self._history = history
        stored = await self._progress.published_seqs() if self._progress is not None and history else {}
        for symbol, state in states.items():
            await self._adopt(symbol, state, stored.get(symbol))

    async def adopt(self, symbol: str, state: EngineState, history: History | None = None) -> None:
        """Publish ``symbol`` from now on, recovered at ``state``: its view is rebuilt at the stored watermark
        and the events from there to ``state.seq`` are queued for re-publication (with a watermark store and a
        history; else the view starts at ``state``)."""
        self._history = history if history is not None else self._history
        stored = (await self._progress.published_seqs() if self._progress is not None and self._history is not None
                  else {})
        await self._adopt(symbol, state, stored.get(symbol))

    async def _adopt(self, symbol: str, state: EngineState, watermark: int | None) -> None:
        history = self._history
        self._parked.pop(symbol, None)
        self._recovered[symbol] = state
        spec = self._specs[symbol]
        durable = state.seq
        stored = watermark
        if history is None or self._progress is None:
            watermark = durable
        elif watermark is None:
            snapshot = await history.latest_snapshot(symbol, durable) if durable else None
            watermark = snapshot.state.seq if snapshot is not None else 0
            if durable:
                self._log.warning("no publish watermark stored (first start with fan-out?); re-publishing "
                                  "from the latest snapshot", instrument=symbol, from_seq=watermark,
                                  durable_seq=durable)
        elif watermark > durable:
            self._log.warning("the publish watermark is ahead of the durable seq (database restored?); "
                              "nothing is re-published", instrument=symbol, watermark=watermark, durable=durable)
            watermark = durable
        if watermark == durable:
            self.builders[symbol] = MarketData(spec, state, depth=self._depth)
        else:
            self.builders[symbol] = MarketData(spec, await self._state_at(spec, watermark), depth=self._depth)
            self._backlog[symbol] = (watermark, durable)
        self.published[symbol] = watermark
        self._stored[symbol] = stored if stored is not None else -1
        self._key_seq.pop(symbol, None)
        self._key_at.pop(symbol, None)

    def park(self, symbols: Iterable[str]) -> None:
        """Stop publishing these (given up, with everything of theirs published: see :meth:`flush`); their
        views are kept for :meth:`unpark` if this process takes them again with nothing written meanwhile."""
        for symbol in symbols:
            builder = self.builders.pop(symbol, None)
            if builder is not None:
                self._parked[symbol] = builder

    def unpark(self, symbol: str) -> bool:
        """Publish this parked instrument again (taken back with nothing written meanwhile); False if its view was
        not kept (then :meth:`adopt` it)."""
        builder = self._parked.pop(symbol, None)
        if builder is not None:
            self.builders[symbol] = builder
        return builder is not None

    def drop(self, symbols: Iterable[str]) -> None:
        """Forget these for good (another process owns them): nothing of theirs is published from now on."""
        tables: list[dict[str, Any]] = [self.builders, self._parked, self._backlog, self._recovered, self.published,
                                        self._stored, self._key_seq, self._key_at]
        for symbol in symbols:
            for table in tables:
                table.pop(symbol, None)

    async def flush(self) -> None:
        """Return once every batch queued before this call is published and the watermark is stored."""
        marker = Flush()
        await self._queue.put(marker)
        await marker.done

    async def _state_at(self, spec: Instrument, seq: int) -> EngineState:
        assert self._history is not None
        snapshot = await self._history.latest_snapshot(spec.symbol, seq)
        return (await replay_stored(self._history, spec, seq, snapshot=snapshot)).state

    def add_listener(self, listener: Callable[[Batch], Awaitable[None]]) -> None:
        """Called with each round's records once they are published (the order source's ``on_published``: their
        input offsets may then be committed)."""
        self._listeners.append(listener)

    async def start(self) -> None:
        if self._sink is None:
            return
        try:
            await self._sink.start()
        except SinkUnavailable as exc:
            self._down(str(exc))

    async def stop(self) -> None:
        if self._sink is not None:
            await self._sink.stop()

    # ---------------------------------------------------------------- running

    async def on_durable(self, batch: Batch) -> None:
        """Writer listener: queue the batch (waits while the queue is full: that is the back-pressure)."""
        if batch.applied:
            await self._queue.put(batch)
            self._metrics.publish_queue.set(self._queue.qsize())

    async def close(self) -> None:
        """No more batches: :meth:`run` publishes what is queued and returns."""
        await self._queue.put(None)

    async def run(self) -> None:
        queue = self._queue
        next_tick = time.monotonic()
        done = False
        while not done:
            if self._backlog:
                await self._republish()
            wait = next_tick - time.monotonic()
            if wait <= 0:
                await self._tick()
                next_tick = time.monotonic() + self._heartbeat_s
                continue
            try:
                first = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                continue
            batches: list[Batch] = []
            item: Batch | Flush | None = first
            flush: Flush | None = None
            n_events = 0
            while True:
                if item is None:
                    done = True
                    break
                if type(item) is Flush:
                    flush = item
                    break
                assert type(item) is Batch
                batches.append(item)
                n_events += sum(len(a.events) for a in item.applied)
                if len(batches) >= _MAX_ROUND or n_events >= _ROUND_EVENTS or queue.empty():
                    break
                item = queue.get_nowait()
            if self._backlog:  # an instrument adopted while this waited: its old events go first
                await self._republish()
            if batches:
                await self._round([a for b in batches for a in b.applied])
            if flush is not None:
                await self._store_progress(force=True)
                if not flush.done.done():
                    flush.done.set_result(None)
        await self._tick()
        await self._store_progress(force=True)

    async def _republish(self) -> None:
        history = self._history
        backlog = dict(self._backlog)
        self._backlog.clear()
        for symbol, (watermark, durable) in sorted(backlog.items()):
            if symbol not in self.builders:
                continue  # given up meanwhile
            assert history is not None
            started = time.monotonic()
            self._log.info("re-publishing events that may not have gone out before the restart",
                           instrument=symbol, from_seq=watermark + 1, to_seq=durable)
            async for chunk in history.read_events(symbol, watermark, durable):
                await self._round([Applied(symbol, chunk, None)])
                self.republished += len(chunk)
                self._metrics.republished.inc(len(chunk))
                if symbol not in self.builders:
                    break  # lost meanwhile
            builder = self.builders.get(symbol)
            if builder is None:
                continue
            if builder.seq != durable or not builder.same_book(self._recovered[symbol]):
                self._log.error("the market-data view rebuilt by re-publication differs from the recovered book; "
                                "starting it from the recovered book (subscribers will resync)", instrument=symbol,
                                view_seq=builder.seq, durable_seq=durable)
                self.builders[symbol] = MarketData(self._specs[symbol], self._recovered[symbol], depth=self._depth)
            self._log.info("re-published", instrument=symbol, events=durable - watermark,
                           elapsed_s=round(time.monotonic() - started, 3))

    async def _round(self, applied: Sequence[Applied]) -> None:
        """Publish one round: market data, then Kafka (retried until taken), then the watermark. Only the
        instruments this process (still) owns, once it has confirmed its epochs."""
        await self._confirmed()
        builders = self.builders
        if any(item.instrument not in builders for item in applied):
            applied = [item for item in applied if item.instrument in builders]  # lost meanwhile: not ours to send
        self.rounds += 1
        per: dict[str, list[Event]] = {}
        for item in applied:
            if item.events:
                events = per.get(item.instrument)
                if events is None:
                    per[item.instrument] = list(item.events)
                else:
                    events.extend(item.events)
        await self._market_data(per)
        if self._kafka is not None:
            await self._to_kafka(applied)
        for symbol, events in per.items():
            self.published[symbol] = events[-1].seq
        if self._listeners:
            done = Batch(applied)
            for listener in self._listeners:
                await listener(done)
        self._metrics.published(self.published)
        self._metrics.publish_queue.set(self._queue.qsize())
        await self._store_progress()

    async def _market_data(self, per: Mapping[str, list[Event]]) -> None:
        commands: list[Outgoing] = []
        now = time.monotonic()
        names = self._names
        for symbol, events in per.items():
            builder = self.builders[symbol]
            messages = builder.apply(events)
            if len(events) >= _YIELD_EVERY:
                await asyncio.sleep(0)  # let the journal writer and the loops run between instruments
            if not self.sink_up:
                continue
            assert names is not None
            if now - self._key_at.get(symbol, 0.0) >= self._book_refresh_s:
                commands.append(("set", names("book", symbol), builder.book()))
                self._key_at[symbol] = now
                self._key_seq[symbol] = builder.seq
            for channel, data in messages:
                commands.append(("publish", names(channel, symbol), data))
        await self._send(commands)

    async def _send(self, commands: list[Outgoing]) -> None:
        if not commands or self._sink is None or not self.sink_up:
            return
        try:
            await self._sink.send(commands)
        except SinkUnavailable as exc:
            self._down(str(exc))
            return
        self._metrics.marketdata_messages.inc(len(commands))

    async def _to_kafka(self, applied: Sequence[Applied]) -> None:
        """Publish the round, sending it again while the broker fails (a record the broker refuses for what it
        is, the Kafka publisher drops itself). Anything else that fails -- a bug on the way to the broker -- would
        fail the same way forever: the round's Kafka publication is dropped, loudly, instead of stalling
        every instrument behind it (its events are durable, and in the store)."""
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._kafka.publish(applied)
            except Exception as exc:  # aiokafka raises KafkaError subclasses, and asyncio timeouts
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if not _transient(exc):
                    seqs: dict[str, list[int]] = {}
                    for item in applied:
                        if item.events:
                            span = seqs.setdefault(item.instrument, [item.events[0].seq, item.events[-1].seq])
                            span[1] = item.events[-1].seq
                    self._log.error("publishing a round to Kafka failed for a reason that sending it again cannot "
                                    "fix; its events are durable but not on the events topic", seqs=seqs,
                                    error=f"{type(exc).__name__}: {exc}", exc_info=exc)
                    self._metrics.publish_failures.labels("kafka").inc()
                    return
                self.kafka_error = f"{type(exc).__name__}: {exc}"
                self._metrics.publish_failures.labels("kafka").inc()
                self._log.warning("publishing to Kafka failed; sending the same events again (consumers drop "
                                  "duplicates by seq)", attempt=attempt, retry_in_s=round(delay, 3),
                                  error=self.kafka_error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self.kafka_error is not None:
                self._log.info("publishing to Kafka resumed", attempts=attempt)
                self.kafka_error = None
            return

    async def _confirmed(self) -> None:
        """Wait until the ownership (if any) confirms this process's epochs (see its lease)."""
        delay = 0.05
        while self._ownership is not None and not await self._ownership.confirm():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _tick(self) -> None:
        """Heartbeats, book keys that are behind, a reconnect attempt while the sink is down; the watermark."""
        if self._ownership is not None and not await self._ownership.confirm():
            return  # nothing goes out unconfirmed; the next tick tries again
        if self._sink is not None and self._names is not None:
            names = self._names
            reconnected = False
            if not self.sink_up:
                try:
                    await self._sink.ping()
                except SinkUnavailable as exc:
                    self.sink_error = str(exc)
                else:
                    reconnected = True
            if self.sink_up or reconnected:
                now = time.monotonic()
                now_ns = self._clock_ns()
                commands: list[Outgoing] = []
                for symbol, builder in self.builders.items():
                    if symbol in self._backlog:
                        # adopted while this tick waited: its view is at the watermark, behind what the previous
                        # owner published; nothing of it goes out before its stored events are re-published
                        continue
                    if reconnected or self._key_seq.get(symbol) != builder.seq:
                        commands.append(("set", names("book", symbol), builder.book()))
                        self._key_at[symbol] = now
                        self._key_seq[symbol] = builder.seq
                    commands.append(("publish", names("heartbeat", symbol), builder.heartbeat(now_ns)))
                if reconnected:
                    self._up()
                await self._send(commands)
        await self._store_progress()

    async def _store_progress(self, force: bool = False) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if not force and now < self._next_store:
            return
        self._next_store = now + self._progress_interval_s
        changed = {s: seq for s, seq in self.published.items() if self._stored.get(s) != seq}
        if not changed:
            return
        try:
            await self._progress.record_published(changed)
        except Exception as exc:  # the watermark only lags: more is re-published after a crash
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._log.warning("storing the publish watermark failed; will retry", error=str(exc))
            return
        self._stored.update(changed)

    # ----------------------------------------------------------------- health

    def _down(self, error: str) -> None:
        if self.sink_up:
            self._log.warning("market data degraded: the sink is unavailable; matching and persistence go on, "
                              "publishing resumes with fresh book keys when it is back", error=error)
        self.sink_up = False
        self.sink_error = error
        self._metrics.marketdata_up.set(0)
        self._metrics.publish_failures.labels("redis").inc()

    def _up(self) -> None:
        self._log.info("market data resumed: the sink is back; book keys rewritten")
        self.sink_up = True
        self.sink_error = None
        self._metrics.marketdata_up.set(1)
        self._metrics.reconnects.labels("redis").inc()

    def status(self) -> dict[str, Any]:
        return {"market_data": ("off" if self._sink is None else "up" if self.sink_up else
                                f"down: {self.sink_error}"),
                "kafka": "ok" if self.kafka_error is None else f"retrying: {self.kafka_error}",
                "queue_batches": self._queue.qsize(), "published_seq": dict(self.published),
                "republished_events": self.republished}

