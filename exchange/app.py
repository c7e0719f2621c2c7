"""The composition root: builds the daemon from settings and runs it.

Start-up: connect the store, migrate (if configured), recover every book (loud
on any mismatch), start the publisher and the consumer (which seeks to the
stored offsets and replays), and become ready once the replay has caught up.

One ``asyncio.TaskGroup`` owns the long-lived tasks: one matching loop per
instrument, the journal writer, the consumer, the snapshot timer and the
shutdown watcher. If any of them fails, the group cancels the rest and the
process exits non-zero; recovery brings the next start back consistent.

Shutdown (SIGTERM/SIGINT): stop consuming, let every loop drain its queue and
take a final snapshot, let the writer commit everything, commit the Kafka
offsets, log one summary line, exit 0 — all within ``shutdown_timeout_s``.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from exchange.adapters.kafka import KafkaEventPublisher, OrderSource
from exchange.engine import Control, InstrumentLoop, JournalItem
from exchange.http import HttpServer, Response
from exchange.journal import Batch, Store
from exchange.logging import configure_logging, get_logger
from exchange.matching import MatchingEngine
from exchange.metrics import Metrics
from exchange.settings import Settings
from exchange.writer import JournalWriter

__all__ = ["Daemon"]


class Daemon:
    def __init__(self, settings: Settings, *, store: Store | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._store = store
        self._log = get_logger("exchange.daemon")
        self._stop = asyncio.Event()
        self.ready = False
        self.recovered = False
        self.loops: dict[str, InstrumentLoop] = {}
        self.writer: JournalWriter | None = None
        self.source: OrderSource | None = None
        self.http: HttpServer | None = None
        self._last_snapshot: dict[str, float] = {}
        self._started = time.monotonic()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        s = self.settings
        specs = s.instrument_map()
        store = self._store or _postgres_store(s)
        http = self.http = HttpServer(s.http.host, s.http.port, self._routes()) if s.http.port else None
        publisher = KafkaEventPublisher(bootstrap_servers=s.kafka.bootstrap_servers, events_topic=s.kafka.events_topic,
                                        instruments=specs, publish_events=s.kafka.publish_events,
                                        order_states=getattr(store, "order_states", None))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            if http is not None:
                await http.start()
                self._log.info("http endpoints listening", host=s.http.host, port=http.port)
            await store.start()
            if s.postgres.migrate_on_start:
                applied = await store.migrate()
                if applied:
                    self._log.info("migrations applied", names=applied)
            from recovery.rebuild import recover

            recovered = await recover(store, s.instruments, metrics=self.metrics)
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
            applied_offsets = {(symbol, topic, partition): offset
                               for symbol, rec in recovered.items()
                               for (topic, partition), offset in rec.offsets.items()}
            await publisher.start()
            source = self.source = OrderSource(
                bootstrap_servers=s.kafka.bootstrap_servers, topic=s.kafka.orders_topic,
                group_id=s.kafka.group_id, loops=self.loops, instruments=specs, applied_offsets=applied_offsets,
                publisher=publisher, dead_letter_topic=s.kafka.dead_letter_topic, metrics=self.metrics,
                client_options={"session_timeout_ms": s.kafka.session_timeout_ms,
                                "fetch_max_wait_ms": s.kafka.fetch_max_wait_ms,
                                 "heartbeat_interval_ms": s.kafka.heartbeat_interval_ms},
                on_caught_up=self._caught_up)
            writer = self.writer = JournalWriter(store, journal, max_events=s.journal.max_events,
                                                 linger_ms=s.journal.linger_ms, metrics=self.metrics,
                                                 listeners=[source.on_durable, self._on_durable,
                                                            publisher.on_durable])
            await source.start()
            async with asyncio.TaskGroup() as tg:
                loop_tasks = [tg.create_task(lp.run(), name=f"loop-{lp.symbol}") for lp in self.loops.values()]
                writer_task = tg.create_task(writer.run(), name="journal-writer")
                source_task = tg.create_task(source.run(), name="order-source")
                timer = tg.create_task(self._snapshot_timer(), name="snapshot-timer")
                lag = tg.create_task(self._watch_loop_lag(), name="loop-lag")
                stop = tg.create_task(self._stop.wait(), name="stop-signal")
                # whichever comes first: a stop request, or a long-lived task ending (a failure)
                await asyncio.wait([stop, source_task, writer_task, *loop_tasks], return_when=asyncio.FIRST_COMPLETED)
                if not stop.done():
                    stop.cancel()
                for task in (source_task, writer_task, *loop_tasks):
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                await self._shutdown(source, source_task, timer, loop_tasks, journal, writer_task)
                lag.cancel()
            return 0
        finally:
            # bounded: a dependency that is down must not keep a stopping daemon alive
            closers = [("kafka consumer", self.source.stop() if self.source is not None else None),
                       ("kafka producer", publisher.stop()), ("store", store.stop()),
                       ("http", http.stop() if http is not None else None)]
            for name, closing in closers:
                if closing is None:
                    continue
                try:
                    async with asyncio.timeout(5):
                        await closing
                except Exception as exc:
                    self._log.warning("closing a connection failed", what=name, error=repr(exc))

    async def _shutdown(self, source: OrderSource, source_task: asyncio.Task[None], timer: asyncio.Task[None],
                        loop_tasks: list[asyncio.Task[None]], journal: asyncio.Queue[list[JournalItem] | None],
                        writer_task: asyncio.Task[None]) -> None:
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
        now_ns = time.time_ns()
        per_instrument: dict[str, list[Any]] = {}
        for item in batch.applied:
            per_instrument.setdefault(item.instrument, []).extend(item.events)
            if item.events and item.position is not None:
                m.order_latency.observe(max(0, now_ns - item.events[0].ts_ns) / 1e9)
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
        return 200, "text/plain", b"ok\n"

    def _readyz(self) -> Response:
        problems = []
        if not self.recovered:
            problems.append("recovering")
        elif not self.ready:
            problems.append("replaying input")
        if self.writer is not None and self.writer.degraded:
            problems.append(f"postgres: {self.writer.last_error}")
        body = msgspec.json.encode({"ready": not problems, "problems": problems}) + b"\n"
        return (503 if problems else 200), "application/json", body

    def _metrics_page(self) -> Response:
        now = time.monotonic()
        for symbol, lp in self.loops.items():
            self.metrics.book_orders.labels(symbol).set(len(lp.engine.book))
            self.metrics.book_levels.labels(symbol, "bid").set(len(lp.engine.book.bids))
            self.metrics.book_levels.labels(symbol, "ask").set(len(lp.engine.book.asks))
            if symbol in self._last_snapshot:
                self.metrics.snapshot_age.labels(symbol).set(now - self._last_snapshot[symbol])
        return 200, "text/plain; version=0.0.4", self.metrics.render()

    def _status(self) -> Response:
        out = {}
        for symbol, lp in self.loops.items():
            book = lp.engine.book
            spec = lp.engine.spec
            bid, ask = book.best_bid(), book.best_ask()
            out[symbol] = {
                "seq": lp.engine.seq,
                "resting_orders": len(book),
                "best_bid": spec.ticks_to_price(bid) if bid is not None else None,
                "best_ask": spec.ticks_to_price(ask) if ask is not None else None,
                "queue_depth": lp.queue.qsize(),
                "last_snapshot_age_s": (round(time.monotonic() - self._last_snapshot[symbol], 3)
                                        if symbol in self._last_snapshot else None),
            }
        body = msgspec.json.encode({"ready": self.ready, "instruments": out}) + b"\n"
        return 200, "application/json", body


def _postgres_store(settings: Settings) -> Store:
    from exchange.adapters.postgres import PostgresStore

    return PostgresStore(settings.postgres.dsn, settings.instruments, pool_size=settings.postgres.pool_size,
                         snapshot_keep=settings.engine.snapshot_keep)


def run_daemon(settings: Settings) -> int:
    configure_logging(settings.log.level, settings.log.format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(Daemon(settings).run())
    return uvloop.run(Daemon(settings).run())
