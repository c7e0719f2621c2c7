"""The composition root: builds the daemon from settings and runs it.

Start-up: connect the store, migrate (if configured), recover every book (loud
on any mismatch), start the publisher and the consumer (which seeks to the
stored offsets and replays), and become ready once the replay has caught up.

One ``asyncio.TaskGroup`` owns the long-lived tasks: one matching loop per
instrument, the journal writer, the consumer, the snapshot timer, the
dependency probes and the shutdown watcher. If any of them fails, the group cancels the rest and the
process exits non-zero; recovery brings the next start back consistent.

Shutdown (SIGTERM/SIGINT): stop consuming, let every loop drain its queue and
take a final snapshot, let the writer commit everything, commit the Kafka
offsets, log one summary line, exit 0 — all within ``shutdown_timeout_s``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from exchange.adapters.kafka import OrderSource, client_options
from exchange.adapters.kafka.topics import check_topics, daemon_topics
from exchange.pipeline.fanout import FanOut, MemorySink
from exchange.pipeline.loop import Control, InstrumentLoop, JournalQueue
from exchange.pipeline.ownership import Ownership
from exchange.pipeline.writer import JournalWriter
from exchange.ports import Batch, Recovered, Source, Store, StoreUnavailable, cannot_start
from exchange.service.compose import kafka_publisher, make_fanout, make_source, make_store, store_probe
from exchange.service.health import PROBE_TIMEOUT_S, Endpoints, Probes
from exchange.service.holdings import Holdings
from exchange.service.http import HttpServer
from exchange.settings import Settings
from exchange.telemetry.logging import configure_logging, get_logger
from exchange.telemetry.metrics import Metrics
from exchange.wire.auth import ENV_KEYS, parse_keys

__all__ = ["Daemon", "run_daemon"]

_STARTUP_RETRY_S = 60.0  # how long start-up waits for a store that answers retriable errors


class Daemon:
    """``marketdata`` is the in-process market-data bus when ``[publisher] marketdata = "memory"`` (else
    None): in-process consumers (the demo's live view) subscribe to it before :meth:`run`."""

    def __init__(self, settings: Settings, *, env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        # operator keys (EXCHANGE_ADMIN_KEYS), read once: a malformed value stops the start with what to fix
        self.admin_keys = parse_keys((os.environ if env is None else env).get(ENV_KEYS))
        self.metrics = Metrics()
        self.metrics.start_at_zero(**_known_labels(settings))
        self.marketdata = MemorySink() if settings.publisher.marketdata == "memory" else None
        self.recovery: dict[str, Recovered] = {}  # what taking each owned instrument loaded (Holdings.recovered)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"  # names this process in the ownership tables
        self._log = get_logger("exchange.daemon")
        self._stop = asyncio.Event()
        self._serving = False  # between start-up and shutdown
        self.recovered = False  # the first instruments are taken (the generator's at once, Kafka's when assigned)
        self.loops: dict[str, InstrumentLoop] = {}  # the owned instruments' loops (Holdings.loops)
        self.holdings: Holdings | None = None
        self.ownership: Ownership | None = None
        self.writer: JournalWriter | None = None
        self.source: Source | None = None
        self.http: HttpServer | None = None
        self.fanout: FanOut | None = None
        self._last_snapshot: dict[str, float] = {}
        self._partition_of: dict[str, tuple[str, int]] = {}  # instrument -> the orders partition it came from
        self._started = time.monotonic()
        self._gc_frozen = False
        self.probes = Probes(self.metrics)  # which dependencies answer, for /readyz and exchange_dependency_up

    @property
    def ready(self) -> bool:
        """Serving, its instruments taken, and caught up with their input."""
        source = self.source
        return (self._serving and self.recovered and source is not None and source.caught_up
                and not (isinstance(source, OrderSource) and source.rebalancing_since is not None))

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:  # noqa: C901 - the composition, in the order it must happen
        s = self.settings
        store = make_store(s, engine=True)
        http = self.http = HttpServer(s.http.host, s.http.port, Endpoints(self).routes()) if s.http.port else None
        publisher = kafka_publisher(s, store, self.metrics)
        # the lease: below the group's session timeout, so a process frozen long enough to lose its partitions
        # checks its epochs before it publishes anything again (see exchange.pipeline.ownership)
        ownership = self.ownership = Ownership(store.epochs, lease_s=s.kafka.session_timeout_ms / 2000,
                                               metrics=self.metrics)
        fanout = self.fanout = make_fanout(s, store, publisher, self.marketdata, self.metrics, ownership=ownership)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        fatal: asyncio.Future[BaseException] = loop.create_future()

        def on_fatal(exc: BaseException) -> None:
            if not fatal.done():
                fatal.set_result(exc)

        try:
            if http is not None:
                await http.start()
                self._log.info("http endpoints listening", host=s.http.host, port=http.port)
            await self._open(store)
            await self._check_topics()
            journal: JournalQueue = asyncio.Queue(s.journal.queue_size)
            writer = self.writer = JournalWriter(
                store, journal, max_events=s.journal.max_events, linger_ms=s.journal.linger_ms, metrics=self.metrics,
                ownership=ownership)
            if fanout is not None:
                await fanout.start()
            if publisher is not None:
                await publisher.start()
            async with asyncio.TaskGroup() as tg:
                holdings = self.holdings = Holdings(
                    store=store, specs=s.instrument_map(), ownership=ownership, journal=journal, writer=writer,
                    fanout=fanout, metrics=self.metrics, owner=self.owner, queue_size=s.engine.queue_size,
                    # giving partitions up must end within the group's patience (aiokafka's rebalance timeout is
                    # the session timeout), or the group goes on without this member
                    release_timeout_s=s.kafka.session_timeout_ms / 1000, stopping=self._stop.is_set,
                    spawn=lambda coro, name: tg.create_task(coro, name=name))
                self.loops, self.recovery = holdings.loops, holdings.recovered
                ownership.on_lost = holdings.lose
                applied_offsets: dict[tuple[str, str, int], int] = {}
                if s.order_source.kind == "generator":  # one process, every instrument, from the start
                    taken = await self._acquire(holdings, [spec.symbol for spec in s.instruments], [])
                    applied_offsets = {(symbol, topic, partition): offset for symbol, offsets in taken.items()
                                       for (topic, partition), offset in offsets.items()}
                source = self.source = make_source(
                    s, loops=holdings.loops, applied_offsets=applied_offsets, publisher=publisher, store=store,
                    metrics=self.metrics, admin_keys=self.admin_keys, on_caught_up=self._caught_up,
                    holder=_Taking(self, holdings), ownership=ownership, on_fatal=on_fatal)
                if isinstance(source, OrderSource):
                    holdings.on_lost_partitions = source.lose
                # With publishing, input offsets are marked durable only once the events are published (the
                # fan-out calls source.on_published): a committed input offset then also means its events were
                # published (exchange admin relies on it).
                if fanout is not None:
                    fanout.add_listener(source.on_published)
                writer.add_listener(fanout.on_durable if fanout is not None else source.on_published)
                writer.add_listener(self._on_durable)
                if isinstance(source, OrderSource):  # each batch stores how far each orders partition is done
                    writer.partition_progress = source.partition_progress
                self._serving = True
                await source.start()
                self._register_probes(store, source)
                writer_task = tg.create_task(writer.run(), name="journal-writer")
                source_task = tg.create_task(source.run(), name="order-source")
                timer = tg.create_task(self._snapshot_timer(), name="snapshot-timer")
                lag = tg.create_task(self._watch_loop_lag(), name="loop-lag")
                probes = tg.create_task(self.probes.run(), name="dependency-probes")
                fanout_task = tg.create_task(fanout.run(), name="fan-out") if fanout is not None else None
                stop = tg.create_task(self._stop.wait(), name="stop-signal")
                watched = [source_task, writer_task, *([fanout_task] if fanout_task else [])]
                # whichever comes first: a stop request, a long-lived task ending (a failure), a loop that raised,
                # or a rebalance that could not be handled
                waited: list[asyncio.Future[Any]] = [stop, holdings.failed, fatal, *watched]
                await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
                if not stop.done():
                    stop.cancel()
                for done in (holdings.failed, fatal):
                    if done.done():
                        raise done.result()
                for task in watched:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                probes.cancel()
                await self._shutdown(source, source_task, timer, holdings, journal, writer_task, fanout_task)
                lag.cancel()
            return 0
        finally:
            self._serving = False
            # bounded: a dependency that is down must not keep a stopping daemon alive
            closers = [("order source", self.source.stop() if self.source is not None else None),
                       ("kafka producer", publisher.stop() if publisher is not None else None),
                       ("store", store.stop()),
                       ("market-data sink", fanout.stop() if fanout is not None else None),
                       ("http", http.stop() if http is not None else None)]
            for name, closing in closers:
                if closing is None:
                    continue
                try:
                    async with asyncio.timeout(5):
                        await closing
                except Exception as exc:
                    self._log.warning("closing a connection failed", what=name, error=repr(exc))

    async def _acquire(self, holdings: Holdings, instruments: Sequence[str],
                       partitions: Sequence[tuple[str, int]]) -> dict[str, dict[tuple[str, int], int]]:
        """Take instruments (see :meth:`Holdings.acquire`); the first time, settle the garbage collector."""
        taken = await holdings.acquire(instruments, partitions)
        if not self._gc_frozen:
            # What recovery loaded lives for the whole run: keep it out of every future collection, and collect
            # the young generation less often (the hot path makes no reference cycles).
            gc.collect()
            gc.set_threshold(50_000, 20, 100)
            self._gc_frozen = True
        gc.freeze()
        self.recovered = True
        return taken

    async def _check_topics(self) -> None:
        """Every topic this configuration uses exists, or the broker just created it (a warning); a missing one
        the broker does not create, or a broker that does not answer, stops the start with one line saying so."""
        topics = daemon_topics(self.settings)
        if topics:
            await check_topics(self.settings.kafka, topics, options=client_options(self.settings.kafka))

    def _register_probes(self, store: Store, source: Source) -> None:
        probe = store_probe(store)
        if probe is not None:
            self.probes.checks[probe[0]] = probe[1]
        if isinstance(source, OrderSource):
            self.probes.checks["kafka"] = lambda: source.probe(PROBE_TIMEOUT_S)

    async def _open(self, store: Store) -> None:
        """Connect and migrate (if configured). A transient store error (the database restarting) is retried with
        backoff for up to ``_STARTUP_RETRY_S``, each attempt logged; anything else, or a database still away after
        that, stops the start."""
        s = self.settings
        deadline = time.monotonic() + _STARTUP_RETRY_S
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                await store.start()
                if s.postgres.migrate_on_start or s.storage.kind == "sqlite":  # the embedded file needs no operator
                    applied = await store.migrate()
                    if applied:
                        self._log.info("migrations applied", names=applied)
                return
            except StoreUnavailable as exc:
                if not exc.retriable or time.monotonic() + delay > deadline:
                    raise
                self._log.warning("the store is not available yet; retrying", attempt=attempt,
                                  retry_in_s=round(delay, 2), error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _shutdown(self, source: Source, source_task: asyncio.Task[None], timer: asyncio.Task[None],
                        holdings: Holdings, journal: JournalQueue, writer_task: asyncio.Task[None],
                        fanout_task: asyncio.Task[None] | None) -> None:
        started = time.monotonic()
        self._serving = False
        self.metrics.ready.set(0)
        self._log.info("shutting down: draining queues")
        try:
            async with asyncio.timeout(self.settings.engine.shutdown_timeout_s):
                source.stop_consuming()
                timer.cancel()
                await source_task
                await holdings.stop_all()  # each loop: a final snapshot after the last command
                await journal.put(None)
                await writer_task
                if fanout_task is not None and self.fanout is not None:
                    await self.fanout.close()  # publish what is durable, store the watermark
                    await fanout_task
        except TimeoutError:
            self._log.error("shutdown did not finish in time; exiting anyway (the next start recovers)",
                            timeout_s=self.settings.engine.shutdown_timeout_s)
            raise
        writer = self.writer
        self._log.info(
            "stopped", uptime_s=round(time.monotonic() - self._started, 1),
            shutdown_s=round(time.monotonic() - started, 3),
            consumed=source.consumed, replayed=source.replayed, skipped=source.skipped,
            dead_lettered=source.dead_lettered,
            batches=writer.batches if writer else 0, events=writer.events if writer else 0,
            instruments={sym: lp.engine.seq for sym, lp in self.loops.items()})

    async def _snapshot_timer(self) -> None:
        interval = self.settings.engine.snapshot_interval_s
        while True:
            await asyncio.sleep(interval)
            for instrument_loop in list(self.loops.values()):
                await instrument_loop.queue.put(Control.SNAPSHOT)

    async def _watch_loop_lag(self) -> None:
        """Measure how late a short timer fires: the time the event loop was blocked (or starved of CPU).

        Every stage of the pipeline shares this one loop, so a stall here delays every order in flight;
        the histogram shows how often, and a long one is logged with its length.
        """
        loop = asyncio.get_running_loop()
        interval = 0.05
        while True:
            started = loop.time()
            await asyncio.sleep(interval)
            lag = max(0.0, loop.time() - started - interval)
            self.metrics.loop_lag.observe(lag)
            if lag >= 0.1:
                self._log.warning("event loop stalled", stalled_ms=round(lag * 1000, 1))

    def _caught_up(self) -> None:
        self.metrics.ready.set(1)
        self._log.info("ready", instruments=sorted(self.loops))

    async def _on_durable(self, batch: Batch) -> None:
        m = self.metrics
        if self.settings.storage.kind in self.probes.unreachable:  # a commit succeeded: no need to wait for a probe
            self.probes.reachable(self.settings.storage.kind)
        now_ns = time.time_ns()
        wall_clock = self.source is not None and self.source.wall_clock_timestamps  # else the source measures
        # input that was in its partition's log before this process was assigned it: its latency is the wait
        catchup_ends = self.source.catchup_ends if self.source is not None and wall_clock else {}
        per_instrument: dict[str, list[Any]] = {}
        partition_of = self._partition_of  # one instrument's orders all come from one partition (key = instrument)
        latencies: list[float] = []
        catchup: list[float] = []
        for item in batch.applied:
            events = item.events
            pos = item.position
            if pos is not None:
                partition_of[item.instrument] = (pos.topic, pos.partition)
                if wall_clock and events:
                    latency = max(0, now_ns - events[0].ts_ns) / 1e9
                    if pos.offset < catchup_ends.get((pos.topic, pos.partition), -1):
                        catchup.append(latency)
                    else:
                        latencies.append(latency)
            if events:
                lst = per_instrument.get(item.instrument)
                if lst is None:
                    lst = per_instrument[item.instrument] = []
                lst += events
        if latencies:
            m.order_latency.observe_many(latencies)
        if catchup:
            m.catchup_latency.observe_many(catchup)
        for symbol, events in per_instrument.items():
            m.count_events(symbol, events)
        now = time.monotonic()
        for snap in batch.snapshots:
            self._last_snapshot[snap.instrument] = now

class _Taking:
    """The source's :class:`~exchange.ports.Holder`: the daemon's holdings, the first taking settling the collector."""

    def __init__(self, daemon: Daemon, holdings: Holdings) -> None:
        self._daemon = daemon
        self._holdings = holdings

    async def acquire(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]]
                      ) -> dict[str, dict[tuple[str, int], int]]:
        return await self._daemon._acquire(self._holdings, instruments, partitions)

    async def release(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]]) -> None:
        await self._holdings.release(instruments, partitions)

    def keep_only(self, instruments: Iterable[str]) -> None:
        self._holdings.keep_only(instruments)


def _known_labels(s: Settings) -> dict[str, list[str]]:
    """The label values :meth:`Metrics.start_at_zero` starts at zero: what these settings make the daemon
    publish to, connect to and produce to."""
    kafka_out = s.publisher.kind == "kafka"
    kafka_in = s.order_source.kind == "kafka"
    topics = []
    if kafka_out:
        topics.append(s.kafka.events_topic)
        if s.kafka.publish_events and s.kafka.trades_topic:
            topics.append(s.kafka.trades_topic)
    if kafka_in:
        topics.append(s.kafka.dead_letter_topic)
    redis = ["redis"] if s.redis.enabled else []
    return {"instruments": list(s.instrument_map()),
            "publish_targets": (["kafka"] if kafka_out else []) + redis,
            "connections": (["postgres"] if s.storage.kind == "postgres" else [])
            + (["kafka"] if kafka_in or kafka_out else []) + redis,
            "produced_topics": list(dict.fromkeys(topics))}


def run_daemon(settings: Settings) -> int:
    """``exchange run``: 0 after a clean shutdown; 1 after one critical log line naming the error that stopped it."""
    from exchange.telemetry.logging import capture_uncaught, log_fatal

    configure_logging(settings.log.level, settings.log.format)
    capture_uncaught()
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            return asyncio.run(Daemon(settings).run())
        return uvloop.run(Daemon(settings).run())
    except Exception as exc:  # the process ends here: one JSON line with the reason, not a plain traceback
        refused = cannot_start(exc)  # a start-up failure an operator puts right: what to do, no traceback
        log_fatal(refused or exc, traceback=refused is None)
        return 1
