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
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from exchange.adapters.kafka import Incident, KafkaEventPublisher, OrderSource, client_options
from exchange.core.instruments import Instrument
from exchange.core.matching import MatchingEngine
from exchange.pipeline.fanout import FanOut, MemorySink
from exchange.pipeline.loop import Control, InstrumentLoop, JournalItem
from exchange.pipeline.writer import JournalWriter
from exchange.ports import Batch, History, InputLedger, Recovered, Sink, Source, Store, StoreUnavailable
from exchange.service.http import HttpServer, Response
from exchange.settings import Settings
from exchange.telemetry.logging import configure_logging, get_logger
from exchange.telemetry.metrics import Metrics
from exchange.wire.auth import ENV_KEYS, Verifier, parse_keys

if TYPE_CHECKING:
    from exchange.adapters.postgres import PostgresStore
    from exchange.adapters.sqlite import SqliteStore

__all__ = ["Daemon", "make_store"]

_PROBE_INTERVAL_S = 2.0  # how often each dependency is checked for /readyz
_PROBE_TIMEOUT_S = 3.0
_STARTUP_RETRY_S = 60.0  # how long start-up waits for a store that answers retriable errors


class Daemon:
    """``marketdata`` is the in-process market-data bus when ``[publisher] marketdata = "memory"`` (else
    None): in-process consumers (the demo's live view) subscribe to it before :meth:`run`."""

    def __init__(self, settings: Settings, *, store: Store | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        # operator keys (EXCHANGE_ADMIN_KEYS), read once: a malformed value stops the start with what to fix
        self.admin_keys = parse_keys((os.environ if env is None else env).get(ENV_KEYS))
        self.metrics = Metrics()
        self._store = store
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
        # dependency -> a cheap check that raises when it cannot be reached (adapters register theirs);
        # the probe task keeps ``unreachable`` current for /readyz and exchange_dependency_up
        self.probes: dict[str, Callable[[], Awaitable[Any]]] = {}
        self.unreachable: dict[str, str] = {}

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        s = self.settings
        specs = s.instrument_map()
        store = self._store or make_store(s)
        http = self.http = HttpServer(s.http.host, s.http.port, self._routes()) if s.http.port else None
        kafka_options = client_options(s.kafka)
        publisher = KafkaEventPublisher(bootstrap_servers=s.kafka.bootstrap_servers, events_topic=s.kafka.events_topic,
                                        instruments=specs, publish_events=s.kafka.publish_events,
                                        client_options=kafka_options, metrics=self.metrics,
                                        order_states=getattr(store, "order_states", None),
                                        trades_topic=s.kafka.trades_topic, batch_records=s.kafka.batch_records,
                                        max_record_bytes=s.kafka.max_record_bytes) \
            if s.publisher.kind == "kafka" else None
        fanout = self.fanout = _fanout(s, store, publisher, self.marketdata, self.metrics)
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
            source = self.source = self._make_source(specs, applied_offsets, publisher, kafka_options, store)
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
            ping = getattr(store, "ping", None)
            if ping is not None:
                self.probes["postgres"] = ping
            if isinstance(source, OrderSource):
                kafka_source = source
                self.probes["kafka"] = lambda: kafka_source.probe(_PROBE_TIMEOUT_S)
            async with asyncio.TaskGroup() as tg:
                loop_tasks = [tg.create_task(lp.run(), name=f"loop-{lp.symbol}") for lp in self.loops.values()]
                writer_task = tg.create_task(writer.run(), name="journal-writer")
                source_task = tg.create_task(source.run(), name="order-source")
                timer = tg.create_task(self._snapshot_timer(), name="snapshot-timer")
                lag = tg.create_task(self._watch_loop_lag(), name="loop-lag")
                probes = tg.create_task(self._probe_dependencies(), name="dependency-probes")
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

    def _make_source(self, specs: Mapping[str, Instrument], applied_offsets: dict[tuple[str, str, int], int],
                     publisher: KafkaEventPublisher | None, kafka_options: Mapping[str, Any],
                     store: Store) -> Source:
        s = self.settings
        if s.order_source.kind == "generator":
            from exchange.adapters.generator.source import GeneratorSource

            return GeneratorSource(loops=self.loops, instruments=specs, applied_offsets=applied_offsets,
                                   seed=s.order_source.seed, rate=s.order_source.rate,
                                   clients=s.order_source.clients, metrics=self.metrics,
                                   on_caught_up=self._caught_up)
        assert publisher is not None, "the settings require the Kafka publisher with the Kafka source"
        verifier = Verifier(self.admin_keys)
        if verifier.key_ids:
            self._log.info("operator actions: signed ones are applied", key_ids=verifier.key_ids)
        else:
            self._log.warning(f"no operator keys ({ENV_KEYS}): halt, resume, clear and snapshot requests are "
                              "refused (not_authorized); set it to key_id:secret to allow signed ones")
        return OrderSource(
            bootstrap_servers=s.kafka.bootstrap_servers, topic=s.kafka.orders_topic,
            group_id=s.kafka.group_id, loops=self.loops, instruments=specs, applied_offsets=applied_offsets,
            publisher=publisher, dead_letter_topic=s.kafka.dead_letter_topic, metrics=self.metrics,
            client_options={**kafka_options, "session_timeout_ms": s.kafka.session_timeout_ms,
                            "fetch_max_wait_ms": s.kafka.fetch_max_wait_ms,
                            "heartbeat_interval_ms": s.kafka.heartbeat_interval_ms},
            on_caught_up=self._caught_up, verifier=verifier, max_message_bytes=s.kafka.max_message_bytes,
            ledger=store if isinstance(store, InputLedger) else None)

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

    async def _probe_dependencies(self) -> None:
        """Check every dependency every few seconds, so /readyz names the ones that cannot be reached
        even while no traffic would notice (an idle daemon with its database gone is not ready)."""
        while True:
            for name, probe in list(self.probes.items()):
                try:
                    async with asyncio.timeout(_PROBE_TIMEOUT_S):
                        await probe()
                except Exception as exc:
                    if name not in self.unreachable:
                        self._log.warning("dependency unreachable", dependency=name, error=_describe(exc))
                    self.unreachable[name] = _describe(exc)
                    self.metrics.dependency_up.labels(name).set(0)
                    continue
                self._reachable_again(name)
            await asyncio.sleep(_PROBE_INTERVAL_S)

    def _reachable_again(self, name: str) -> None:
        if self.unreachable.pop(name, None) is not None:
            self._log.info("dependency reachable again", dependency=name)
            if name != "postgres":  # the journal writer counts its own recoveries
                self.metrics.reconnected(name)
        self.metrics.dependency_up.labels(name).set(1)

    def _caught_up(self) -> None:
        self.ready = True
        self.metrics.ready.set(1)
        self._log.info("ready", instruments=len(self.loops))

    async def _on_durable(self, batch: Batch) -> None:
        m = self.metrics
        if self.settings.storage.kind in self.unreachable:  # a commit just succeeded: no need to wait for a probe
            self._reachable_again(self.settings.storage.kind)
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

    # ------------------------------------------------------------------ HTTP

    def _routes(self) -> Mapping[str, Any]:
        return {"/healthz": self._healthz, "/readyz": self._readyz, "/metrics": self._metrics_page,
                "/status": self._status}

    def _healthz(self) -> Response:
        """Alive: 200. Degraded outputs (market data, Kafka publishing) are named, still with 200."""
        fan = self.fanout
        problems = []
        if fan is not None and fan.sink_error is not None and not fan.sink_up:
            problems.append(f"market data degraded: {fan.sink_error}")
        if fan is not None and fan.kafka_error is not None:
            problems.append(f"kafka publishing retrying: {fan.kafka_error}")
        body = ("degraded: " + "; ".join(problems) + "\n") if problems else "ok\n"
        return 200, "text/plain", body.encode()

    def _readyz(self) -> Response:
        problems = []
        if not self.recovered:
            problems.append("recovering")
        elif not self.ready:
            problems.append("replaying input")
        unreachable = dict(self.unreachable)
        if self.writer is not None and self.writer.degraded:
            unreachable[self.settings.storage.kind] = self.writer.last_error or "commits are failing"
        problems += [f"{name}: {error}" for name, error in sorted(unreachable.items())]
        problems += [incident.describe() for _, incident in sorted(self._incidents().items())]
        body = msgspec.json.encode({"ready": not problems, "problems": problems,
                                    "unreachable": sorted(unreachable)}) + b"\n"
        return (503 if problems else 200), "application/json", body

    def _incidents(self) -> Mapping[tuple[str, int], Incident]:
        """Orders partitions the source does not read because their log lost data."""
        return self.source.incidents if isinstance(self.source, OrderSource) else {}

    def _metrics_page(self) -> Response:
        now = time.monotonic()
        m = self.metrics
        for symbol, lp in self.loops.items():
            book = lp.engine.book
            m.book_orders.labels(symbol).set(len(book))
            m.book_levels.labels(symbol, "bid").set(len(book.bids))
            m.book_levels.labels(symbol, "ask").set(len(book.asks))
            m.book_depth.labels(symbol, "bid").set(sum(level.total_lots for level in book.bids.values()))
            m.book_depth.labels(symbol, "ask").set(sum(level.total_lots for level in book.asks.values()))
            m.queue_depth_gauge.labels(symbol).set(lp.queue.qsize())
            m.halted.labels(symbol).set(1 if lp.engine.halted else 0)
            m.seq.labels(symbol).set(lp.engine.seq)
            if symbol in self._last_snapshot:
                m.snapshot_age.labels(symbol).set(now - self._last_snapshot[symbol])
        if self.source is not None:
            for (topic, partition), lag in self.source.lag().items():
                m.consumer_lag.labels(topic, str(partition)).set(lag)
        return 200, "text/plain; version=0.0.4", self.metrics.render()

    def _status(self) -> Response:
        out = {}
        lags = self.source.lag() if self.source is not None else {}
        for symbol, lp in self.loops.items():
            book = lp.engine.book
            spec = lp.engine.spec
            bid, ask = book.best_bid(), book.best_ask()
            out[symbol] = {
                "seq": lp.engine.seq,
                "resting_orders": len(book),
                "best_bid": spec.ticks_to_price(bid) if bid is not None else None,
                "best_ask": spec.ticks_to_price(ask) if ask is not None else None,
                "halted": lp.engine.halted,
                "queue_depth": lp.queue.qsize(),
                # messages of this instrument's orders partition not yet read (shared with the partition's
                # other instruments); null until the instrument has committed something
                "consumer_lag": lags.get(self._partition_of[symbol]) if symbol in self._partition_of else None,
                "last_snapshot_age_s": (round(time.monotonic() - self._last_snapshot[symbol], 3)
                                        if symbol in self._last_snapshot else None),
            }
        incidents = [{"topic": i.topic, "partition": i.partition, "problem": i.problem, "since": i.since}
                     for _, i in sorted(self._incidents().items())]
        body = msgspec.json.encode({"ready": self.ready and not incidents, "instruments": out,
                                    "input_incidents": incidents,
                                    "publishing": self.fanout.status() if self.fanout else None}) + b"\n"
        return 200, "application/json", body


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return "no answer in time" if isinstance(exc, TimeoutError) else text


def make_store(settings: Settings) -> PostgresStore | SqliteStore:
    """The store the settings choose (``[storage] kind``): PostgreSQL or one SQLite file.

    Both implement :class:`~exchange.ports.Store` and :class:`~exchange.ports.History`.
    """
    if settings.storage.kind == "sqlite":
        from exchange.adapters.sqlite import SqliteStore

        return SqliteStore(settings.storage.path, settings.instruments, snapshot_keep=settings.engine.snapshot_keep,
                           synchronous=settings.storage.synchronous)
    from exchange.adapters.postgres import PostgresStore, connect_options

    return PostgresStore(settings.postgres.dsn, settings.instruments, pool_size=settings.postgres.pool_size,
                         snapshot_keep=settings.engine.snapshot_keep,
                         connect_options=connect_options(settings.postgres))


def _fanout(settings: Settings, store: Store, kafka: KafkaEventPublisher | None, memory: MemorySink | None,
            metrics: Metrics) -> FanOut | None:
    """The fan-out task's set-up; None when nothing is published (no Kafka events, no market data).

    Market data goes to Redis or to the in-process bus ``memory``; either way the channel and key names,
    depth, refresh and heartbeat come from ``[redis]``. The bus keeps nothing across a restart (its
    consumers start from the book key), so it alone needs no watermark and nothing is re-published.
    """
    r = settings.redis
    if kafka is None or not settings.kafka.publish_events:
        kafka = None
    sink: Sink | None = memory
    if r.enabled:
        from exchange.adapters.redis import RedisSink

        sink = RedisSink(r)
    if kafka is None and sink is None:
        return None
    if sink is not None:
        metrics.marketdata_up.set(1)
    needs_watermark = kafka is not None or r.enabled
    progress = store if needs_watermark and hasattr(store, "published_seqs") and hasattr(store, "record_published") \
        else None
    return FanOut(settings.instrument_map(), kafka=kafka, sink=sink,
                  names=r.channel, depth=r.book_depth, queue_size=settings.journal.publish_queue_size,
                  heartbeat_s=r.heartbeat_interval_s, book_refresh_s=r.book_refresh_ms / 1000,
                  progress=progress, metrics=metrics)  # type: ignore[arg-type]


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
