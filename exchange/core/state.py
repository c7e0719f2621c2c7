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

import msgspec

from exchange.core.book import Order, OrderBook
from exchange.core.types import Side, StpMode

__all__ = ["EngineState", "RestingOrder", "book_order", "engine_state_hash", "resting_orders"]


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


def engine_state_hash(book: OrderBook, halted: bool, balances: bytes = b"") -> str:
    """The book's hash, marked when the instrument is halted, and combined with the balances
    (:meth:`exchange.core.balances.Ledger.digest`) when there are any: a trading book without balances
    hashes as the bare book."""
    book_hash = book.state_hash()
    if not halted and not balances:
        return book_hash
    return hashlib.blake2b((b"halted:" if halted else b"") + book_hash.encode() + balances,
                           digest_size=16).hexdigest()


def resting_orders(book: OrderBook) -> list[RestingOrder]:
    """The book's live orders in priority order, as stored in snapshots."""
    return [RestingOrder(o.order_id, o.client_id, o.client_order_id, o.side, o.price, o.qty, o.remaining,
                         o.priority, o.expire_ns, o.post_only, o.stp, o.rate) for o in book.iter_orders()]


def book_order(r: RestingOrder) -> Order:
    """The live order a stored one stands for (the inverse of :func:`resting_orders`, one order)."""
    return Order(r.order_id, r.client_id, r.client_order_id, Side(r.side), r.price_ticks, r.qty_lots,
                 r.remaining_lots, r.priority, r.expire_ns, r.post_only, StpMode(r.stp), r.rate)
