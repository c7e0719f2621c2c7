"""Prometheus metrics, all prefixed ``exchange_``, base units, bounded labels.

One :class:`Metrics` object per daemon, on its own registry (so tests can run
several daemons in one process). Components call its small methods; none of
them touches prometheus-client directly.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from exchange.events import Event, OrderAccepted, OrderFilled, OrderRejected

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.orders_received = Counter("exchange_orders_received_total", "Commands applied by the matching loops",
                                       ["instrument"], registry=r)
        self.orders_accepted = Counter("exchange_orders_accepted_total", "Orders accepted", ["instrument"],
                                       registry=r)
        self.orders_rejected = Counter("exchange_orders_rejected_total", "Commands rejected, by reason",
                                       ["instrument", "reason"], registry=r)
        self.trades = Counter("exchange_trades_total", "Trades (fills)", ["instrument"], registry=r)
        self.traded_lots = Counter("exchange_traded_lots_total", "Traded quantity in lots", ["instrument"],
                                   registry=r)
        self.events = Counter("exchange_events_total", "Events made durable", ["instrument"], registry=r)
        self.order_latency = Histogram("exchange_order_latency_seconds",
                                       "From the input's timestamp to its batch being durable",
                                       buckets=(.001, .002, .005, .01, .015, .02, .025, .03, .04, .05, .1, .25, .5,
                                                1, 2.5, 5, 10),
                                       registry=r)
        self.queue_depth_gauge = Gauge("exchange_queue_depth", "Commands waiting in an instrument's queue",
                                       ["instrument"], registry=r)
        self.book_orders = Gauge("exchange_book_orders", "Resting orders", ["instrument"], registry=r)
        self.book_levels = Gauge("exchange_book_levels", "Price levels", ["instrument", "side"], registry=r)
        self.batch_events = Histogram("exchange_journal_batch_events", "Events per journal batch",
                                      buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000), registry=r)
        self.commit_seconds = Histogram("exchange_journal_commit_seconds", "Journal commit duration",
                                        buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1),
                                        registry=r)
        self.consume_delay = Histogram("exchange_consume_delay_seconds",
                                       "From the timestamp of the oldest message in a fetched batch to its "
                                       "consumption (input delivery plus consumer lag)",
                                       buckets=(.001, .002, .005, .01, .015, .02, .03, .05, .1, .25, .5, 1, 5, 30),
                                       registry=r)
        self.loop_lag = Histogram("exchange_event_loop_lag_seconds",
                                  "How late a 50 ms timer fires: time the event loop was blocked or starved",
                                  buckets=(.001, .002, .005, .01, .02, .05, .1, .25, .5, 1), registry=r)
        self.commit_failures = Counter("exchange_journal_commit_failures_total", "Failed journal commits",
                                       registry=r)
        self.consumer_paused_gauge = Gauge("exchange_consumer_paused", "1 while back-pressure pauses the consumer",
                                           registry=r)
        self.snapshot_age = Gauge("exchange_snapshot_age_seconds", "Seconds since the last durable snapshot",
                                  ["instrument"], registry=r)
        self.recovery_orders = Gauge("exchange_recovery_orders_loaded", "Open orders loaded by recovery",
                                     registry=r)
        self.recovery_replayed = Gauge("exchange_recovery_messages_replayed", "Input messages replayed",
                                       registry=r)
        self.ready = Gauge("exchange_ready", "1 once recovery and replay are done", registry=r)
        self.dead_letters = Counter("exchange_dead_letters_total", "Messages sent to the dead-letter topic",
                                    registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- small hooks used by the components

    def commands_applied(self, instrument: str, n: int, depth: int) -> None:
        if n:
            self.orders_received.labels(instrument).inc(n)
        self.queue_depth_gauge.labels(instrument).set(depth)

    def consumer_paused(self, paused: bool) -> None:
        self.consumer_paused_gauge.set(1 if paused else 0)

    def commit_failed(self) -> None:
        self.commit_failures.inc()

    def batch_committed(self, n_events: int, seconds: float) -> None:
        self.batch_events.observe(n_events)
        self.commit_seconds.observe(seconds)

    def count_events(self, instrument: str, events: Iterable[Event]) -> None:
        accepted = trades = lots = 0
        n = 0
        for event in events:
            n += 1
            kind = type(event)
            if kind is OrderAccepted:
                accepted += 1
            elif kind is OrderFilled:
                trades += 1
                lots += event.qty_lots  # type: ignore[union-attr]
            elif kind is OrderRejected:
                self.orders_rejected.labels(instrument, event.reason.value).inc()  # type: ignore[union-attr]
        if n:
            self.events.labels(instrument).inc(n)
        if accepted:
            self.orders_accepted.labels(instrument).inc(accepted)
        if trades:
            self.trades.labels(instrument).inc(trades)
            self.traded_lots.labels(instrument).inc(lots)
