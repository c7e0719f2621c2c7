"""W3C trace context carried from an order's record to the records of the events it caused.

A gateway that traces its requests puts a ``traceparent`` header (and possibly ``tracestate``) on the
order it produces. :class:`TraceContexts` holds the valid ones per input position (topic, partition,
offset): the order source keeps them when it dispatches the command, the publisher attaches them to
the events and trades records of that input and forgets them once those records are acknowledged.

A malformed ``traceparent`` (not ``version-traceid-parentid-flags`` in lowercase hex, 55 characters,
version ``ff`` or an all-zero id) is dropped, and ``tracestate`` with it; a ``tracestate`` that is not
printable ASCII of at most 512 characters is dropped alone. Nothing here raises on what a producer
sent: a header never breaks processing. The map is bounded (``limit`` positions, oldest forgotten
first), so commands that are dispatched but never published (a partition revoked before its loop
applied them) cannot make it grow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from exchange.ports import InputPosition

__all__ = ["TraceContexts", "trace_headers"]

Headers = tuple[tuple[str, bytes], ...]

_TRACEPARENT = re.compile(rb"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_TRACESTATE = re.compile(rb"[\x20-\x7e]{1,512}")


def trace_headers(headers: Iterable[Any] | None) -> Headers | None:
    """The valid ``traceparent`` (and ``tracestate``, if valid too) among a record's headers, or None."""
    return _parse(headers)[0]


def _parse(headers: Iterable[Any] | None) -> tuple[Headers | None, bool]:
    """(the headers to carry or None, whether there was a ``traceparent`` at all)."""
    parent = state = None
    try:
        for name, value in headers or ():
            if name == "traceparent" and parent is None:
                parent = bytes(value)
            elif name == "tracestate" and state is None:
                state = bytes(value)
    except (TypeError, ValueError):  # not (name, bytes) pairs: nothing to carry
        return None, parent is not None
    if parent is None:
        return None, False
    if len(parent) != 55 or _TRACEPARENT.fullmatch(parent) is None:
        return None, True
    if state is not None and _TRACESTATE.fullmatch(state) is not None:
        return (("traceparent", parent), ("tracestate", state)), True
    return (("traceparent", parent),), True


class TraceContexts:
    """Trace headers per input position, from dispatch until the events' records are acknowledged."""

    def __init__(self, limit: int = 100_000) -> None:
        self._by_position: dict[InputPosition, Headers] = {}
        self.limit = limit
        self.dropped = 0  # malformed traceparent headers seen

    def __len__(self) -> int:
        return len(self._by_position)

    def keep(self, position: InputPosition, headers: Iterable[Any] | None) -> None:
        """Remember the record's trace headers, if it has valid ones."""
        found, had_parent = _parse(headers)
        if found is None:
            self.dropped += had_parent
            return
        by_position = self._by_position
        if len(by_position) >= self.limit:
            del by_position[next(iter(by_position))]
        by_position[position] = found

    def get(self, position: InputPosition | None) -> Headers | None:
        return self._by_position.get(position) if position is not None else None

    def forget(self, positions: Iterable[InputPosition | None]) -> None:
        by_position = self._by_position
        for position in positions:
            if position is not None:
                by_position.pop(position, None)

