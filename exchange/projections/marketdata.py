"""Market data from durable events: a level-2 view per instrument and the messages consumers read.

:class:`MarketData` follows one instrument's events in sequence order (the same
events the journal made durable) and keeps the aggregated book: price level ->
total open quantity. It never matches anything; it only follows what the events
say happened, like :class:`exchange.projections.applier.EventApplier` but without the
per-order detail a level-2 view does not need.

For each batch of events it produces ONE message per channel (exchanges call
these batched or "diff" channels): a consumer gets the whole batch's changes in
one message instead of one message per change, which is what lets a Python
subscriber keep up. Every message carries the instrument's sequence numbers:

- ``l2``: the levels the batch changed, each with its new total quantity ("0"
  removes the level), ``prev_seq`` and ``seq`` (the batch covers
  ``prev_seq < seq' <= seq``) and a CRC32 checksum of the top of the book. One is
  produced for every batch that has events for the instrument, even when no level
  changed, so consecutive ``l2`` messages chain: ``prev_seq`` of one is ``seq``
  of the one before. A gap is ``prev_seq`` above the consumer's ``seq``.
- ``l3``: the public order lifecycle of the batch (accepted, triggered, filled,
  replenished, canceled, amended, expired) and trading halts/resumptions, without
  client identities; same ``prev_seq``/``seq`` chain.
  Rejections change no book and are not public; nor is an operator's
  ``cleared`` event by itself (the ``canceled`` events that follow it, reason
  ``cleared``, are).
- ``trades``: the batch's trades (only when there are any), each with its
  ``trade_id`` (per instrument, +1 per trade: a gap shows) and ``seq``.
- ``bbo``: best bid and offer with their quantities, when either changed.

What the public must not see is left out, not blurred. A waiting stop or
stop-limit order is invisible: its ``accepted`` event, and the amends, cancels and
expiries of it while it waits, publish nothing and change no level; it appears
only when triggered (an l3 ``triggered`` entry, which consumers treat as an
arriving order: a stop-limit that rests is then an ordinary resting order). An
iceberg shows only its slice: levels count its shown lots, and every quantity l3
gives of it counts what shows, never the hidden rest (``accepted``: its first
slice; ``taker_remaining``, and an IOC or FOK one's ``canceled``: at most a slice
of what it has open; a resting one's ``canceled`` and ``expired``: its shown
slice; ``amended``: ``remaining`` the slice, ``qty`` filled plus the slice). A
``replenished`` entry puts its next slice (``shown``) at the back of its level,
and an amend that lowers only its hidden lots publishes nothing. The view keeps
each iceberg's hidden lots, to know what the next event shows, but no message
carries them.

The levels an ``l2`` message carries are absolute (new totals, not deltas), so
applying a message that overlaps what a consumer already has (``prev_seq`` below
its ``seq`` and ``seq`` above it, as after a re-publication) gives the right book.

With ``depth`` N > 0 the view consumers keep is the top N levels per side: an
``l2`` message carries the changed levels that are (or were) in the top N plus
the levels that entered it, and a consumer truncates to N levels after applying.

The checksum is ``zlib.crc32`` of the ASCII string made of the top
``checksum_levels`` (10) levels, interleaved best first: ``bid1_price:bid1_qty:
ask1_price:ask1_qty:bid2_price:...`` (a side that runs out is skipped), with
prices and quantities as the decimal strings the messages carry.

No I/O, no clock: the caller passes wall-clock time to :meth:`heartbeat` only.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any

import msgspec
from sortedcontainers import SortedDict

from exchange.core.events import (
    BookCleared,
    Deposited,
    Event,
    InstrumentHalted,
    InstrumentResumed,
    OrderAccepted,
    OrderAmended,
    OrderCanceled,
    OrderExpired,
    OrderFilled,
    OrderRejected,
    OrderReplenished,
    OrderTriggered,
    Withdrawn,
)
from exchange.core.instruments import Instrument
from exchange.core.state import EngineState
from exchange.core.types import OrderType, Side, TimeInForce

__all__ = ["CHANNELS", "MarketData", "MarketDataError", "book_checksum"]

CHANNELS = ("l2", "l3", "trades", "bbo", "heartbeat")
_RESTING_TIF = (TimeInForce.GTC, TimeInForce.GTD)
_LIMIT, _STOP_LIMIT = OrderType.LIMIT, OrderType.STOP_LIMIT
_STOPS = (OrderType.STOP, OrderType.STOP_LIMIT)
_CACHE_MAX = 50_000  # decimal strings remembered per instrument before the cache starts afresh
_encode = msgspec.json.Encoder().encode

Level = tuple[str, str]  # (price, quantity) as decimal strings


class MarketDataError(Exception):
    """Events that do not follow from the view (a gap, an unknown order): a bug upstream, never input."""


def book_checksum(bids: Sequence[Level], asks: Sequence[Level], levels: int = 10) -> int:
    """CRC32 of the interleaved top ``levels`` of each side (see the module docstring)."""
    parts: list[str] = []
    for i in range(levels):
        if i < len(bids):
            parts += bids[i]
        if i < len(asks):
            parts += asks[i]
    return zlib.crc32(":".join(parts).encode())


class MarketData:
    """The level-2 view of one instrument and the messages its batches produce."""

    def __init__(self, spec: Instrument, state: EngineState | None = None, *, depth: int = 0,
                 checksum_levels: int = 10) -> None:
        if depth < 0:
            raise ValueError("depth must be 0 (the whole book) or positive")
        self.spec = spec
        self.symbol = spec.symbol
        self.depth = depth
        self.checksum_levels = min(checksum_levels, depth) if depth else checksum_levels
        state = state if state is not None else EngineState(spec.symbol, 0, 1, 1, [])
        if state.instrument != spec.symbol:
            raise ValueError(f"state of {state.instrument!r} given for {spec.symbol!r}")
        self.seq = state.seq
        self.last_trade_id = state.next_trade_id - 1
        self.ts_ns = 0
        self.bids: SortedDict[int, int] = SortedDict()  # -price -> total lots (best first)
        self.asks: SortedDict[int, int] = SortedDict()  # price -> total lots (best first)
        # order id -> [is_buy, price_ticks, shown_lots, hidden_lots, display_lots] of every order that rests, or
        # will once it has traded on arrival (a plain order: hidden and display 0)
        self._orders: dict[int, list[Any]] = {}
        self._stops: dict[int, TimeInForce] = {}  # waiting stops (unseen) -> their time in force
        self._slices: dict[int, int] = {}  # icebergs that never rest (IOC, FOK) -> display lots, while they trade
        self._touched: set[tuple[bool, int]] = set()
        self._prices: dict[int, str] = {}
        self._qtys: dict[int, str] = {}
        self._handlers: dict[type[Any], Callable[[Any, list[dict[str, Any]], list[dict[str, Any]]], None]] = {
            OrderFilled: self._on_fill, OrderAccepted: self._on_accept, OrderCanceled: self._on_cancel,
            OrderExpired: self._on_expire, OrderAmended: self._on_amend, OrderRejected: self._on_reject,
            InstrumentHalted: self._on_status, InstrumentResumed: self._on_status, BookCleared: self._on_cleared,
            Deposited: self._on_reject, Withdrawn: self._on_reject,  # money moves no book and is not public
            OrderTriggered: self._on_trigger, OrderReplenished: self._on_replenish}
        for r in state.orders:  # an iceberg's remaining_lots is its shown slice
            buy = r.side == "buy"
            self._orders[r.order_id] = [buy, r.price_ticks, r.remaining_lots, r.hidden_lots, r.display_lots]
            self._change(buy, r.price_ticks, r.remaining_lots)
        for stop in state.stops:
            self._stops[stop.order_id] = TimeInForce(stop.tif)
        self._touched.clear()
        self._top = {True: self._top_prices(True), False: self._top_prices(False)}
        self._bbo = self._best()

    # ------------------------------------------------------------------ API

    def apply(self, events: Sequence[Event]) -> list[tuple[str, bytes]]:
        """Follow one batch of this instrument's events; return ``(channel, message)`` pairs.

        ``events`` must continue the view's sequence exactly (the first is ``seq + 1``).
        """
        if not events:
            return []
        prev = self.seq
        if events[0].seq != prev + 1:
            raise MarketDataError(f"{self.symbol}: batch starts at seq {events[0].seq} after seq {prev}")
        trades: list[dict[str, Any]] = []
        l3: list[dict[str, Any]] = []
        handlers = self._handlers
        for event in events:
            handler = handlers.get(type(event))
            if handler is None:
                raise MarketDataError(f"{self.symbol}: not an event: {event!r}")
            handler(event, trades, l3)
        last = events[-1]
        self.seq = last.seq
        self.ts_ns = last.ts_ns
        bids, asks = self._changes()
        symbol = self.symbol
        out = [("l2", _encode({"type": "l2", "instrument": symbol, "prev_seq": prev, "seq": self.seq,
                                "ts_ns": self.ts_ns, "bids": bids, "asks": asks, "checksum": self.checksum()})),
               ("l3", _encode({"type": "l3", "instrument": symbol, "prev_seq": prev, "seq": self.seq,
                                "ts_ns": self.ts_ns, "events": l3}))]
        if trades:
            out.append(("trades", _encode({"type": "trades", "instrument": symbol, "seq": self.seq,
                                            "trades": trades})))
        bbo = self._best()
        if bbo != self._bbo:
            self._bbo = bbo
            out.append(("bbo", _encode({"type": "bbo", "instrument": symbol, "seq": self.seq, "ts_ns": self.ts_ns,
                                         "bid": bbo[0], "ask": bbo[1]})))
        return out

    def book(self) -> bytes:
        """The book image a new subscriber starts from (the Redis book key's value)."""
        bids, asks = self.levels(True, self.depth), self.levels(False, self.depth)
        return _encode({"type": "book", "instrument": self.symbol, "seq": self.seq, "ts_ns": self.ts_ns,
                        "last_trade_id": self.last_trade_id, "depth": self.depth, "bids": bids, "asks": asks,
                        "checksum": book_checksum(bids, asks, self.checksum_levels)})

    def heartbeat(self, now_ns: int) -> bytes:
        """``seq`` and ``last_trade_id`` as published so far; ``time_ns`` is the daemon's wall clock."""
        return _encode({"type": "heartbeat", "instrument": self.symbol, "seq": self.seq,
                        "last_trade_id": self.last_trade_id, "time_ns": now_ns})

    def levels(self, buy: bool, depth: int = 0) -> list[Level]:
        """One side best first as decimal strings; ``depth`` 0: all of it."""
        side = self.bids if buy else self.asks
        items = side.items() if not depth else islice(side.items(), depth)
        return [(self._price(abs(key)), self._qty(lots)) for key, lots in items]

    def checksum(self) -> int:
        n = self.checksum_levels
        return book_checksum(self.levels(True, n), self.levels(False, n), n)

    def same_book(self, state: EngineState) -> bool:
        """Whether the view equals the levels of an engine image (a check after re-publication)."""
        other = MarketData(self.spec, state, depth=self.depth)
        return list(self.bids.items()) == list(other.bids.items()) and \
            list(self.asks.items()) == list(other.asks.items())

    # -------------------------------------------------------------- events

    def _on_fill(self, ev: OrderFilled, trades: list[dict[str, Any]], l3: list[dict[str, Any]]) -> None:
        taker_remaining = self._fill(ev)
        self.last_trade_id = ev.trade_id
        price, qty = self._price(ev.price_ticks), self._qty(ev.qty_lots)
        trades.append({"trade_id": ev.trade_id, "seq": ev.seq, "ts_ns": ev.ts_ns, "price": price, "qty": qty,
                       "side": ev.aggressor_side})
        l3.append({"type": "filled", "seq": ev.seq, "trade_id": ev.trade_id, "price": price, "qty": qty,
                   "aggressor_side": ev.aggressor_side, "maker_order_id": ev.maker_order_id,
                   "maker_remaining": self._qty(ev.maker_remaining_lots), "taker_order_id": ev.taker_order_id,
                   "taker_remaining": self._qty(taker_remaining)})

    def _on_accept(self, ev: OrderAccepted, trades: list[dict[str, Any]], l3: list[dict[str, Any]]) -> None:
        if ev.order_type in _STOPS:  # it waits unseen until triggered
            self._stops[ev.order_id] = ev.tif
            return
        qty, display = ev.qty_lots, ev.display_qty_lots
        shown = display if display and display < qty else qty
        if ev.order_type is _LIMIT and ev.tif in _RESTING_TIF:
            buy = ev.side is Side.BUY
            self._orders[ev.order_id] = [buy, ev.price_ticks, shown, qty - shown, display]
            self._change(buy, ev.price_ticks, shown)
        elif display:
            self._slices[ev.order_id] = display
        l3.append({"type": "accepted", "seq": ev.seq, "order_id": ev.order_id, "side": ev.side,
                   "order_type": ev.order_type, "price": self._price(ev.price_ticks) if ev.price_ticks else None,
                   "qty": self._qty(shown), "tif": ev.tif})

    def _on_trigger(self, ev: OrderTriggered, trades: list[dict[str, Any]], l3: list[dict[str, Any]]) -> None:
        """A stop comes out of hiding as an arriving order: a market order (IOC), or a limit at its price that
        rests like any limit order when its time in force lets it."""
        tif = self._stops.pop(ev.order_id, None)
        if tif is None:
            raise MarketDataError(f"{self.symbol}: seq {ev.seq} triggers order {ev.order_id}, which is not a "
                                  "waiting stop")
        if ev.order_type is not _STOP_LIMIT:
            tif = TimeInForce.IOC
        elif tif in _RESTING_TIF:
            buy = ev.side is Side.BUY
            self._orders[ev.order_id] = [buy, ev.price_ticks, ev.qty_lots, 0, 0]
            self._change(buy, ev.price_ticks, ev.qty_lots)
        l3.append({"type": "triggered", "seq": ev.seq, "order_id": ev.order_id, "side": ev.side,
                   "order_type": ev.order_type, "price": self._price(ev.price_ticks) if ev.price_ticks else None,
                   "qty": self._qty(ev.qty_lots), "tif": tif})

    def _on_replenish(self, ev: OrderReplenished, trades: list[dict[str, Any]], l3: list[dict[str, Any]]) -> None:
        order = self._orders.get(ev.order_id)
        if order is None or order[2]:
            raise MarketDataError(f"{self.symbol}: seq {ev.seq} replenishes order {ev.order_id}, which is not an "
                                  "iceberg whose slice was just filled")
        order[2], order[3] = ev.shown_lots, ev.hidden_lots
        self._change(order[0], order[1], ev.shown_lots)
        l3.append({"type": "replenished", "seq": ev.seq, "order_id": ev.order_id, "side": ev.side,
                   "price": self._price(ev.price_ticks), "shown": self._qty(ev.shown_lots)})

    def _on_cancel(self, ev: OrderCanceled, trades: list[dict[str, Any]], l3: list[dict[str, Any]]) -> None:
        if self._stops.pop(ev.order_id, None) is not None:
            return  # a waiting stop: never seen, so never seen to go
        l3.append({"type": "canceled", "seq": ev.seq, "order_id": ev.order_id, "side": ev.side,
                   "price": self._price(ev.price_ticks) if ev.price_ticks else None,
                   "qty": self._qty(self._remove(ev.order_id, ev.canceled_lots)), "reason": ev.reason})

    def _on_expire(self, ev: OrderExpired, trades: list[dict[str, Any]], l3: list[dict[str, Any]]) -> None:
        if self._stops.pop(ev.order_id, None) is not None:
            return
        l3.append({"type": "expired", "seq": ev.seq, "order_id": ev.order_id, "side": ev.side,
                   "price": self._price(ev.price_ticks), "qty": self._qty(self._remove(ev.order_id, ev.expired_lots))})

    def _on_amend(self, ev: OrderAmended, trades: list[dict[str, Any]], l3: list[dict[str, Any]]) -> None:
        if ev.order_id in self._stops:
            return  # a waiting stop's new stop price, price or quantity: still unseen
        hidden = ev.hidden_lots
        order = self._orders.get(ev.order_id)
        if order is not None and order[4] and not ev.requeued and ev.remaining_lots - hidden == order[2]:
            order[3] = hidden  # an iceberg's lower quantity taken from its hidden lots alone: nothing shows
            return
        self._amend(ev)
        # an iceberg's quantities as the public sees the order: its filled lots and its slice, never its hidden lots
        l3.append({"type": "amended", "seq": ev.seq, "order_id": ev.order_id, "side": ev.side,
                   "old_price": self._price(ev.old_price_ticks), "price": self._price(ev.price_ticks),
                   "qty": self._qty(ev.qty_lots - hidden), "remaining": self._qty(ev.remaining_lots - hidden),
                   "requeued": ev.requeued})

    def _on_status(self, ev: InstrumentHalted | InstrumentResumed, trades: list[dict[str, Any]],
                   l3: list[dict[str, Any]]) -> None:
        """Trading halted or resumed by an operator: public, without the operator's identity."""
        l3.append({"type": "halted" if type(ev) is InstrumentHalted else "resumed", "seq": ev.seq, "text": ev.text})

    def _on_reject(self, ev: OrderRejected, trades: list[dict[str, Any]], l3: list[dict[str, Any]]) -> None:
        return None  # a rejection changes no book and is not public

    def _on_cleared(self, ev: BookCleared, trades: list[dict[str, Any]], l3: list[dict[str, Any]]) -> None:
        return None  # the operator's audit record; the cancellations that follow change the book

    def _fill(self, ev: OrderFilled) -> int:
        """Follow a fill; the taker's remaining quantity as the public sees it (an iceberg's: its slice)."""
        maker = self._orders.get(ev.maker_order_id)
        if maker is None:
            raise MarketDataError(f"{self.symbol}: seq {ev.seq} fills order {ev.maker_order_id}, which is not resting")
        left = ev.maker_remaining_lots  # a maker iceberg's: what is left of its slice (its hidden lots stay)
        self._change(maker[0], maker[1], left - maker[2])
        maker[2] = left
        if not left and not maker[3]:
            del self._orders[ev.maker_order_id]
        left = ev.taker_remaining_lots  # all it has open (an iceberg trades with its whole quantity)
        taker = self._orders.get(ev.taker_order_id)
        if taker is not None:  # a resting-capable order (or a re-queued amend) trading on arrival
            display = taker[4]
            shown = display if display and display < left else left
            self._change(taker[0], taker[1], shown - taker[2])
            taker[2], taker[3] = shown, left - shown
            if not left:
                del self._orders[ev.taker_order_id]
            return shown
        display = self._slices.get(ev.taker_order_id, 0)
        if display:
            if not left:
                del self._slices[ev.taker_order_id]
            return display if display < left else left
        return left

    def _remove(self, order_id: int, lots: int) -> int:
        """Take an order off the view; what of its ``lots`` (all it had open) the public saw go."""
        order = self._orders.pop(order_id, None)
        if order is not None:
            self._change(order[0], order[1], -order[2])
            return int(order[2])
        display = self._slices.pop(order_id, 0)  # else an IOC/FOK/market remainder that never rested
        return display if display and display < lots else lots

    def _amend(self, ev: OrderAmended) -> None:
        order = self._orders.get(ev.order_id)
        if order is None:
            raise MarketDataError(f"{self.symbol}: seq {ev.seq} amends order {ev.order_id}, which is not resting")
        shown = ev.remaining_lots - ev.hidden_lots
        self._change(order[0], order[1], -order[2])
        order[1], order[2], order[3] = ev.price_ticks, shown, ev.hidden_lots
        self._change(order[0], ev.price_ticks, shown)

    # -------------------------------------------------------------- levels

    def _change(self, buy: bool, price: int, delta: int) -> None:
        if not delta:  # (an iceberg trading on arrival still shows a whole slice)
            return
        side, key = (self.bids, -price) if buy else (self.asks, price)
        total = side.get(key, 0) + delta
        if total:
            side[key] = total
        else:
            del side[key]
        self._touched.add((buy, price))

    def _changes(self) -> tuple[list[Level], list[Level]]:
        """The batch's changed levels per side, best first (with depth: see the module docstring)."""
        touched = self._touched
        out: tuple[list[Level], list[Level]] = ([], [])
        for buy, side in ((True, self.bids), (False, self.asks)):
            prices = {price for b, price in touched if b is buy}
            if self.depth:
                old, new = self._top[buy], self._top_prices(buy)
                self._top[buy] = new
                prices = {p for p in prices if p in new or p in old} | (new - old)
            levels = out[0] if buy else out[1]
            for price in sorted(prices, reverse=buy):
                levels.append((self._price(price), self._qty(side.get(-price if buy else price, 0))))
        touched.clear()
        return out

    def _top_prices(self, buy: bool) -> set[int]:
        side = self.bids if buy else self.asks
        return {abs(key) for key in islice(side.keys(), self.depth)} if self.depth else set()

    def _best(self) -> tuple[Level | None, Level | None]:
        bids, asks = self.levels(True, 1), self.levels(False, 1)
        return (bids[0] if bids else None), (asks[0] if asks else None)

    def _price(self, ticks: int) -> str:
        text = self._prices.get(ticks)
        if text is None:
            if len(self._prices) >= _CACHE_MAX:
                self._prices.clear()
            text = self._prices[ticks] = self.spec.ticks_to_price(ticks)
        return text

    def _qty(self, lots: int) -> str:
        text = self._qtys.get(lots)
        if text is None:
            if len(self._qtys) >= _CACHE_MAX:
                self._qtys.clear()
            text = self._qtys[lots] = self.spec.lots_to_qty(lots)
        return text


def split_by_instrument(items: Iterable[tuple[str, Sequence[Event]]]) -> dict[str, list[Event]]:
    """Events per instrument, in order, from ``(instrument, events)`` pairs (a batch's applied records)."""
    out: dict[str, list[Event]] = {}
    for symbol, events in items:
        if events:
            out.setdefault(symbol, []).extend(events)
    return out
