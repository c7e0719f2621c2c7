"""Commands the core accepts: imperative, immutable, integers only.

Prices are ticks and quantities lots of the command's instrument (see
:mod:`exchange.core.instruments`). ``ts_ns`` is the input timestamp (for the daemon,
the Kafka message time); the core never reads a clock, so GTD expiry is judged
by these timestamps alone.

These are msgspec Structs: constructing one costs about a tenth of a frozen
dataclass, which matters at hundreds of thousands of commands per second.
"""

from __future__ import annotations

import msgspec

from exchange.core.types import OrderType, RejectReason, Side, StpMode, TimeInForce

__all__ = ["AmendOrder", "CancelAll", "CancelOrder", "ClearBook", "Command", "Deposit", "HaltInstrument",
           "PlaceOrder", "RejectInput", "ResumeInstrument", "Withdraw"]


class PlaceOrder(msgspec.Struct, frozen=True, gc=False):
    """Place a new order.

    ``price_ticks`` is ignored for market orders (use 0). ``expire_ns`` is only
    for ``GTD`` (0 otherwise). ``stp`` of ``None`` takes the instrument default.
    ``funds`` is a market buy's budget in quote units (tick x lot), fees included, on an
    instrument that keeps balances (0: none; the order is then reserved at its price band).

    ``stop_price_ticks`` is a ``stop`` or ``stop_limit`` order's trigger price (0 otherwise): a buy
    stop triggers once a trade is at or above it, a sell stop at or below. ``display_qty_lots`` makes a
    limit order an iceberg: only that much of it shows in the book at a time (0: all of it).
    """

    instrument: str
    client_id: str
    client_order_id: str
    side: Side
    order_type: OrderType
    price_ticks: int
    qty_lots: int
    tif: TimeInForce = TimeInForce.GTC
    ts_ns: int = 0
    post_only: bool = False
    stp: StpMode | None = None
    expire_ns: int = 0
    funds: int = 0
    stop_price_ticks: int = 0
    display_qty_lots: int = 0


class CancelOrder(msgspec.Struct, frozen=True, gc=False):
    """Cancel one open order, named by ``client_order_id`` or by engine ``order_id``."""

    instrument: str
    client_id: str
    client_order_id: str | None = None
    order_id: int | None = None
    ts_ns: int = 0


class AmendOrder(msgspec.Struct, frozen=True, gc=False):
    """Change an open order's price and/or total quantity.

    ``qty_lots`` is the new *total* quantity (filled + open), as in FIX; it must
    stay above what has already filled. Reducing it keeps time priority; a new
    price or a larger quantity re-queues the order at the back of its (new)
    level, and a new price that crosses trades at once. ``stop_price_ticks`` is a waiting stop's new
    stop price.
    """

    instrument: str
    client_id: str
    client_order_id: str | None = None
    order_id: int | None = None
    price_ticks: int | None = None
    qty_lots: int | None = None
    ts_ns: int = 0
    stop_price_ticks: int | None = None


class CancelAll(msgspec.Struct, frozen=True, gc=False):
    """Cancel every open order of one client (on one instrument, or on all when ``instrument`` is None)."""

    client_id: str
    instrument: str | None = None
    ts_ns: int = 0


class ClearBook(msgspec.Struct, frozen=True, gc=False):
    """Operator action: cancel every open order of an instrument (reason ``cleared``).

    ``client_id`` names the operator who asked and ``text`` is their note, for the audit trail: the
    engine answers with a ``cleared`` event (:class:`exchange.core.events.BookCleared`) before the
    cancellations, even when the book is empty. (They come after ``ts_ns`` so that
    ``ClearBook(instrument, ts_ns)`` keeps its meaning.)
    """

    instrument: str
    ts_ns: int = 0
    client_id: str = ""
    text: str = ""


class HaltInstrument(msgspec.Struct, frozen=True, gc=False):
    """Operator action: stop trading an instrument.

    While halted, new orders and amends are rejected ``instrument_halted``;
    cancels (and cancel-all, clear) still work, so participants can take risk
    off. ``client_id`` names the operator who asked, for the audit trail.
    """

    instrument: str
    client_id: str
    text: str = ""  # the operator's note, e.g. why
    ts_ns: int = 0


class ResumeInstrument(msgspec.Struct, frozen=True, gc=False):
    """Operator action: trading resumes on a halted instrument (the book is as it was)."""

    instrument: str
    client_id: str
    text: str = ""
    ts_ns: int = 0


class Deposit(msgspec.Struct, frozen=True, gc=False):
    """Money in: ``amount`` of ``asset`` (the instrument's base asset, in lots, or its quote asset, in units of
    tick x lot) becomes available to ``client_id`` on this instrument. ``transfer_id`` makes it idempotent: a
    transfer id seen before (whatever its outcome) is rejected ``duplicate_transfer_id``. An operator-grade
    action: the daemon applies it only when signed."""

    instrument: str
    client_id: str
    asset: str
    amount: int
    transfer_id: str
    ts_ns: int = 0


class Withdraw(msgspec.Struct, frozen=True, gc=False):
    """Money out: ``amount`` of ``asset`` leaves ``client_id``'s available balance on this instrument (never its
    reserved one); refused ``insufficient_funds`` when the available balance is short. Idempotent by
    ``transfer_id``, operator-grade, like :class:`Deposit`."""

    instrument: str
    client_id: str
    asset: str
    amount: int
    transfer_id: str
    ts_ns: int = 0


class RejectInput(msgspec.Struct, frozen=True, gc=False):
    """Input the edge could not turn into a valid command (off-grid price, bad field, ...).

    It still travels through the instrument's loop so that the rejection gets a
    sequence number and is journaled like every other outcome.
    """

    instrument: str
    client_id: str
    client_order_id: str | None
    reason: RejectReason
    text: str
    command: str = "place"  # what was refused: "place", "cancel", "amend", ...
    ts_ns: int = 0
    transfer_id: str = ""  # a refused deposit or withdrawal's, when it could be read (the edge remembers nothing)


Command = (PlaceOrder | CancelOrder | AmendOrder | CancelAll | ClearBook | HaltInstrument | ResumeInstrument
           | RejectInput | Deposit | Withdraw)
