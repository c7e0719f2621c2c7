"""Health, readiness, status and metrics pages, and the dependency probes behind them.

``/healthz`` says the process is alive (and names degraded outputs), ``/readyz`` whether it may take
traffic (recovered, caught up, every dependency reachable, no input incident), ``/status`` the state of
each instrument, ``/metrics`` the Prometheus page (gauges refreshed from the live books on each scrape).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec

from exchange.adapters.kafka import Incident, OrderSource
from exchange.service.http import Response
from exchange.telemetry.logging import get_logger
from exchange.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from exchange.service.daemon import Daemon

__all__ = ["Endpoints", "Probes"]

PROBE_INTERVAL_S = 2.0  # how often each dependency is checked for /readyz
PROBE_TIMEOUT_S = 3.0
STARTUP_GRACE_S = 30.0  # how long a dependency that has never answered counts as starting, not unreachable


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return "no answer in time" if isinstance(exc, TimeoutError) else text


def _totals(instruments: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Per asset, the sums over the instruments of /status that keep balances (each instrument holds its own
    clients' money: a USD balance on BTC-USD is not one on ETH-USD)."""
    totals: dict[str, dict[str, Decimal]] = {}
    for status in instruments.values():
        for asset, amounts in status.get("balances", {}).items():
            into = totals.setdefault(asset, {})
            for name, amount in amounts.items():
                into[name] = into.get(name, Decimal(0)) + Decimal(amount)
    return {asset: {name: str(amount) for name, amount in sorted(amounts.items())}
            for asset, amounts in sorted(totals.items())}


class Probes:
    """Which dependencies answer: ``unreachable`` maps each one that does not to why (for /readyz and
    ``exchange_dependency_up``); adapters register a cheap check under the dependency's name.

    A dependency that has not answered once yet is *starting*, not unreachable: right after start-up the
    Kafka probe waits for the consumer group's coordinator, which the first JoinGroup may still be finding.
    Its failures go to ``starting`` (named by /readyz, ``exchange_dependency_up`` 0) without a warning;
    its first answer is no reconnection. Only a dependency still silent :data:`STARTUP_GRACE_S` after the
    probes began is reported unreachable (and its later answer counted as a reconnection)."""

    def __init__(self, metrics: Metrics, *, grace_s: float | None = None) -> None:
        self.checks: dict[str, Callable[[], Awaitable[Any]]] = {}
        self.unreachable: dict[str, str] = {}
        self.starting: dict[str, str] = {}  # not answered yet, within the start-up grace: why the last probe failed
        self.answered: set[str] = set()
        self._grace_s = STARTUP_GRACE_S if grace_s is None else grace_s
        self._began: float | None = None
        self._metrics = metrics
        self._log = get_logger("exchange.daemon")

    async def run(self) -> None:
        """Check every dependency every few seconds, so /readyz names the ones that cannot be reached
        even while no traffic would notice (an idle daemon with its database gone is not ready)."""
        self._began = time.monotonic()
        while True:
            for name, probe in list(self.checks.items()):
                try:
                    async with asyncio.timeout(PROBE_TIMEOUT_S):
                        await probe()
                except Exception as exc:
                    self.failed(name, exc)
                    continue
                self.reachable(name)
            await asyncio.sleep(PROBE_INTERVAL_S)

    def failed(self, name: str, exc: BaseException) -> None:
        """A probe of ``name`` failed: starting (see the class docstring) or unreachable."""
        why = _describe(exc)
        self._metrics.dependency_up.labels(name).set(0)
        began = self._began if self._began is not None else time.monotonic()
        if name not in self.answered and time.monotonic() - began < self._grace_s:
            self.starting[name] = why
            return
        if self.starting.pop(name, None) is not None:
            why = f"{why} (no answer since start-up, {self._grace_s:g} s)"
        if name not in self.unreachable:
            self._log.warning("dependency unreachable", dependency=name, error=why)
        self.unreachable[name] = why

    def reachable(self, name: str) -> None:
        """``name`` answered (a probe, or a commit that just succeeded)."""
        self.answered.add(name)
        self.starting.pop(name, None)
        if self.unreachable.pop(name, None) is not None:
            self._log.info("dependency reachable again", dependency=name)
            if name != "postgres":  # the journal writer counts its own recoveries
                self._metrics.reconnected(name)
        self._metrics.dependency_up.labels(name).set(1)


class Endpoints:
    """The HTTP handlers, reading the running daemon's state (they never change it)."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    def routes(self) -> Mapping[str, Callable[[], Response]]:
        return {"/healthz": self.healthz, "/readyz": self.readyz, "/metrics": self.metrics_page,
                "/status": self.status}

    def healthz(self) -> Response:
        """Alive: 200. Degraded outputs (market data, Kafka publishing) are named, still with 200."""
        fan = self._d.fanout
        problems = []
        if fan is not None and fan.sink_error is not None and not fan.sink_up:
            problems.append(f"market data degraded: {fan.sink_error}")
        if fan is not None and fan.kafka_error is not None:
            problems.append(f"kafka publishing retrying: {fan.kafka_error}")
        body = ("degraded: " + "; ".join(problems) + "\n") if problems else "ok\n"
        return 200, "text/plain", body.encode()

    def readyz(self) -> Response:
        problems = []
        rebalancing = isinstance(self._d.source, OrderSource) and self._d.source.rebalancing_since is not None
        if not self._d.recovered:
            problems.append("recovering")
        elif rebalancing:
            problems.append("rebalancing: partitions taken away, the new assignment not in place yet")
        elif not self._d.ready:
            problems.append("replaying input")
        unreachable = dict(self._d.probes.unreachable)
        if self._d.writer is not None and self._d.writer.degraded:
            unreachable[self._d.settings.storage.kind] = self._d.writer.last_error or "commits are failing"
        problems += [f"{name}: {error}" for name, error in sorted(unreachable.items())]
        problems += [f"{name}: not answered yet (starting): {error}"
                     for name, error in sorted(self._d.probes.starting.items()) if name not in unreachable]
        problems += [incident.describe() for _, incident in sorted(self._incidents().items())]
        problems += [f"{topic}[{partition}]: another process took its instruments (a commit was fenced); not read "
                     "until the consumer group takes the partition away" for topic, partition in sorted(self._lost())]
        body = msgspec.json.encode({"ready": not problems, "problems": problems,
                                    "unreachable": sorted(unreachable), "owner": self._d.owner,
                                    "instruments": self._owned()}) + b"\n"
        return (503 if problems else 200), "application/json", body

    def _owned(self) -> dict[str, dict[str, Any]]:
        """The instruments this process owns: the epoch of each, and the orders partition it came with."""
        holdings = self._d.holdings
        owned = holdings.describe() if holdings is not None else {}
        if isinstance(self._d.source, OrderSource):
            partitions = self._d.source.owned()
            for symbol, entry in owned.items():
                entry["partition"] = partitions.get(symbol)
        return owned

    def _lost(self) -> Mapping[tuple[str, int], float]:
        return self._d.source.lost if isinstance(self._d.source, OrderSource) else {}

    def _incidents(self) -> Mapping[tuple[str, int], Incident]:
        """Orders partitions the source does not read because their log lost data."""
        return self._d.source.incidents if isinstance(self._d.source, OrderSource) else {}

    def metrics_page(self) -> Response:
        now = time.monotonic()
        m = self._d.metrics
        m.ready.set(1 if self._d.ready else 0)
        for symbol, lp in list(self._d.loops.items()):
            book = lp.engine.book
            m.book_orders.labels(symbol).set(len(book))
            m.book_levels.labels(symbol, "bid").set(len(book.bids))
            m.book_levels.labels(symbol, "ask").set(len(book.asks))
            m.book_depth.labels(symbol, "bid").set(sum(level.total_lots for level in book.bids.values()))
            m.book_depth.labels(symbol, "ask").set(sum(level.total_lots for level in book.asks.values()))
            m.queue_depth_gauge.labels(symbol).set(lp.queue.qsize())
            m.halted.labels(symbol).set(1 if lp.engine.halted else 0)
            m.seq.labels(symbol).set(lp.engine.seq)
            if symbol in self._d._last_snapshot:
                m.snapshot_age.labels(symbol).set(now - self._d._last_snapshot[symbol])
        if self._d.source is not None:
            for (topic, partition), lag in self._d.source.lag().items():
                m.consumer_lag.labels(topic, str(partition)).set(lag)
        return 200, "text/plain; version=0.0.4", self._d.metrics.render()

    def status(self) -> Response:
        out = {}
        lags = self._d.source.lag() if self._d.source is not None else {}
        owned = self._owned()
        for symbol, lp in sorted(self._d.loops.items()):
            book = lp.engine.book
            spec = lp.engine.spec
            bid, ask = book.best_bid(), book.best_ask()
            out[symbol] = {
                "epoch": lp.epoch,
                "partition": owned.get(symbol, {}).get("partition"),
                "seq": lp.engine.seq,
                "resting_orders": len(book),
                "best_bid": spec.ticks_to_price(bid) if bid is not None else None,
                "best_ask": spec.ticks_to_price(ask) if ask is not None else None,
                "halted": lp.engine.halted,
                "queue_depth": lp.queue.qsize(),
                # messages of this instrument's orders partition not yet read (shared with the partition's
                # other instruments); null until the instrument has committed something
                "consumer_lag": lags.get(self._d._partition_of[symbol]) if symbol in self._d._partition_of else None,
                "last_snapshot_age_s": (round(time.monotonic() - self._d._last_snapshot[symbol], 3)
                                        if symbol in self._d._last_snapshot else None),
            }
            ledger = lp.engine.ledger
            if ledger is not None:
                sums = [sum(column) for column in zip(*ledger.accounts.values(), strict=True)] or [0, 0, 0, 0]
                out[symbol]["accounts"] = len(ledger.accounts)
                out[symbol]["balances"] = {
                    ledger.base: {"available": spec.units_to_amount(ledger.base, sums[0]),
                                  "reserved": spec.units_to_amount(ledger.base, sums[1])},
                    ledger.quote: {"available": spec.units_to_amount(ledger.quote, sums[2]),
                                   "reserved": spec.units_to_amount(ledger.quote, sums[3]),
                                   "fees": spec.units_to_amount(ledger.quote, ledger.fees)}}
        incidents = [{"topic": i.topic, "partition": i.partition, "problem": i.problem, "since": i.since}
                     for _, i in sorted(self._incidents().items())]
        rebalancing = self._d.source.rebalancing_since if isinstance(self._d.source, OrderSource) else None
        body = msgspec.json.encode({"ready": self._d.ready and not incidents, "owner": self._d.owner,
                                    "rebalancing_s": round(time.monotonic() - rebalancing, 3)
                                    if rebalancing is not None else None,
                                    "instruments": out, "assets": _totals(out), "input_incidents": incidents,
                                    "lost_partitions": [{"topic": t, "partition": p, "since": since}
                                                        for (t, p), since in sorted(self._lost().items())],
                                    "publishing": self._d.fanout.status() if self._d.fanout else None}) + b"\n"
        return 200, "application/json", body
