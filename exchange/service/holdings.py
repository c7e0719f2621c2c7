"""The instruments this process owns: taking them, giving them up, and losing them.

Ownership follows the input. The Kafka source asks for the instruments of the orders partitions the
consumer group assigns to this process and gives them back when the group takes the partitions away;
the generator source takes every instrument at start-up. :class:`Holdings` is the one owner of what
that means here: a matching loop per owned instrument (``loops``, which the sources feed), the
engines given up but maybe coming back (parked), and what start-up loaded (``recovered``).

**Taking** (:meth:`Holdings.acquire`): the instruments' and partitions' epochs are bumped in the
store first (:meth:`~exchange.ports.Store.take`, which waits for a commit under the old epoch to
end), so nothing the previous owner writes from then on can land. Then, per instrument, the same
recovery as at start-up (:func:`recovery.rebuild.recover`: the open orders in priority order, the
counters, the dedupe window, checked against the latest snapshot and the events after it), a loop
under the new epoch, and the fan-out adopts it (re-publishing what the previous owner may not have
sent). The stored input offsets of the instruments go back to the source, which replays the partition
from there.

An instrument given up and taken back with nothing written meanwhile -- its new epoch is exactly the
one after this process's own -- keeps its engine and market-data view: Kafka's rebalances take every
partition away and give most of them back, and reloading every book (its dedupe window above all)
would be most of the pause.

**Giving up** (:meth:`Holdings.release`): the loops stop after what is queued (each takes a final
snapshot, so the next owner's check is short), the journal writer makes everything of theirs durable,
the fan-out publishes it and stores the watermark; the source then commits the offsets. The engines
are parked until the next assignment says whether they come back (:meth:`Holdings.keep_only`).

**Losing** (:meth:`Holdings.lose`): a commit was fenced, or the lease check found another epoch. The
loops are cancelled at once (the writer drops their outcomes as they come), the fan-out forgets them,
and ``on_lost_partitions`` makes the source stop reading their partitions until the group reassigns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from exchange.core.instruments import Instrument
from exchange.core.matching import MatchingEngine
from exchange.pipeline.fanout import FanOut
from exchange.pipeline.loop import Control, InstrumentLoop, JournalQueue
from exchange.pipeline.ownership import Ownership
from exchange.pipeline.writer import JournalWriter
from exchange.ports import Epochs, History, Recovered, Store, StoreUnavailable
from exchange.telemetry.logging import get_logger
from exchange.telemetry.metrics import Metrics

__all__ = ["Holdings"]

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> last applied offset
_RETRY_MAX_S = 5.0


class _Parked(NamedTuple):
    engine: MatchingEngine
    epoch: int
    recovered: Recovered


class Holdings:
    """The owned instruments' loops (see the module docstring). ``spawn`` runs a loop as a task of the daemon's
    task group; ``failed`` is set with the exception of a loop that raised (the daemon stops on it)."""

    def __init__(self, *, store: Store, specs: Mapping[str, Instrument], ownership: Ownership, journal: JournalQueue,
                 writer: JournalWriter, fanout: FanOut | None, metrics: Metrics, owner: str, queue_size: int,
                 release_timeout_s: float, spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
                 stopping: Callable[[], bool]) -> None:
        self.loops: dict[str, InstrumentLoop] = {}
        self.recovered: dict[str, Recovered] = {}  # what the last taking loaded, per instrument
        self.failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self.on_lost_partitions: Callable[[Iterable[tuple[str, int]], Iterable[str]], Awaitable[None]] | None = None
        self._store = store
        self._specs = specs
        self._ownership = ownership
        self._journal = journal
        self._writer = writer
        self._fanout = fanout
        self._metrics = metrics
        self._owner = owner
        self._queue_size = queue_size
        self._release_timeout_s = release_timeout_s
        self._spawn = spawn
        self._stopping = stopping
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._parked: dict[str, _Parked] = {}
        self._log = get_logger("exchange.ownership")

    # ---------------------------------------------------------------- taking

    async def acquire(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]]) -> dict[str, Offsets]:
        """Take ``instruments`` and ``partitions``: new epochs, each book recovered (or kept: see the module
        docstring), a loop each. Returns the stored input offsets of each instrument loaded from the store (an
        instrument kept has none: nothing was written since this process had it). A transient store error is
        retried until the store answers or the daemon stops; anything else raises (the daemon must stop)."""
        from recovery.rebuild import recover

        started = time.monotonic()
        epochs = await self._retrying("taking ownership", lambda: self._store.take(instruments, partitions,
                                                                                   self._owner))
        self._ownership.hold(epochs)
        kept: dict[str, tuple[MatchingEngine, Recovered]] = {}
        for symbol in instruments:
            parked = self._parked.pop(symbol, None)
            if parked is not None and parked.epoch + 1 == epochs.instruments[symbol]:
                kept[symbol] = (parked.engine, parked.recovered)
        specs = [self._specs[symbol] for symbol in instruments if symbol not in kept]

        async def load() -> dict[str, Recovered]:
            return await recover(self._store, specs, metrics=self._metrics) if specs else {}

        loaded = await self._retrying("recovering " + ", ".join(spec.symbol for spec in specs), load)
        history = self._store if isinstance(self._store, History) else None
        for symbol in instruments:
            if symbol in kept:
                engine, rec = kept[symbol]
                if self._fanout is not None and not self._fanout.unpark(symbol):
                    await self._fanout.adopt(symbol, engine.export_state(window=False), history)
            else:
                rec = loaded[symbol]
                engine = MatchingEngine.from_state(self._specs[symbol], rec.state)
                if self._fanout is not None:
                    self._fanout.drop([symbol])
                    await self._fanout.adopt(symbol, rec.state, history)
            self.recovered[symbol] = rec
            self._start_loop(InstrumentLoop(engine, self._journal, epoch=epochs.instruments[symbol],
                                            queue_size=self._queue_size, metrics=self._metrics))
        offsets = {symbol: dict(rec.offsets) for symbol, rec in loaded.items()}
        self._log.info("instruments taken", instruments={s: epochs.instruments[s] for s in instruments},
                       partitions=[f"{t}[{p}]" for t, p in sorted(partitions)], kept=sorted(kept),
                       loaded=sorted(loaded), elapsed_s=round(time.monotonic() - started, 3))
        return offsets

    def _start_loop(self, loop: InstrumentLoop) -> None:
        symbol = loop.symbol
        self.loops[symbol] = loop
        self._tasks[symbol] = self._spawn(self._run_loop(loop), f"loop-{symbol}")

    async def _run_loop(self, loop: InstrumentLoop) -> None:
        try:
            await loop.run()
        except Exception as exc:  # a bug in the core (the loop logged it): the daemon stops on ``failed``
            if not self.failed.done():
                self.failed.set_result(exc)

    async def _retrying(self, doing: str, attempt: Callable[[], Awaitable[Any]]) -> Any:
        delay = 0.1
        while True:
            try:
                return await attempt()
            except StoreUnavailable as exc:
                if not exc.retriable or self._stopping():
                    raise
                self._log.warning(f"{doing} failed; retrying", retry_in_s=round(delay, 2), error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    # ---------------------------------------------------------------- giving up

    async def release(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]]) -> None:
        """Give these up: stop their loops after what is queued, make all of it durable and published, park
        the engines. Bounded by ``release_timeout_s``: what is not durable by then stays with the writer (fenced
        when another process has taken the instrument; durable before that take otherwise) and the engine is
        not parked (a later taking reloads it)."""
        started = time.monotonic()
        loops = {s: self.loops.pop(s) for s in instruments if s in self.loops}
        tasks = [self._tasks.pop(s) for s in loops if s in self._tasks]
        clean = True
        try:
            async with asyncio.timeout(self._release_timeout_s):
                for loop in loops.values():
                    await loop.queue.put(Control.STOP)  # a final snapshot after the last command
                await asyncio.gather(*tasks)
                await self._writer.flush()
                if self._fanout is not None:
                    await self._fanout.flush()
        except TimeoutError:
            clean = False
            for task in tasks:
                task.cancel()
            self._log.error("giving instruments up did not finish in time: what was not durable is left to the next "
                            "owner's replay", instruments=sorted(loops), timeout_s=self._release_timeout_s)
        held = self._ownership.instruments
        parked = [s for s, loop in loops.items() if clean and held.get(s) == loop.epoch]  # (not lost meanwhile)
        for symbol in parked:
            loop = loops[symbol]
            self._parked[symbol] = _Parked(loop.engine, loop.epoch, self.recovered[symbol])
        if self._fanout is not None:
            self._fanout.park(parked)
            self._fanout.drop([s for s in loops if s not in parked])
        self._ownership.release(instruments, partitions)
        for symbol in loops:
            self._metrics.forget_instrument(symbol)
        self._log.info("instruments given up", instruments={s: lp.engine.seq for s, lp in sorted(loops.items())},
                       partitions=[f"{t}[{p}]" for t, p in sorted(partitions)], parked=sorted(parked),
                       elapsed_s=round(time.monotonic() - started, 3))

    def keep_only(self, instruments: Iterable[str]) -> None:
        """The assignment is complete: drop the parked engines it did not give back (another process has them)."""
        keep = set(instruments)
        gone = [symbol for symbol in self._parked if symbol not in keep]
        for symbol in gone:
            del self._parked[symbol]
            self.recovered.pop(symbol, None)
        if gone and self._fanout is not None:
            self._fanout.drop(gone)

    # ---------------------------------------------------------------- losing

    async def lose(self, lost: Epochs) -> None:
        """Another process took these (a fenced commit, or the lease check): stop at once, forget them."""
        # (``lost`` holds only what this process still held under those epochs: nothing it took again since)
        for symbol, epoch in lost.instruments.items():
            loop = self.loops.get(symbol)
            if loop is not None and loop.epoch == epoch:  # (else being given up already: release ends it)
                del self.loops[symbol]
                task = self._tasks.pop(symbol, None)
                if task is not None:
                    task.cancel()
            self._parked.pop(symbol, None)
            self.recovered.pop(symbol, None)
            self._metrics.forget_instrument(symbol)
        if self._fanout is not None:
            self._fanout.drop(lost.instruments)  # nothing more goes out for them, heartbeats included
        if self.on_lost_partitions is not None:
            await self.on_lost_partitions(lost.partitions, lost.instruments)

    # ---------------------------------------------------------------- shutdown

    async def stop_all(self) -> None:
        """Shutdown: every loop drains its queue and takes a final snapshot."""
        for loop in list(self.loops.values()):
            await loop.queue.put(Control.STOP)
        await asyncio.gather(*self._tasks.values())

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per owned instrument: its epoch (for /status and /readyz)."""
        return {symbol: {"epoch": loop.epoch} for symbol, loop in sorted(self.loops.items())}
