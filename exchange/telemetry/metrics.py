"""Prometheus metrics, all prefixed ``exchange_``, base units, bounded labels.

One :class:`Metrics` object per daemon, on its own registry (so tests can run
several daemons in one process). Components call its small methods; none of
them touches prometheus-client directly. The README's metrics table lists every
one; ``tests/unit/test_compose.py`` checks that the Grafana dashboard only uses
names defined here.

Labels stay bounded: ``instrument`` (configured), ``reason`` (an enum),
``side``, ``topic``/``partition`` (the orders topic's), ``dependency`` and
``target`` (``postgres``, ``kafka``, ``redis``).
"""

from __future__ import annotations

import contextlib
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from exchange.core.events import Event, OrderAccepted, OrderFilled, OrderRejected, OrderTriggered
from exchange.core.types import RejectReason

__all__ = ["BOOK_REJECT_REASONS", "BulkHistogram", "Metrics"]

# the reasons an instrument's book rejects with (exchange_orders_rejected_total); the others are the edge's,
# for messages that never reached a book (exchange_dead_letters_total)
BOOK_REJECT_REASONS = tuple(r for r in RejectReason if r not in {
    RejectReason.INSTRUMENT_REQUIRED, RejectReason.MESSAGE_TOO_LARGE, RejectReason.INVALID_TIMESTAMP,
    RejectReason.WRONG_PARTITION, RejectReason.INTERNAL_ERROR})


class BulkHistogram:
    """A histogram without labels that takes a whole batch of observations in one call.

    ``prometheus_client.Histogram.observe`` takes a lock and walks the buckets
    for every value: about 5 us. The order latency is observed once per command
    when its batch is durable, 200,000 times for 200,000 orders, which cost the
    writer's coroutine about 7 % of the daemon's thread (py-spy). The daemon
    observes from its one event-loop thread only, so plain counters suffice here;
    the exposition is the same as a ``Histogram``'s (``_bucket``, ``_count``,
    ``_sum``).
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = (*sorted(buckets), float("inf"))
        self._labels: list[str] = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        counts, bounds = self._counts, self._bounds
        total = 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1
            total += value
        self._sum += total

    def collect(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        for label, count in zip(self._labels, self._counts, strict=True):
            cumulative += count
            buckets.append((label, float(cumulative)))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=self._sum)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # process_* (CPU, memory, open fds, start time) and python_info, as on the default registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.orders_received = Counter("exchange_orders_received_total", "Commands applied by the matching loops",
                                       ["instrument"], registry=r)
        self.orders_accepted = Counter("exchange_orders_accepted_total", "Orders accepted", ["instrument"],
                                       registry=r)
        self.orders_triggered = Counter("exchange_orders_triggered_total",
                                        "Stop and stop-limit orders triggered (each then trades as a new order)",
                                        ["instrument"], registry=r)
        self.orders_rejected = Counter("exchange_orders_rejected_total", "Commands rejected, by reason",
                                       ["instrument", "reason"], registry=r)
        self.trades = Counter("exchange_trades_total", "Trades (fills)", ["instrument"], registry=r)
        self.traded_lots = Counter("exchange_traded_lots_total", "Traded quantity in lots", ["instrument"],
                                   registry=r)
        self.events = Counter("exchange_events_total", "Events made durable", ["instrument"], registry=r)
        self.order_latency = BulkHistogram("exchange_order_latency_seconds",
                                           "From the input's timestamp to its batch being durable",
                                           buckets=(.001, .002, .005, .01, .015, .02, .025, .03, .04, .05, .1, .25,
                                                    .5, 1, 2.5, 5, 10),
                                           registry=r)
        self.catchup_latency = BulkHistogram("exchange_catchup_latency_seconds",
                                             "From the input's timestamp to its batch being durable, for input "
                                             "already in its partition's log when this process was assigned it "
                                             "(a restart's or a rebalance's catch-up; not in order_latency)",
                                             buckets=(.01, .1, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600,
                                                      24 * 3600), registry=r)
        self.queue_depth_gauge = Gauge("exchange_queue_depth", "Commands waiting in an instrument's queue",
                                       ["instrument"], registry=r)
        self.book_orders = Gauge("exchange_book_orders", "Resting orders", ["instrument"], registry=r)
        self.book_levels = Gauge("exchange_book_levels", "Price levels", ["instrument", "side"], registry=r)
        self.batch_events = Histogram("exchange_journal_batch_events", "Events per journal batch",
                                      buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000), registry=r)
        self.commit_seconds = Histogram("exchange_journal_commit_seconds",
                                        "Journal commit duration (from the previous commit's end if it started before)",
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
        self.dead_letters = Counter("exchange_dead_letters_total", "Messages sent to the dead-letter topic, by reason",
                                    ["reason"], registry=r)
        self.input_incidents = Gauge("exchange_input_incidents",
                                     "Orders partitions not consumed because their log lost data (see /readyz)",
                                     registry=r)
        self.records_dropped = Counter("exchange_records_dropped_total",
                                       "Records the broker refused for what they are (too large, ...) and that were "
                                       "dropped", ["topic"], registry=r)
        self.orders_matched = Counter("exchange_orders_matched_total",
                                      "Orders (and re-pricing amends) that traded on arrival, once per command",
                                      ["instrument"], registry=r)
        self.book_depth = Gauge("exchange_book_depth_lots", "Open quantity resting on a side of the book, in lots",
                                ["instrument", "side"], registry=r)
        self.halted = Gauge("exchange_instrument_halted", "1 while an operator has halted the instrument",
                            ["instrument"], registry=r)
        self.seq = Gauge("exchange_instrument_seq", "The instrument's last sequence number", ["instrument"],
                         registry=r)
        self.consumer_lag = Gauge("exchange_consumer_lag_messages",
                                  "Messages of an orders partition not yet read (high watermark - position)",
                                  ["topic", "partition"], registry=r)
        self.recovery_instruments = Gauge("exchange_recovery_instruments_done", "Instruments recovered so far",
                                          registry=r)
        self.recovery_events = Gauge("exchange_recovery_events_checked",
                                     "Stored events replayed to check the rebuilt books", registry=r)
        self.recovery_behind = Gauge("exchange_recovery_replay_behind_messages",
                                     "Input messages still to replay before the daemon is ready", registry=r)
        self.publish_failures = Counter("exchange_publish_failures_total",
                                        "Failed publications of durable events (retried or given up)", ["target"],
                                        registry=r)
        self.reconnects = Counter("exchange_reconnects_total",
                                  "Connections re-established after a failure", ["target"], registry=r)
        self.dependency_up = Gauge("exchange_dependency_up", "1 when the last health probe reached the dependency",
                                   ["dependency"], registry=r)
        # fan-out (exchange.pipeline.fanout)
        self.publish_queue = Gauge("exchange_publish_queue_batches", "Durable batches waiting for the publisher",
                                   registry=r)
        self.published_seq = Gauge("exchange_published_seq", "Published through this seq (Kafka and market data)",
                                   ["instrument"], registry=r)
        self.marketdata_up = Gauge("exchange_marketdata_up", "1 while the market-data sink (Redis) is reachable",
                                   registry=r)
        self.marketdata_messages = Counter("exchange_marketdata_commands_total",
                                           "Market-data messages and book-key writes sent", registry=r)
        self.republished = Counter("exchange_republished_events_total",
                                   "Events published again after the stored watermark (start-up, an instrument taken)",
                                   registry=r)
        # scale-out (exchange.pipeline.ownership, exchange.adapters.kafka.source)
        self.owned_instruments = Gauge("exchange_owned_instruments",
                                       "Instruments this process owns (holds the epoch of)", registry=r)
        self.fenced_commits = Counter("exchange_fenced_commits_total",
                                      "Journal commits the store refused because another process took instruments "
                                      "of the batch", registry=r)
        self.rebalances = Counter("exchange_rebalances_total",
                                  "Consumer-group rebalances this process went through (its first join included)",
                                  registry=r)
        self.rebalance_pause = Histogram("exchange_rebalance_pause_seconds",
                                         "From partitions revoked to the new assignment taken and planned",
                                         buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def start_at_zero(self, *, instruments: Iterable[str], publish_targets: Iterable[str],
                      connections: Iterable[str], produced_topics: Iterable[str]) -> None:
        """Every known label combination of the labelled counters, at zero, so that a series exists (and a
        dashboard shows 0, not "no data"; ``rate()`` has its first point) before the first increment: the
        configured ``instruments`` (with every reason their books reject with), every dead-letter reason, the
        ``publish_targets`` (``kafka``, ``redis``), the ``connections`` that count reconnects (``postgres``,
        ``kafka``, ``redis``) and the ``produced_topics`` (records dropped)."""
        for instrument in instruments:
            for counter in (self.orders_received, self.orders_accepted, self.orders_triggered, self.trades,
                            self.traded_lots, self.events, self.orders_matched):
                counter.labels(instrument)
            for reason in BOOK_REJECT_REASONS:
                self.orders_rejected.labels(instrument, reason.value)
        for edge_reason in RejectReason:
            self.dead_letters.labels(edge_reason.value)
        for target in publish_targets:
            self.publish_failures.labels(target)
        for target in connections:
            self.reconnects.labels(target)
        for topic in produced_topics:
            self.records_dropped.labels(topic)

    # --- small hooks used by the components

    def commands_applied(self, instrument: str, n: int, depth: int) -> None:
        if n:
            self.orders_received.labels(instrument).inc(n)
        self.queue_depth_gauge.labels(instrument).set(depth)

    def forget_instrument(self, instrument: str) -> None:
        """This process no longer owns ``instrument``: its gauges go (the owner's are the ones to read; counters
        stay, they count what this process did)."""
        for gauge, labels in ((self.book_orders, [(instrument,)]), (self.queue_depth_gauge, [(instrument,)]),
                              (self.halted, [(instrument,)]), (self.seq, [(instrument,)]),
                              (self.snapshot_age, [(instrument,)]), (self.published_seq, [(instrument,)]),
                              (self.book_levels, [(instrument, "bid"), (instrument, "ask")]),
                              (self.book_depth, [(instrument, "bid"), (instrument, "ask")])):
            for values in labels:
                with contextlib.suppress(KeyError):
                    gauge.remove(*values)

    def published(self, seqs: Mapping[str, int]) -> None:
        for instrument, seq in seqs.items():
            self.published_seq.labels(instrument).set(seq)

    def consumer_paused(self, paused: bool) -> None:
        self.consumer_paused_gauge.set(1 if paused else 0)

    def commit_failed(self) -> None:
        self.commit_failures.inc()

    def publish_failed(self, target: str) -> None:
        """A publisher could not deliver (``target``: ``kafka``, ``redis``)."""
        self.publish_failures.labels(target).inc()

    def reconnected(self, target: str) -> None:
        """A connection to ``target`` works again after failing (``postgres``, ``kafka``, ``redis``)."""
        self.reconnects.labels(target).inc()

    def batch_committed(self, n_events: int, seconds: float) -> None:
        self.batch_events.observe(n_events)
        self.commit_seconds.observe(seconds)

    def count_events(self, instrument: str, events: Iterable[Event]) -> None:
        accepted = trades = lots = matched = triggered = 0
        taker = None
        n = 0
        for event in events:
            n += 1
            kind = type(event)
            if kind is OrderAccepted:
                accepted += 1
            elif kind is OrderFilled:
                trades += 1
                lots += event.qty_lots  # type: ignore[union-attr]
                if event.taker_order_id != taker:  # type: ignore[union-attr]  # a command's fills share the taker
                    taker = event.taker_order_id  # type: ignore[union-attr]
                    matched += 1
            elif kind is OrderTriggered:
                triggered += 1
            elif kind is OrderRejected:
                self.orders_rejected.labels(instrument, event.reason.value).inc()  # type: ignore[union-attr]
        if n:
            self.events.labels(instrument).inc(n)
        if accepted:
            self.orders_accepted.labels(instrument).inc(accepted)
        if triggered:
            self.orders_triggered.labels(instrument).inc(triggered)
        if trades:
            self.trades.labels(instrument).inc(trades)
            self.traded_lots.labels(instrument).inc(lots)
            self.orders_matched.labels(instrument).inc(matched)


_DISCARDED: list[Metrics] = []


def discarded() -> Metrics:
    """One :class:`Metrics` that nobody reads, shared: what a component built without the daemon's own
    (a test, a tool, a benchmark) counts into, so that no component needs a ``metrics is None`` branch."""
    if not _DISCARDED:
        _DISCARDED.append(Metrics())
    return _DISCARDED[0]
