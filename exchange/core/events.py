"""Events the core emits: past tense, immutable, integers only.

Every event carries its instrument, the instrument's sequence number (strictly
increasing by one, no gaps, across all event types) and the timestamp of the
input that caused it. Order ids and trade ids come from per-instrument
counters, so the same command stream always yields byte-identical events.

Fields ending in ``_ticks`` are prices and ``_lots`` quantities; the wire codec
turns them into decimal strings named without the suffix.

On an instrument that keeps balances (see :mod:`exchange.core.balances`) the events
that move money say how: ``reserved`` (what an accepted order holds, or an amended
one holds now: base lots for a sell, quote units of tick x lot for a buy),
``released``, a fill's ``maker_fee`` and ``taker_fee`` (quote units), and
``balances``: the resulting ``(client_id, asset, available, reserved)`` of every
account the event changed, the venue's fees account (client ``""``) included. On an
instrument without balances these fields keep their defaults and are left out of
the encoding, so the events are byte for byte what they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from exchange.core.types import CancelReason, OrderType, RejectReason, Side, StpMode, TimeInForce

__all__ = [
    "Balance",
    "BookCleared",
    "Deposited",
    "Event",
    "InstrumentHalted",
    "InstrumentResumed",
    "OrderAccepted",
    "OrderAmended",
    "OrderCanceled",
    "OrderExpired",
    "OrderFilled",
    "OrderRejected",
    "OrderReplenished",
    "OrderTriggered",
    "Withdrawn",
]

Balance = tuple[str, str, int, int]  # (client_id, asset, available, reserved) after the event; "" is the fees account


class _Base(msgspec.Struct, frozen=True, gc=False, tag_field="type", omit_defaults=True):
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
    reserved: int = 0  # balances: what the order holds (base lots to sell, quote units to buy)
    funds: int = 0  # a market buy's budget (quote units), when it gave one
    balances: Sequence[Balance] = ()
    stop_price_ticks: int = 0  # a stop or stop-limit order's trigger price: it waits, unseen, until triggered
    display_qty_lots: int = 0  # an iceberg's slice: only that much of it shows in the book at a time


class OrderTriggered(_Base, frozen=True, gc=False, tag="triggered"):
    """A waiting stop order's condition was met by trade ``trade_id`` at ``trigger_price_ticks``: it is now a
    taker (``stop``: a market order, IOC; ``stop_limit``: a limit order at ``price_ticks`` with its time in
    force). What it does follows, as for a new order: fills, then it rests (its priority is this event's
    ``seq``) or its remainder is canceled."""

    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    order_type: OrderType
    stop_price_ticks: int
    price_ticks: int  # 0 for a stop (market)
    qty_lots: int
    trade_id: int
    trigger_price_ticks: int


class OrderReplenished(_Base, frozen=True, gc=False, tag="replenished"):
    """An iceberg's shown slice was filled: the next slice, ``shown_lots``, joins the back of the same level
    (its priority is this event's ``seq``); ``hidden_lots`` are still to come after it."""

    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    price_ticks: int
    shown_lots: int
    hidden_lots: int


class OrderRejected(_Base, frozen=True, gc=False, tag="rejected"):
    """A command was refused; the book is unchanged. ``command`` names what was refused.

    ``order_id`` is the order the command named, if known; for a duplicate
    client order id it is the original order, so the sender can follow it.
    """

    client_id: str
    client_order_id: str | None
    order_id: int | None
    command: str  # "place", "cancel", "amend", "cancel_all", "clear", "halt", "resume", "deposit", "withdraw"...
    reason: RejectReason
    text: str
    transfer_id: str = ""  # a refused deposit or withdrawal's (its outcome is remembered under it)


class OrderFilled(_Base, frozen=True, gc=False, tag="filled"):
    """One match between a resting maker and the incoming taker, at the maker's price."""

    trade_id: int
    price_ticks: int
    qty_lots: int
    aggressor_side: Side  # the taker's side
    maker_order_id: int
    maker_client_id: str
    maker_client_order_id: str
    maker_remaining_lots: int  # an iceberg maker: what is left of its shown slice (the hidden rest never shows)
    taker_order_id: int
    taker_client_id: str
    taker_client_order_id: str
    taker_remaining_lots: int
    maker_fee: int = 0  # balances: quote units, rounded up (negative: a rebate)
    taker_fee: int = 0
    balances: Sequence[Balance] = ()


class OrderCanceled(_Base, frozen=True, gc=False, tag="canceled"):
    """An order left the book (or an incoming remainder was dropped) unfilled."""

    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    price_ticks: int
    canceled_lots: int  # all that was open (an iceberg's hidden quantity included)
    reason: CancelReason
    released: int = 0  # balances: what the order no longer holds
    balances: Sequence[Balance] = ()


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
    remaining_lots: int  # open quantity (an iceberg's shown and hidden together)
    requeued: bool
    reserved: int = 0  # balances: what the order holds now
    balances: Sequence[Balance] = ()
    stop_price_ticks: int = 0  # a waiting stop's stop price after the amend
    hidden_lots: int = 0  # an iceberg's open quantity not shown after the amend


class OrderExpired(_Base, frozen=True, gc=False, tag="expired"):
    """A GTD order reached its expiry time (judged by input timestamps)."""

    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    price_ticks: int
    expired_lots: int
    released: int = 0
    balances: Sequence[Balance] = ()


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


class Deposited(_Base, frozen=True, gc=False, tag="deposited"):
    """``amount`` of ``asset`` came in for ``client_id`` (units: base lots, or quote units of tick x lot)."""

    client_id: str
    asset: str
    amount: int
    transfer_id: str
    balances: Sequence[Balance] = ()


class Withdrawn(_Base, frozen=True, gc=False, tag="withdrawn"):
    """``amount`` of ``asset`` left ``client_id``'s available balance."""

    client_id: str
    asset: str
    amount: int
    transfer_id: str
    balances: Sequence[Balance] = ()


Event = (OrderAccepted | OrderRejected | OrderFilled | OrderCanceled | OrderAmended | OrderExpired
         | InstrumentHalted | InstrumentResumed | BookCleared | Deposited | Withdrawn | OrderTriggered
         | OrderReplenished)
