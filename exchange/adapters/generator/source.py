"""An in-process order source for the embedded default: a seeded order flow, paced.

:class:`GeneratorSource` plays the part of the Kafka consumer towards the
matching loops: each message goes through the edge's one guard, the same
:class:`~exchange.pipeline.router.Router` as Kafka input, onto its instrument's
bounded queue (waiting when the queue is full: back-pressure), with where it
came from as ``InputPosition("generator", 0, n)`` where ``n`` is the message's
index in the flow.

The flow is :class:`exchange.adapters.generator.flow.OrderFlow`: deterministic for a seed
and a list of instruments, with its own input timestamps (never the wall
clock). So the generator is a log that can be re-read: after a restart it
regenerates the flow from the start without applying it up to the lowest
stored offset + 1 ("fast-forward"), skips each instrument's messages up to that
instrument's stored offset, and from there applies exactly the messages a crash
lost -- the same commands, so the same events, ids and sequence numbers.
Changing the seed, the instruments or their order on an existing store
continues with a different flow (consistent, but no longer the same one).

Latency: commands carry the flow's timestamps, not the time they were sent, so
the source remembers when it handed each command to its loop and measures
"sent to published" itself when the batch holding it is durable and published
(:meth:`GeneratorSource.on_published`; :attr:`latencies`, and the
``exchange_order_latency_seconds`` histogram).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import Any

from exchange.adapters.generator.flow import OrderFlow
from exchange.core.commands import Command
from exchange.core.instruments import Instrument
from exchange.pipeline.loop import Control, Inbound, InstrumentLoop
from exchange.pipeline.router import Refusal, Router, SnapshotRequested
from exchange.ports import Batch, InputPosition
from exchange.telemetry.logging import get_logger
from exchange.telemetry.metrics import Metrics, discarded

__all__ = ["GENERATOR_TOPIC", "GeneratorSource", "generated_commands"]

GENERATOR_TOPIC = "generator"
_TICK_S = 0.01  # pacing granularity: a burst of rate/100 orders every 10 ms
_MAX_DEBT_S = 1.0  # fell behind by more than this (back-pressure)? forget the debt instead of bursting
_FAST_FORWARD_YIELD = 20_000  # messages regenerated between yields to the event loop


def generated_commands(instruments: Mapping[str, Instrument], seed: int, clients: int = 20) -> OrderFlow:
    """The flow a :class:`GeneratorSource` with these settings sends (for tests and offline replays)."""
    return OrderFlow(list(instruments.values()), seed, clients=clients)


class GeneratorSource:
    wall_clock_timestamps = False  # ts_ns comes from the flow; latency is measured here instead
    # latency is measured from when this source sent the command, so a restart's replay is timed as live input
    catchup_ends: Mapping[tuple[str, int], int] = MappingProxyType({})

    def __init__(self, *, loops: Mapping[str, InstrumentLoop], instruments: Mapping[str, Instrument],
                 applied_offsets: Mapping[tuple[str, str, int], int], seed: int = 1, rate: float = 1000.0,
                 clients: int = 20, metrics: Metrics | None = None, on_caught_up: Callable[[], None] | None = None,
                 latency_samples: int = 100_000) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive (orders per second)")
        self._loops = loops
        # The one router, as for Kafka input, with what the flow has not: no partitions (one log, no key to
        # check), no verifier (the flow is this process's own input and holds no operator actions; as
        # ``exchange replay`` trusts the operator's own file), and no bytes: the flow makes parsed messages
        # (Router.route_message), so the size and Kafka-timestamp checks of Router.route do not apply (its
        # timestamps are the messages' own ts_ns, whole milliseconds, strictly increasing).
        self._router = Router(instruments, verifier=None)
        self._flow = generated_commands(instruments, seed, clients)
        self.seed = seed
        self.rate = rate
        # per instrument: the last offset that is durable (-1: none)
        self._applied = {symbol: applied_offsets.get((symbol, GENERATOR_TOPIC, 0), -1) for symbol in loops}
        self._resume = min(self._applied.values(), default=-1) + 1  # the first message any instrument needs
        self._replay_until = max(self._applied.values(), default=-1)
        self._metrics = metrics if metrics is not None else discarded()
        self._on_caught_up = on_caught_up
        self._stopping = asyncio.Event()
        self._sent_ns: dict[int, int] = {}  # offset -> when it was handed to its loop (perf_counter_ns)
        self.latencies: deque[tuple[str, int]] = deque(maxlen=latency_samples)  # (instrument, sent->published ns)
        self._log = get_logger("exchange.source", topic=GENERATOR_TOPIC)
        self.next_offset = 0
        self.consumed = 0
        self.replayed = 0
        self.skipped = 0
        self.dead_lettered = 0
        self.caught_up = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Nothing to connect to."""

    def stop_consuming(self) -> None:
        """Stop generating; ``run`` returns after the current message."""
        self._stopping.set()

    async def stop(self) -> None:
        """Nothing to release (safe to call twice)."""

    def lag(self) -> dict[tuple[str, int], int]:
        """No backlog: the generator makes each order when it is due."""
        return {}

    # ---------------------------------------------------------------- running

    async def run(self) -> None:
        await self._fast_forward()
        self.caught_up = True
        if self._on_caught_up is not None:
            self._on_caught_up()
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0
        while not self._stopping.is_set():
            now = loop.time()
            due = int((now - started) * self.rate) - sent
            if due > self.rate * _MAX_DEBT_S:  # held back by back-pressure: carry on at the rate from here
                started = now - sent / self.rate
                due = int(self.rate * _TICK_S) or 1
            for _ in range(due):
                pending = self._send()
                if pending is not None:
                    await pending
                if self._stopping.is_set():
                    break
            sent += due
            await asyncio.sleep(_TICK_S)

    async def _fast_forward(self) -> None:
        """Regenerate (without applying) the messages every instrument already has."""
        flow = self._flow
        target = self._resume
        if not target:
            return
        started = time.monotonic()
        self._log.info("fast-forwarding the generator to the stored offsets", resume_offset=target)
        next_log = started + 1.0
        while self.next_offset < target:
            flow.next()
            self.next_offset += 1
            self.skipped += 1
            if self.next_offset % _FAST_FORWARD_YIELD == 0:
                await asyncio.sleep(0)
                now = time.monotonic()
                if now >= next_log:
                    next_log = now + 1.0
                    self._log.info("fast-forwarding", offset=self.next_offset, resume_offset=target,
                                   rate_per_s=round(self.next_offset / (now - started)))
        self._log.info("generator fast-forwarded", resume_offset=target,
                       elapsed_s=round(time.monotonic() - started, 3))

    def _send(self) -> Coroutine[Any, Any, None] | None:
        """Generate, route and queue one message; returns the work still to await, if any."""
        msg = self._flow.next()
        offset = self.next_offset
        self.next_offset += 1
        self.consumed += 1
        route = self._router.route_message(msg, msg["ts_ns"])
        if type(route) is Refusal:
            # The flow only makes valid messages; say so loudly if that ever changes. There is no dead-letter
            # topic and no producer to answer here (the Kafka source has both): the message is dropped.
            self.dead_lettered += 1
            self._log.error("generated message refused (dropped)", offset=offset, reason=route.reason.value,
                            text=route.text)
            return None
        if type(route) is SnapshotRequested:  # (the flow makes none; handled as the Kafka source does)
            loop = self._loops.get(route.instrument or "")
            if loop is None or offset <= self._applied[loop.symbol]:
                return None
            try:
                loop.queue.put_nowait(Control.SNAPSHOT)
                return None
            except asyncio.QueueFull:
                return loop.queue.put(Control.SNAPSHOT)
        command: Command = route  # type: ignore[assignment]
        symbol = command.instrument or ""
        loop = self._loops.get(symbol)
        if loop is None:
            self.dead_lettered += 1
            self._log.error("generated message for an instrument without a loop (dropped)", offset=offset,
                            instrument=symbol)
            return None
        if offset <= self._applied[symbol]:
            self.skipped += 1  # durable before the restart
            return None
        if offset <= self._replay_until:
            self.replayed += 1
        self._sent_ns[offset] = time.perf_counter_ns()
        item = Inbound(command, InputPosition(GENERATOR_TOPIC, 0, offset))
        try:
            loop.queue.put_nowait(item)
            return None
        except asyncio.QueueFull:
            return loop.queue.put(item)  # back-pressure: the generator waits, as a paused consumer would

    async def on_published(self, batch: Batch) -> None:
        """The batch is durable and published (see :class:`~exchange.ports.Source`): measure sent -> published
        for its commands."""
        now = time.perf_counter_ns()
        sent = self._sent_ns
        latencies = self.latencies
        histogram = self._metrics.order_latency
        for item in batch.applied:
            pos = item.position
            if pos is None or pos.topic != GENERATOR_TOPIC:
                continue
            started = sent.pop(pos.offset, None)
            if started is not None:
                latency = now - started
                latencies.append((item.instrument, latency))
                histogram.observe(latency / 1e9)
