"""Events the core emits: past tense, immutable, integers only.

Every event carries its instrument, the instrument's sequence number (strictly
increasing by one, no gaps, across all event types) and the timestamp of the
input that caused it. Order ids and trade ids come from per-instrument
counters, so the same command stream always yields byte-identical events.

Fields ending in ``_ticks`` are prices and ``_lots`` quantities; the wire codec
turns them into decimal strings named without the suffix.
"""

from __future__ import annotations

import msgspec

from exchange.core.types import CancelReason, OrderType, RejectReason, Side, StpMode, TimeInForce

__all__ = [
    "BookCleared",
    "Event",
    "InstrumentHalted",
    "InstrumentResumed",
    "OrderAccepted",
    "OrderAmended",
    "OrderCanceled",
    "OrderExpired",
    "OrderFilled",
    "OrderRejected",
]


class _Base(msgspec.Struct, frozen=True, gc=False, tag_field="type"):
    instrument: str
    seq: int
    ts_ns: int


class OrderAccepted(_Base, frozen=True, gc=False, tag="accepted"):
    """A new order passed validation and got its engine ``order_id``.

    Fills, if any, follow; then the order rests, or its remainder is canceled
    (IOC, FOK, market, self-trade prevention). If it rests, its time priority
    is this event's ``seq``; a re-queuing amend's ``seq`` replaces it.
    """

    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    order_type: OrderType
    price_ticks: int  # 0 for market orders
    qty_lots: int
    tif: TimeInForce
    post_only: bool
    stp: StpMode
    expire_ns: int  # 0 unless GTD


class OrderRejected(_Base, frozen=True, gc=False, tag="rejected"):
    """A command was refused; the book is unchanged. ``command`` names what was refused.

    ``order_id`` is the order the command named, if known; for a duplicate
    client order id it is the original order, so the sender can follow it.
    """

    client_id: str
    client_order_id: str | None
    order_id: int | None
    command: str  # "place", "cancel", "amend", "cancel_all", "clear", "halt", "resume" or "unknown"
    reason: RejectReason
    text: str


class OrderFilled(_Base, frozen=True, gc=False, tag="filled"):
    """One match between a resting maker and the incoming taker, at the maker's price."""

    trade_id: int
    price_ticks: int
    qty_lots: int
    aggressor_side: Side  # the taker's side
    maker_order_id: int
    maker_client_id: str
    maker_client_order_id: str
    maker_remaining_lots: int
    taker_order_id: int
    taker_client_id: str
    taker_client_order_id: str
    taker_remaining_lots: int


class OrderCanceled(_Base, frozen=True, gc=False, tag="canceled"):
    """An order left the book (or an incoming remainder was dropped) unfilled."""

    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    price_ticks: int
    canceled_lots: int
    reason: CancelReason


class OrderAmended(_Base, frozen=True, gc=False, tag="amended"):
    """An order's price or quantity changed; ``requeued`` says it lost time priority."""

    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    old_price_ticks: int
    price_ticks: int
    old_qty_lots: int
    qty_lots: int
    remaining_lots: int
    requeued: bool


class OrderExpired(_Base, frozen=True, gc=False, tag="expired"):
    """A GTD order reached its expiry time (judged by input timestamps)."""

    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    price_ticks: int
    expired_lots: int


class InstrumentHalted(_Base, frozen=True, gc=False, tag="halted"):
    """Trading stopped: until ``resumed``, places and amends are rejected ``instrument_halted``.

    ``client_id`` is the operator who asked; ``text`` their note.
    """

    client_id: str
    text: str


class InstrumentResumed(_Base, frozen=True, gc=False, tag="resumed"):
    """Trading resumed on a halted instrument."""

    client_id: str
    text: str


class BookCleared(_Base, frozen=True, gc=False, tag="cleared"):
    """An operator cleared the book: one ``canceled`` event (reason ``cleared``) per open order follows.

    It comes first, with its own seq, and also when the book was empty (``orders`` 0): the operator's
    action is journaled either way. ``client_id`` is the operator who asked, ``text`` their note,
    ``orders`` how many orders the clear cancels (GTD orders that expire at the same input expire
    before it, as for any input, and are not counted).
    """

    client_id: str
    text: str
    orders: int


Event = (OrderAccepted | OrderRejected | OrderFilled | OrderCanceled | OrderAmended | OrderExpired
         | InstrumentHalted | InstrumentResumed | BookCleared)
