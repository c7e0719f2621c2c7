"""The engine image: what a snapshot stores and an engine resumes from, and the hash that compares books.

- :class:`EngineState` is everything needed to continue an engine exactly where it was:
  its counters, its resting orders (:class:`RestingOrder`, in priority order), the dedupe
  window and the halted flag. :meth:`exchange.core.matching.MatchingEngine.export_state`
  makes one, :meth:`~exchange.core.matching.MatchingEngine.from_state` continues from one;
  snapshots, the stores and recovery hold nothing else.
- :func:`resting_orders` and :func:`book_order` are the two directions between a book's
  live orders and their image: a field of one is a field of the other.
- :func:`engine_state_hash` is the hash recovery, verification and the snapshots compare:
  the book's (:meth:`exchange.core.book.OrderBook.state_hash`), marked when the
  instrument is halted.

No I/O, no clock, no randomness: this module is part of the pure core.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

from exchange.core.book import Iceberg, Order, OrderBook, Stop, waiting_stop
from exchange.core.types import OrderType, Side, StpMode, TimeInForce

__all__ = ["EngineState", "RestingOrder", "StopOrder", "book_order", "engine_state_hash", "resting_orders",
           "stop_order", "stop_orders", "stops_digest"]


class RestingOrder(msgspec.Struct, frozen=True, gc=False):
    """A resting order as stored in snapshots and in the orders table."""

    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    price_ticks: int
    qty_lots: int
    remaining_lots: int
    priority: int
    expire_ns: int = 0
    post_only: bool = False
    stp: StpMode = StpMode.NONE
    rate: int = 0  # balances: what each open lot holds (exchange.core.balances)
    display_lots: int = 0  # an iceberg's slice size (``remaining_lots`` is what shows of it now)
    hidden_lots: int = 0  # an iceberg's open quantity that does not show


class StopOrder(msgspec.Struct, frozen=True, gc=False):
    """A stop or stop-limit order waiting for its stop price (not in the book), as snapshots and the orders
    table hold it. ``priority`` orders stops of one stop price: the seq of the event that accepted it, or of
    the amend that last moved it."""

    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    order_type: OrderType
    stop_price_ticks: int
    price_ticks: int
    qty_lots: int
    priority: int
    tif: TimeInForce = TimeInForce.GTC
    expire_ns: int = 0
    stp: StpMode = StpMode.NONE
    rate: int = 0  # balances: what each lot holds (a stop buy with a budget: 0, its ``funds`` hold)
    funds: int = 0


class EngineState(msgspec.Struct, frozen=True):
    """Everything needed to continue an engine exactly where it was.

    ``orders`` are in priority order (bids best first, then asks best first,
    FIFO within a level). ``done`` lists the remembered finished orders as
    ``(client_id, client_order_id, order_id)``, oldest first. ``halted``: an
    operator halted trading (see :class:`exchange.core.commands.HaltInstrument`).

    ``done_complete`` is False when ``done`` holds only the most recent part of
    the dedupe window: a periodic snapshot leaves the window out (up to a million
    entries an instrument: copying and encoding them every minute held the event
    loop for about 0.4 s; the orders table keeps the finished orders, and
    recovery loads the window from there), and a replay from such a snapshot
    knows only what finished after it: exactly the window's entries that finished
    after the snapshot (see :class:`~exchange.core.dedupe.DedupeWindow`), and it is the whole window once
    ``dedupe_window`` entries are known. An engine never starts from an incomplete
    window (:meth:`~exchange.core.matching.MatchingEngine.from_state` refuses).

    ``transfers_complete`` is False when ``transfers`` holds only some of the transfer ids the
    engine remembers, for the same reason: a periodic snapshot leaves them out (they only grow; the
    transfers table keeps them and recovery loads them from there), and a replay from such a snapshot
    knows the transfers decided after it. ``transfers_count`` and ``transfers_sum`` then stand for all of
    them (:func:`exchange.core.balances.summarize`; with a complete list they follow from it and are 0
    here): that summary, not the list, is in the state hash, so a snapshot still checks every transfer
    remembered. The dedupe window is not in the state hash.
    """

    instrument: str
    seq: int
    next_order_id: int
    next_trade_id: int
    orders: list[RestingOrder]
    done: list[tuple[str, str, int]] = []
    halted: bool = False
    done_complete: bool = True  # (with a default: stored snapshots from before it decode as complete)
    # balances (exchange.core.balances): (client, base available, base reserved, quote available, quote reserved)
    # of every client holding something, the fees account, and every transfer id decided on with its outcome
    accounts: list[tuple[str, int, int, int, int]] = []
    fees: int = 0
    transfers: list[tuple[str, str]] = []
    transfers_complete: bool = True
    transfers_count: int = 0  # when not transfers_complete: how many transfers are remembered in all ...
    transfers_sum: int = 0  # ... and the sum of their hashes (exchange.core.balances.summarize)
    # order types (exchange.core.matching): the waiting stops, in order_id order, and the last trade's price
    stops: list[StopOrder] = []
    last_price_ticks: int = 0


def engine_state_hash(book: OrderBook, halted: bool, balances: bytes = b"", stops: bytes = b"") -> str:
    """The book's hash, marked when the instrument is halted, and combined with the balances
    (:meth:`exchange.core.balances.Ledger.digest`) and the waiting stops and last trade price
    (:func:`stops_digest`) when there are any: a trading book without them hashes as the bare book."""
    book_hash = book.state_hash()
    if not halted and not balances and not stops:
        return book_hash
    return hashlib.blake2b((b"halted:" if halted else b"") + book_hash.encode() + balances + stops,
                           digest_size=16).hexdigest()


def stops_digest(stops: Iterable[Stop], last_price: int) -> bytes:
    """The waiting stops (in order_id order) and the last trade price, as the state hash takes them; empty when
    there is neither (so a book that never traded with none hashes as before)."""
    if not last_price and not stops:
        return b""
    h = hashlib.blake2b(b"P%d;" % last_price, digest_size=16)
    for o in stops:
        h.update(b"S%d:%s:%s:%s:%d:%d:%d:%d:%s:%d:%s:%d:%d;" % (
            o.order_id, o.client_id.encode(), o.client_order_id.encode(), o.side.value.encode(), o.stop, o.price,
            o.qty, o.priority, o.tif.value.encode(), o.expire_ns, o.stp.value.encode(), o.rate, o.funds))
    return h.digest()


def resting_orders(book: OrderBook) -> list[RestingOrder]:
    """The book's live orders in priority order, as stored in snapshots."""
    return [RestingOrder(o.order_id, o.client_id, o.client_order_id, o.side, o.price, o.qty, o.remaining,
                         o.priority, o.expire_ns, o.post_only, o.stp, o.rate, o.display, o.hidden)
            for o in book.iter_orders()]


def book_order(r: RestingOrder) -> Order:
    """The live order a stored one stands for (the inverse of :func:`resting_orders`, one order)."""
    if r.display_lots:
        return Iceberg(r.order_id, r.client_id, r.client_order_id, Side(r.side), r.price_ticks, r.qty_lots,
                       r.remaining_lots, r.priority, r.expire_ns, r.post_only, StpMode(r.stp), r.rate, r.display_lots,
                       r.hidden_lots)
    return Order(r.order_id, r.client_id, r.client_order_id, Side(r.side), r.price_ticks, r.qty_lots,
                 r.remaining_lots, r.priority, r.expire_ns, r.post_only, StpMode(r.stp), r.rate)


def stop_orders(stops: Iterable[Stop]) -> list[StopOrder]:
    """The waiting stops' images, in order_id order."""
    return [StopOrder(o.order_id, o.client_id, o.client_order_id, o.side, o.otype, o.stop, o.price, o.qty,
                      o.priority, o.tif, o.expire_ns, o.stp, o.rate, o.funds)
            for o in sorted(stops, key=lambda o: o.order_id)]


def stop_order(r: StopOrder) -> Stop:
    """The waiting stop a stored one stands for (the inverse of :func:`stop_orders`, one order)."""
    return waiting_stop(r.order_id, r.client_id, r.client_order_id, Side(r.side), OrderType(r.order_type),
                        r.stop_price_ticks, r.price_ticks, r.qty_lots, r.priority, TimeInForce(r.tif), r.expire_ns,
                        StpMode(r.stp), r.rate, r.funds)
