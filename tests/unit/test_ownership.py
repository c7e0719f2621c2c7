"""The process's ownership view: epochs held, fenced commits, and the lease checked before anything goes out."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from exchange.pipeline.ownership import Ownership
from exchange.ports import Epochs, StoreUnavailable


class Store:
    """The store's side: the stored epochs (tests move them as another process would); counts the reads."""

    def __init__(self) -> None:
        self.stored = Epochs({"X": 1, "Y": 1}, {("orders", 0): 1})
        self.reads = 0
        self.down = False

    async def epochs(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]]) -> Epochs:
        self.reads += 1
        if self.down:
            raise StoreUnavailable("connection refused", retriable=True)
        return Epochs({i: self.stored.instruments.get(i, 0) for i in instruments},
                      {p: self.stored.partitions.get(p, 0) for p in partitions})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ownership(store: Store, clock: Clock) -> tuple[Ownership, list[Epochs]]:
    lost: list[Epochs] = []

    async def on_lost(epochs: Epochs) -> None:
        lost.append(epochs)

    ownership = Ownership(store.epochs, lease_s=5.0, clock=clock)
    ownership.on_lost = on_lost
    ownership.hold(Epochs({"X": 1, "Y": 1}, {("orders", 0): 1}))
    return ownership, lost


def test_the_lease_is_confirmed_at_most_once_per_period_and_a_moved_epoch_is_lost() -> None:
    async def scenario() -> None:
        store, clock = Store(), Clock()
        ownership, lost = _ownership(store, clock)
        assert await ownership.confirm()
        assert store.reads == 1
        clock.now += 4.9
        assert await ownership.confirm()
        assert store.reads == 1  # within the lease: no query
        # another process takes X and the partition while this one is not looking (frozen)
        store.stored = Epochs({"X": 2, "Y": 1}, {("orders", 0): 2})
        clock.now += 10
        assert await ownership.confirm()
        assert store.reads == 2
        assert lost == [Epochs({"X": 1}, {("orders", 0): 1})]
        assert ownership.instruments == {"Y": 1}
        assert ownership.partitions == {}

    asyncio.run(scenario())


def test_without_the_store_nothing_is_confirmed_until_it_answers() -> None:
    async def scenario() -> None:
        store, clock = Store(), Clock()
        ownership, lost = _ownership(store, clock)
        store.down = True
        assert not await ownership.confirm()
        assert ownership.unconfirmed is not None
        store.down = False
        assert await ownership.confirm()
        assert ownership.unconfirmed is None
        assert lost == []

    asyncio.run(scenario())


def test_a_fenced_commit_drops_only_what_is_still_held_under_the_stale_epoch() -> None:
    """Taken again since (a new epoch): a late refusal of a batch prepared under the old one changes nothing."""

    async def scenario() -> None:
        store, clock = Store(), Clock()
        ownership, lost = _ownership(store, clock)
        ownership.hold(Epochs({"Y": 3}))  # this process took Y again
        await ownership.fenced(Epochs({"X": 1, "Y": 1}), Epochs({"X": 2, "Y": 3}))
        assert lost == [Epochs({"X": 1})]
        assert ownership.instruments == {"Y": 3}
        await ownership.fenced(Epochs({"Y": 1}), Epochs({"Y": 3}))
        assert len(lost) == 1

    asyncio.run(scenario())
