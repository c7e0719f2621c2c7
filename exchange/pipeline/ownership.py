"""What this process owns, under which epoch, and whether it may still act for it.

Several engine processes can share one store: Kafka's consumer group gives each orders partition, and
so each instrument on it, to one of them, and the process that takes an instrument or a partition bumps
its epoch in the store first (:meth:`exchange.ports.Store.take`). :class:`Ownership` is the one owner of
this process's view of that:

- ``instruments`` and ``partitions``: the epochs this process holds (:meth:`Ownership.hold`,
  :meth:`Ownership.release`);
- fencing: a commit refused because another process took some of them since (the journal writer calls
  :meth:`Ownership.fenced`) drops them here, and ``on_lost`` tells the process to stop applying them;
- the lease: what leaves the process without a commit of its own -- market data and events published
  after their commit, heartbeats, book keys, dead letters -- goes out only while this process has
  confirmed its epochs within ``lease_s`` (:meth:`Ownership.confirm`, one query of the store when the
  last confirmation is older). ``lease_s`` is below the consumer group's session timeout, and nobody can
  take an instrument before the group has given its partition away, which takes longer than that: so a
  process that was frozen (SIGSTOP, a paused VM) or cut off long enough to lose its partitions checks its
  epochs before it sends anything, learns it was fenced, and sends nothing for what it lost. A commit
  needs no lease: the store fences it in its own transaction.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from exchange.ports import Epochs
from exchange.telemetry.logging import get_logger
from exchange.telemetry.metrics import Metrics, discarded

__all__ = ["Ownership"]

ReadEpochs = Callable[[Sequence[str], Sequence[tuple[str, int]]], Awaitable[Epochs]]
LostListener = Callable[[Epochs], Awaitable[None]]


class Ownership:
    """This process's instruments and orders partitions with their epochs (see the module docstring).

    ``read`` is the store's :meth:`~exchange.ports.Store.epochs`; ``on_lost`` is called with the epochs this
    process held of what another process took (the daemon stops applying them).
    """

    def __init__(self, read: ReadEpochs, *, lease_s: float, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.instruments: dict[str, int] = {}
        self.partitions: dict[tuple[str, int], int] = {}
        self.on_lost: LostListener | None = None
        self._read = read
        self._lease_s = lease_s
        self._metrics = metrics if metrics is not None else discarded()
        self._clock = clock
        self._confirmed_at = -math.inf
        self._checking = asyncio.Lock()
        self._log = get_logger("exchange.ownership")
        self.unconfirmed: str | None = None  # why the last confirmation failed (the store did not answer)

    def hold(self, epochs: Epochs) -> None:
        """This process took these (their new epochs)."""
        self.instruments.update(epochs.instruments)
        self.partitions.update(epochs.partitions)
        self._metrics.owned_instruments.set(len(self.instruments))

    def release(self, instruments: Iterable[str], partitions: Iterable[tuple[str, int]]) -> None:
        """This process gave these up (or lost them)."""
        for symbol in instruments:
            self.instruments.pop(symbol, None)
        for key in partitions:
            self.partitions.pop(key, None)
        self._metrics.owned_instruments.set(len(self.instruments))

    def owns(self, instrument: str) -> bool:
        return instrument in self.instruments

    async def confirm(self) -> bool:
        """True while this process may act for what it holds: it confirmed every epoch within ``lease_s``, now
        or before. What it lost meanwhile is dropped first (``on_lost``). False when the store did not answer:
        send nothing that needs the lease, try again later."""
        if self._clock() - self._confirmed_at < self._lease_s:
            return True
        async with self._checking:
            if self._clock() - self._confirmed_at < self._lease_s:
                return True  # confirmed by the call this one waited for
            started = self._clock()
            held_i, held_p = dict(self.instruments), dict(self.partitions)
            if held_i or held_p:
                try:
                    current = await self._read(sorted(held_i), sorted(held_p))
                except Exception as exc:
                    if self.unconfirmed is None:
                        self._log.warning("cannot confirm this process's ownership epochs; publishing waits for "
                                          "the store", error=f"{type(exc).__name__}: {exc}")
                    self.unconfirmed = f"{type(exc).__name__}: {exc}"
                    return False
                moved = Epochs({s: e for s, e in held_i.items() if current.instruments.get(s) != e},
                               {k: e for k, e in held_p.items() if current.partitions.get(k) != e})
                if moved.instruments or moved.partitions:
                    await self._lose(moved, current, "its epochs moved while this process did not look")
            if self.unconfirmed is not None:
                self._log.info("ownership epochs confirmed again")
                self.unconfirmed = None
            self._confirmed_at = started
            return True

    async def fenced(self, stale: Epochs, current: Epochs) -> None:
        """The store refused a commit prepared under ``stale``: another process holds ``current`` now."""
        self._metrics.fenced_commits.inc()
        await self._lose(stale, current, "a commit was fenced")

    async def _lose(self, stale: Epochs, current: Epochs, why: str) -> None:
        """Drop what this process still holds under ``stale`` (not what it took again since) and tell the daemon."""
        lost = Epochs({s: e for s, e in stale.instruments.items() if self.instruments.get(s) == e},
                      {k: e for k, e in stale.partitions.items() if self.partitions.get(k) == e})
        if not lost.instruments and not lost.partitions:
            return
        self.release(lost.instruments, lost.partitions)
        self._log.error("ownership lost: another process took these; this one stops applying and publishing them",
                        why=why, instruments={s: {"held": e, "now": current.instruments.get(s)}
                                              for s, e in sorted(lost.instruments.items())},
                        partitions=[{"topic": t, "partition": p, "held": e, "now": current.partitions.get((t, p))}
                                    for (t, p), e in sorted(lost.partitions.items())])
        if self.on_lost is not None:
            await self.on_lost(lost)
