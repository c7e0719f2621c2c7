"""Stops, stop-limits and icebergs at the edges: the wire codec, ``exchange replay``, the library's exports and
the metrics.

Decoding: ``"type": "stop" | "stop_limit"`` with ``"stop_price"`` (on the tick grid), ``"display_qty"`` (on the
lot grid), an amend's ``"stop_price"``; an off-grid or malformed value is a sequenced rejection naming the field,
as for ``price`` and ``qty``. Encoding: the ``triggered`` and ``replenished`` events, and the new fields of
``accepted`` and ``amended`` only when set, so the events of other orders are byte for byte what they were.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import msgspec
import pytest

from exchange import (
    AmendOrder,
    Deposit,
    Event,
    Instrument,
    MatchingEngine,
    OrderAmended,
    OrderReplenished,
    OrderTriggered,
    OrderType,
    PlaceOrder,
    RejectInput,
    RejectReason,
    StopOrder,
)
from exchange.telemetry.metrics import Metrics
from exchange.wire.codec import WireEncoder, decode_command, encode_event

from ._helpers import BUY, GTC, GTD, IOC, LIMIT, SELL, SYM, make_spec

ROOT = Path(__file__).resolve().parents[2]
STOP, STOP_LIMIT = OrderType.STOP, OrderType.STOP_LIMIT
SPECS = {SYM: make_spec(lot_size="0.1")}  # tick 0.01, lot 0.1


def place(**fields: Any) -> dict[str, Any]:
    return {"op": "place", "instrument": SYM, "client_id": "alice", "client_order_id": "a-1", "side": "buy",
            "qty": "1.0", **fields}


def decode(msg: dict[str, Any]) -> Any:
    return decode_command(msg, SPECS, ts_ns=7)


# ------------------------------------------------------------------ commands in


def test_stop_stop_limit_and_iceberg_places_become_their_commands() -> None:
    assert decode(place(type="stop", stop_price="101.25")) == PlaceOrder(
        SYM, "alice", "a-1", BUY, STOP, 0, 10, GTC, 7, stop_price_ticks=10125)  # a stop waits: GTC by default
    assert decode(place(type="stop_limit", stop_price="101.25", price="101.50", tif="IOC", side="sell")) == \
        PlaceOrder(SYM, "alice", "a-1", SELL, STOP_LIMIT, 10150, 10, IOC, 7, stop_price_ticks=10125)
    assert decode(place(type="stop", stop_price="99", tif="GTD", expire_ns=99)) == PlaceOrder(
        SYM, "alice", "a-1", BUY, STOP, 0, 10, GTD, 7, expire_ns=99, stop_price_ticks=9900)
    assert decode(place(price="100.00", qty="5.0", display_qty="0.5")) == PlaceOrder(
        SYM, "alice", "a-1", BUY, LIMIT, 10000, 50, GTC, 7, display_qty_lots=5)


@pytest.mark.parametrize(("fields", "reason", "text"), [
    ({"type": "stop", "stop_price": "101.255"}, RejectReason.INVALID_PRICE,
     "stop_price 101.255 is not a multiple of 0.01"),
    ({"type": "stop", "stop_price": 101.25}, RejectReason.INVALID_PRICE,
     'stop_price must be a decimal string such as "101.25", not a JSON float (101.25)'),
    ({"type": "stop", "stop_price": "0"}, RejectReason.INVALID_PRICE, "stop_price must be greater than zero, got 0"),
    ({"type": "stop"}, RejectReason.INVALID_PRICE, "stop_price is missing or not a number: None"),
    ({"type": "stop_limit", "price": "101.00"}, RejectReason.INVALID_PRICE,
     "stop_price is missing or not a number: None"),
    ({"type": "stop", "stop_price": "101.00", "price": "101.00"}, RejectReason.INVALID_PRICE,
     "stop orders take no price (triggered, one trades as a market order): use stop_limit"),
    ({"price": "100.00", "display_qty": "0.05"}, RejectReason.INVALID_QUANTITY,
     "display_qty 0.05 is not a multiple of 0.1"),
    ({"price": "100.00", "display_qty": "x"}, RejectReason.INVALID_QUANTITY,
     'display_qty must be a plain decimal such as "101.25" (no sign, exponent or spaces), got \'x\''),
    ({"price": "100.00", "stop_price": "1.001"}, RejectReason.INVALID_PRICE,
     "stop_price 1.001 is not a multiple of 0.01"),
    ({"type": "stop", "stop_price": "101.00", "funds": "10.00"}, RejectReason.INVALID_ORDER,
     "funds (a budget in the quote asset) is for market and stop buys on an instrument that keeps balances"),
])
def test_an_off_grid_or_malformed_stop_price_or_display_qty_is_a_rejection_naming_the_field(
        fields: dict[str, Any], reason: RejectReason, text: str) -> None:
    assert decode(place(**fields)) == RejectInput(SYM, "alice", "a-1", reason, text, "place", 7)


def test_the_core_decides_on_combinations_the_grid_allows() -> None:
    engine = MatchingEngine(SPECS[SYM])
    for fields in ({"price": "100.00", "stop_price": "99.00"}, {"type": "stop", "stop_price": "99", "tif": "IOC"},
                   {"type": "stop_limit", "stop_price": "99", "price": "99", "display_qty": "0.5"}):
        [event] = engine.apply(decode(place(**fields)))
        assert event.reason is RejectReason.INVALID_ORDER  # type: ignore[union-attr]


def test_an_amend_may_name_a_stop_price() -> None:
    amend = {"op": "amend", "instrument": SYM, "client_id": "alice", "client_order_id": "a-1"}
    assert decode({**amend, "stop_price": "99.50"}) == AmendOrder(SYM, "alice", "a-1", None, None, None, 7, 9950)
    assert decode({**amend, "stop_price": "99.50", "qty": "2.0"}) == AmendOrder(SYM, "alice", "a-1", None, None, 20,
                                                                               7, 9950)
    assert decode({**amend, "stop_price": "99.505"}) == RejectInput(
        SYM, "alice", "a-1", RejectReason.INVALID_PRICE, "stop_price 99.505 is not a multiple of 0.01", "amend", 7)
    assert decode(amend).reason is RejectReason.INVALID_AMEND


def test_a_stop_buy_names_its_budget_on_an_instrument_with_balances() -> None:
    spec = make_spec(balances=True, base_asset="B", quote_asset="Q")
    cmd = decode_command(place(type="stop", stop_price="101.00", qty="2", funds="250.00"), {SYM: spec}, ts_ns=0)
    assert cmd == PlaceOrder(SYM, "alice", "a-1", BUY, STOP, 0, 2, GTC, stop_price_ticks=10100, funds=25000)


# ------------------------------------------------------------------ events out


def _events() -> list[Event]:
    """A stop that waits and is amended, one that triggers and rests, an iceberg refilled and amended."""
    engine = MatchingEngine(SPECS[SYM])
    out: list[Event] = []
    for msg in (place(client_order_id="s1", side="sell", price="100.00", qty="1.0"),
                place(client_order_id="st", client_id="carol", type="stop_limit", stop_price="100.00",
                      price="100.05", qty="2.0"),
                place(client_order_id="w", client_id="carol", side="sell", type="stop", stop_price="90.00"),
                {"op": "amend", "instrument": SYM, "client_id": "carol", "client_order_id": "w", "stop_price": "91.00"},
                place(client_order_id="ice", client_id="dave", side="sell", price="100.10", qty="1.0",
                      display_qty="0.3"),
                place(client_order_id="b1", client_id="bob", price="100.00", qty="0.5"),
                place(client_order_id="b2", client_id="bob", price="100.10", qty="0.4"),
                {"op": "amend", "instrument": SYM, "client_id": "dave", "client_order_id": "ice", "qty": "0.6"}):
        out += engine.apply(decode(msg))
    return out


def test_the_new_events_and_fields_encode_as_decimals_named_without_the_suffix() -> None:
    spec = SPECS[SYM]
    wire = [msgspec.json.decode(encode_event(e, spec)) for e in _events()]
    common = {"instrument": SYM, "ts_ns": 7}
    assert wire[1] == {**common, "type": "accepted", "seq": 2, "order_id": 2, "client_id": "carol",
                       "client_order_id": "st", "side": "buy", "order_type": "stop_limit", "price": "100.05",
                       "qty": "2.0", "tif": "GTC", "post_only": False, "stp": "none", "expire_ns": 0,
                       "stop_price": "100.00"}
    assert wire[3] == {**common, "type": "amended", "seq": 4, "order_id": 3, "client_id": "carol",
                       "client_order_id": "w", "side": "sell", "old_price": None, "price": None, "old_qty": "1.0",
                       "qty": "1.0", "remaining": "1.0", "requeued": True, "stop_price": "91.00"}
    assert wire[4]["display_qty"] == "0.3"
    triggered = next(w for w in wire if w["type"] == "triggered")
    assert triggered == {**common, "type": "triggered", "seq": 8, "order_id": 2, "client_id": "carol",
                         "client_order_id": "st", "side": "buy", "order_type": "stop_limit", "stop_price": "100.00",
                         "price": "100.05", "qty": "2.0", "trade_id": 1, "trigger_price": "100.00"}
    replenished = next(w for w in wire if w["type"] == "replenished")
    assert replenished == {**common, "type": "replenished", "seq": 12, "order_id": 4, "client_id": "dave",
                           "client_order_id": "ice", "side": "sell", "price": "100.10", "shown": "0.3",
                           "hidden": "0.4"}
    # 0.4 filled, 0.2 shown and 0.4 hidden: the amend to 0.6 leaves 0.2 open, all shown (hidden 0: left out)
    assert wire[-1] == {**common, "type": "amended", "seq": 14, "order_id": 4, "client_id": "dave",
                        "client_order_id": "ice", "side": "sell", "old_price": "100.10", "price": "100.10",
                        "old_qty": "1.0", "qty": "0.6", "remaining": "0.2", "requeued": False}
    assert [type(e).__name__ for e in _events()].count("OrderReplenished") == 1
    hidden = OrderAmended(SYM, 15, 7, 4, "dave", "ice", SELL, 10010, 10010, 10, 8, 4, False, hidden_lots=2)
    assert msgspec.json.decode(encode_event(hidden, spec))["hidden"] == "0.2"
    assert WireEncoder(spec).encode(hidden) == encode_event(hidden, spec)


def test_events_of_plain_orders_encode_as_before() -> None:
    spec = SPECS[SYM]
    engine = MatchingEngine(spec)
    events = engine.apply(decode(place(price="100.00"))) + engine.apply(
        decode({"op": "amend", "instrument": SYM, "client_id": "alice", "client_order_id": "a-1", "qty": "0.5"}))
    assert [encode_event(e, spec) for e in events] == [
        b'{"type":"accepted","instrument":"T","seq":1,"ts_ns":7,"order_id":1,"client_id":"alice",'
        b'"client_order_id":"a-1","side":"buy","order_type":"limit","price":"100.00","qty":"1.0","tif":"GTC",'
        b'"post_only":false,"stp":"none","expire_ns":0}',
        b'{"type":"amended","instrument":"T","seq":2,"ts_ns":7,"order_id":1,"client_id":"alice",'
        b'"client_order_id":"a-1","side":"buy","old_price":"100.00","price":"100.00","old_qty":"1.0","qty":"0.5",'
        b'"remaining":"0.5","requeued":false}']


def test_the_wire_encoder_gives_the_same_bytes_for_the_new_events_with_and_without_balances() -> None:
    spec = SPECS[SYM]
    events = _events()
    assert {OrderTriggered, OrderReplenished} <= {type(e) for e in events}
    encoder = WireEncoder(spec)
    assert [encoder.encode(e) for e in events] == [encode_event(e, spec) for e in events]
    money = make_spec(balances=True, base_asset="B", quote_asset="Q")
    engine = MatchingEngine(money)
    events = []
    for cmd in (Deposit(SYM, "alice", "Q", 10**9, "t1"), Deposit(SYM, "bob", "B", 100, "t2"),
                Deposit(SYM, "carol", "Q", 10**9, "t3")):
        events += engine.apply(cmd)
    for msg in (place(client_id="bob", client_order_id="s1", side="sell", price="100.00", qty="5"),
                place(client_id="carol", client_order_id="st", type="stop", stop_price="100.00", qty="2",
                      funds="300.00"),
                place(client_id="bob", client_order_id="ice", side="sell", price="100.00", qty="6", display_qty="2"),
                place(client_order_id="b1", price="100.00", qty="6")):
        events += engine.apply(decode_command(msg, {SYM: money}, ts_ns=3))
    assert {OrderTriggered, OrderReplenished} <= {type(e) for e in events}
    assert msgspec.json.decode(encode_event(events[4], money))["funds"] == "300.00"  # the stop buy's budget
    encoder = WireEncoder(money)
    assert [encoder.encode(e) for e in events] == [encode_event(e, money) for e in events]


# ------------------------------------------------------------------ replay, exports, metrics


def test_the_order_types_example_replays_with_triggers_a_cascade_and_a_refill() -> None:
    from exchange.cli.replay import replay
    from exchange.settings import load_instruments

    lines = (ROOT / "examples" / "order_types.jsonl").read_bytes().splitlines()
    out = io.BytesIO()
    replay(lines, out, load_instruments(ROOT / "exchange" / "defaults" / "exchange.toml"))
    answers = [msgspec.json.decode(line) for line in out.getvalue().splitlines()]
    assert len(answers) == len(lines)
    assert not [a for a in answers if "error" in a]
    events = [e for a in answers for e in a.get("events", ())]
    assert [e["reason"] for e in events if e["type"] == "rejected"] == ["stop_would_trigger"]
    # one buy reaches two stops; the first one's own trade reaches the stop-limit, which then rests
    assert [(e["client_order_id"], e["trigger_price"]) for e in events if e["type"] == "triggered"] == [
        ("c-1", "30010.00"), ("c-2", "30010.00"), ("c-3", "30020.00")]
    assert [(e["shown"], e["hidden"]) for e in events if e["type"] == "replenished"] == [("0.2000", "0.6000")]
    book = answers[-1]["snapshot"]["BTC-USD"]
    assert book["bids"] == [{"price": "30025.00", "qty": "0.9000", "orders": [
        {"order_id": 9, "client_id": "carol", "client_order_id": "c-3", "remaining": "0.9000"}]}]
    assert book["asks"] == [{"price": "30030.00", "qty": "0.1000", "orders": [
        {"order_id": 4, "client_id": "dave", "client_order_id": "d-ice", "remaining": "0.1000", "display": "0.2000",
         "hidden": "0.6000"}]}]
    assert book["stops"] == [{"order_id": 10, "client_id": "hana", "client_order_id": "h-2", "side": "sell",
                              "type": "stop", "stop_price": "29900.00", "price": None, "qty": "0.2000", "tif": "GTC"}]
    assert "stops" not in answers[-1]["snapshot"]["ETH-USD"]


def test_the_library_exports_the_new_events_and_the_stop_image() -> None:
    import exchange

    assert {"OrderTriggered", "OrderReplenished", "StopOrder"} <= set(exchange.__all__)
    engine = MatchingEngine(Instrument.from_decimals(SYM, tick_size="0.01", lot_size="1"))
    engine.apply(PlaceOrder(SYM, "a", "s", SELL, STOP, 0, 1, stop_price_ticks=90))
    assert engine.export_state().stops == [StopOrder(1, "a", "s", SELL, STOP, 90, 0, 1, 1)]


def test_triggered_stops_are_counted() -> None:
    metrics = Metrics()
    metrics.count_events(SYM, _events())
    assert metrics.orders_triggered.labels(SYM)._value.get() == 1
    assert metrics.orders_accepted.labels(SYM)._value.get() == 6
