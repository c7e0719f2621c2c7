"""What the broker really holds, read with a consumer of its own (no group).

Two questions the order source asks when it takes a partition, and that the group's consumer cannot
answer without disturbing its own positions:

- :meth:`LogReader.log_end`: does the partition still hold a given offset, and where does its log
  really end? (Some brokers' ListOffsets answer the start of the last record batch, not the end: the
  test broker, Tansu, does. A fetch's high watermark is right.)
- :meth:`LogReader.dead_lettered_through`: the highest offset of an orders partition already on the
  dead-letter topic. Dead letters of one orders partition go to one dead-letter partition, in offset
  order, and only once they are on the broker does their offset count as done; so after a crash the
  ones sent since the last stored offset are exactly those that partition holds beyond it. It is
  read from its end backwards, in growing windows, until a dead letter of the orders partition shows
  up (or its start).

One lock: the assignment listener and the source's review of blocked partitions both use the reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

__all__ = ["LogReader"]

_FIRST_WINDOW = 256  # dead letters read back first; each further window is four times the one before


class LogReader:
    def __init__(self, bootstrap_servers: str, options: Mapping[str, Any]) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers,
                                          **{**options, "enable_auto_commit": False, "auto_offset_reset": "none",
                                             "fetch_max_wait_ms": 10})
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def log_end(self, tp: TopicPartition, offset: int) -> int:
        """The partition's real log end if it holds ``offset``, else -1."""
        async with self._lock:
            reader = self._consumer
            reader.assign([tp])
            reader.seek(tp, offset)
            for _ in range(3):
                try:
                    got = await reader.getmany(tp, timeout_ms=200)
                except OffsetOutOfRangeError:
                    return -1
                records = got.get(tp, [])
                if records:
                    high = reader.highwater(tp)
                    return max(records[-1].offset + 1, high or 0) if records[0].offset <= offset else -1
            return -1

    async def dead_lettered_through(self, dead_letters: TopicPartition, source: TopicPartition, start: int) -> int:
        """The highest offset of ``source`` on the dead-letter partition ``dead_letters`` (-1 if none at or after
        ``start``)."""
        async with self._lock:
            reader = self._consumer
            reader.assign([dead_letters])
            begin = (await reader.beginning_offsets([dead_letters]))[dead_letters]
            end = (await reader.end_offsets([dead_letters]))[dead_letters]
            if end <= begin:
                return -1  # an empty partition (a broker that reports the last batch's start says at least begin+1)
            window, hi = _FIRST_WINDOW, None
            while True:
                lo = max(begin, end - window)
                found = await self._highest(dead_letters, lo, hi, source)
                if found is not None:
                    return found if found >= start else -1
                if lo <= begin:
                    return -1
                hi, window = lo, window * 4

    async def _highest(self, dead_letters: TopicPartition, lo: int, hi: int | None,
                       source: TopicPartition) -> int | None:
        """The highest source offset of ``source`` among dead letters ``lo`` .. ``hi`` (the real end if None)."""
        reader = self._consumer
        reader.seek(dead_letters, lo)
        best: int | None = None
        topic, partition = source.topic.encode(), str(source.partition).encode()
        empty = 0
        while True:
            got = (await reader.getmany(dead_letters, timeout_ms=100)).get(dead_letters, [])
            for record in got:
                if hi is not None and record.offset >= hi:
                    return best
                headers = dict(record.headers or ())
                if headers.get("source_topic") == topic and headers.get("source_partition") == partition:
                    try:
                        best = max(best if best is not None else -1, int(headers.get("source_offset", b"-1")))
                    except ValueError:
                        continue
            position = await reader.position(dead_letters)
            target = hi if hi is not None else reader.highwater(dead_letters)
            if target is not None and position >= target:
                return best
            empty = 0 if got else empty + 1
            if empty >= 3:  # nothing more arrives: the end
                return best
