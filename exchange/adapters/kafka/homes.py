"""One partition per instrument: which orders partition each configured instrument lives on.

An instrument lives on the orders partition stored with its progress, or, before anything is
stored, the one murmur2 of its name gives (the producer contract: key = instrument, Kafka's default
partitioner). Its messages on another partition, or not keyed by it, are refused
``wrong_partition`` (by :class:`exchange.pipeline.router.Router`, which reads :attr:`Homes.router_view`):
its order can never depend on two partitions' fetch timing.

:class:`Homes` is the one owner of that knowledge: the stored homes (from start-up, then from every
batch that stores an instrument's first offset), the topic's partition count once the group assignment
shows it, and the mapping the router reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from exchange.adapters.kafka.options import partition_for

__all__ = ["Homes"]


class Homes:
    """The orders partition of each configured instrument (see the module docstring).

    ``applied`` is the store's progress, ``(instrument, topic, partition) -> last offset``.
    """

    def __init__(self, instruments: Iterable[str], applied: Mapping[tuple[str, str, int], int], topic: str) -> None:
        self._symbols = list(instruments)
        self._topic = topic
        self.stored = _homes(applied, topic)  # instrument -> the orders partition it lives on (stored)
        self._count = 0  # of the orders topic, once known: murmur2 places instruments not yet stored
        self._murmur: dict[tuple[str, int], int] = {}  # configured instruments only: the router asks for no other
        self.router_view: dict[str, int] = {}  # configured instrument -> partition_of(it), for the router
        self._refresh()

    @property
    def count(self) -> int:
        """The orders topic's partitions (0 until the group assignment showed them)."""
        return self._count

    def partition_of(self, instrument: str) -> int | None:
        """The orders partition ``instrument`` lives on: the one stored with its progress, else the one
        the producer contract gives (murmur2 of the instrument over the topic's partitions)."""
        home = self.stored.get(instrument)
        if home is not None:
            return home
        if not self._count:
            return None
        found = self._murmur.get((instrument, self._count))
        if found is None:  # murmur2 in Python costs microseconds: once per instrument
            found = self._murmur[(instrument, self._count)] = partition_for(instrument, self._count)
        return found

    def counted(self, partitions: int) -> None:
        """The orders topic has ``partitions`` partitions (0: not known; the count known before stays)."""
        self._count = partitions or self._count
        self._refresh()

    def learned(self, instrument: str, partition: int) -> None:
        """A batch stored the first offset of ``instrument``: from now on it lives on ``partition``."""
        if instrument not in self.stored:
            self.stored[instrument] = partition
            self._refresh()

    def refresh(self, stored: Mapping[tuple[str, int], int]) -> None:
        """The store's input offsets of the orders topic, ``(instrument, partition) -> last offset`` (another
        process may have stored instruments' first offsets since): their homes are learned."""
        for instrument, partition in _homes({(i, self._topic, p): o for (i, p), o in stored.items()},
                                            self._topic).items():
            self.learned(instrument, partition)

    def instruments_on(self, partitions: Iterable[int]) -> list[str]:
        """The configured instruments that live on these partitions (known once the topic's count is)."""
        wanted = set(partitions)
        return [symbol for symbol in self._symbols if self.partition_of(symbol) in wanted]

    def moved(self) -> list[tuple[str, int, int]]:
        """``(instrument, stored partition, murmur2 partition)`` of each instrument stored on another
        partition than the producer contract gives it now (were partitions added to the topic?)."""
        out = []
        for symbol, home in sorted(self.stored.items()):
            expected = partition_for(symbol, self._count) if self._count else home
            if expected != home:
                out.append((symbol, home, expected))
        return out

    def _refresh(self) -> None:
        """The router's mapping, after the topic's partitions became known or an instrument's was stored."""
        for symbol in self._symbols:
            partition = self.partition_of(symbol)
            if partition is None:
                self.router_view.pop(symbol, None)
            else:
                self.router_view[symbol] = partition


def _homes(applied: Mapping[tuple[str, str, int], int], topic: str) -> dict[str, int]:
    """instrument -> its stored orders partition. An instrument stored on several (fed from two partitions
    before that was refused) keeps the one it reached furthest on."""
    best: dict[str, tuple[int, int]] = {}
    for (instrument, t, partition), offset in applied.items():
        if t == topic and instrument and (instrument not in best or offset > best[instrument][1]):
            best[instrument] = (partition, offset)
    return {instrument: partition for instrument, (partition, _) in best.items()}
