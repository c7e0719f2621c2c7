"""Trace headers: which are carried, which dropped, and how a key's values split into runs around them."""

from __future__ import annotations

from typing import Any

import pytest

from exchange.adapters.kafka.publisher import _runs, _Traced
from exchange.adapters.kafka.tracing import TraceContexts, trace_headers
from exchange.ports import InputPosition

PARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("headers", [
    [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7")],       # no flags: 52 chars
    [("traceparent", PARENT + b"-")],                                                 # 56 chars
    [("traceparent", PARENT.upper())],                                                # hex in upper case
    [("traceparent", b"ff" + PARENT[2:])],                                            # version ff is invalid
    [("traceparent", b"00-" + b"0" * 32 + PARENT[35:])],                              # all-zero trace id
    [("traceparent", PARENT[:36] + b"0" * 16 + b"-01")],                              # all-zero parent id
    [("traceparent", PARENT.replace(b"-", b"_"))],
    [("traceparent", b"\xff" * 55)],
    [("traceparent", None)],                                                          # a null header value
    [("traceparent",)],                                                               # not a pair
    [("tracestate", b"a=b")],                                                         # a state alone
    [], None, 7,
])
def test_malformed_or_missing_traceparent_carries_nothing_and_never_raises(headers: Any) -> None:
    assert trace_headers(headers) is None
    traces = TraceContexts()
    traces.keep(InputPosition("orders", 0, 1), headers)
    assert len(traces) == 0


def test_a_valid_traceparent_is_carried_with_a_valid_tracestate_and_nothing_else() -> None:
    assert trace_headers([("x", b"1"), ("traceparent", PARENT)]) == (("traceparent", PARENT),)
    assert trace_headers([("traceparent", PARENT), ("tracestate", b"congo=t61rcWkgMzE")]) == (
        ("traceparent", PARENT), ("tracestate", b"congo=t61rcWkgMzE"))
    for state in (b"", b"a=\x00", b"a=" + b"b" * 600):  # a bad state is dropped alone
        assert trace_headers([("traceparent", PARENT), ("tracestate", state)]) == (("traceparent", PARENT),)


def test_the_map_is_bounded_and_forgets_what_was_published() -> None:
    traces = TraceContexts(limit=2)
    at = [InputPosition("orders", 0, n) for n in range(3)]
    for position in at:
        traces.keep(position, [("traceparent", PARENT)])
    traces.keep(InputPosition("orders", 0, 9), [("traceparent", b"bad")])
    assert traces.dropped == 1
    assert [traces.get(p) for p in at] == [None, (("traceparent", PARENT),), (("traceparent", PARENT),)]
    traces.forget([at[1], None])
    assert len(traces) == 1
    assert traces.get(None) is None


def test_a_keys_values_split_into_runs_in_order() -> None:
    a, b = (("traceparent", b"a"),), (("traceparent", b"b"),)
    values = [b"0", b"1", b"2", b"3", b"4", b"5"]
    assert list(_runs(values, None)) == [(values, ())]
    assert list(_runs(values, [_Traced(1, 3, a), _Traced(3, 4, b)])) == [
        ([b"0"], ()), ([b"1", b"2"], a), ([b"3"], b), ([b"4", b"5"], ())]
    assert list(_runs(values, [_Traced(0, 6, a)])) == [(values, a)]
