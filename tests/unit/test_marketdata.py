"""Market data of stops and icebergs: exact messages, and what the public never sees.

A waiting stop is invisible (its accept, amends, cancel and expiry publish nothing); triggered, it arrives
like a new order. An iceberg shows only its slice: in the levels, in every l3 quantity and in the book key;
a refill is an l3 ``replenished`` entry. The hidden quantity is in no message. The last test drives a
seeded stream of every order type through an engine and checks, after each command, that the levels equal
the engine's and that an l3 follower ends with exactly the engine's shown quantity per order.
"""

from __future__ import annotations

import json
import random
from typing import Any

from exchange import (
    ClearBook,
    Command,
    Event,
    MatchingEngine,
    OrderType,
    PlaceOrder,
    Side,
    TimeInForce,
)
from exchange.core.commands import AmendOrder, CancelOrder
from exchange.projections.marketdata import MarketData, book_checksum

from ._helpers import ALICE, BOB, BUY, CAROL, GTC, GTD, IOC, LIMIT, SELL, SYM, amend, buy, cancel, make_spec, sell

STOP, STOP_LIMIT = OrderType.STOP, OrderType.STOP_LIMIT


def stop(coid: str, side: Side, stop_price: int, qty: int, price: int = 0, *, client: str = CAROL,
         tif: TimeInForce = GTC, expire_ns: int = 0) -> PlaceOrder:
    """A stop (``price`` 0) or stop-limit order."""
    return PlaceOrder(SYM, client, coid, side, STOP_LIMIT if price else STOP, price, qty, tif, expire_ns=expire_ns,
                      stop_price_ticks=stop_price)


def iceberg(coid: str, side: Side, price: int, qty: int, display: int, *, client: str = ALICE,
            tif: TimeInForce = GTC) -> PlaceOrder:
    return PlaceOrder(SYM, client, coid, side, LIMIT, price, qty, tif, display_qty_lots=display)


class Feed:
    """An engine and the market-data view of its events: each call applies commands as one batch."""

    def __init__(self) -> None:
        self.engine = MatchingEngine(make_spec())
        self.view = MarketData(self.engine.spec)

    def __call__(self, *commands: Command) -> dict[str, Any]:
        events: list[Event] = []
        for command in commands:
            events += self.engine.apply(command)
        return {channel: json.loads(message) for channel, message in self.view.apply(events)}


def l2(prev: int, seq: int, bids: list[list[str]], asks: list[list[str]], book: tuple[list[Any], list[Any]],
       ts: int = 0) -> dict[str, Any]:
    """An l2 message; ``book`` is the whole book after it (bids, asks), for the checksum."""
    return {"type": "l2", "instrument": SYM, "prev_seq": prev, "seq": seq, "ts_ns": ts, "bids": bids, "asks": asks,
            "checksum": book_checksum(*book)}


def l3(prev: int, seq: int, *events: dict[str, Any], ts: int = 0) -> dict[str, Any]:
    return {"type": "l3", "instrument": SYM, "prev_seq": prev, "seq": seq, "ts_ns": ts, "events": list(events)}


def accepted(seq: int, oid: int, side: str, price: str | None, qty: str, tif: str = "GTC",
             order_type: str = "limit") -> dict[str, Any]:
    return {"type": "accepted", "seq": seq, "order_id": oid, "side": side, "order_type": order_type,
            "price": price, "qty": qty, "tif": tif}


def filled(seq: int, trade_id: int, price: str, qty: str, aggressor: str, maker: tuple[int, str],
           taker: tuple[int, str]) -> dict[str, Any]:
    return {"type": "filled", "seq": seq, "trade_id": trade_id, "price": price, "qty": qty,
            "aggressor_side": aggressor, "maker_order_id": maker[0], "maker_remaining": maker[1],
            "taker_order_id": taker[0], "taker_remaining": taker[1]}


def test_a_waiting_stop_publishes_nothing_accepted_amended_canceled_or_expired() -> None:
    feed = Feed()
    feed(sell("s1", 100, 5, client=BOB))
    book: tuple[list[Any], list[Any]] = ([], [("1.00", "5")])
    assert feed(stop("st", BUY, 101, 2)) == {"l2": l2(1, 2, [], [], book), "l3": l3(1, 2)}
    assert feed(AmendOrder(SYM, CAROL, "st", stop_price_ticks=102, qty_lots=3)) == {
        "l2": l2(2, 3, [], [], book), "l3": l3(2, 3)}
    assert feed(cancel("st", client=CAROL)) == {"l2": l2(3, 4, [], [], book), "l3": l3(3, 4)}
    feed(stop("gtd", SELL, 90, 1, price=90, tif=GTD, expire_ns=50))
    assert feed(buy("b1", 80, 1, ts=60)) == {  # the stop expires first: unseen
        "l2": l2(5, 7, [["0.80", "1"]], [], ([("0.80", "1")], book[1]), ts=60),
        "l3": l3(5, 7, accepted(7, 4, "buy", "0.80", "1"), ts=60),
        "bbo": {"type": "bbo", "instrument": SYM, "seq": 7, "ts_ns": 60, "bid": ["0.80", "1"], "ask": ["1.00", "5"]}}
    feed.engine.apply(stop("st2", BUY, 100, 1))  # the view does not follow this one ...
    image = MarketData(feed.engine.spec, feed.engine.export_state())  # ... a view from the engine's image has it
    assert (json.loads(image.book())["bids"], json.loads(image.book())["asks"]) == ([["0.80", "1"]], [["1.00", "5"]])
    out = dict(image.apply(feed.engine.apply(buy("b2", 100, 1, client=BOB))))
    assert [e["type"] for e in json.loads(out["l3"])["events"]] == ["accepted", "filled", "triggered", "filled"]


def test_a_triggered_stop_limit_that_rests_appears_as_a_new_order() -> None:
    feed = Feed()
    feed(sell("s1", 100, 5, client=BOB), stop("st", BUY, 100, 4, price=101))
    out = feed(buy("b1", 100, 2))  # trades at 1.00: the stop-limit triggers, takes 3 and rests 1 at 1.01
    book: tuple[list[Any], list[Any]] = ([("1.01", "1")], [])
    assert out == {
        "l2": l2(2, 6, [["1.01", "1"], ["1.00", "0"]], [["1.00", "0"]], book),
        "l3": l3(2, 6, accepted(3, 3, "buy", "1.00", "2"),
                 filled(4, 1, "1.00", "2", "buy", (1, "3"), (3, "0")),
                 {"type": "triggered", "seq": 5, "order_id": 2, "side": "buy", "order_type": "stop_limit",
                  "price": "1.01", "qty": "4", "tif": "GTC"},
                 filled(6, 2, "1.00", "3", "buy", (1, "0"), (2, "1"))),
        "trades": {"type": "trades", "instrument": SYM, "seq": 6, "trades": [
            {"trade_id": 1, "seq": 4, "ts_ns": 0, "price": "1.00", "qty": "2", "side": "buy"},
            {"trade_id": 2, "seq": 6, "ts_ns": 0, "price": "1.00", "qty": "3", "side": "buy"}]},
        "bbo": {"type": "bbo", "instrument": SYM, "seq": 6, "ts_ns": 0, "bid": ["1.01", "1"], "ask": None}}
    # then it is an ordinary resting order: it trades, and the book key shows it
    assert feed(sell("s2", 101, 1, client=BOB))["l3"]["events"][1] == filled(8, 3, "1.01", "1", "sell", (2, "0"),
                                                                           (4, "0"))
    assert json.loads(feed.view.book())["bids"] == []


def test_a_triggered_stop_is_an_ioc_market_order() -> None:
    feed = Feed()
    feed(sell("s1", 105, 5, client=BOB), stop("m1", BUY, 105, 1), stop("m2", BUY, 106, 1))
    out = feed(PlaceOrder(SYM, BOB, "mk", BUY, OrderType.MARKET, 0, 1, IOC))
    assert out["l3"]["events"][2:] == [
        {"type": "triggered", "seq": 6, "order_id": 2, "side": "buy", "order_type": "stop", "price": None, "qty": "1",
         "tif": "IOC"},
        filled(7, 2, "1.05", "1", "buy", (1, "3"), (2, "0"))]
    assert out["l2"]["asks"] == [["1.05", "3"]]


def test_an_iceberg_shows_its_slice_and_a_refill_goes_to_the_back_of_the_level() -> None:
    feed = Feed()
    out = feed(iceberg("i1", SELL, 102, 10, 3), sell("s2", 102, 2, client=BOB))
    assert out["l2"] == l2(0, 2, [], [["1.02", "5"]], ([], [("1.02", "5")]))  # 3 shown + 2, not 10 + 2
    assert out["l3"] == l3(0, 2, accepted(1, 1, "sell", "1.02", "3"), accepted(2, 2, "sell", "1.02", "2"))
    out = feed(buy("b1", 102, 5, client=CAROL))  # the slice, then s2 (before the new slice), 3 left showing
    assert out["l2"] == l2(2, 6, [["1.02", "0"]], [["1.02", "3"]], ([], [("1.02", "3")]))
    assert out["l3"] == l3(2, 6, accepted(3, 3, "buy", "1.02", "5"),
                           filled(4, 1, "1.02", "3", "buy", (1, "0"), (3, "2")),
                           {"type": "replenished", "seq": 5, "order_id": 1, "side": "sell", "price": "1.02",
                            "shown": "3"},
                           filled(6, 2, "1.02", "2", "buy", (2, "0"), (3, "0")))
    assert json.loads(feed.view.book())["asks"] == [["1.02", "3"]]
    image = json.loads(MarketData(feed.engine.spec, feed.engine.export_state()).book())
    assert image == json.loads(feed.view.book())  # the book from a snapshot shows the slice too
    assert b"hidden" not in feed.view.book()


def test_canceling_an_iceberg_removes_its_slice() -> None:
    feed = Feed()
    feed(iceberg("i1", SELL, 102, 10, 3), sell("s2", 102, 2, client=BOB), buy("b1", 102, 1, client=BOB))
    out = feed(cancel("i1"))  # 9 open (2 shown, 7 hidden): the public saw 2 go
    assert out["l2"] == l2(4, 5, [], [["1.02", "2"]], ([], [("1.02", "2")]))
    assert out["l3"] == l3(4, 5, {"type": "canceled", "seq": 5, "order_id": 1, "side": "sell", "price": "1.02",
                                  "qty": "2", "reason": "requested"})


def test_amending_an_iceberg_publishes_what_shows() -> None:
    feed = Feed()
    feed(iceberg("i1", SELL, 102, 10, 3), buy("b1", 102, 4, client=BOB))  # filled 4: 2 shown, 4 hidden
    assert feed.view.levels(False) == [("1.02", "2")]
    assert feed(amend("i1", qty=8)) == {  # 2 fewer hidden: nothing public changes
        "l2": l2(5, 6, [], [], ([], [("1.02", "2")])), "l3": l3(5, 6)}
    out = feed(amend("i1", qty=5))  # 1 open: from the slice
    assert out["l3"] == l3(6, 7, {"type": "amended", "seq": 7, "order_id": 1, "side": "sell", "old_price": "1.02",
                                  "price": "1.02", "qty": "5", "remaining": "1", "requeued": False})
    assert out["l2"]["asks"] == [["1.02", "1"]]
    out = feed(amend("i1", price=103, qty=9))  # re-queued: 5 open, a slice of 3 shows (qty: 4 filled + 3)
    assert out["l3"]["events"] == [{"type": "amended", "seq": 8, "order_id": 1, "side": "sell",
                                    "old_price": "1.02", "price": "1.03", "qty": "7", "remaining": "3",
                                    "requeued": True}]
    assert out["l2"]["asks"] == [["1.02", "0"], ["1.03", "3"]]


def test_an_iceberg_that_trades_on_arrival_shows_only_its_slice() -> None:
    feed = Feed()
    feed(sell("s1", 100, 2, client=BOB), sell("s2", 101, 2, client=BOB))
    out = feed(iceberg("i1", BUY, 100, 10, 3))  # takes 2 with its whole quantity, rests 8: 3 shown
    assert out["l3"]["events"] == [accepted(3, 3, "buy", "1.00", "3"),
                                   filled(4, 1, "1.00", "2", "buy", (1, "0"), (3, "3"))]
    assert out["l2"]["bids"] == [["1.00", "3"]]
    out = feed(iceberg("i2", BUY, 101, 8, 3, tif=IOC))  # never rests: its quantities are slices too
    assert out["l3"]["events"] == [accepted(5, 4, "buy", "1.01", "3", "IOC"),
                                   filled(6, 2, "1.01", "2", "buy", (2, "0"), (4, "3")),
                                   {"type": "canceled", "seq": 7, "order_id": 4, "side": "buy", "price": "1.01",
                                    "qty": "3", "reason": "ioc_remainder"}]


def test_clear_cancels_waiting_stops_unseen() -> None:
    feed = Feed()
    feed(iceberg("i1", BUY, 99, 6, 2), stop("st", SELL, 90, 2, price=90))
    out = feed(ClearBook(SYM, 5, "ops", "eod"))
    assert out["l3"] == l3(2, 5, {"type": "canceled", "seq": 4, "order_id": 1, "side": "buy", "price": "0.99",
                                  "qty": "2", "reason": "cleared"}, ts=5)
    assert out["l2"]["bids"] == [["0.99", "0"]]


# ------------------------------------------------------------------ a seeded stream


def _command(rng: random.Random, n: int, ts: int, coids: list[tuple[str, str]]) -> Command:
    client = rng.choice((ALICE, BOB, CAROL))
    side = rng.choice((BUY, SELL))
    price, qty = rng.randint(95, 105), rng.randint(1, 8)
    coid = f"o{n}"
    roll = rng.random()
    if roll < 0.35:
        tif = rng.choice((GTC, GTC, GTD, IOC, TimeInForce.FOK))
        display = rng.randint(1, qty) if rng.random() < 0.4 else 0
        coids.append((client, coid))
        return PlaceOrder(SYM, client, coid, side, LIMIT, price, qty, tif, ts, expire_ns=ts + 7 if tif is GTD else 0,
                          display_qty_lots=display)
    if roll < 0.55:
        otype = rng.choice((STOP, STOP_LIMIT))
        tif = rng.choice((GTC, GTD) if otype is STOP else (GTC, GTD, IOC))
        coids.append((client, coid))
        return PlaceOrder(SYM, client, coid, side, otype, price if otype is STOP_LIMIT else 0, qty, tif, ts,
                          expire_ns=ts + 9 if tif is GTD else 0, stop_price_ticks=rng.randint(95, 105))
    if roll < 0.62:
        return PlaceOrder(SYM, client, coid, side, OrderType.MARKET, 0, qty, IOC, ts)
    if roll < 0.99 and coids:
        client, coid = rng.choice(coids)
        if roll < 0.75:
            return CancelOrder(SYM, client, coid, ts_ns=ts)
        return AmendOrder(SYM, client, coid, price_ticks=rng.choice((None, price)),
                          qty_lots=rng.choice((None, qty, qty + 4)), ts_ns=ts,
                          stop_price_ticks=rng.choice((None, None, rng.randint(95, 105))))
    return ClearBook(SYM, ts, "ops")


def _follow_l3(orders: dict[int, list[Any]], message: dict[str, Any]) -> None:
    """An l3 follower's book: order id -> [price, remaining] of every order it has seen and not seen go."""
    for e in message["events"]:
        kind = e["type"]
        if kind in ("accepted", "triggered"):
            orders[e["order_id"]] = [e["price"], int(e["qty"])]
        elif kind == "filled":
            orders[e["maker_order_id"]][1] = int(e["maker_remaining"])
            orders[e["taker_order_id"]][1] = int(e["taker_remaining"])
        elif kind == "replenished":
            orders[e["order_id"]][1] = int(e["shown"])
        elif kind == "amended":
            orders[e["order_id"]] = [e["price"], int(e["remaining"])]
        elif kind in ("canceled", "expired"):
            del orders[e["order_id"]]
    for oid in [oid for oid, (_, left) in orders.items() if not left]:
        del orders[oid]


def test_a_stream_of_stops_and_icebergs_publishes_exactly_what_shows() -> None:
    rng = random.Random(21)
    engine = MatchingEngine(make_spec())
    spec = engine.spec
    view = MarketData(spec)
    follower: dict[int, list[Any]] = {}
    coids: list[tuple[str, str]] = []
    kinds: set[str] = set()
    for n in range(3000):
        events = engine.apply(_command(rng, n, n, coids))
        messages = dict(view.apply(events))
        kinds |= {type(e).__name__ for e in events}
        _follow_l3(follower, json.loads(messages["l3"]))
        for buy_side, levels in ((True, engine.book.bids), (False, engine.book.asks)):
            assert view.levels(buy_side) == [(spec.ticks_to_price(level.price), spec.lots_to_qty(level.total_lots))
                                             for level in levels.values()]
        shown = {o.order_id: [spec.ticks_to_price(o.price), o.remaining] for o in engine.book.iter_orders()}
        assert follower == shown, f"after command {n}"
        if n % 250 == 0:
            assert view.same_book(engine.export_state())
            image = MarketData(spec, engine.export_state())
            assert json.loads(image.book())["asks"] == json.loads(view.book())["asks"]
            assert json.loads(image.book())["bids"] == json.loads(view.book())["bids"]
            view = image  # and carry on from the image, as a publisher starting from a snapshot does
    assert {"OrderTriggered", "OrderReplenished", "OrderExpired", "OrderAmended"} <= kinds
