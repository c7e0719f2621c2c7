"""Market data from events: a subscriber following the sync procedure ends with the engine's book.

A seeded random command stream (every command kind, self-trades, amends that
cross, GTD expiry) runs through real engines and is cut into batches; the
:class:`~exchange.projections.marketdata.MarketData` builder turns each batch into messages
and a :class:`~exchange.projections.booksync.BookSync` subscriber that joins at a random
batch (from the book image at that point) applies them. After every batch the
subscriber's book must equal the engine's levels, the checksum must agree, and
the trades must be exactly the engine's, once each, with no client identity on
any public channel.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange.core.events import OrderFilled
from exchange.core.matching import MatchingEngine
from exchange.projections.booksync import OK, RESYNC, BookSync
from exchange.projections.marketdata import MarketData, MarketDataError
from tests.integration._workload import SPECS, Workload


def engine_levels(engine: MatchingEngine, buy: bool, depth: int = 0) -> list[tuple[str, str]]:
    spec = engine.spec
    levels = engine.book.bids if buy else engine.book.asks
    out = [(spec.ticks_to_price(level.price), spec.lots_to_qty(level.total_lots)) for level in levels.values()]
    return out[:depth] if depth else out


def run(seed: int, commands: int, depth: int, join_at: int) -> None:
    work = Workload(seed=seed)
    builders = {s.symbol: MarketData(s, depth=depth) for s in SPECS}
    subscribers = {s.symbol: BookSync(s.symbol) for s in SPECS}
    trades_seen: dict[str, list[int]] = {s.symbol: [] for s in SPECS}
    left, n = commands, -1
    while left:
        n += 1
        size = min(left, work.rng.randrange(1, 31))
        left -= size
        applied = [work.apply(work.command()) for _ in range(size)]
        per: dict[str, list[Any]] = {}
        for item in applied:
            per.setdefault(item.instrument, []).extend(item.events)
        for symbol, events in per.items():
            messages = builders[symbol].apply(events)
            sub = subscribers[symbol]
            if n == join_at:  # joins mid-stream: subscribed, these messages are buffered, then the image
                for channel, raw in messages:
                    if channel == "trades":
                        trades_seen[symbol] += [t["trade_id"] for t in json.loads(raw)["trades"]]
                    assert sub.on_message(json.loads(raw)) == OK
                assert sub.on_book(json.loads(builders[symbol].book()))
                continue
            if n < join_at:
                continue
            for channel, raw in messages:
                msg = json.loads(raw)
                assert "client" not in raw.decode(), f"{channel} leaks a client identity"
                assert msg["type"] == channel
                if channel == "trades":
                    trades_seen[symbol] += [t["trade_id"] for t in msg["trades"]]
                assert sub.on_message(msg) == OK, sub.last_problem
        for symbol, engine in work.engines.items():
            sub = subscribers[symbol]
            if not sub.synced:
                continue
            assert sub.seq == engine.seq
            assert sub.levels(True) == engine_levels(engine, True, depth)
            assert sub.levels(False) == engine_levels(engine, False, depth)
            assert json.loads(builders[symbol].heartbeat(0))["seq"] == engine.seq
            # the book image is the same book
            image = json.loads(builders[symbol].book())
            assert [tuple(x) for x in image["bids"]] == engine_levels(engine, True, depth)
    for symbol, engine in work.engines.items():
        fills = [e.trade_id for e in work.events if isinstance(e, OrderFilled) and e.instrument == symbol]
        if subscribers[symbol].synced and join_at == 0:
            assert trades_seen[symbol] == fills
        assert builders[symbol].last_trade_id == engine.next_trade_id - 1
        assert subscribers[symbol].gaps == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), depth=st.sampled_from([0, 0, 1, 3, 6]), join_at=st.integers(0, 12))
def test_subscriber_ends_with_the_engines_book(seed: int, depth: int, join_at: int) -> None:
    run(seed, 400, depth, join_at)


def test_long_stream_full_depth() -> None:
    run(7, 4000, 0, 0)


def test_long_stream_top_five() -> None:
    run(8, 4000, 5, 3)


def _l2_stream(events: list[Any], spec: Any, cuts: list[int]) -> list[dict[str, Any]]:
    """The l2 messages of ``events`` cut into batches at the given indexes."""
    md = MarketData(spec)
    bounds = [0, *cuts, len(events)]
    return [json.loads(raw) for a, b in itertools.pairwise(bounds) if a < b
            for ch, raw in md.apply(events[a:b]) if ch == "l2"]


def test_gap_duplicate_and_overlap() -> None:
    """A lost message is a gap; a repeated one is dropped; one overlapping the local book applies."""
    work = Workload(seed=3)
    spec = SPECS[0]
    for _ in range(400):
        work.apply(work.command(spec.symbol))
    events = [e for e in work.events if e.instrument == spec.symbol]
    engine = work.engines[spec.symbol]
    msgs = _l2_stream(events, spec, list(range(7, len(events), 7)))
    empty = {"seq": 0, "bids": [], "asks": [], "depth": 0, "last_trade_id": 0}
    sub = BookSync(spec.symbol)
    assert sub.on_book(empty)
    assert sub.on_message(msgs[0]) == OK
    assert sub.on_message(msgs[0]) == OK
    assert sub.duplicates == 1
    assert sub.on_message(msgs[2]) == RESYNC
    assert sub.gaps == 1
    assert not sub.synced
    # an image older than the buffered stream is refused; the buffered message applies after a fresh one
    assert not sub.on_book(empty)
    at_1 = MarketData(spec)
    at_1.apply(events[: msgs[1]["seq"]])
    assert sub.on_book(json.loads(at_1.book()))
    assert sub.seq == msgs[2]["seq"]
    assert sub.gaps == 1
    # a re-publication with other batch bounds, starting below the local seq, continues the book exactly
    sub = BookSync(spec.symbol)
    assert sub.on_book(empty)
    first = msgs[:20]
    for m in first:
        assert sub.on_message(m) == OK
    again = _l2_stream(events, spec, list(range(5, len(events), 11)))
    for m in again:
        assert sub.on_message(m) == OK, sub.last_problem
    assert sub.seq == engine.seq
    assert sub.gaps == 0
    assert sub.duplicates > 0
    assert sub.levels(True) == engine_levels(engine, True)
    assert sub.levels(False) == engine_levels(engine, False)


def test_heartbeat_reveals_a_lost_last_message() -> None:
    sub = BookSync("X")
    assert sub.on_book({"seq": 5, "bids": [], "asks": [], "last_trade_id": 0})
    assert sub.on_message({"type": "heartbeat", "seq": 5, "last_trade_id": 0}) == OK
    assert sub.on_message({"type": "heartbeat", "seq": 6, "last_trade_id": 0}) == RESYNC


def test_events_must_continue_the_sequence() -> None:
    work = Workload(seed=1)
    spec = SPECS[0]
    events = [e for _ in range(20) for e in work.apply(work.command(spec.symbol)).events]
    md = MarketData(spec)
    with pytest.raises(MarketDataError):
        md.apply(events[1:])
