"""The dependency probes: a dependency that has not answered yet at start-up is starting, not unreachable."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from exchange.service.health import Probes
from exchange.telemetry.metrics import Metrics


def _reconnects(metrics: Metrics, target: str) -> float:
    return metrics.registry.get_sample_value("exchange_reconnects_total", {"target": target}) or 0.0


def _up(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value("exchange_dependency_up", {"dependency": name})


def test_a_first_probe_without_an_answer_is_starting_and_its_first_answer_no_reconnection() -> None:
    metrics = Metrics()
    probes = Probes(metrics, grace_s=60.0)
    with capture_logs() as logs:
        probes.failed("kafka", TimeoutError())  # the coordinator is still being found: nothing failed
        assert (probes.starting, probes.unreachable, _up(metrics, "kafka")) == ({"kafka": "no answer in time"}, {}, 0)
        probes.reachable("kafka")
    assert (probes.starting, probes.unreachable, probes.answered) == ({}, {}, {"kafka"})
    assert (_up(metrics, "kafka"), _reconnects(metrics, "kafka")) == (1, 0)
    assert logs == []  # no "dependency unreachable", no "reachable again"


def test_a_dependency_that_answered_once_and_then_fails_is_unreachable_and_its_return_counted() -> None:
    metrics = Metrics()
    probes = Probes(metrics, grace_s=60.0)
    probes.reachable("kafka")
    with capture_logs() as logs:
        probes.failed("kafka", TimeoutError())
        probes.failed("kafka", TimeoutError())  # logged once
        assert (probes.starting, probes.unreachable) == ({}, {"kafka": "no answer in time"})
        probes.reachable("kafka")
    assert [(e["event"], e["dependency"]) for e in logs] == [("dependency unreachable", "kafka"),
                                                            ("dependency reachable again", "kafka")]
    assert (_up(metrics, "kafka"), _reconnects(metrics, "kafka")) == (1, 1)


def test_a_dependency_silent_for_the_whole_grace_is_reported_unreachable() -> None:
    metrics = Metrics()
    probes = Probes(metrics, grace_s=0.0)
    with capture_logs() as logs:
        probes.failed("redis", ConnectionRefusedError("Connection refused"))
    assert probes.starting == {}
    assert probes.unreachable == {"redis": "Connection refused"}
    assert [e["event"] for e in logs] == ["dependency unreachable"]


@pytest.mark.parametrize("answers_after", [1, 2])
def test_the_probe_loop_reports_no_failure_while_a_dependency_is_still_starting(answers_after: int) -> None:
    metrics = Metrics()
    probes = Probes(metrics, grace_s=60.0)
    calls = 0
    answered = asyncio.Event()

    async def check() -> None:
        nonlocal calls
        calls += 1
        if calls <= answers_after:
            raise TimeoutError
        answered.set()

    async def main() -> None:
        probes.checks["kafka"] = check
        task = asyncio.create_task(probes.run())
        await asyncio.wait_for(answered.wait(), 5)
        await asyncio.sleep(0)  # the probe loop records the answer
        task.cancel()

    with capture_logs() as logs, pytest.MonkeyPatch.context() as mp:
        mp.setattr("exchange.service.health.PROBE_INTERVAL_S", 0.01)
        asyncio.run(main())
    assert (probes.unreachable, _reconnects(metrics, "kafka"), logs) == ({}, 0, [])
