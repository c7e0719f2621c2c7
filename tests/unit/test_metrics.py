"""The daemon's own histogram type against prometheus-client's."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from exchange.telemetry.metrics import BulkHistogram

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
