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
import time
from collections.abc import Mapping
from typing import Any

from exchange.adapters.kafka import OrderSource
from exchange.core.matching import MatchingEngine
from exchange.pipeline.fanout import FanOut, MemorySink
from exchange.pipeline.loop import Control, InstrumentLoop, JournalItem
from exchange.pipeline.writer import JournalWriter
from exchange.ports import Batch, History, Recovered, Source, Store, StoreUnavailable
from exchange.service.compose import kafka_publisher, make_fanout, make_source, make_store, store_probe
from exchange.service.health import PROBE_TIMEOUT_S, Endpoints, Probes
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
        self.marketdata = MemorySink() if settings.publisher.marketdata == "memory" else None
        self.recovery: dict[str, Recovered] = {}  # what start-up recovery loaded, per instrument
        self._log = get_logger("exchange.daemon")
        self._stop = asyncio.Event()
        self.ready = False
        self.recovered = False
        self.loops: dict[str, InstrumentLoop] = {}
        self.writer: JournalWriter | None = None
        self.source: Source | None = None
        self.http: HttpServer | None = None
        self.fanout: FanOut | None = None
        self._last_snapshot: dict[str, float] = {}
        self._partition_of: dict[str, tuple[str, int]] = {}  # instrument -> the orders partition it came from
        self._started = time.monotonic()
        self.probes = Probes(self.metrics)  # which dependencies answer, for /readyz and exchange_dependency_up

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        s = self.settings
        specs = s.instrument_map()
        store = make_store(s)
        http = self.http = HttpServer(s.http.host, s.http.port, Endpoints(self).routes()) if s.http.port else None
        publisher = kafka_publisher(s, store, self.metrics)
        fanout = self.fanout = make_fanout(s, store, publisher, self.marketdata, self.metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            if http is not None:
                await http.start()
                self._log.info("http endpoints listening", host=s.http.host, port=http.port)
            recovered = self.recovery = await self._open_and_recover(store)
            self.recovered = True
            # What recovery loaded lives for the whole run: keep it out of every future collection,
            # and collect the young generation less often (the hot path makes no reference cycles).
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 100)
            journal: asyncio.Queue[list[JournalItem] | None] = asyncio.Queue(s.journal.queue_size)
            for symbol, rec in recovered.items():
                engine = MatchingEngine.from_state(specs[symbol], rec.state)
                self.loops[symbol] = InstrumentLoop(engine, journal, queue_size=s.engine.queue_size,
                                                    metrics=self.metrics)
            if fanout is not None:
                await fanout.prepare({symbol: rec.state for symbol, rec in recovered.items()},
                                     store if isinstance(store, History) else None)
                await fanout.start()
            applied_offsets = {(symbol, topic, partition): offset
                               for symbol, rec in recovered.items()
                               for (topic, partition), offset in rec.offsets.items()}
            if publisher is not None:
                await publisher.start()
            source = self.source = make_source(s, loops=self.loops, applied_offsets=applied_offsets,
                                               publisher=publisher, store=store, metrics=self.metrics,
                                               admin_keys=self.admin_keys, on_caught_up=self._caught_up)
            # With publishing, input offsets are marked durable only once the events are published (the
            # fan-out calls source.on_published): a committed input offset then also means its events were
            # published (exchange admin relies on it).
            if fanout is not None:
                fanout.add_listener(source.on_published)
            writer = self.writer = JournalWriter(
                store, journal, max_events=s.journal.max_events, linger_ms=s.journal.linger_ms, metrics=self.metrics,
                listeners=[fanout.on_durable if fanout is not None else source.on_published, self._on_durable])
            if isinstance(source, OrderSource):  # each batch stores how far each orders partition is done
                writer.partition_progress = source.partition_progress
            await source.start()
            self._register_probes(store, source)
            async with asyncio.TaskGroup() as tg:
                loop_tasks = [tg.create_task(lp.run(), name=f"loop-{lp.symbol}") for lp in self.loops.values()]
                writer_task = tg.create_task(writer.run(), name="journal-writer")
                source_task = tg.create_task(source.run(), name="order-source")
                timer = tg.create_task(self._snapshot_timer(), name="snapshot-timer")
                lag = tg.create_task(self._watch_loop_lag(), name="loop-lag")
                probes = tg.create_task(self.probes.run(), name="dependency-probes")
                fanout_task = tg.create_task(fanout.run(), name="fan-out") if fanout is not None else None
                stop = tg.create_task(self._stop.wait(), name="stop-signal")
                watched = [source_task, writer_task, *loop_tasks, *([fanout_task] if fanout_task else [])]
                # whichever comes first: a stop request, or a long-lived task ending (a failure)
                await asyncio.wait([stop, *watched], return_when=asyncio.FIRST_COMPLETED)
                if not stop.done():
                    stop.cancel()
                for task in watched:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                probes.cancel()
                await self._shutdown(source, source_task, timer, loop_tasks, journal, writer_task, fanout_task)
                lag.cancel()
            return 0
        finally:
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

    def _register_probes(self, store: Store, source: Source) -> None:
        probe = store_probe(store)
        if probe is not None:
            self.probes.checks[probe[0]] = probe[1]
        if isinstance(source, OrderSource):
            self.probes.checks["kafka"] = lambda: source.probe(PROBE_TIMEOUT_S)

    async def _open_and_recover(self, store: Store) -> dict[str, Recovered]:
        """Connect, migrate (if configured) and recover. A transient store error (the database restarting, a
        connection the server ended during the load) is retried with backoff for up to ``_STARTUP_RETRY_S``,
        each attempt logged; anything else, or a database still away after that, stops the start."""
        from recovery.rebuild import recover

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
                return await recover(store, s.instruments, metrics=self.metrics)
            except StoreUnavailable as exc:
                if not exc.retriable or time.monotonic() + delay > deadline:
                    raise
                self._log.warning("the store is not available for recovery yet; retrying", attempt=attempt,
                                  retry_in_s=round(delay, 2), error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _shutdown(self, source: Source, source_task: asyncio.Task[None], timer: asyncio.Task[None],
                        loop_tasks: list[asyncio.Task[None]], journal: asyncio.Queue[list[JournalItem] | None],
                        writer_task: asyncio.Task[None], fanout_task: asyncio.Task[None] | None) -> None:
        started = time.monotonic()
        self.ready = False
        self.metrics.ready.set(0)
        self._log.info("shutting down: draining queues")
        try:
            async with asyncio.timeout(self.settings.engine.shutdown_timeout_s):
                source.stop_consuming()
                timer.cancel()
                await source_task
                for instrument_loop in self.loops.values():
                    await instrument_loop.queue.put(Control.STOP)  # final snapshot after the last command
                await asyncio.gather(*loop_tasks)
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
            for instrument_loop in self.loops.values():
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
        self.ready = True
        self.metrics.ready.set(1)
        self._log.info("ready", instruments=len(self.loops))

    async def _on_durable(self, batch: Batch) -> None:
        m = self.metrics
        if self.settings.storage.kind in self.probes.unreachable:  # a commit succeeded: no need to wait for a probe
            self.probes.reachable(self.settings.storage.kind)
        now_ns = time.time_ns()
        wall_clock = self.source is not None and self.source.wall_clock_timestamps  # else the source measures
        per_instrument: dict[str, list[Any]] = {}
        partition_of = self._partition_of  # one instrument's orders all come from one partition (key = instrument)
        latencies: list[float] = []
        for item in batch.applied:
            events = item.events
            pos = item.position
            if pos is not None:
                partition_of[item.instrument] = (pos.topic, pos.partition)
                if wall_clock and events:
                    latencies.append(max(0, now_ns - events[0].ts_ns) / 1e9)
            if events:
                lst = per_instrument.get(item.instrument)
                if lst is None:
                    lst = per_instrument[item.instrument] = []
                lst += events
        if latencies:
            m.order_latency.observe_many(latencies)
        for symbol, events in per_instrument.items():
            m.count_events(symbol, events)
        now = time.monotonic()
        for snap in batch.snapshots:
            self._last_snapshot[snap.instrument] = now

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
        log_fatal(exc)
        return 1
