"""The daemon's own histogram type against prometheus-client's; the registry's process series and the labelled
counters a daemon starts at zero."""

from __future__ import annotations

import random
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exchange.core.types import RejectReason
from exchange.service.daemon import Daemon
from exchange.settings import load_settings
from exchange.telemetry.metrics import BOOK_REJECT_REASONS, BulkHistogram, Metrics

ROOT = Path(__file__).resolve().parents[2]

BUCKETS = (.001, .002, .005, .01, .025, .1, 1, 10)


def _samples(text: bytes, name: str) -> list[str]:
    return [line for line in text.decode().splitlines()
            if line.startswith(name) and not line.startswith(f"{name}_created")]


def test_bulk_histogram_exposes_what_a_prometheus_histogram_exposes_for_the_same_values() -> None:
    rng = random.Random(4)
    values = [rng.choice(BUCKETS) for _ in range(50)]  # exactly on a bound: counted in that bucket (le)
    values += [rng.expovariate(50) for _ in range(2000)] + [0.0, 25.0, 1e-9]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("x_seconds", "doc", BUCKETS, registry=ours)
    reference = Histogram("x_seconds", "doc", buckets=BUCKETS, registry=theirs)
    bulk.observe_many(values[:1000])
    for value in values[1000:]:
        bulk.observe(value)
    for value in values:
        reference.observe(value)
    mine, expected = _samples(generate_latest(ours), "x_seconds"), _samples(generate_latest(theirs), "x_seconds")
    assert len(mine) == len(BUCKETS) + 3  # the buckets, +Inf, _count, _sum
    assert mine[:-1] == expected[:-1]
    assert abs(float(mine[-1].split()[-1]) - float(expected[-1].split()[-1])) < 1e-9  # _sum, summed in another order


def _series(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_the_registry_has_the_process_and_platform_collectors() -> None:
    names = {name for name, _ in _series(Metrics().render())}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
            "process_start_time_seconds", "python_info"} <= names


def test_a_daemons_labelled_counters_start_at_zero_for_every_known_label_value() -> None:
    settings = load_settings(ROOT / "config" / "compose.toml", env={})  # Kafka in and out, PostgreSQL, Redis
    series = _series(Daemon(settings, env={}).metrics.render())

    def value(name: str, **labels: str) -> float:
        return series[(name, frozenset(labels.items()))]

    symbols = [spec.symbol for spec in settings.instruments]
    assert symbols
    for symbol in symbols:
        for name in ("orders_received", "orders_accepted", "orders_triggered", "orders_matched", "trades",
                     "traded_lots", "events"):
            assert value(f"exchange_{name}_total", instrument=symbol) == 0
        for reason in BOOK_REJECT_REASONS:
            assert value("exchange_orders_rejected_total", instrument=symbol, reason=reason.value) == 0
    for reason in RejectReason:
        assert value("exchange_dead_letters_total", reason=reason.value) == 0
    for target in ("kafka", "redis"):
        assert value("exchange_publish_failures_total", target=target) == 0
    for target in ("postgres", "kafka", "redis"):
        assert value("exchange_reconnects_total", target=target) == 0
    for topic in (settings.kafka.events_topic, settings.kafka.trades_topic, settings.kafka.dead_letter_topic):
        assert value("exchange_records_dropped_total", topic=topic) == 0
    # only what the configuration uses: the demo (SQLite, the generator, no Kafka out, no Redis) has no such series
    demo = _series(Daemon(load_settings(ROOT / "exchange/defaults/demo.toml", env={}), env={}).metrics.render())
    assert not [key for key in demo if key[0] in ("exchange_publish_failures_total", "exchange_reconnects_total",
                                                  "exchange_records_dropped_total")]
