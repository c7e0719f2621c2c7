"""A deliberately naive reference order book for differential testing of the matching core.

It implements the rules stated in the docstrings of :mod:`exchange.core.matching`,
:mod:`exchange.core.commands`, :mod:`exchange.core.types` and :mod:`exchange.core.instruments`
*independently* of :mod:`exchange.core.book` and :mod:`exchange.core.matching` (neither is
imported here): each side is a plain Python list of orders, re-sorted by
``(price, arrival counter)`` before every look at it, and every lookup is a
linear scan. Speed is irrelevant; obviousness is the point.

Rules as implemented (and as the tests hold the engine to):

- Price-time priority; a trade happens at the maker's price; one fill per
  maker; a partially filled maker keeps its place.
- Market orders are IOC or FOK and never rest; the event price of a market order
  is 0. With ``price_band_bps`` they only trade at prices within that many basis
  points of the best opposite price at arrival (buy: ``p <= best * (1 + bps/1e4)``,
  sell: ``p >= best * (1 - bps/1e4)``, exact rational comparison).
- IOC remainders are canceled (``ioc_remainder``, also for market orders); FOK
  either fills completely or is accepted then canceled ``fok_unfilled`` without
  touching the book. Whether a FOK can fill is decided by running the match on a
  deep copy of the whole reference (so STP is honoured exactly as in matching).
- Post-only is only for GTC/GTD limit orders (else ``invalid_order``); a
  post-only order (or amend) that would cross the opposite best is rejected
  ``post_only_would_trade``, even if the only crossing orders are the owner's.
- STP follows the incoming order's mode (the instrument default when the
  command names none; for an amend, the mode the order was placed with).
- Amend: ``qty`` is the new total; it must exceed the filled quantity. Same
  price and a lower total keeps priority; anything else re-queues at the back
  and, if the new price crosses, trades at once as the taker.
- GTD orders expire (``OrderExpired``) when a command's ``ts_ns`` reaches their
  ``expire_ns``; expiries are processed before that command, oldest expiry
  first (ties by order id). ``expire_ns`` must be a positive time after the order's ``ts_ns``.
- Client order ids that are live, or finished and still remembered, are
  duplicates. A finished order is remembered iff it is among its client's
  ``dedupe_per_client`` most recently finished orders and among the
  ``dedupe_window`` most recent of those: :func:`dedupe_window` recomputes that
  from the whole history of finished orders after every finish.
- Clear: a ``cleared`` event (operator, note, number of open orders) comes
  first, also on an empty book, then every resting order is canceled
  ``cleared`` in priority order.
- Halt: while halted, every place and every amend is rejected
  ``instrument_halted`` before any other check (an amend carries the order id
  it named, a place none); cancels, cancel-all, clear and expiry go on. Halting
  a halted instrument is rejected ``instrument_halted``, resuming a trading one
  ``not_halted`` (``command`` "halt"/"resume", no client order id).
- Validation order of a place (first failing check wins): enums (``malformed``),
  ids (``malformed``), quantity, limit price, market+GTC/GTD, post-only
  combination, GTD expiry, expiry without GTD, duplicate live, duplicate
  finished. A duplicate's rejection carries the original order's id.

Balances (``Instrument.balances``), from the rules in :mod:`exchange.core.balances`' docstring, written
again here without importing it (or the engine):

- Every client has, per asset (base in lots, quote in quote units of tick x lot), an available and a
  reserved amount (a plain ``[available, reserved]`` list); the venue's fees account is one integer
  of quote. An account that holds nothing reads as zeros.
- A fee is ``ceil(notional * bps / 10000)`` (exact, with :class:`~fractions.Fraction`) of a fill's
  notional ``price * lots``, by role: the maker's fee to the maker, the taker's to the taker. The buyer
  pays notional + its fee, the seller receives notional - its fee, the venue gets both fees.
- On accept a sell holds its quantity of base; a limit buy holds ``qty * rate`` of quote with
  ``rate = price + ceil(price * max(maker, taker, 0) / 10000)``; a market buy holds its ``funds`` (a
  budget: it then buys, maker by maker, the most lots the budget still pays for, fees included, and
  stops at the first maker it cannot afford a lot of, before self-trade prevention looks at that
  maker; a FOK is fillable only if the budget pays for all of it, as the trial on a copy finds), or
  else ``qty`` at the rate of the price band's limit price (the largest whole tick inside the band); it
  holds nothing when the opposite side is
  empty, and without a band (and a non-empty opposite side) it is rejected ``invalid_order``. Not
  enough available: ``insufficient_funds`` (checked after ``post_only_would_trade``). ``funds`` on
  anything but a market buy on an instrument with balances is ``invalid_order``; a budget that is not
  a positive integer up to ``MAX_AMOUNT_UNITS`` is ``invalid_amount``.
- A fill of ``q`` lots takes ``q * rate`` from the buy order's reservation (a budget: exactly what the
  fill costs), spends the cost and makes the rest available at once; the buyer gets ``q`` lots of
  base; the seller's reservation gives ``q`` lots and it receives its proceeds. A budget's unspent
  rest goes back when the order ends: with the fill that completes its quantity, else with the
  cancellation of its remainder.
- An order that ends unfilled (cancel, cancel-all, clear, expiry, IOC / FOK remainder, self-trade
  prevention) releases ``remaining * rate``. An amend holds ``new_remaining * new_rate -
  remaining * rate`` more (a new price takes a fresh rate, the same price keeps the order's), or
  releases it when negative; when the client does not have it available, the amend is rejected
  ``insufficient_funds`` (checked after ``post_only_would_trade``, as for a place) and nothing changes.
- Deposits and withdrawals: ``balances_disabled``, ``malformed`` (empty client or transfer id),
  ``unknown_asset``, ``invalid_amount``, ``duplicate_transfer_id`` in that order, none of them
  remembered; then a withdrawal larger than the available amount is refused ``insufficient_funds``
  and remembered, and an applied transfer is remembered. A withdrawal never touches reserved amounts.
- Events: ``reserved``/``funds``/``released``/fees as above; ``balances`` lists the resulting
  ``(client, asset, available, reserved)`` of what the event changed: the order's asset (quote for a
  buy, base for a sell) for accepts, amends, cancels and expiries; for a fill the buyer's base and
  quote, then the seller's (once if they are the same client), then the fees account ``("", quote,
  fees, 0)``; for a transfer the asset moved.

Stop, stop-limit and iceberg orders (issue 21), from the rules written down for them (the design note
and the docstrings of :mod:`exchange.core.commands` and :mod:`exchange.core.events`), again without
the engine's code:

- A stop (``stop`` or ``stop_limit``, with ``stop_price_ticks``) waits in a plain list of its own, never
  in the book. Validation adds, after the limit price check: a stop type needs a stop price in
  ``1..max_price`` (``invalid_price``), any other type must not name one (``invalid_order``); then
  market + GTC/GTD, a ``stop`` with IOC/FOK, post-only on anything but a GTC/GTD limit, a display
  quantity on anything but a limit (all ``invalid_order``), a display quantity outside
  ``min_qty..qty`` (``invalid_quantity``); then expiry and duplicates as before. A stop whose
  condition the last trade price already meets (buy: last >= stop, sell: last <= stop; never while no
  trade has happened, last 0) is rejected ``stop_would_trigger``, before anything about money.
- With balances a waiting stop holds what the order it becomes needs: a stop-limit as a limit at its
  price, a stop sell its quantity of base, a stop buy its ``funds`` (which it must name:
  ``invalid_order`` otherwise; a budget on any other stop is ``invalid_order`` as on any other order).
- The last trade price is the price of the last fill of a command (cascade included). After a command
  that traded, each of its trades in turn (and then each trade of the orders triggered by it, in the
  same way, behind them) reaches the waiting stops its price meets: buy stops in ascending stop
  price, then sell stops in descending stop price (the design leaves the order between the two sides
  for one trade open; buys first is the engine's), ties by priority (the seq of the accept or of the
  last requeuing amend). Reached stops leave the waiting list at once and fire one by one: a
  ``triggered`` event (its seq is the order's priority if it rests), then the order trades as a new
  taker would: a ``stop`` as a market IOC order (band from the book as it is then), a ``stop_limit``
  as a limit at its price with its time in force (FOK decided on a copy, GTC/GTD rest).
- Waiting stops are canceled (by cancel, cancel-all in order id order with the book's orders, clear
  after the book's orders in order id order, counted in ``cleared``), expire (GTD, with the book's
  orders in (expiry, order id) order), and are amended: stop price, a stop-limit's price, quantity
  (a price for a ``stop`` is ``invalid_amend``); checks: nothing named (``invalid_amend``), price for a
  stop, stop price range, price range, quantity range, no change, ``stop_would_trigger`` for the new
  stop price, then money (a new rate at the new price; a budget does not change); a new stop price
  or price or a larger quantity takes the amend's seq as priority. The ``amended`` event names the
  stop price after the amend (0 for non-stops); an amend naming a stop price for an order in the
  book is ``invalid_amend`` (before any other check).
- An iceberg is a limit order with ``display_qty_lots``: ``remaining`` is all it has open,
  ``hidden`` the part that does not show, so what shows is ``remaining - hidden`` (at most the
  display quantity). As a taker it uses all of it. A maker whose shown part is filled to 0 with some
  hidden left shows ``min(display, hidden)`` more, announced by a ``replenished`` event right after
  that fill, and goes to the back of its level with that event's seq as priority; the fill's
  ``maker_remaining_lots`` is what is left of the shown part. Cancel, expiry, clear and self-trade
  prevention take all that is open. An amend works on the total: a lower one takes hidden lots
  first, then shown ones, and keeps the place; a requeuing one reports ``hidden_lots`` = open -
  min(display, open), trades with all that is open, and rests showing min(display, what is left).
  FOK and self-trade prevention see hidden quantity exactly as the match on the copy takes it.

Rejection ``text`` is free-form prose: the reference leaves it empty and the
tests compare rejections with the text blanked out.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from exchange.core.commands import (
    AmendOrder,
    CancelAll,
    CancelOrder,
    ClearBook,
    Deposit,
    HaltInstrument,
    PlaceOrder,
    RejectInput,
    ResumeInstrument,
    Withdraw,
)
from exchange.core.events import (
    BookCleared,
    Deposited,
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
from exchange.core.instruments import MAX_AMOUNT_UNITS
from exchange.core.types import CancelReason, OrderType, RejectReason, Side, StpMode, TimeInForce

__all__ = ["RefOrder", "RefStop", "ReferenceBook", "dedupe_window"]


def dedupe_window(history: list[tuple[str, str, int]], size: int, per_client: int) -> list[tuple[str, str, int]]:
    """The remembered entries of a history of finished orders (oldest first), straight from the rule.

    First the orders among their client's ``per_client`` most recently finished, then the ``size``
    most recent of those.
    """
    if size <= 0:
        return []
    recent_for_client = [e for i, e in enumerate(history)
                         if sum(1 for later in history[i + 1:] if later[0] == e[0]) < per_client]
    return recent_for_client[-size:]


@dataclass
class RefOrder:
    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    price: int
    qty: int  # total: filled + open
    remaining: int  # open
    arrival: int  # queue position counter: larger = later
    gtd: bool
    expire_ns: int
    post_only: bool
    stp: StpMode
    rate: int = 0  # balances: what each open lot holds (a buy: quote units; a sell: 1 lot of base)
    priority: int = 0  # the seq of the event that queued it (accept, requeuing amend, trigger, replenish)
    display: int = 0  # an iceberg's slice size (0: not an iceberg)
    hidden: int = 0  # an iceberg's open lots that do not show

    @property
    def shown(self) -> int:
        return self.remaining - self.hidden


@dataclass
class RefStop:
    """A waiting stop or stop-limit order (never in the book)."""

    order_id: int
    client_id: str
    client_order_id: str
    side: Side
    otype: OrderType
    stop: int
    price: int  # a stop-limit's limit; 0 for a stop
    qty: int
    priority: int
    tif: TimeInForce
    expire_ns: int
    stp: StpMode
    rate: int = 0  # balances: what each lot holds (0 for a stop buy: its funds hold)
    funds: int = 0

    @property
    def remaining(self) -> int:  # (nothing of a waiting stop has filled)
        return self.qty

    def reached(self, price: int) -> bool:
        return _reaches(self.side, self.stop, price)


def _reaches(side: Side, stop: int, price: int) -> bool:
    """Does a trade at ``price`` meet the condition of a ``side`` stop at ``stop``?"""
    return price >= stop if side == Side.BUY else price <= stop


def _enum(enum: type[Any], value: object) -> Any:
    try:
        return enum(value)
    except ValueError:
        return None


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is not a quantity


def _command_name(cmd: object) -> str:
    if isinstance(cmd, RejectInput):
        return cmd.command
    if isinstance(cmd, PlaceOrder):
        return "place"
    if isinstance(cmd, CancelOrder):
        return "cancel"
    if isinstance(cmd, AmendOrder):
        return "amend"
    if isinstance(cmd, CancelAll):
        return "cancel_all"
    if isinstance(cmd, ClearBook):
        return "clear"
    if isinstance(cmd, HaltInstrument):
        return "halt"
    if isinstance(cmd, ResumeInstrument):
        return "resume"
    if isinstance(cmd, Deposit):
        return "deposit"
    if isinstance(cmd, Withdraw):
        return "withdraw"
    return "unknown"


class ReferenceBook:
    """One instrument's book, the slow and obvious way."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.symbol: str = spec.symbol
        self.bids: list[RefOrder] = []
        self.asks: list[RefOrder] = []
        self.seq = 0
        self.next_order_id = 1
        self.next_trade_id = 1
        self.arrivals = 0
        self.finished: list[tuple[str, str, int]] = []  # every finished order, in finish order
        self._done: tuple[int, list[tuple[str, str, int]]] = (0, [])  # (len(finished), dedupe_window(finished))
        self.events: list[Any] = []
        self.ts = 0
        self.halted = False
        # balances
        self.balances: bool = bool(spec.balances)
        self.base: str = spec.base_asset
        self.quote: str = spec.quote_asset
        self.wallets: dict[str, dict[str, list[int]]] = {}  # client -> asset -> [available, reserved]
        self.fees = 0  # the venue's fees account, in quote units
        self.deposited: dict[str, int] = {spec.base_asset: 0, spec.quote_asset: 0}  # deposits - withdrawals
        self.transfers: dict[str, int] = {}  # transfer id -> seq of the event that decided it
        self.budget = 0  # what the incoming market buy's budget has left, while it trades
        # order types
        self.stops: list[RefStop] = []  # the waiting stops, in no particular order
        self.last_price = 0  # the price of the last fill (0: nothing ever traded)
        self.trades: list[tuple[int, int]] = []  # (trade id, price) of the current command's fills

    # ------------------------------------------------------------ queries

    def _sort(self) -> None:
        self.bids.sort(key=lambda o: (-o.price, o.arrival))
        self.asks.sort(key=lambda o: (o.price, o.arrival))

    def orders(self) -> list[RefOrder]:
        """Every resting order: bids best first, then asks best first, FIFO within a price."""
        self._sort()
        return [*self.bids, *self.asks]

    def side_list(self, side: Side) -> list[RefOrder]:
        self._sort()
        return self.bids if side == Side.BUY else self.asks

    def opposite(self, side: Side) -> list[RefOrder]:
        return self.side_list(Side.SELL if side == Side.BUY else Side.BUY)

    def everything(self) -> list[RefOrder | RefStop]:
        """Every open order: the book's, then the waiting stops (by order id)."""
        return [*self.orders(), *sorted(self.stops, key=lambda s: s.order_id)]

    def live(self, client: str, coid: str) -> RefOrder | RefStop | None:
        for o in self.everything():
            if o.client_id == client and o.client_order_id == coid:
                return o
        return None

    def by_id(self, oid: object) -> RefOrder | RefStop | None:
        for o in self.everything():
            if o.order_id == oid:
                return o
        return None

    def in_done(self, client: str, coid: str) -> bool:
        return self.done_id(client, coid) is not None

    def done_id(self, client: str, coid: str) -> int | None:
        for c, k, oid in self.done:
            if c == client and k == coid:
                return oid
        return None

    # ------------------------------------------------------------ balances

    def wallet(self, client: str, asset: str) -> list[int]:
        """``[available, reserved]`` of ``client`` in ``asset`` (created empty on first use)."""
        return self.wallets.setdefault(client, {}).setdefault(asset, [0, 0])

    def balance(self, client: str, asset: str) -> tuple[str, str, int, int]:
        available, reserved = self.wallet(client, asset)
        return (client, asset, available, reserved)

    def asset_of(self, side: Side) -> str:
        """What an order of ``side`` holds: quote to buy, base to sell."""
        return self.quote if side == Side.BUY else self.base

    def fee(self, notional: int, bps: int) -> int:
        return math.ceil(Fraction(notional * bps, 10_000))

    def rate(self, side: Side, price: int) -> int:
        """What one lot of an order holds: a lot of base to sell; to buy, its price and the largest fee."""
        if side == Side.SELL:
            return 1
        return price + self.fee(price, max(self.spec.maker_fee_bps, self.spec.taker_fee_bps, 0))

    def move(self, client: str, asset: str, amount: int) -> None:
        """Available -> reserved (``amount`` > 0) or back (``amount`` < 0)."""
        w = self.wallet(client, asset)
        w[0] -= amount
        w[1] += amount

    def accounts_image(self) -> list[tuple[str, int, int, int, int]]:
        """``(client, base available, base reserved, quote available, quote reserved)`` of every client holding
        something, sorted: what ``EngineState.accounts`` must be."""
        out = []
        for client in sorted(self.wallets):
            b, q = self.wallet(client, self.base), self.wallet(client, self.quote)
            if any((*b, *q)):
                out.append((client, b[0], b[1], q[0], q[1]))
        return out

    def _settle(self, maker: RefOrder, taker_side: Side, taker_client: str, taker_rate: int, budget: bool,
                price: int, lots: int) -> dict[str, Any]:
        """Move the money of one fill; returns its fees as the fill event's fields."""
        spec = self.spec
        buyer, seller = (taker_client, maker.client_id) if taker_side == Side.BUY else (maker.client_id,
                                                                                           taker_client)
        notional = price * lots
        maker_fee, taker_fee = self.fee(notional, spec.maker_fee_bps), self.fee(notional, spec.taker_fee_bps)
        buyer_fee = taker_fee if taker_side == Side.BUY else maker_fee
        seller_fee = maker_fee if taker_side == Side.BUY else taker_fee
        cost = notional + buyer_fee
        if taker_side == Side.BUY and budget:
            given_up = cost
            self.budget -= cost
        else:
            given_up = lots * (taker_rate if taker_side == Side.BUY else maker.rate)
        bq = self.wallet(buyer, self.quote)
        bq[1] -= given_up
        bq[0] += given_up - cost
        self.wallet(buyer, self.base)[0] += lots
        sb = self.wallet(seller, self.base)
        sb[1] -= lots
        self.wallet(seller, self.quote)[0] += notional - seller_fee
        self.fees += maker_fee + taker_fee
        return {"maker_fee": maker_fee, "taker_fee": taker_fee}

    def _fill_balances(self, buyer: str, seller: str) -> list[tuple[str, str, int, int]]:
        out = []
        for client in dict.fromkeys((buyer, seller)):
            out += [self.balance(client, self.base), self.balance(client, self.quote)]
        return [*out, ("", self.quote, self.fees, 0)]

    def held(self, order: RefOrder | RefStop) -> int:
        """What an open order holds: its open lots at its rate, or a waiting stop buy's budget."""
        if isinstance(order, RefStop) and order.funds:
            return order.funds
        return order.remaining * order.rate

    def _released(self, order: RefOrder | RefStop, left: int) -> dict[str, Any]:
        """Release what ``left`` open lots of a resting ``order`` (or all of a waiting stop) hold; the event's
        balance fields."""
        if not self.balances:
            return {}
        asset = self.asset_of(order.side)
        amount = self.held(order) if isinstance(order, RefStop) else left * order.rate
        self.move(order.client_id, asset, -amount)
        return {"released": amount, "balances": [self.balance(order.client_id, asset)]}

    # ------------------------------------------------------------ mutation helpers

    def _emit(self, cls: type[Any], **fields: Any) -> None:
        self.seq += 1
        self.events.append(cls(instrument=self.symbol, seq=self.seq, ts_ns=self.ts, **fields))

    def _reject(self, client: str, coid: str | None, oid: int | None, command: str, reason: RejectReason,
                transfer_id: str = "") -> None:
        self._emit(OrderRejected, client_id=client, client_order_id=coid, order_id=oid, command=command,
                   reason=reason, text="", transfer_id=transfer_id)

    def _remember(self, client: str, coid: str, oid: int) -> None:
        self.finished.append((client, coid, oid))

    @property
    def done(self) -> list[tuple[str, str, int]]:
        """The remembered finished orders, oldest first (recomputed from the whole history when it grew)."""
        if self._done[0] != len(self.finished):
            self._done = (len(self.finished), dedupe_window(self.finished, self.spec.dedupe_window,
                                                            self.spec.dedupe_per_client))
        return self._done[1]

    def _take_out(self, order: RefOrder | RefStop) -> None:
        lst: list[Any] = self.bids if order.side == Side.BUY else self.asks
        if isinstance(order, RefStop):
            lst = self.stops
        for i, o in enumerate(lst):
            if o is order:
                del lst[i]
                return
        raise AssertionError(f"reference lost {order}")

    def _queue(self, order: RefOrder) -> None:
        self.arrivals += 1
        order.arrival = self.arrivals
        (self.bids if order.side == Side.BUY else self.asks).append(order)

    def _acceptable(self, side: Side, limit: Fraction | None) -> Any:
        """Predicate on a maker price: may an incoming order of ``side`` with this limit trade there?

        ``limit`` None means no price limit at all.
        """
        if limit is None:
            return lambda p: True
        if side == Side.BUY:
            return lambda p: p <= limit
        return lambda p: p >= limit

    # ------------------------------------------------------------ API

    def apply(self, cmd: Any) -> list[Any]:
        self.events = []
        self.trades = []
        self.ts = cmd.ts_ns
        self._expire()
        instrument = cmd.instrument
        if instrument is not None and instrument != self.symbol:
            self._reject(getattr(cmd, "client_id", ""), getattr(cmd, "client_order_id", None), None,
                         _command_name(cmd), RejectReason.UNKNOWN_INSTRUMENT)
            return self.events
        if isinstance(cmd, PlaceOrder | AmendOrder) and self.halted:
            self._reject(cmd.client_id, cmd.client_order_id, getattr(cmd, "order_id", None),
                         _command_name(cmd), RejectReason.INSTRUMENT_HALTED)
        elif isinstance(cmd, PlaceOrder):
            self._place(cmd)
        elif isinstance(cmd, CancelOrder):
            self._cancel(cmd)
        elif isinstance(cmd, AmendOrder):
            self._amend(cmd)
        elif isinstance(cmd, HaltInstrument | ResumeInstrument):
            halting = isinstance(cmd, HaltInstrument)
            if self.halted == halting:
                self._reject(cmd.client_id, None, None, _command_name(cmd),
                             RejectReason.INSTRUMENT_HALTED if halting else RejectReason.NOT_HALTED)
            else:
                self.halted = halting
                self._emit(InstrumentHalted if halting else InstrumentResumed, client_id=cmd.client_id,
                           text=cmd.text)
        elif isinstance(cmd, CancelAll):
            self._cancel_all(cmd)
        elif isinstance(cmd, ClearBook):
            self._clear(cmd)
        elif isinstance(cmd, Deposit | Withdraw):
            self._transfer(cmd)
        elif isinstance(cmd, RejectInput):
            self._emit(OrderRejected, client_id=cmd.client_id, client_order_id=cmd.client_order_id, order_id=None,
                       command=cmd.command, reason=cmd.reason, text="", transfer_id=cmd.transfer_id)
        else:
            raise TypeError(cmd)
        self._trigger()
        return self.events

    # ------------------------------------------------------------ stops

    def _trigger(self) -> None:
        """Fire the waiting stops the command's trades reached, trade by trade, until no trade reaches any."""
        queue: list[tuple[RefStop, int, int]] = []
        looked = 0  # trades looked at so far
        while True:
            for trade_id, price in self.trades[looked:]:
                buys = sorted((s for s in self.stops if s.side == Side.BUY and s.reached(price)),
                              key=lambda s: (s.stop, s.priority))
                sells = sorted((s for s in self.stops if s.side == Side.SELL and s.reached(price)),
                               key=lambda s: (-s.stop, s.priority))
                for s in [*buys, *sells]:
                    self._take_out(s)
                    queue.append((s, trade_id, price))
            looked = len(self.trades)
            if not queue:
                break
            self._fire(*queue.pop(0))
        if self.trades:
            self.last_price = self.trades[-1][1]

    def _fire(self, stop: RefStop, trade_id: int, price: int) -> None:
        """A reached stop becomes a taker: a market IOC order (``stop``) or a limit at its price with its time in
        force (``stop_limit``)."""
        self._emit(OrderTriggered, order_id=stop.order_id, client_id=stop.client_id,
                   client_order_id=stop.client_order_id, side=stop.side, order_type=stop.otype,
                   stop_price_ticks=stop.stop, price_ticks=stop.price, qty_lots=stop.qty, trade_id=trade_id,
                   trigger_price_ticks=price)
        priority = self.seq
        if stop.otype == OrderType.STOP:
            tif = TimeInForce.IOC
            can_trade, limit = self._market_limit(stop.side)
        else:
            tif = stop.tif
            can_trade, limit = True, Fraction(stop.price)
        ok = self._acceptable(stop.side, limit)
        opp = self.opposite(stop.side)
        crosses = can_trade and bool(opp) and ok(opp[0].price)
        self.budget = stop.funds
        self._take(stop.order_id, stop.client_id, stop.client_order_id, stop.side, stop.price, stop.qty, tif,
                   stop.stp, stop.rate, stop.funds > 0, ok, crosses, stop.expire_ns, False, 0, priority)

    # ------------------------------------------------------------ expiry

    def _expire(self) -> None:
        due: list[RefOrder | RefStop] = [o for o in self.orders() if o.gtd and o.expire_ns <= self.ts]
        due += [s for s in self.stops if s.tif == TimeInForce.GTD and s.expire_ns <= self.ts]
        due.sort(key=lambda o: (o.expire_ns, o.order_id))
        for o in due:
            self._take_out(o)
            self._emit(OrderExpired, order_id=o.order_id, client_id=o.client_id, client_order_id=o.client_order_id,
                       side=o.side, price_ticks=o.price, expired_lots=o.remaining, **self._released(o, o.remaining))
            self._remember(o.client_id, o.client_order_id, o.order_id)

    # ------------------------------------------------------------ place

    def _place_error(self, cmd: PlaceOrder) -> RejectReason | None:
        spec = self.spec
        side, otype, tif = _enum(Side, cmd.side), _enum(OrderType, cmd.order_type), _enum(TimeInForce, cmd.tif)
        stp = _enum(StpMode, spec.stp_default if cmd.stp is None else cmd.stp)
        if side is None or otype is None or tif is None or stp is None:
            return RejectReason.MALFORMED
        for ident in (cmd.client_id, cmd.client_order_id):
            if not isinstance(ident, str) or ident == "":
                return RejectReason.MALFORMED
        if not _is_int(cmd.qty_lots) or not spec.min_qty_lots <= cmd.qty_lots <= spec.max_qty_lots:
            return RejectReason.INVALID_QUANTITY
        stops = (OrderType.STOP, OrderType.STOP_LIMIT)
        if otype in (OrderType.LIMIT, OrderType.STOP_LIMIT) and (
                not _is_int(cmd.price_ticks) or not 0 < cmd.price_ticks <= spec.max_price_ticks):
            return RejectReason.INVALID_PRICE
        if otype in stops and (not _is_int(cmd.stop_price_ticks)
                               or not 0 < cmd.stop_price_ticks <= spec.max_price_ticks):
            return RejectReason.INVALID_PRICE
        if otype not in stops and cmd.stop_price_ticks != 0:
            return RejectReason.INVALID_ORDER
        if otype == OrderType.MARKET and tif in (TimeInForce.GTC, TimeInForce.GTD):
            return RejectReason.INVALID_ORDER
        if otype == OrderType.STOP and tif in (TimeInForce.IOC, TimeInForce.FOK):
            return RejectReason.INVALID_ORDER  # a stop waits: GTC or GTD; triggered it is IOC anyway
        if cmd.post_only and (otype != OrderType.LIMIT or tif not in (TimeInForce.GTC, TimeInForce.GTD)):
            return RejectReason.INVALID_ORDER
        display = cmd.display_qty_lots
        if display != 0 and otype != OrderType.LIMIT:
            return RejectReason.INVALID_ORDER
        if display != 0 and (not _is_int(display) or not spec.min_qty_lots <= display <= cmd.qty_lots):
            return RejectReason.INVALID_QUANTITY
        if tif == TimeInForce.GTD and (not _is_int(cmd.expire_ns) or cmd.expire_ns <= cmd.ts_ns or cmd.expire_ns <= 0):
            return RejectReason.INVALID_EXPIRY
        if tif != TimeInForce.GTD and cmd.expire_ns != 0:
            return RejectReason.INVALID_EXPIRY
        if self.live(cmd.client_id, cmd.client_order_id) is not None:
            return RejectReason.DUPLICATE_CLIENT_ORDER_ID
        if self.in_done(cmd.client_id, cmd.client_order_id):
            return RejectReason.DUPLICATE_CLIENT_ORDER_ID
        return None

    def _market_limit(self, side: Side) -> tuple[bool, Fraction | None]:
        """(can trade at all, price limit or None for unlimited) of a market order arriving now."""
        opp = self.opposite(side)
        if not opp:
            return False, None
        bps = self.spec.price_band_bps
        if bps is None:
            return True, None
        best = opp[0].price
        if side == Side.BUY:
            return True, Fraction(best) * (10_000 + bps) / 10_000
        return True, Fraction(best) * (10_000 - bps) / 10_000

    def _place(self, cmd: PlaceOrder) -> None:
        error = self._place_error(cmd)
        client, coid = cmd.client_id, cmd.client_order_id
        if error is not None:
            original = None
            if error == RejectReason.DUPLICATE_CLIENT_ORDER_ID:  # the rejection names the original order
                live = self.live(client, coid)
                original = live.order_id if live is not None else self.done_id(client, coid)
            self._reject(client, coid, original, "place", error)
            return
        side, otype, tif = Side(cmd.side), OrderType(cmd.order_type), TimeInForce(cmd.tif)
        stp = StpMode(self.spec.stp_default if cmd.stp is None else cmd.stp)
        qty = cmd.qty_lots
        if otype in (OrderType.STOP, OrderType.STOP_LIMIT):
            self._place_stop(cmd, side, otype, tif, stp)
            return
        if otype == OrderType.LIMIT:
            price = cmd.price_ticks
            can_trade, limit = True, Fraction(price)
        else:
            price = 0
            can_trade, limit = self._market_limit(side)
        ok = self._acceptable(side, limit)
        opp = self.opposite(side)
        crosses = can_trade and bool(opp) and ok(opp[0].price)
        if cmd.post_only and crosses:
            self._reject(client, coid, None, "place", RejectReason.POST_ONLY_WOULD_TRADE)
            return
        holds = self._holds(cmd, side, otype, price, can_trade, limit)
        if isinstance(holds, RejectReason):
            self._reject(client, coid, None, "place", holds)
            return
        held, rate, budget = holds

        oid = self.next_order_id
        self.next_order_id += 1
        money: dict[str, Any] = {}
        if self.balances:
            asset = self.asset_of(side)
            self.move(client, asset, held)
            self.budget = cmd.funds if budget else 0
            money = {"reserved": held, "funds": cmd.funds, "balances": [self.balance(client, asset)]}
        self._emit(OrderAccepted, order_id=oid, client_id=client, client_order_id=coid, side=side, order_type=otype,
                   price_ticks=price, qty_lots=qty, tif=tif, post_only=cmd.post_only, stp=stp,
                   expire_ns=cmd.expire_ns, display_qty_lots=cmd.display_qty_lots, **money)
        self._take(oid, client, coid, side, price, qty, tif, stp, rate, budget, ok, crosses, cmd.expire_ns,
                   cmd.post_only, cmd.display_qty_lots, self.seq)

    def _take(self, oid: int, client: str, coid: str, side: Side, price: int, qty: int, tif: TimeInForce,
              stp: StpMode, rate: int, budget: bool, ok: Any, crosses: bool, expire_ns: int, post_only: bool,
              display: int, priority: int) -> None:
        """An incoming order (just accepted, or a stop just triggered) trades as far as it may, then rests (GTC,
        GTD: an iceberg showing its first slice) with ``priority``, or the rest of it is canceled."""

        def cancel_incoming(left: int, reason: CancelReason) -> None:
            money: dict[str, Any] = {}
            if self.balances:  # what the order still holds goes back
                released = self.budget if budget else left * rate
                self.budget = 0
                self.move(client, self.asset_of(side), -released)
                money = {"released": released, "balances": [self.balance(client, self.asset_of(side))]}
            self._emit(OrderCanceled, order_id=oid, client_id=client, client_order_id=coid, side=side,
                       price_ticks=price, canceled_lots=left, reason=reason, **money)

        if tif == TimeInForce.FOK:
            fillable = False
            if crosses:
                trial = copy.deepcopy(self)
                left, _ = trial._match(oid, client, coid, side, ok, qty, stp, rate, budget)
                fillable = left == 0
            if not fillable:
                cancel_incoming(qty, CancelReason.FOK_UNFILLED)
                self._remember(client, coid, oid)
                return

        remaining, stopped = qty, False
        if crosses:
            remaining, stopped = self._match(oid, client, coid, side, ok, qty, stp, rate, budget)
        if remaining and stopped:
            cancel_incoming(remaining, CancelReason.SELF_TRADE)
        elif remaining and tif in (TimeInForce.GTC, TimeInForce.GTD):
            hidden = remaining - min(display, remaining) if display else 0
            self._queue(RefOrder(oid, client, coid, side, price, qty, remaining, 0, tif == TimeInForce.GTD,
                                 expire_ns, post_only, stp, rate, priority, display, hidden))
            return
        elif remaining:
            cancel_incoming(remaining, CancelReason.IOC_REMAINDER)
        self._remember(client, coid, oid)

    def _holds(self, cmd: PlaceOrder, side: Side, otype: OrderType, price: int, can_trade: bool,
               limit: Fraction | None) -> tuple[int, int, bool] | RejectReason:
        """``(held, rate, budget)`` of an order about to be accepted, or why it is refused."""
        funds = cmd.funds
        market_buy = otype == OrderType.MARKET and side == Side.BUY
        stop_buy = otype == OrderType.STOP and side == Side.BUY
        if funds != 0 and not (self.balances and (market_buy or stop_buy)):
            return RejectReason.INVALID_ORDER
        if funds != 0 and (not _is_int(funds) or not 0 < funds <= MAX_AMOUNT_UNITS):
            return RejectReason.INVALID_AMOUNT
        if not self.balances:
            return 0, 0, False
        if funds:
            held, rate, budget = funds, 0, True
        elif stop_buy:
            return RejectReason.INVALID_ORDER  # it waits holding its budget: it must name one
        elif market_buy and not can_trade:  # nothing to buy: nothing to hold
            held, rate, budget = 0, 0, False
        elif market_buy and limit is None:
            return RejectReason.INVALID_ORDER  # no band: a market buy must name its budget
        else:
            if market_buy:  # at the band's limit: its highest whole tick
                assert limit is not None
                price = math.floor(limit)
            rate = self.rate(side, price)
            held, budget = cmd.qty_lots * rate, False
        if held > self.wallet(cmd.client_id, self.asset_of(side))[0]:
            return RejectReason.INSUFFICIENT_FUNDS
        return held, rate, budget

    def _place_stop(self, cmd: PlaceOrder, side: Side, otype: OrderType, tif: TimeInForce, stp: StpMode) -> None:
        """A valid stop or stop-limit order: it waits (unless the last trade already meets its stop price)."""
        client, coid, stop = cmd.client_id, cmd.client_order_id, cmd.stop_price_ticks
        price = cmd.price_ticks if otype == OrderType.STOP_LIMIT else 0
        order = RefStop(self.next_order_id, client, coid, side, otype, stop, price, cmd.qty_lots, 0, tif,
                        cmd.expire_ns, stp)
        if self.last_price and order.reached(self.last_price):
            self._reject(client, coid, None, "place", RejectReason.STOP_WOULD_TRIGGER)
            return
        holds = self._holds(cmd, side, otype, price, True, None)
        if isinstance(holds, RejectReason):
            self._reject(client, coid, None, "place", holds)
            return
        held, order.rate, _ = holds
        order.funds = cmd.funds
        self.next_order_id += 1
        money: dict[str, Any] = {}
        if self.balances:
            asset = self.asset_of(side)
            self.move(client, asset, held)
            money = {"reserved": held, "funds": cmd.funds, "balances": [self.balance(client, asset)]}
        self._emit(OrderAccepted, order_id=order.order_id, client_id=client, client_order_id=coid, side=side,
                   order_type=otype, price_ticks=price, qty_lots=cmd.qty_lots, tif=tif, post_only=False, stp=stp,
                   expire_ns=cmd.expire_ns, stop_price_ticks=stop, **money)
        order.priority = self.seq
        self.stops.append(order)

    def _affordable(self, price: int, lots: int) -> int:
        """The most of ``lots`` at ``price`` the incoming buy's budget pays for, its taker fee included."""
        while lots and price * lots + self.fee(price * lots, self.spec.taker_fee_bps) > self.budget:
            lots -= 1
        return lots

    def _match(self, oid: int, client: str, coid: str, side: Side, ok: Any, remaining: int,
               stp: StpMode, rate: int = 0, budget: bool = False) -> tuple[int, bool]:
        """Trade ``remaining`` of an incoming order against the opposite side; (left, stopped by STP).

        With balances ``rate`` is what each lot of the incoming order holds, unless it is a market buy with a
        ``budget`` (``self.budget``)."""
        while remaining > 0:
            opp = self.opposite(side)
            if not opp or not ok(opp[0].price):
                break
            maker = opp[0]
            if budget and not self._affordable(maker.price, 1):  # spent: the order stops, before anything else
                break
            if stp != StpMode.NONE and maker.client_id == client:
                if stp == StpMode.CANCEL_INCOMING:
                    return remaining, True
                self._take_out(maker)
                self._emit(OrderCanceled, order_id=maker.order_id, client_id=maker.client_id,
                           client_order_id=maker.client_order_id, side=maker.side, price_ticks=maker.price,
                           canceled_lots=maker.remaining, reason=CancelReason.SELF_TRADE,
                           **self._released(maker, maker.remaining))
                self._remember(maker.client_id, maker.client_order_id, maker.order_id)
                if stp == StpMode.CANCEL_BOTH:
                    return remaining, True
                continue
            fill = min(remaining, maker.shown)  # an iceberg's hidden lots wait for their slice
            if budget:
                fill = self._affordable(maker.price, fill)
                if not fill:  # the budget does not buy one more lot: the order stops here
                    break
            maker.remaining -= fill
            remaining -= fill
            money: dict[str, Any] = {}
            if self.balances:
                money = self._settle(maker, side, client, rate, budget, maker.price, fill)
                if budget and not remaining and self.budget:  # complete: the rest of the budget goes back
                    self.move(client, self.quote, -self.budget)
                    self.budget = 0
                buyer, seller = (client, maker.client_id) if side == Side.BUY else (maker.client_id, client)
                money["balances"] = self._fill_balances(buyer, seller)
            tid = self.next_trade_id
            self.next_trade_id += 1
            self._emit(OrderFilled, trade_id=tid, price_ticks=maker.price, qty_lots=fill, aggressor_side=side,
                       maker_order_id=maker.order_id, maker_client_id=maker.client_id,
                       maker_client_order_id=maker.client_order_id, maker_remaining_lots=maker.shown,
                       taker_order_id=oid, taker_client_id=client, taker_client_order_id=coid,
                       taker_remaining_lots=remaining, **money)
            self.trades.append((tid, maker.price))
            if maker.remaining == 0:
                self._take_out(maker)
                self._remember(maker.client_id, maker.client_order_id, maker.order_id)
            elif maker.shown == 0:  # an iceberg's slice is gone: the next one goes to the back of the level
                maker.hidden -= min(maker.display, maker.hidden)
                self._emit(OrderReplenished, order_id=maker.order_id, client_id=maker.client_id,
                           client_order_id=maker.client_order_id, side=maker.side, price_ticks=maker.price,
                           shown_lots=maker.shown, hidden_lots=maker.hidden)
                maker.priority = self.seq
                self._take_out(maker)
                self._queue(maker)
        return remaining, False

    # ------------------------------------------------------------ cancel / amend

    def _find(self, client: str, coid: str | None, oid: int | None, command: str) -> RefOrder | RefStop | None:
        if coid is None and oid is None:
            self._reject(client, coid, oid, command, RejectReason.MALFORMED)
            return None
        if oid is not None:
            order = self.by_id(oid)
            reason = None
            if order is None:
                was_issued = _is_int(oid) and 1 <= oid < self.next_order_id
                reason = RejectReason.TOO_LATE if was_issued else RejectReason.UNKNOWN_ORDER
            elif order.client_id != client:
                reason = RejectReason.NOT_OWNER
            elif coid is not None and order.client_order_id != coid:
                reason = RejectReason.UNKNOWN_ORDER
            if reason is not None:
                self._reject(client, coid, oid, command, reason)
                return None
            return order
        assert coid is not None
        order = self.live(client, coid)
        if order is None:
            reason = RejectReason.TOO_LATE if self.in_done(client, coid) else RejectReason.UNKNOWN_ORDER
            self._reject(client, coid, oid, command, reason)
        return order

    def _cancel_order(self, order: RefOrder | RefStop, reason: CancelReason) -> None:
        self._take_out(order)
        self._emit(OrderCanceled, order_id=order.order_id, client_id=order.client_id,
                   client_order_id=order.client_order_id, side=order.side, price_ticks=order.price,
                   canceled_lots=order.remaining, reason=reason, **self._released(order, order.remaining))
        self._remember(order.client_id, order.client_order_id, order.order_id)

    def _cancel(self, cmd: CancelOrder) -> None:
        order = self._find(cmd.client_id, cmd.client_order_id, cmd.order_id, "cancel")
        if order is not None:
            self._cancel_order(order, CancelReason.REQUESTED)

    def _amend(self, cmd: AmendOrder) -> None:
        order = self._find(cmd.client_id, cmd.client_order_id, cmd.order_id, "amend")
        if order is None:
            return
        if isinstance(order, RefStop):
            self._amend_stop(cmd, order)
            return
        spec = self.spec
        new_price = order.price if cmd.price_ticks is None else cmd.price_ticks
        new_qty = order.qty if cmd.qty_lots is None else cmd.qty_lots
        filled = order.qty - order.remaining
        error = None
        if cmd.stop_price_ticks is not None:
            error = RejectReason.INVALID_AMEND  # only a waiting stop has a stop price
        elif cmd.price_ticks is None and cmd.qty_lots is None:
            error = RejectReason.INVALID_AMEND
        elif not _is_int(new_price) or not 0 < new_price <= spec.max_price_ticks:
            error = RejectReason.INVALID_PRICE
        elif not _is_int(new_qty) or not spec.min_qty_lots <= new_qty <= spec.max_qty_lots:
            error = RejectReason.INVALID_QUANTITY
        elif new_qty <= filled or (new_price == order.price and new_qty == order.qty):
            error = RejectReason.INVALID_AMEND  # must stay above the filled part; must change something
        ok = None
        crosses = False
        if error is None:
            ok = self._acceptable(order.side, Fraction(new_price))
            opp = self.opposite(order.side)
            crosses = bool(opp) and ok(opp[0].price)
            if order.post_only and crosses:
                error = RejectReason.POST_ONLY_WOULD_TRADE
        new_rate, delta = order.rate, 0
        if error is None and self.balances:
            new_rate = self.rate(order.side, new_price) if new_price != order.price else order.rate
            delta = (new_qty - filled) * new_rate - order.remaining * order.rate
            if delta > self.wallet(order.client_id, self.asset_of(order.side))[0]:
                error = RejectReason.INSUFFICIENT_FUNDS
        if error is not None:
            self._reject(order.client_id, order.client_order_id, order.order_id, "amend", error)
            return

        old_price, old_qty = order.price, order.qty
        remaining = new_qty - filled
        money: dict[str, Any] = {}
        if self.balances:  # hold the difference, or give it back
            asset = self.asset_of(order.side)
            self.move(order.client_id, asset, delta)
            order.rate = new_rate
            money = {"reserved": remaining * new_rate, "balances": [self.balance(order.client_id, asset)]}
        if new_price == old_price and new_qty < old_qty:
            order.hidden -= min(order.hidden, old_qty - new_qty)  # an iceberg gives up hidden lots first
            order.remaining = remaining
            order.qty = new_qty
            self._emit(OrderAmended, order_id=order.order_id, client_id=order.client_id,
                       client_order_id=order.client_order_id, side=order.side, old_price_ticks=old_price,
                       price_ticks=new_price, old_qty_lots=old_qty, qty_lots=new_qty, remaining_lots=order.remaining,
                       requeued=False, hidden_lots=order.hidden, **money)
            return

        self._take_out(order)
        would_hide = remaining - min(order.display, remaining) if order.display else 0
        self._emit(OrderAmended, order_id=order.order_id, client_id=order.client_id,
                   client_order_id=order.client_order_id, side=order.side, old_price_ticks=old_price,
                   price_ticks=new_price, old_qty_lots=old_qty, qty_lots=new_qty, remaining_lots=remaining,
                   requeued=True, hidden_lots=would_hide, **money)
        order.priority = self.seq
        stopped = False
        if crosses:  # as a taker it uses all it has open
            remaining, stopped = self._match(order.order_id, order.client_id, order.client_order_id, order.side, ok,
                                             remaining, order.stp, new_rate)
        order.price, order.qty, order.remaining = new_price, new_qty, remaining
        order.hidden = remaining - min(order.display, remaining) if order.display else 0
        if remaining and not stopped:
            self._queue(order)
            return
        if remaining:
            self._emit(OrderCanceled, order_id=order.order_id, client_id=order.client_id,
                       client_order_id=order.client_order_id, side=order.side, price_ticks=new_price,
                       canceled_lots=remaining, reason=CancelReason.SELF_TRADE, **self._released(order, remaining))
        self._remember(order.client_id, order.client_order_id, order.order_id)

    def _amend_stop(self, cmd: AmendOrder, order: RefStop) -> None:
        """A waiting stop's stop price, price (stop-limit) or quantity; it keeps waiting."""
        spec = self.spec
        new_stop = order.stop if cmd.stop_price_ticks is None else cmd.stop_price_ticks
        new_price = order.price if cmd.price_ticks is None else cmd.price_ticks
        new_qty = order.qty if cmd.qty_lots is None else cmd.qty_lots
        error = None
        if cmd.stop_price_ticks is None and cmd.price_ticks is None and cmd.qty_lots is None:
            error = RejectReason.INVALID_AMEND
        elif cmd.price_ticks is not None and order.otype == OrderType.STOP:
            error = RejectReason.INVALID_AMEND  # a stop trades as a market order: it has no price
        elif not all(_is_int(p) and 0 < p <= spec.max_price_ticks
                     for p in (new_stop, new_price if order.otype == OrderType.STOP_LIMIT else 1)):
            error = RejectReason.INVALID_PRICE  # the stop price, then a stop-limit's price
        elif not _is_int(new_qty) or not spec.min_qty_lots <= new_qty <= spec.max_qty_lots:
            error = RejectReason.INVALID_QUANTITY
        elif (new_stop, new_price, new_qty) == (order.stop, order.price, order.qty):
            error = RejectReason.INVALID_AMEND
        elif self.last_price and _reaches(order.side, new_stop, self.last_price):
            error = RejectReason.STOP_WOULD_TRIGGER
        new_rate, delta = order.rate, 0
        if error is None and self.balances and not order.funds:  # (a budget is what it is, whatever the amend)
            new_rate = self.rate(order.side, new_price)
            delta = new_qty * new_rate - order.qty * order.rate
            if delta > self.wallet(order.client_id, self.asset_of(order.side))[0]:
                error = RejectReason.INSUFFICIENT_FUNDS
        if error is not None:
            self._reject(order.client_id, order.client_order_id, order.order_id, "amend", error)
            return
        requeued = new_stop != order.stop or new_price != order.price or new_qty > order.qty
        old_price, old_qty = order.price, order.qty
        order.stop, order.price, order.qty, order.rate = new_stop, new_price, new_qty, new_rate
        money: dict[str, Any] = {}
        if self.balances:
            asset = self.asset_of(order.side)
            self.move(order.client_id, asset, delta)
            money = {"reserved": self.held(order), "balances": [self.balance(order.client_id, asset)]}
        self._emit(OrderAmended, order_id=order.order_id, client_id=order.client_id,
                   client_order_id=order.client_order_id, side=order.side, old_price_ticks=old_price,
                   price_ticks=new_price, old_qty_lots=old_qty, qty_lots=new_qty, remaining_lots=new_qty,
                   requeued=requeued, stop_price_ticks=new_stop, **money)
        if requeued:
            order.priority = self.seq

    def _cancel_all(self, cmd: CancelAll) -> None:
        mine = sorted((o for o in self.everything() if o.client_id == cmd.client_id), key=lambda o: o.order_id)
        for o in mine:
            self._cancel_order(o, CancelReason.REQUESTED)

    def _clear(self, cmd: ClearBook) -> None:
        orders = self.everything()  # the book's in priority order, then the waiting stops
        self._emit(BookCleared, client_id=cmd.client_id, text=cmd.text, orders=len(orders))
        for o in orders:
            self._cancel_order(o, CancelReason.CLEARED)

    # ------------------------------------------------------------ transfers

    def _transfer(self, cmd: Deposit | Withdraw) -> None:
        withdraw = isinstance(cmd, Withdraw)
        command = "withdraw" if withdraw else "deposit"
        client, asset, amount, tid = cmd.client_id, cmd.asset, cmd.amount, cmd.transfer_id
        reason = None
        if not self.balances:
            reason = RejectReason.BALANCES_DISABLED
        elif not (isinstance(client, str) and client and isinstance(tid, str) and tid):
            reason = RejectReason.MALFORMED
        elif asset not in (self.base, self.quote):
            reason = RejectReason.UNKNOWN_ASSET
        elif not _is_int(amount) or not 0 < amount <= MAX_AMOUNT_UNITS:
            reason = RejectReason.INVALID_AMOUNT
        elif tid in self.transfers:
            reason = RejectReason.DUPLICATE_TRANSFER_ID
        if reason is not None:  # not remembered
            self._reject(client, None, None, command, reason, tid)
            return
        wallet = self.wallet(client, asset)
        if withdraw and wallet[0] < amount:  # only what is available, never what is reserved
            self._reject(client, None, None, command, RejectReason.INSUFFICIENT_FUNDS, tid)
        else:
            wallet[0] += -amount if withdraw else amount
            self.deposited[asset] += -amount if withdraw else amount
            self._emit(Withdrawn if withdraw else Deposited, client_id=client, asset=asset, amount=amount,
                       transfer_id=tid, balances=[self.balance(client, asset)])
        self.transfers[tid] = self.seq  # a repeat is told of this outcome
