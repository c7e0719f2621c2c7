"""The matching engine: ``apply(command) -> list[Event]``, pure and deterministic.

Why one module: it is longer than 600 lines because it is one class, :class:`MatchingEngine`, the
single writer of a book, whose indices (the book, the live-order index, the dedupe window, the expiry
heap and its live count, the waiting stops and their trigger order, the ledger's holds) share
invariants every command handler keeps: a waiting stop is in the live-order index, the expiry heap
and the ledger as a resting order is, and a cancel, amend, expiry or clear must treat both alike.
Split over modules (mixins, or functions taking the engine) that one set of invariants would be
spread over files. What is not
the engine lives elsewhere: the engine image and its hash in :mod:`exchange.core.state`, the dedupe
window in :mod:`exchange.core.dedupe`, the book in
:mod:`exchange.core.book`.

One :class:`MatchingEngine` owns one instrument's book. It validates a command
completely before it changes anything, then mutates and emits events. The
rules:

- Price-time priority; a trade happens at the maker's price; one fill event per
  maker; a partially filled maker keeps its place.
- Market orders are IOC or FOK, never rest, and with a price band never trade
  further than ``price_band_bps`` from the best opposite price at arrival.
- IOC remainders are canceled; FOK fills completely or does nothing (accepted,
  then canceled ``fok_unfilled``); a post-only order that would trade is
  rejected; a client order id that is live, or finished and still in the
  dedupe window (its client's ``dedupe_per_client`` most recent, within the
  ``dedupe_window`` most recent of those: :class:`DedupeWindow`), is rejected
  as a duplicate.
- Self-trade prevention follows the incoming order's mode (instrument default
  when it names none); the FOK check honours it.
- Amend: a lower quantity keeps priority; a new price or a larger quantity
  re-queues at the back, and a new crossing price trades at once.
- GTD orders expire when an input timestamp reaches their expiry; expiries are
  applied before the command that carries that timestamp, in (expire_ns,
  order_id) order.
- Clear (an operator's): a ``cleared`` event naming the operator and the number
  of open orders comes first, with its own seq (also on an empty book), then
  every open order is canceled ``cleared`` in priority order.
- Halt (an operator's): until resume, places and amends are rejected
  ``instrument_halted``; cancels, cancel-all, clear and expiries go on. The
  halted flag is part of the engine state and of its state hash.
- Stops and stop-limits wait outside the book (``stop_would_trigger`` if the
  last trade already reached them); after a command that traded, the stops its
  trades reached fire in order (trade, nearest stop price, arrival), each a
  ``triggered`` event and then a taker; their own trades can queue more
  (:meth:`MatchingEngine._trigger` says why a pass ends).
- An iceberg shows one slice; a filled slice with quantity left is
  ``replenished`` at the back of its level.

Every event takes the next sequence number; order and trade ids come from
counters. No I/O, no clock, no randomness.

Memory follows what is live, not what has been: a client has entries in the
live-order index only while it has a live order and in the dedupe window only
while it has a remembered id; the expiry heap holds at most twice the live GTD
orders plus 64 entries (finished orders' entries are dropped when they would
outnumber the live ones; the expiry order does not depend on the heap's layout,
since its keys are unique).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from heapq import heapify, heappop, heappush
from typing import Any

from sortedcontainers import SortedList

from exchange.core.balances import Ledger, ceil_bps, refused, transferred
from exchange.core.book import Iceberg, Level, Order, OrderBook, Stop, waiting_stop
from exchange.core.commands import (
    AmendOrder,
    CancelAll,
    CancelOrder,
    ClearBook,
    Command,
    Deposit,
    HaltInstrument,
    PlaceOrder,
    RejectInput,
    ResumeInstrument,
    Withdraw,
)
from exchange.core.dedupe import DedupeWindow
from exchange.core.events import (
    Balance,
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
from exchange.core.instruments import MAX_AMOUNT_UNITS, Instrument
from exchange.core.state import (
    EngineState,
    book_order,
    engine_state_hash,
    resting_orders,
    stop_order,
    stop_orders,
    stops_digest,
)
from exchange.core.types import CancelReason, OrderType, RejectReason, Side, StpMode, TimeInForce

__all__ = ["Exchange", "MatchingEngine", "command_name"]

BUY, SELL = Side.BUY, Side.SELL
LIMIT, MARKET, STOP, STOP_LIMIT = OrderType.LIMIT, OrderType.MARKET, OrderType.STOP, OrderType.STOP_LIMIT
GTC, IOC, FOK, GTD = TimeInForce.GTC, TimeInForce.IOC, TimeInForce.FOK, TimeInForce.GTD
STP_NONE = StpMode.NONE
CANCEL_RESTING, CANCEL_INCOMING, CANCEL_BOTH = (
    StpMode.CANCEL_RESTING, StpMode.CANCEL_INCOMING, StpMode.CANCEL_BOTH)
_NO_LIMIT = 1 << 62  # a limit key no level reaches: "any price"
_NOTHING = -(1 << 62)  # a limit key every level exceeds: "no price"
_BPS = 10_000
_EXPIRY_SLACK = 64  # the expiry heap is compacted when it holds more than 2 x live GTD orders + this


_COMMAND_NAMES: dict[type[Any], str] = {
    PlaceOrder: "place", CancelOrder: "cancel", AmendOrder: "amend", CancelAll: "cancel_all", ClearBook: "clear",
    HaltInstrument: "halt", ResumeInstrument: "resume", Deposit: "deposit", Withdraw: "withdraw"}


def command_name(command: Command) -> str:
    """The wire name of a command (``"place"``, ``"cancel"``, ...)."""
    if isinstance(command, RejectInput):
        return command.command
    return _COMMAND_NAMES.get(type(command), "unknown")


def _budget_of(order: Order) -> int:
    """What a waiting stop buy with a budget holds (its ``funds``); 0 for any other order."""
    return order.funds if order.__class__ is Stop else 0


def _order_id(order: Order) -> int:
    return order.order_id


def _coerce(enum: type[Any], value: object) -> Any:
    """Turn a plain string into the enum member (commands built by hand); None if invalid."""
    if value.__class__ is enum:  # (the usual case: calling an enum class costs about 0.25 us)
        return value
    try:
        return enum(value)
    except ValueError:
        return None


class MatchingEngine:
    """The single writer of one instrument's book."""

    def __init__(self, spec: Instrument) -> None:
        self.spec = spec
        self.symbol = spec.symbol
        self.book = OrderBook()
        self.seq = 0
        self.next_order_id = 1
        self.next_trade_id = 1
        self.halted = False
        self._live: dict[str, dict[str, Order]] = {}  # client -> client order id -> live order (never empty)
        self._dedupe = DedupeWindow(spec.dedupe_window, spec.dedupe_per_client)
        self._done = self._dedupe.ids  # finished: client -> client order id -> order id
        self._remember = self._dedupe.remember
        self._expiries: list[tuple[int, int]] = []  # heap of (expire_ns, order_id), with entries of finished ones
        self._expiring = 0  # live GTD orders: each has exactly one entry in _expiries
        self._requeuing = 0  # the order id of an amended order while it trades out of the book (else 0)
        # balances (exchange.core.balances), on an instrument that keeps them
        self.ledger: Ledger | None = Ledger(spec) if spec.balances else None
        self._budget = 0  # what a market buy's budget has left while it matches (a taker with rate 0)
        # order types: waiting stops by order id, and by trigger order: (stop, priority, order id) for buys,
        # (-stop, priority, order id) for sells, nearest to the market first; the last trade's price
        self._stops: dict[int, Stop] = {}
        self._buy_stops: SortedList = SortedList()
        self._sell_stops: SortedList = SortedList()
        self.last_price = 0
        self._handlers: dict[type[Any], Callable[[Any, list[Event]], None]] = {
            PlaceOrder: self._place_halted,  # reached only while halted: see apply's fast path
            CancelOrder: self._cancel,
            AmendOrder: self._amend,
            CancelAll: self._cancel_all,
            ClearBook: self._clear,
            HaltInstrument: self._halt,
            ResumeInstrument: self._resume,
            RejectInput: self._reject_input,
            Deposit: self._deposit,
            Withdraw: self._withdraw,
        }

    # ------------------------------------------------------------------ API

    def apply(self, command: Command) -> list[Event]:
        """Apply one command and return the events it caused, in sequence order."""
        events: list[Event] = []
        ts = command.ts_ns
        if self._expiries and self._expiries[0][0] <= ts:
            self._expire(ts, events)
        instrument = command.instrument
        if instrument is not None and instrument != self.symbol:
            self._reject(events, ts, getattr(command, "client_id", ""), getattr(command, "client_order_id", None),
                         None, command_name(command), RejectReason.UNKNOWN_INSTRUMENT,
                         f"command for {instrument!r} sent to the {self.symbol!r} engine")
            return events
        trade_id = self.next_trade_id
        if type(command) is PlaceOrder and not self.halted:
            self._place(command, events)
        else:
            try:
                handler = self._handlers[type(command)]
            except KeyError:
                raise TypeError(f"not a command: {command!r}") from None
            handler(command, events)
        if self._stops and self.next_trade_id != trade_id:
            self._trigger(events, ts)
        return events

    def state_hash(self) -> str:
        """Hash of the book (levels and queues in priority order; see :meth:`OrderBook.state_hash`) and the
        halted flag."""
        return engine_state_hash(self.book, self.halted, self.ledger.digest() if self.ledger is not None else b"",
                                 stops_digest(sorted(self._stops.values(), key=_order_id), self.last_price))

    def export_state(self, *, window: bool = True) -> EngineState:
        """A snapshot of the engine from which :meth:`from_state` rebuilds it exactly; without the dedupe
        window and the transfer ids if not ``window`` (what the periodic snapshots store: the store keeps both in
        tables of their own; see :class:`EngineState`)."""
        ledger = self.ledger
        if ledger is None:
            return EngineState(self.symbol, self.seq, self.next_order_id, self.next_trade_id, resting_orders(self.book),
                               self._dedupe.entries() if window else [], self.halted, done_complete=window,
                               stops=stop_orders(self._stops.values()), last_price_ticks=self.last_price)
        if window:
            return EngineState(self.symbol, self.seq, self.next_order_id, self.next_trade_id, resting_orders(self.book),
                               self._dedupe.entries(), self.halted, accounts=ledger.accounts_image(), fees=ledger.fees,
                               transfers=sorted(ledger.transfers.items()), stops=stop_orders(self._stops.values()),
                               last_price_ticks=self.last_price)
        return EngineState(self.symbol, self.seq, self.next_order_id, self.next_trade_id, resting_orders(self.book),
                           [], self.halted, done_complete=False, accounts=ledger.accounts_image(), fees=ledger.fees,
                           transfers_complete=False, transfers_count=len(ledger.transfers),
                           transfers_sum=ledger.transfers_sum, stops=stop_orders(self._stops.values()),
                           last_price_ticks=self.last_price)

    @classmethod
    def from_state(cls, spec: Instrument, state: EngineState) -> MatchingEngine:
        """Rebuild an engine from :meth:`export_state` output (or the same data from storage).

        Orders are queued in the order given, which must be priority order.
        """
        if state.instrument != spec.symbol:
            raise ValueError(f"state of {state.instrument!r} cannot restore the {spec.symbol!r} engine")
        if not state.done_complete:
            raise ValueError(f"{spec.symbol}: this state (seq {state.seq}) leaves out the dedupe window, as "
                             "snapshots do; an engine restored from it would accept duplicate client order ids")
        if not state.transfers_complete:
            raise ValueError(f"{spec.symbol}: this state (seq {state.seq}) leaves out the transfer ids, as snapshots "
                             "do; an engine restored from it would apply a repeated deposit or withdrawal again")
        engine = cls(spec)
        engine.seq = state.seq
        engine.next_order_id = state.next_order_id
        engine.next_trade_id = state.next_trade_id
        engine.halted = state.halted
        for r in state.orders:
            order = book_order(r)
            engine.book.add(order)
            engine._live.setdefault(r.client_id, {})[r.client_order_id] = order
            if r.expire_ns:
                engine._expiries.append((r.expire_ns, r.order_id))
        for s in state.stops:
            stop = stop_order(s)
            engine._add_stop(stop)
            engine._live.setdefault(s.client_id, {})[s.client_order_id] = stop
            if s.expire_ns:
                engine._expiries.append((s.expire_ns, s.order_id))
        engine.last_price = state.last_price_ticks
        heapify(engine._expiries)
        engine._expiring = len(engine._expiries)
        for client_id, client_order_id, order_id in state.done:
            engine._remember(client_id, client_order_id, order_id)
        if engine.ledger is not None:
            engine.ledger.restore(state.accounts, state.fees, state.transfers)
        elif state.accounts or state.fees or state.transfers or state.transfers_count:
            raise ValueError(f"{spec.symbol}: this state (seq {state.seq}) holds balances, but the instrument keeps "
                             "none ([risk] balances): an engine restored from it would lose them")
        return engine

    def open_order(self, client_id: str, client_order_id: str) -> Order | None:
        """The live order with this client order id, if any (read-only use)."""
        live = self._live.get(client_id)
        return live.get(client_order_id) if live else None

    # ------------------------------------------------------------ commands

    def _place(self, cmd: PlaceOrder, events: list[Event]) -> None:  # noqa: C901 - the hot path, in one frame
        spec = self.spec
        ts = cmd.ts_ns
        client = cmd.client_id
        coid = cmd.client_order_id
        side = cmd.side
        otype = cmd.order_type
        tif = cmd.tif
        qty = cmd.qty_lots
        price = cmd.price_ticks
        post_only = cmd.post_only
        expire_ns = cmd.expire_ns
        stp = cmd.stp or spec.stp_default

        # ---- validate everything before touching anything. The common case
        # (well-typed GTC/IOC limit, fresh id) passes the first test alone.
        live = self._live.get(client)
        if not (
            side.__class__ is Side
            and otype is LIMIT
            and (tif is GTC or (tif is IOC and not post_only))
            and not expire_ns
            and stp.__class__ is StpMode
            and qty.__class__ is int
            and spec.min_qty_lots <= qty <= spec.max_qty_lots
            and price.__class__ is int
            and 0 < price <= spec.max_price_ticks
            and coid.__class__ is str
            and coid
            and client.__class__ is str
            and client
            and (live is None or coid not in live)
            and not cmd.stop_price_ticks
            and (not (display := cmd.display_qty_lots)  # an iceberg's slice: a whole number of lots up to qty
                 or (display.__class__ is int and spec.min_qty_lots <= display <= qty))
        ) or ((done := self._done.get(client)) is not None and coid in done):
            error = self._place_error(cmd)
            if error is not None:
                original = None
                if error[0] is RejectReason.DUPLICATE_CLIENT_ORDER_ID:  # point the sender at the original order
                    original = live[coid].order_id if live and coid in live else self._dedupe.get(client, coid)
                self._reject(events, ts, client, coid, original, "place", error[0], error[1])
                return
            # well-formed but off the fast path (market, FOK, GTD, post-only, stop, enum from a plain str)
            side, otype, tif, stp = (_coerce(Side, side), _coerce(OrderType, otype), _coerce(TimeInForce, tif),
                                     _coerce(StpMode, stp))
            if otype is STOP or otype is STOP_LIMIT:
                self._place_stop(cmd, side, otype, tif, stp, events)
                return
            display = cmd.display_qty_lots

        buy = side is BUY
        if buy:
            opp, keys = self.book.asks, self.book.ask_keys
        else:
            opp, keys = self.book.bids, self.book.bid_keys
        if otype is LIMIT:
            limit_key = price if buy else -price
        else:
            price = 0
            limit_key = self._market_limit_key(buy, opp)
        crosses = bool(keys) and keys[0][0] <= limit_key
        if post_only and crosses:
            best = opp[keys[0][0]].price
            self._reject(events, ts, client, coid, None, "place", RejectReason.POST_ONLY_WOULD_TRADE,
                         f"post-only order at {spec.ticks_to_price(price)} would trade against "
                         f"{spec.ticks_to_price(best)}")
            return

        rate = 0
        ledger = self.ledger
        if ledger is not None or cmd.funds:  # balances: hold what the order needs
            account = None
            if ledger is not None and otype is LIMIT and not cmd.funds:  # the common case, written out: _reserve
                account = ledger.accounts.get(client)
                i = 2 if buy else 0  # quote or base available (exchange.core.balances)
                rate = price - (-price * ledger.reserve_bps) // 10_000 if buy else 1
                held = qty * rate
                if account is not None and account[i] >= held:
                    account[i] -= held
                    account[i + 1] += held
                else:
                    account = None
            if account is None:
                holds = self._reserve(cmd, buy, otype, price, limit_key, events)
                if holds is None:
                    return
                held, rate = holds
        oid = self.next_order_id
        self.next_order_id = oid + 1
        self.seq += 1
        priority = self.seq  # an order's place in its queue is the sequence number of the event that queued it
        if ledger is None:
            if display:
                events.append(OrderAccepted(self.symbol, priority, ts, oid, client, coid, side, otype, price, qty, tif,
                                            post_only, stp, expire_ns, display_qty_lots=display))
            else:
                events.append(OrderAccepted(self.symbol, priority, ts, oid, client, coid, side, otype, price, qty, tif,
                                            post_only, stp, expire_ns))
        else:
            events.append(OrderAccepted(self.symbol, priority, ts, oid, client, coid, side, otype, price, qty, tif,
                                        post_only, stp, expire_ns, held, cmd.funds,
                                        ledger.balances(client, buy) if account is None else
                                        [(client, ledger.quote if buy else ledger.base, account[i], account[i + 1])],
                                        display_qty_lots=display))
            self._budget = cmd.funds
        remaining = qty
        stopped = False
        if tif is FOK and not (crosses and self._fok_fillable(
                opp, limit_key, qty, client, stp, self._budget if ledger is not None and buy and not rate else None)):
            self._cancel_remainder(events, ts, oid, client, coid, side, price, qty, CancelReason.FOK_UNFILLED, rate)
            self._remember(client, coid, oid)
            return
        if crosses:
            remaining, stopped = self._match(events, ts, oid, client, coid, side, opp, keys, limit_key, qty, stp,
                                             rate)
        if remaining:
            if stopped:
                self._cancel_remainder(events, ts, oid, client, coid, side, price, remaining,
                                       CancelReason.SELF_TRADE, rate)
            elif tif is GTC or tif is GTD:
                # OrderBook.add, written out: the order joins the back of its level (the level's own price object)
                book = self.book
                levels = book.bids if buy else book.asks
                level = levels.get(-limit_key)  # (bids are keyed by -price, asks by price)
                if level is None:
                    level = levels[-limit_key] = Level(price)
                order: Order
                if display:  # an iceberg: its first slice shows
                    shown = display if display < remaining else remaining
                    order = Iceberg(oid, client, coid, side, level.price, qty, shown, priority, expire_ns, post_only,
                                    stp, rate, display, remaining - shown)
                    level.total_lots += shown
                    level.hidden += remaining - shown
                else:
                    order = Order(oid, client, coid, side, level.price, qty, remaining, priority, expire_ns, post_only,
                                  stp, rate)
                    level.total_lots += remaining
                level.orders.append(order)
                level.count += 1
                book.orders[oid] = order
                if not live:  # none, or emptied (and dropped) by self-trade prevention while this one matched
                    live = self._live[client] = {}
                live[coid] = order
                if expire_ns:
                    heappush(self._expiries, (expire_ns, oid))
                    self._expiring += 1
                return
            else:
                self._cancel_remainder(events, ts, oid, client, coid, side, price, remaining,
                                       CancelReason.IOC_REMAINDER, rate)
        self._remember(client, coid, oid)

    def _place_stop(self, cmd: PlaceOrder, side: Side, otype: OrderType, tif: TimeInForce, stp: StpMode,
                    events: list[Event]) -> None:
        """A valid stop or stop-limit order: it waits, unseen, for a trade at or through its stop price (rejected
        ``stop_would_trigger`` if the last trade already is); with balances it holds what the order it becomes
        will need (a stop buy: its budget, ``funds``, which it must name)."""
        ts, client, coid, stop = cmd.ts_ns, cmd.client_id, cmd.client_order_id, cmd.stop_price_ticks
        buy = side is BUY
        last = self.last_price
        if last and (last >= stop if buy else last <= stop):
            self._reject(events, ts, client, coid, None, "place", RejectReason.STOP_WOULD_TRIGGER,
                         f"the last trade, at {self.spec.ticks_to_price(last)}, is already at or "
                         f"{'above' if buy else 'below'} the stop price {self.spec.ticks_to_price(stop)}")
            return
        price = cmd.price_ticks if otype is STOP_LIMIT else 0
        ledger = self.ledger
        held = rate = 0
        funds = cmd.funds
        error: tuple[RejectReason, str] | None = None
        if funds and (ledger is None or not (buy and otype is STOP)):
            error = (RejectReason.INVALID_ORDER, "funds (a budget) is for market and stop buys on an instrument that "
                     "keeps balances")
        elif funds and (funds.__class__ is not int or not 0 < funds <= MAX_AMOUNT_UNITS):
            error = (RejectReason.INVALID_AMOUNT, f"funds must be a positive amount, got {funds!r}")
        elif ledger is not None:
            if buy and otype is STOP and not funds:
                error = (RejectReason.INVALID_ORDER, f"{self.symbol} keeps balances: a stop buy must name its budget "
                         "(funds), which it holds while it waits")
            else:
                rate = 0 if funds else ledger.rate(buy, price)
                held = funds or cmd.qty_lots * rate
                if not ledger.hold(client, buy, held):
                    asset = ledger.quote if buy else ledger.base
                    error = (RejectReason.INSUFFICIENT_FUNDS,
                             f"{asset} required {self.spec.units_to_amount(asset, held)}, available "
                             f"{self.spec.units_to_amount(asset, ledger.available(client, buy))}")
        if error is not None:
            self._reject(events, ts, client, coid, None, "place", *error)
            return
        oid = self.next_order_id
        self.next_order_id = oid + 1
        self.seq += 1
        order = waiting_stop(oid, client, coid, side, otype, stop, price, cmd.qty_lots, self.seq, tif, cmd.expire_ns,
                             stp, rate, funds)
        events.append(OrderAccepted(self.symbol, self.seq, ts, oid, client, coid, side, otype, price, cmd.qty_lots,
                                    tif, False, stp, cmd.expire_ns, held, funds,
                                    ledger.balances(client, buy) if ledger is not None else (), stop))
        self._add_stop(order)
        live = self._live.get(client)
        if live is None:
            live = self._live[client] = {}
        live[coid] = order
        if cmd.expire_ns:
            heappush(self._expiries, (cmd.expire_ns, oid))
            self._expiring += 1

    def _add_stop(self, order: Stop) -> None:
        self._stops[order.order_id] = order
        if order.side is BUY:
            self._buy_stops.add((order.stop, order.priority, order.order_id))
        else:
            self._sell_stops.add((-order.stop, order.priority, order.order_id))

    def _unstop(self, order: Stop) -> None:
        """Take a waiting stop out (canceled, expired, cleared, or amended: it is added again)."""
        del self._stops[order.order_id]
        if order.side is BUY:
            self._buy_stops.remove((order.stop, order.priority, order.order_id))
        else:
            self._sell_stops.remove((-order.stop, order.priority, order.order_id))

    def _trigger(self, events: list[Event], ts: int) -> None:
        """The command traded: the waiting stops its trades reached trigger.

        In a fixed order: by the trade that reached them, then stop price (nearest to the market first), then
        arrival (the seq that placed or last moved them); each becomes a taker (``triggered``, then what it
        does), and the trades of a triggered order can reach further stops, queued behind those already
        reached. It ends: a stop triggers at most once and leaves the waiting stops when it is queued, nothing
        in a pass adds a waiting stop, so a pass triggers at most as many orders as were waiting."""
        buys, sells, stops = self._buy_stops, self._sell_stops, self._stops
        # (a SortedList's sorted sublists: [0][0] is its least key without a Python-level __getitem__)
        buy_keys: list[list[tuple[int, int, int]]] = buys._lists
        sell_keys: list[list[tuple[int, int, int]]] = sells._lists
        queue: deque[tuple[Stop, int, int]] = deque()
        scan = 0
        while True:
            n = len(events)
            if stops:
                lowest_buy = buy_keys[0][0][0] if buy_keys else _NO_LIMIT
                highest_sell = -sell_keys[0][0][0] if sell_keys else _NOTHING
                for k in range(scan, n):
                    event = events[k]
                    if event.__class__ is not OrderFilled:
                        continue
                    price = event.price_ticks
                    if lowest_buy <= price:
                        while buy_keys and buy_keys[0][0][0] <= price:
                            queue.append((stops.pop(buys.pop(0)[2]), event.trade_id, price))
                        lowest_buy = buy_keys[0][0][0] if buy_keys else _NO_LIMIT
                    if highest_sell >= price:  # (both sides at once: stops placed before the first trade)
                        while sell_keys and -sell_keys[0][0][0] >= price:
                            queue.append((stops.pop(sells.pop(0)[2]), event.trade_id, price))
                        highest_sell = -sell_keys[0][0][0] if sell_keys else _NOTHING
            scan = n
            if not queue:
                break
            order, trade_id, price = queue.popleft()
            self._fire(order, trade_id, price, ts, events)

    def _fire(self, stop: Stop, trade_id: int, trigger: int, ts: int, events: list[Event]) -> None:
        """A waiting stop triggers (already out of the waiting stops): ``triggered``, then it trades as a market
        order (``stop``, IOC) or a limit order at its price with its time in force (``stop_limit``)."""
        oid, client, coid, side, qty, stp, rate = (stop.order_id, stop.client_id, stop.client_order_id, stop.side,
                                                   stop.qty, stop.stp, stop.rate)
        self.seq += 1
        priority = self.seq
        events.append(OrderTriggered(self.symbol, priority, ts, oid, client, coid, side, stop.otype, stop.stop,
                                     stop.price, qty, trade_id, trigger))
        buy = side is BUY
        opp, keys = (self.book.asks, self.book.ask_keys) if buy else (self.book.bids, self.book.bid_keys)
        if stop.otype is STOP:
            price, tif = 0, IOC
            limit_key = self._market_limit_key(buy, opp)
        else:
            price, tif = stop.price, stop.tif
            limit_key = price if buy else -price
        ledger = self.ledger
        self._budget = stop.funds if ledger is not None else 0
        crosses = bool(keys) and keys[0][0] <= limit_key
        remaining = qty
        stopped = False
        if tif is FOK and not (crosses and self._fok_fillable(
                opp, limit_key, qty, client, stp, self._budget if ledger is not None and buy and not rate else None)):
            self._cancel_remainder(events, ts, oid, client, coid, side, price, qty, CancelReason.FOK_UNFILLED, rate)
            self._finish(stop)
            return
        if crosses:
            remaining, stopped = self._match(events, ts, oid, client, coid, side, opp, keys, limit_key, qty, stp,
                                             rate)
        if remaining and not stopped and (tif is GTC or tif is GTD):
            order = Order(oid, client, coid, side, price, qty, remaining, priority, stop.expire_ns, False, stp, rate)
            self.book.add(order)
            live = self._live.get(client)
            if live is None:  # (emptied by self-trade prevention while it matched)
                live = self._live[client] = {}
            live[coid] = order  # (in place of the stop)
            return
        if remaining:
            self._cancel_remainder(events, ts, oid, client, coid, side, price, remaining,
                                   CancelReason.SELF_TRADE if stopped else CancelReason.IOC_REMAINDER, rate)
        self._finish(stop)

    def _reserve(self, cmd: PlaceOrder, buy: bool, otype: OrderType, price: int, limit_key: int,
                 events: list[Event]) -> tuple[int, int] | None:
        """Balances: hold what an accepted order needs (see :mod:`exchange.core.balances`) and return it with what
        each lot holds (0 for a budget, or a market buy with nothing to buy), or reject the command (None) -- a
        budget on anything but a market buy, a market buy that names no budget where no price band bounds it,
        or available funds that fall short. Nothing changes on a rejection."""
        ledger = self.ledger
        funds = cmd.funds
        error: tuple[RejectReason, str] | None = None
        held = rate = 0
        if funds and (ledger is None or not (buy and otype is MARKET)):
            error = (RejectReason.INVALID_ORDER, "funds (a budget) is for market buys on an instrument that keeps "
                     "balances")
        elif funds and (funds.__class__ is not int or not 0 < funds <= MAX_AMOUNT_UNITS):
            error = (RejectReason.INVALID_AMOUNT, f"funds must be a positive amount, got {funds!r}")
        elif ledger is None:
            return 0, 0
        elif funds:
            held = funds
        elif buy and otype is MARKET and limit_key == _NO_LIMIT:
            error = (RejectReason.INVALID_ORDER, f"{self.symbol} has no price band: a market buy must name its budget "
                     "(funds)")
        elif not (buy and otype is MARKET and limit_key == _NOTHING):  # (nothing to buy: it holds nothing)
            rate = ledger.rate(buy, limit_key if buy else price)  # (a buy's limit key is its limit price)
            held = cmd.qty_lots * rate
        if error is None and ledger is not None and not ledger.hold(cmd.client_id, buy, held):
            asset = ledger.quote if buy else ledger.base
            error = (RejectReason.INSUFFICIENT_FUNDS,
                     f"{asset} required {self.spec.units_to_amount(asset, held)}, available "
                     f"{self.spec.units_to_amount(asset, ledger.available(cmd.client_id, buy))}")
        if error is not None:
            self._reject(events, cmd.ts_ns, cmd.client_id, cmd.client_order_id, None, "place", *error)
            return None
        return held, rate

    def _place_error(self, cmd: PlaceOrder) -> tuple[RejectReason, str] | None:
        """Why a place command must be rejected, or None if it is valid (the slow, thorough check)."""
        spec = self.spec
        client, coid, qty, price, expire_ns = (
            cmd.client_id, cmd.client_order_id, cmd.qty_lots, cmd.price_ticks, cmd.expire_ns)
        side, otype = _coerce(Side, cmd.side), _coerce(OrderType, cmd.order_type)
        tif, stp = _coerce(TimeInForce, cmd.tif), _coerce(StpMode, cmd.stp or spec.stp_default)
        if side is None or otype is None or tif is None or stp is None:
            return (RejectReason.MALFORMED, "side, order type, time in force or STP mode is not recognised")
        if not client or not coid or client.__class__ is not str or coid.__class__ is not str:
            return (RejectReason.MALFORMED, "client_id and client_order_id must be non-empty strings")
        if qty.__class__ is not int or not spec.min_qty_lots <= qty <= spec.max_qty_lots:
            return (RejectReason.INVALID_QUANTITY,
                    f"quantity must be between {spec.lots_to_qty(spec.min_qty_lots)} and "
                    f"{spec.lots_to_qty(spec.max_qty_lots)}")
        if (otype is LIMIT or otype is STOP_LIMIT) and (price.__class__ is not int
                                                        or not 0 < price <= spec.max_price_ticks):
            return (RejectReason.INVALID_PRICE,
                    f"limit price must be above zero and at most {spec.ticks_to_price(spec.max_price_ticks)}")
        error = self._type_error(cmd, otype, tif)
        if error is not None:
            return error
        if tif is GTD and (expire_ns.__class__ is not int or expire_ns <= cmd.ts_ns or expire_ns <= 0):
            return (RejectReason.INVALID_EXPIRY,
                    f"GTD expiry {expire_ns} is not a positive time after the order time {cmd.ts_ns}")
        if tif is not GTD and expire_ns:
            return (RejectReason.INVALID_EXPIRY, "an expiry time is only allowed with GTD")
        live = self._live.get(client)
        if live is not None and coid in live:
            return (RejectReason.DUPLICATE_CLIENT_ORDER_ID,
                    f"client order id {coid!r} is already live as order {live[coid].order_id}")
        original = self._dedupe.get(client, coid)
        if original is not None:
            return (RejectReason.DUPLICATE_CLIENT_ORDER_ID,
                    f"client order id {coid!r} was already used by order {original}")
        return None

    def _type_error(self, cmd: PlaceOrder, otype: OrderType, tif: TimeInForce) -> tuple[RejectReason, str] | None:
        """What is wrong with a place command's combination of type, time in force, stop price, post-only and
        display quantity (its quantity and price are valid), or None."""
        spec = self.spec
        stop = cmd.stop_price_ticks
        if otype is STOP or otype is STOP_LIMIT:
            if stop.__class__ is not int or not 0 < stop <= spec.max_price_ticks:
                return (RejectReason.INVALID_PRICE, f"a {otype} order needs a stop price above zero and at most "
                        f"{spec.ticks_to_price(spec.max_price_ticks)}")
        elif stop:
            return (RejectReason.INVALID_ORDER, "a stop price is for stop and stop_limit orders")
        if otype is MARKET and (tif is GTC or tif is GTD):
            return (RejectReason.INVALID_ORDER, "market orders never rest: time in force must be IOC or FOK")
        if otype is STOP and (tif is IOC or tif is FOK):
            return (RejectReason.INVALID_ORDER, "a stop order waits for its stop price, then trades as a market order "
                    "(IOC): time in force must be GTC or GTD")
        if cmd.post_only and (otype is not LIMIT or tif is IOC or tif is FOK):
            return (RejectReason.INVALID_ORDER, "post-only orders must be GTC or GTD limit orders")
        display = cmd.display_qty_lots
        if display and otype is not LIMIT:
            return (RejectReason.INVALID_ORDER, "a display quantity (an iceberg) is for limit orders")
        if display and (display.__class__ is not int or not spec.min_qty_lots <= display <= cmd.qty_lots):
            return (RejectReason.INVALID_QUANTITY,
                    f"display quantity must be at least {spec.lots_to_qty(spec.min_qty_lots)} and at most the "
                    f"order's quantity {spec.lots_to_qty(cmd.qty_lots)}")
        return None

    def _cancel(self, cmd: CancelOrder, events: list[Event]) -> None:
        coid = cmd.client_order_id
        if cmd.order_id is None and coid.__class__ is str:  # the usual case, by client order id: _find, written out
            live = self._live.get(cmd.client_id)
            order = live.get(coid) if live else None
            if order is not None:
                self._remove(order, events, cmd.ts_ns, CancelReason.REQUESTED)
                return
        order = self._find(cmd.client_id, coid, cmd.order_id, "cancel", cmd.ts_ns, events)
        if order is not None:
            self._remove(order, events, cmd.ts_ns, CancelReason.REQUESTED)

    def _place_halted(self, cmd: PlaceOrder, events: list[Event]) -> None:
        self._reject(events, cmd.ts_ns, cmd.client_id, cmd.client_order_id, None, "place",
                     RejectReason.INSTRUMENT_HALTED, f"{self.symbol} is halted; no new orders until it resumes")

    def _amend(self, cmd: AmendOrder, events: list[Event]) -> None:
        ts = cmd.ts_ns
        if self.halted:
            self._reject(events, ts, cmd.client_id, cmd.client_order_id, cmd.order_id, "amend",
                         RejectReason.INSTRUMENT_HALTED, f"{self.symbol} is halted; amends wait until it resumes "
                         "(cancels still work)")
            return
        order = self._find(cmd.client_id, cmd.client_order_id, cmd.order_id, "amend", ts, events)
        if order is None:
            return
        if order.__class__ is Stop:
            self._amend_stop(cmd, order, events)
            return
        new_price = order.price if cmd.price_ticks is None else cmd.price_ticks
        new_qty = order.qty if cmd.qty_lots is None else cmd.qty_lots
        filled = order.qty - order.remaining - order.hidden
        error = self._amend_error(cmd, order, new_price, new_qty)
        if order.side is BUY:
            opp, keys, limit_key = self.book.asks, self.book.ask_keys, new_price
        else:
            opp, keys, limit_key = self.book.bids, self.book.bid_keys, -new_price
        crosses = bool(keys) and keys[0][0] <= limit_key
        if error is None and order.post_only and crosses:
            error = (RejectReason.POST_ONLY_WOULD_TRADE,
                     f"post-only order amended to {self.spec.ticks_to_price(new_price)} would trade")
        new_rate, delta = order.rate, 0
        if error is None and self.ledger is not None:  # (as for a place: after the checks that hold nothing)
            new_rate, delta, error = self._amend_holds(order, new_price, new_qty - filled)
        if error is not None:
            self._reject(events, ts, order.client_id, order.client_order_id, order.order_id, "amend", *error)
            return

        old_price, old_qty = order.price, order.qty
        if delta > 0:  # (what the amend holds more was checked to be available)
            self.ledger.hold(order.client_id, order.side is BUY, delta)  # type: ignore[union-attr]
        elif delta < 0:
            self.ledger.free(order.client_id, order.side is BUY, -delta)  # type: ignore[union-attr]
        if new_price == old_price and new_qty < old_qty:
            self.book.reduce(order, old_qty - new_qty)
            self._amended(events, ts, order, old_price, old_qty, new_price, new_qty, order.remaining + order.hidden,
                          False, new_rate, hidden=order.hidden)
            return

        # cancel-and-replace under the same ids; the replacement may trade at once
        remaining = new_qty - filled
        self.book.remove(order)
        display = order.display
        self._amended(events, ts, order, old_price, old_qty, new_price, new_qty, remaining, True, new_rate,
                      hidden=remaining - display if display and display < remaining else 0)
        priority = self.seq
        stopped = False
        if crosses:
            self._requeuing = order.order_id  # out of the book but live: its expiry entry must stay
            remaining, stopped = self._match(events, ts, order.order_id, order.client_id, order.client_order_id,
                                             order.side, opp, keys, limit_key, remaining, order.stp, new_rate)
            self._requeuing = 0
        if remaining and not stopped:
            replacement: Order
            if display:
                shown = display if display < remaining else remaining
                replacement = Iceberg(order.order_id, order.client_id, order.client_order_id, order.side, new_price,
                                      new_qty, shown, priority, order.expire_ns, order.post_only, order.stp, new_rate,
                                      display, remaining - shown)
            else:
                replacement = Order(order.order_id, order.client_id, order.client_order_id, order.side, new_price,
                                    new_qty, remaining, priority, order.expire_ns, order.post_only, order.stp, new_rate)
            self.book.add(replacement)
            self._live[order.client_id][order.client_order_id] = replacement
            return
        if remaining:
            self._cancel_remainder(events, ts, order.order_id, order.client_id, order.client_order_id, order.side,
                                   new_price, remaining, CancelReason.SELF_TRADE, new_rate)
        self._finish(order)

    def _amend_error(self, cmd: AmendOrder, order: Order, new_price: int, new_qty: int
                     ) -> tuple[RejectReason, str] | None:
        """Why an amend of ``order`` to ``new_price`` and ``new_qty`` must be rejected (balances aside), or None."""
        spec = self.spec
        filled = order.qty - order.remaining - order.hidden
        if cmd.stop_price_ticks is not None:
            return (RejectReason.INVALID_AMEND, f"order {order.order_id} is not a waiting stop: it has no stop price")
        if cmd.price_ticks is None and cmd.qty_lots is None:
            return (RejectReason.INVALID_AMEND, "an amend must give a new price or a new quantity")
        if new_price.__class__ is not int or not 0 < new_price <= spec.max_price_ticks:
            return (RejectReason.INVALID_PRICE,
                    f"limit price must be above zero and at most {spec.ticks_to_price(spec.max_price_ticks)}")
        if new_qty.__class__ is not int or not spec.min_qty_lots <= new_qty <= spec.max_qty_lots:
            return (RejectReason.INVALID_QUANTITY,
                    f"quantity must be between {spec.lots_to_qty(spec.min_qty_lots)} and "
                    f"{spec.lots_to_qty(spec.max_qty_lots)}")
        if new_qty <= filled:
            return (RejectReason.INVALID_AMEND,
                    f"new total quantity {spec.lots_to_qty(new_qty)} must exceed the filled "
                    f"{spec.lots_to_qty(filled)}; cancel the order instead")
        if new_price == order.price and new_qty == order.qty:
            return (RejectReason.INVALID_AMEND, "the amend changes nothing")
        return None

    def _amend_holds(self, order: Order, new_price: int, new_remaining: int
                     ) -> tuple[int, int, tuple[RejectReason, str] | None]:
        """Balances: ``(rate, delta, error)`` of an amend: what each open lot will hold (a new price, a new rate),
        how much more (or, negative, less) the order will hold, and ``insufficient_funds`` if that is not
        available."""
        ledger = self.ledger
        assert ledger is not None
        buy = order.side is BUY
        rate = ledger.rate(buy, new_price) if new_price != order.price else order.rate
        delta = new_remaining * rate - (order.remaining + order.hidden) * order.rate
        available = ledger.available(order.client_id, buy)
        if delta > available:
            asset = ledger.quote if buy else ledger.base
            return rate, delta, (RejectReason.INSUFFICIENT_FUNDS,
                                 f"the amend needs {self.spec.units_to_amount(asset, delta)} more {asset}, available "
                                 f"{self.spec.units_to_amount(asset, available)}")
        return rate, delta, None

    def _amended(self, events: list[Event], ts: int, order: Order, old_price: int, old_qty: int, new_price: int,
                 new_qty: int, remaining: int, requeued: bool, rate: int, *, hidden: int = 0, stop: int = 0,
                 reserved: int | None = None) -> None:
        self.seq += 1
        ledger = self.ledger
        if ledger is None:
            events.append(OrderAmended(self.symbol, self.seq, ts, order.order_id, order.client_id,
                                       order.client_order_id, order.side, old_price, new_price, old_qty, new_qty,
                                       remaining, requeued, stop_price_ticks=stop, hidden_lots=hidden))
        else:
            events.append(OrderAmended(self.symbol, self.seq, ts, order.order_id, order.client_id,
                                       order.client_order_id, order.side, old_price, new_price, old_qty, new_qty,
                                       remaining, requeued, remaining * rate if reserved is None else reserved,
                                       ledger.balances(order.client_id, order.side is BUY), stop, hidden))

    def _amend_stop(self, cmd: AmendOrder, order: Stop, events: list[Event]) -> None:
        """Amend a waiting stop: its stop price, a stop-limit's price, its quantity. It stays waiting (a new stop
        price the last trade has already reached is rejected ``stop_would_trigger``); a new stop price or price
        or a larger quantity moves it behind the stops waiting at its stop price, a lower quantity does not."""
        spec, ledger, ts = self.spec, self.ledger, cmd.ts_ns
        buy = order.side is BUY
        new_stop = order.stop if cmd.stop_price_ticks is None else cmd.stop_price_ticks
        new_price = order.price if cmd.price_ticks is None else cmd.price_ticks
        new_qty = order.qty if cmd.qty_lots is None else cmd.qty_lots
        last = self.last_price
        error: tuple[RejectReason, str] | None = None
        if cmd.price_ticks is None and cmd.qty_lots is None and cmd.stop_price_ticks is None:
            error = (RejectReason.INVALID_AMEND, "an amend must give a new price, stop price or quantity")
        elif cmd.price_ticks is not None and order.otype is STOP:
            error = (RejectReason.INVALID_AMEND, "a stop order has no limit price (triggered, it trades as a market "
                     "order): amend its stop price")
        elif new_stop.__class__ is not int or not 0 < new_stop <= spec.max_price_ticks:
            error = (RejectReason.INVALID_PRICE, f"stop price must be above zero and at most "
                     f"{spec.ticks_to_price(spec.max_price_ticks)}")
        elif order.otype is STOP_LIMIT and (new_price.__class__ is not int
                                            or not 0 < new_price <= spec.max_price_ticks):
            error = (RejectReason.INVALID_PRICE,
                     f"limit price must be above zero and at most {spec.ticks_to_price(spec.max_price_ticks)}")
        elif new_qty.__class__ is not int or not spec.min_qty_lots <= new_qty <= spec.max_qty_lots:
            error = (RejectReason.INVALID_QUANTITY, f"quantity must be between {spec.lots_to_qty(spec.min_qty_lots)} "
                     f"and {spec.lots_to_qty(spec.max_qty_lots)}")
        elif new_stop == order.stop and new_price == order.price and new_qty == order.qty:
            error = (RejectReason.INVALID_AMEND, "the amend changes nothing")
        elif last and (last >= new_stop if buy else last <= new_stop):
            error = (RejectReason.STOP_WOULD_TRIGGER,
                     f"the last trade, at {spec.ticks_to_price(last)}, is already at or "
                     f"{'above' if buy else 'below'} the stop price {spec.ticks_to_price(new_stop)}")
        rate = order.rate
        delta = 0
        if error is None and ledger is not None and rate:  # (a budget, funds, does not change with the amend)
            rate = ledger.rate(buy, new_price) if order.otype is STOP_LIMIT else rate
            delta = new_qty * rate - order.qty * order.rate
            available = ledger.available(order.client_id, buy)
            if delta > available:
                asset = ledger.quote if buy else ledger.base
                error = (RejectReason.INSUFFICIENT_FUNDS,
                         f"the amend needs {spec.units_to_amount(asset, delta)} more {asset}, available "
                         f"{spec.units_to_amount(asset, available)}")
        if error is not None:
            self._reject(events, ts, order.client_id, order.client_order_id, order.order_id, "amend", *error)
            return
        if delta > 0:
            ledger.hold(order.client_id, buy, delta)  # type: ignore[union-attr]
        elif delta < 0:
            ledger.free(order.client_id, buy, -delta)  # type: ignore[union-attr]
        old_price, old_qty = order.price, order.qty
        requeued = new_stop != order.stop or new_price != order.price or new_qty > order.qty
        self._unstop(order)
        order.stop, order.price, order.qty, order.remaining, order.rate = new_stop, new_price, new_qty, new_qty, rate
        self._amended(events, ts, order, old_price, old_qty, new_price, new_qty, new_qty, requeued, rate, stop=new_stop,
                      reserved=order.funds or new_qty * rate)
        if requeued:
            order.priority = self.seq
        self._add_stop(order)

    def _cancel_all(self, cmd: CancelAll, events: list[Event]) -> None:
        live = self._live.get(cmd.client_id)
        if live:
            for order in sorted(live.values(), key=lambda o: o.order_id):
                self._remove(order, events, cmd.ts_ns, CancelReason.REQUESTED)

    def _clear(self, cmd: ClearBook, events: list[Event]) -> None:
        orders = [*self.book.iter_orders(), *sorted(self._stops.values(), key=_order_id)]
        self.seq += 1  # the operator's action is journaled, with its count, even on an empty book
        events.append(BookCleared(self.symbol, self.seq, cmd.ts_ns, cmd.client_id, cmd.text, len(orders)))
        for order in orders:
            self._remove(order, events, cmd.ts_ns, CancelReason.CLEARED)

    def _halt(self, cmd: HaltInstrument, events: list[Event]) -> None:
        if self.halted:
            self._reject(events, cmd.ts_ns, cmd.client_id, None, None, "halt", RejectReason.INSTRUMENT_HALTED,
                         f"{self.symbol} is already halted")
            return
        self.halted = True
        self.seq += 1
        events.append(InstrumentHalted(self.symbol, self.seq, cmd.ts_ns, cmd.client_id, cmd.text))

    def _resume(self, cmd: ResumeInstrument, events: list[Event]) -> None:
        if not self.halted:
            self._reject(events, cmd.ts_ns, cmd.client_id, None, None, "resume", RejectReason.NOT_HALTED,
                         f"{self.symbol} is not halted")
            return
        self.halted = False
        self.seq += 1
        events.append(InstrumentResumed(self.symbol, self.seq, cmd.ts_ns, cmd.client_id, cmd.text))

    def _reject_input(self, cmd: RejectInput, events: list[Event]) -> None:
        self._reject(events, cmd.ts_ns, cmd.client_id, cmd.client_order_id, None, cmd.command, cmd.reason, cmd.text,
                     transfer_id=cmd.transfer_id)

    def _transfer_error(self, cmd: Deposit | Withdraw, command: str) -> tuple[RejectReason, str] | None:
        """Why a deposit or withdrawal cannot be applied as it is (nothing is remembered of it then)."""
        ledger = self.ledger
        if ledger is None:
            return (RejectReason.BALANCES_DISABLED, f"{self.symbol} keeps no balances ([risk] balances = false)")
        if cmd.client_id.__class__ is not str or not cmd.client_id or cmd.transfer_id.__class__ is not str \
                or not cmd.transfer_id:
            return (RejectReason.MALFORMED, f"a {command} needs a client_id and a transfer_id")
        if cmd.asset not in (ledger.base, ledger.quote):
            return (RejectReason.UNKNOWN_ASSET,
                    f"{self.symbol} keeps balances of {ledger.base} and {ledger.quote}, not {str(cmd.asset)[:40]!r}")
        if cmd.amount.__class__ is not int or not 0 < cmd.amount <= MAX_AMOUNT_UNITS:
            return (RejectReason.INVALID_AMOUNT, f"the amount must be positive, got {cmd.amount!r}")
        outcome = ledger.transfers.get(cmd.transfer_id)
        if outcome is not None:
            return (RejectReason.DUPLICATE_TRANSFER_ID, f"transfer {cmd.transfer_id!r} was seen before: {outcome}")
        return None

    def _deposit(self, cmd: Deposit, events: list[Event]) -> None:
        error = self._transfer_error(cmd, "deposit")
        if error is not None:
            self._reject(events, cmd.ts_ns, cmd.client_id, None, None, "deposit", *error,
                         transfer_id=cmd.transfer_id)
            return
        ledger = self.ledger
        assert ledger is not None
        base = cmd.asset == ledger.base
        ledger.deposit(cmd.client_id, base, cmd.amount)
        self.seq += 1
        ledger.remember(cmd.transfer_id, transferred("deposited", self.spec.units_to_amount(cmd.asset, cmd.amount),
                                                     cmd.asset, cmd.client_id, self.seq))
        events.append(Deposited(self.symbol, self.seq, cmd.ts_ns, cmd.client_id, cmd.asset, cmd.amount,
                                cmd.transfer_id, ledger.balances(cmd.client_id, not base)))

    def _withdraw(self, cmd: Withdraw, events: list[Event]) -> None:
        error = self._transfer_error(cmd, "withdraw")
        ledger = self.ledger
        if error is None:
            assert ledger is not None
            base = cmd.asset == ledger.base
            if ledger.withdraw(cmd.client_id, base, cmd.amount):
                self.seq += 1
                ledger.remember(cmd.transfer_id, transferred(
                    "withdrawn", self.spec.units_to_amount(cmd.asset, cmd.amount), cmd.asset, cmd.client_id, self.seq))
                events.append(Withdrawn(self.symbol, self.seq, cmd.ts_ns, cmd.client_id, cmd.asset, cmd.amount,
                                        cmd.transfer_id, ledger.balances(cmd.client_id, not base)))
                return
            error = (RejectReason.INSUFFICIENT_FUNDS,
                     f"{cmd.asset} required {self.spec.units_to_amount(cmd.asset, cmd.amount)}, available "
                     f"{self.spec.units_to_amount(cmd.asset, ledger.available(cmd.client_id, not base))}")
            ledger.remember(cmd.transfer_id, refused(self.seq + 1, error[0].value, error[1]))
        self._reject(events, cmd.ts_ns, cmd.client_id, None, None, "withdraw", *error, transfer_id=cmd.transfer_id)

    # ------------------------------------------------------------ matching

    def _market_limit_key(self, buy: bool, opp: Any) -> int:
        bps = self.spec.price_band_bps
        if not opp:
            return _NOTHING
        if bps is None:
            return _NO_LIMIT
        best: int = opp.peekitem(0)[1].price
        if buy:  # highest price within the band, rounded into it
            return best * (_BPS + bps) // _BPS
        lowest = -((-best * (_BPS - bps)) // _BPS)  # lowest sell price within the band, rounded up
        return -lowest

    def _fok_fillable(self, opp: Any, limit_key: int, qty: int, client: str, stp: StpMode,
                      budget: int | None = None) -> bool:
        """Would matching fill all ``qty`` now? As :meth:`_match` walks the book: up to ``limit_key``, through
        self-trade prevention, and, for a market buy with a ``budget``, as far as the money goes (each fill's
        notional and taker fee, rounded per fill)."""
        need = qty
        ledger = self.ledger
        for key, level in opp.items():
            if key > limit_key:
                return False
            if stp is STP_NONE and budget is None:
                need -= level.total_lots + level.hidden
                if need <= 0:
                    return True
                continue
            # the level's queue as matching walks it: (client, shown, hidden, display); an iceberg whose slice is
            # taken whole shows its next slice at the back
            queue = deque((m.client_id, m.remaining, m.hidden, m.display) for m in level.orders if m.remaining)
            while queue:
                maker_client, shown, hidden, display = queue.popleft()
                if stp is not STP_NONE and maker_client == client:
                    if stp is CANCEL_RESTING:
                        continue
                    return False
                lots = need if need < shown else shown
                if budget is not None:
                    assert ledger is not None
                    if ledger.affordable(budget, level.price) < lots:
                        return False  # the money runs out first
                    notional = level.price * lots
                    budget -= notional + ceil_bps(notional, ledger.taker_bps)
                need -= lots
                if need <= 0:
                    return True
                if hidden:
                    queue.append((maker_client, display if display < hidden else hidden,
                                  hidden - display if display < hidden else 0, display))
        return False

    def _match(self, events: list[Event], ts: int, oid: int, client: str, coid: str,  # noqa: C901 - the hot loop
               side: Side, opp: Any,
               keys: list[list[int]], limit_key: int, remaining: int, stp: StpMode, rate: int = 0
               ) -> tuple[int, bool]:
        """Walk the opposite side up to ``limit_key``; return (remaining, stopped by STP). With balances, ``rate``
        is what each lot of the taker holds (0 for a buy: a budget, ``self._budget``, limits what it takes)."""
        index = self.book.orders
        symbol = self.symbol
        check_stp = stp is not STP_NONE
        append = events.append
        ledger = self.ledger
        taker_buys = side is BUY
        budget = ledger is not None and taker_buys and not rate
        settle = ledger.fill if ledger is not None else None
        while keys:
            key = keys[0][0]
            if key > limit_key:
                break
            level = opp[key]
            queue = level.orders
            price = level.price
            while queue:
                maker = queue[0]
                maker_left = maker.remaining
                if not maker_left:
                    queue.popleft()
                    continue
                if budget:
                    affordable = ledger.affordable(self._budget, price)  # type: ignore[union-attr]
                    if not affordable:  # the budget is spent: the rest of the order is canceled, nothing else
                        if not level.count:
                            del opp[key]
                        return remaining, False
                if check_stp and maker.client_id == client:
                    if stp is CANCEL_INCOMING:
                        return remaining, True
                    queue.popleft()
                    level.count -= 1
                    level.total_lots -= maker_left
                    maker.remaining = 0
                    if maker.display:  # an iceberg: its hidden quantity goes too
                        level.hidden -= maker.hidden
                        maker_left += maker.hidden
                        maker.hidden = 0
                    del index[maker.order_id]
                    self.seq += 1
                    append(self._canceled(ts, maker, price, maker_left, CancelReason.SELF_TRADE))
                    self._finish(maker)
                    if stp is CANCEL_BOTH:
                        if not level.count:
                            del opp[key]
                        return remaining, True
                    continue
                fill = remaining if remaining < maker_left else maker_left
                if budget and affordable < fill:
                    fill = affordable
                maker_left -= fill
                remaining -= fill
                maker.remaining = maker_left
                level.total_lots -= fill
                self.last_price = price
                trade_id = self.next_trade_id
                self.next_trade_id = trade_id + 1
                self.seq += 1
                if settle is None:
                    append(OrderFilled(symbol, self.seq, ts, trade_id, price, fill, side, maker.order_id,
                                       maker.client_id, maker.client_order_id, maker_left, oid, client, coid,
                                       remaining))
                else:  # balances (exchange.core.balances): settle the fill at the maker's price
                    if taker_buys:
                        maker_fee, taker_fee, balances = settle(client, maker.client_id, price, fill, rate, False)
                        if budget:
                            self._spent(client, price * fill + taker_fee, remaining, balances)
                    else:
                        maker_fee, taker_fee, balances = settle(maker.client_id, client, price, fill, maker.rate, True)
                    append(OrderFilled(symbol, self.seq, ts, trade_id, price, fill, side, maker.order_id,
                                       maker.client_id, maker.client_order_id, maker_left, oid, client, coid,
                                       remaining, maker_fee, taker_fee, balances))
                if not maker_left:
                    queue.popleft()
                    if maker.hidden:  # an iceberg's next slice joins the back of the level
                        self.seq += 1
                        append(OrderReplenished(symbol, self.seq, ts, maker.order_id, maker.client_id,
                                                maker.client_order_id, maker.side, price,
                                                self.book.replenish(level, maker, self.seq),
                                                maker.hidden))
                    else:
                        level.count -= 1
                        del index[maker.order_id]
                        self._finish(maker)
                if not remaining:
                    break
            if not level.count:
                del opp[key]
            if not remaining:
                break
        return remaining, False

    def _spent(self, client: str, cost: int, remaining: int, balances: list[Balance]) -> None:
        """A market buy with a budget paid ``cost`` for a fill; once its quantity is complete the rest of the budget
        goes back at once (and the fill's ``balances`` say so)."""
        ledger = self.ledger
        assert ledger is not None
        self._budget -= cost
        if not remaining and self._budget:
            ledger.free(client, True, self._budget)
            self._budget = 0
            account = ledger.accounts[client]
            balances[1] = (client, ledger.quote, account[2], account[3])  # the buyer's quote, after the release

    def _canceled(self, ts: int, order: Order, price: int, left: int, reason: CancelReason) -> OrderCanceled:
        """The event of a resting order leaving the book with ``left`` lots open (already taken out); with balances,
        what it held is released."""
        ledger = self.ledger
        if ledger is None:
            return OrderCanceled(self.symbol, self.seq, ts, order.order_id, order.client_id, order.client_order_id,
                                 order.side, price, left, reason)
        client = order.client_id
        released = left * order.rate or _budget_of(order)
        account = ledger.accounts[client]  # (it holds what the order held: Ledger.free, written out)
        i = 2 if order.side is BUY else 0
        account[i + 1] -= released
        account[i] += released
        return OrderCanceled(self.symbol, self.seq, ts, order.order_id, client, order.client_order_id, order.side,
                             price, left, reason, released,
                             [(client, ledger.quote if i else ledger.base, account[i], account[i + 1])])

    # ------------------------------------------------------------- helpers

    def _find(self, client: str, coid: str | None, oid: int | None, command: str, ts: int,
              events: list[Event]) -> Order | None:
        """The caller's live order named by client order id and/or order id, or a rejection."""
        order: Order | None = None
        error: tuple[RejectReason, str] | None = None
        if coid is None and oid is None:
            error = (RejectReason.MALFORMED, "name the order by client_order_id or order_id")
        elif oid is not None:
            order = self.book.orders.get(oid) or self._stops.get(oid)
            if order is None:
                if oid.__class__ is int and 0 < oid < self.next_order_id:
                    error = (RejectReason.TOO_LATE, f"order {oid} is no longer open")
                else:
                    error = (RejectReason.UNKNOWN_ORDER, f"there is no order {oid}")
            elif order.client_id != client:
                order, error = None, (RejectReason.NOT_OWNER, f"order {oid} belongs to another client")
            elif coid is not None and order.client_order_id != coid:
                order, error = None, (RejectReason.UNKNOWN_ORDER,
                                      f"order {oid} does not have client order id {coid!r}")
        else:
            assert coid is not None
            live = self._live.get(client)
            order = live.get(coid) if live else None
            if order is None:
                if self._dedupe.get(client, coid) is not None:
                    error = (RejectReason.TOO_LATE, f"order {coid!r} is no longer open")
                else:
                    error = (RejectReason.UNKNOWN_ORDER, f"no open order with client order id {coid!r}")
        if error is not None:
            self._reject(events, ts, client, coid, oid, command, *error)
        return order

    def _remove(self, order: Order, events: list[Event], ts: int, reason: CancelReason) -> None:
        left = order.remaining + order.hidden
        if order.__class__ is Stop:
            self._unstop(order)
        else:
            self.book.remove(order)
        self.seq += 1
        if self.ledger is None:
            events.append(OrderCanceled(self.symbol, self.seq, ts, order.order_id, order.client_id,
                                        order.client_order_id, order.side, order.price, left, reason))
        else:
            events.append(self._canceled(ts, order, order.price, left, reason))
        self._finish(order)

    def _cancel_remainder(self, events: list[Event], ts: int, oid: int, client: str, coid: str, side: Side,
                          price: int, left: int, reason: CancelReason, rate: int = 0) -> None:
        """An incoming order's remainder is dropped; with balances, what it still holds is released: ``left``
        lots at ``rate`` each, or what its budget has left (``rate`` 0 on a buy)."""
        self.seq += 1
        ledger = self.ledger
        if ledger is None:
            events.append(OrderCanceled(self.symbol, self.seq, ts, oid, client, coid, side, price, left, reason))
            return
        buy = side is BUY
        if rate or not buy:
            released = left * rate
        else:
            released, self._budget = self._budget, 0
        ledger.free(client, buy, released)
        events.append(OrderCanceled(self.symbol, self.seq, ts, oid, client, coid, side, price, left, reason,
                                    released, ledger.balances(client, buy)))

    def _reject(self, events: list[Event], ts: int, client: str, coid: str | None, oid: int | None,
                command: str, reason: RejectReason, text: str, *, transfer_id: str = "") -> None:
        self.seq += 1
        events.append(OrderRejected(self.symbol, self.seq, ts, client, coid, oid, command, reason, text, transfer_id))

    def _expire(self, ts: int, events: list[Event]) -> None:
        heap = self._expiries
        orders = self.book.orders
        while heap and heap[0][0] <= ts:
            expire_ns, oid = heappop(heap)
            order = orders.get(oid)
            if order is None:
                order = self._stops.get(oid)
                if order is None or order.expire_ns != expire_ns:
                    continue
                left = order.remaining
                self._unstop(order)
            elif order.expire_ns != expire_ns:
                continue
            else:
                left = order.remaining + order.hidden
                self.book.remove(order)
            self.seq += 1
            ledger = self.ledger
            if ledger is None:
                events.append(OrderExpired(self.symbol, self.seq, ts, oid, order.client_id, order.client_order_id,
                                           order.side, order.price, left))
            else:
                buy = order.side is BUY
                released = left * order.rate or _budget_of(order)
                ledger.free(order.client_id, buy, released)
                events.append(OrderExpired(self.symbol, self.seq, ts, oid, order.client_id, order.client_order_id,
                                           order.side, order.price, left, released,
                                           ledger.balances(order.client_id, buy)))
            self._finish(order)

    def _finish(self, order: Order) -> None:
        """A live order is done (filled, canceled, expired): keep its id only for deduplication."""
        client, coid = order.client_id, order.client_order_id
        live = self._live[client]
        del live[coid]
        if not live:
            del self._live[client]
        if order.expire_ns:
            self._expiring -= 1
            if len(self._expiries) > 2 * self._expiring + _EXPIRY_SLACK:
                self._compact_expiries()
        self._remember(client, coid, order.order_id)

    def _compact_expiries(self) -> None:
        """Drop the entries of finished orders from the expiry heap (in place: ``_expire`` may hold it).

        Expiry order stays exactly (expire_ns, order_id): the keys are unique, so the heap's layout does not
        matter. The order being re-queued by an amend is out of the book while it trades, but live. It runs
        once the live GTD orders' entries are outnumbered, so its cost, about 0.5 us an entry (0.1 s with
        100,000 GTD orders resting), is amortised over as many finished ones; it holds the loop that long.
        """
        orders, requeuing = self.book.orders, self._requeuing
        heap = self._expiries
        stops = self._stops
        heap[:] = [e for e in heap if ((o := orders.get(e[1]) or stops.get(e[1])) is not None and o.expire_ns == e[0])
                   or e[1] == requeuing]
        heapify(heap)


class Exchange:
    """Several instruments behind one ``apply``: routes each command to its engine.

    A :class:`CancelAll` without an instrument goes to every engine (in symbol
    order). A command for an unknown instrument is rejected with sequence
    number 0: no instrument's sequence covers it.
    """

    def __init__(self, instruments: Iterable[Instrument]) -> None:
        self.engines: dict[str, MatchingEngine] = {}
        for spec in instruments:
            if spec.symbol in self.engines:
                raise ValueError(f"instrument {spec.symbol!r} is defined twice")
            self.engines[spec.symbol] = MatchingEngine(spec)

    def apply(self, command: Command) -> list[Event]:
        instrument = command.instrument
        if instrument is None:
            events: list[Event] = []
            for symbol in sorted(self.engines):
                events += self.engines[symbol].apply(command)
            return events
        engine = self.engines.get(instrument)
        if engine is None:
            return [OrderRejected(str(instrument), 0, command.ts_ns, getattr(command, "client_id", ""),
                                  getattr(command, "client_order_id", None), None, command_name(command),
                                  RejectReason.UNKNOWN_INSTRUMENT, f"unknown instrument {instrument!r}")]
        return engine.apply(command)
