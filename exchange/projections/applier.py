"""Rebuild an engine image from a starting state plus the events that followed it.

:class:`EventApplier` is the inverse of the matching engine's output: it never
matches anything, it only follows what the events say happened, on the same
:class:`exchange.core.book.OrderBook`, so its :meth:`~EventApplier.state_hash` is
comparable with :meth:`exchange.core.matching.MatchingEngine.state_hash`.

Rules (one event at a time, sequence numbers strictly +1):

- ``accepted``: the order id counter moves past it. A GTC/GTD limit order joins
  the back of its level at once with priority = this seq: nothing else can
  enter that level before the same command's fills end, so the queue order is
  the engine's. IOC/FOK/market orders are only tracked until they end. A stop
  or stop-limit order waits (not in the book) with priority = this seq;
- ``filled``: the trade id counter moves past it, and the last trade price is
  its price; the maker's and the taker's open quantity become the event's
  remaining quantities; an order with none left is finished (the maker first:
  the engine finishes it first);
- ``triggered``: the waiting stop leaves the waiting stops and becomes a taker
  like an accepted order: a GTC/GTD stop-limit joins the back of its level with
  priority = this seq, anything else is tracked until it ends;
- ``canceled``/``expired``: the order leaves the book (or the waiting stops) and is finished;
- ``amended``: a kept-priority amend lowers the quantity in place; a re-queue
  takes the order out and puts it back at the back of its (new) level with
  priority = this seq; fills or a self-trade cancel may follow. A waiting stop
  takes its new stop price, price and quantity (and, re-queued, priority = this seq);
- ``halted``/``resumed``: the halted flag is set/cleared (it is part of the
  state and of its hash, as in the engine);
- ``cleared``: nothing changes (the ``canceled`` events that follow do), but
  its count must be the number of open orders and waiting stops;
- ``rejected``: nothing changes but the seq.

Icebergs: as a taker (accepted, or re-queued by an amend) an iceberg trades with its whole open
quantity, so the applier keeps it in its level showing all of it while its fills come; at the first
event that is not part of that matching (not one of its taker fills, nor a maker's ``replenished`` or
self-trade cancel) it shows ``min(display, open)`` and hides the rest, as the engine rests it. A maker
fill that empties an iceberg's slice while it hides more must be followed at once by its
``replenished`` event: the next slice joins the back of the level with priority = that seq.

Balances (an instrument with ``balances``): every event that moves money carries the resulting
``balances`` of each account it changed, and they become the applier's (the fees account, client
``""``, included); an order's ``rate`` -- what each of its open lots holds -- is what its ``accepted``
(or re-queuing ``amended``) event reserved over its open quantity; deposits and withdrawals, and a
withdrawal refused ``insufficient_funds``, are remembered by transfer id with what the engine remembers.
No balance may go negative.

Every event about an order must name the order's owner: the client (and client order id) of a
``canceled``, ``expired`` or ``amended`` event, and the maker's and the taker's of a ``filled`` one,
are those the order was accepted with. The engine never emits anything else, so an event that names
another client was not the engine's outcome for this book (another writer's, or a doctored row).

A finished order enters the dedupe window exactly as the engine remembers it
(:class:`exchange.core.dedupe.DedupeWindow`, same ``dedupe_window`` and
``dedupe_per_client``, same finish order). Started from a snapshot, which
leaves the window out, the applier knows only the orders finished since; since
whether an order is remembered depends only on the orders finished after it,
its window is exactly the whole window's entries that finished after the
snapshot, in order, and its image says it is partial
(``EngineState.done_complete`` False) until it holds ``dedupe_window`` entries:
then no order finished before the snapshot can still be in the window. (Fewer
could be enough, when every client that finished orders before the snapshot
has finished ``dedupe_per_client`` since, but the applier cannot know those
clients.) Any event that does not fit (a gap in the seq, an unknown order, a
quantity that does not add up, a finished order whose client order id is still
remembered) raises :class:`ReplayError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from exchange.core.balances import FEES_ACCOUNT, digest, refused, summarize, transfer_summary, transferred
from exchange.core.book import Iceberg, Level, Order, OrderBook, Stop, waiting_stop
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
from exchange.core.instruments import Instrument
from exchange.core.state import (
    EngineState,
    book_order,
    engine_state_hash,
    resting_orders,
    stop_order,
    stop_orders,
    stops_digest,
)
from exchange.core.types import CancelReason, OrderType, RejectReason, Side, TimeInForce

__all__ = ["EventApplier", "ReplayError"]

_BUY = Side.BUY
_LIMIT, _STOP, _STOP_LIMIT = OrderType.LIMIT, OrderType.STOP, OrderType.STOP_LIMIT
_SELF_TRADE = CancelReason.SELF_TRADE
_RESTING_TIF = (TimeInForce.GTC, TimeInForce.GTD)


def _order_id(order: Order) -> int:
    return order.order_id


class ReplayError(Exception):
    """An event does not follow from the state it is applied to."""


class EventApplier:
    """One instrument's book, counters and dedupe window, driven by events only."""

    def __init__(self, spec: Instrument, state: EngineState | None = None) -> None:
        if state is None:
            state = EngineState(spec.symbol, 0, 1, 1, [])
        if state.instrument != spec.symbol:
            raise ValueError(f"state of {state.instrument!r} given for instrument {spec.symbol!r}")
        self.spec = spec
        self.symbol = spec.symbol
        self.book = OrderBook()
        self.seq = state.seq
        self.next_order_id = state.next_order_id
        self.next_trade_id = state.next_trade_id
        self.halted = state.halted
        self.events_applied = 0
        self._transient: dict[int, tuple[str, str]] = {}  # accepted orders that never rest, until they end
        self._dedupe = DedupeWindow(spec.dedupe_window, spec.dedupe_per_client)
        self._done_complete = state.done_complete  # else: until the window is full
        # balances: client -> [base available, base reserved, quote available, quote reserved]
        self.accounts: dict[str, list[int]] = {c: [ba, br, qa, qr] for c, ba, br, qa, qr in state.accounts}
        self.fees = state.fees
        self.transfers = dict(state.transfers)
        self._transfers_complete = state.transfers_complete  # a snapshot's: those decided after it only
        self._transfers_count, self._transfers_sum = transfer_summary(state)  # all of them
        for r in state.orders:
            self.book.add(book_order(r))
        # order types: the waiting stops by order id, the last trade's price, an iceberg still matching as a
        # taker (it shows all its open quantity until then), and an iceberg maker whose slice a fill just emptied
        self._stops: dict[int, Stop] = {s.order_id: stop_order(s) for s in state.stops}
        self.last_price = state.last_price_ticks
        self._taking: Iceberg | None = None
        self._refill: Order | None = None
        for client_id, client_order_id, order_id in state.done:
            self._remember(client_id, client_order_id, order_id, state.seq)

    # ------------------------------------------------------------------ API

    def apply_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.apply(event)

    def apply(self, event: Event) -> None:
        """Apply one event; raise :class:`ReplayError` if it does not fit."""
        seq = event.seq
        if seq != self.seq + 1:
            raise ReplayError(f"{self.symbol}: event seq {seq} follows seq {self.seq} (a gap or a duplicate)")
        if event.instrument != self.symbol:
            raise ReplayError(f"{self.symbol}: event {seq} belongs to {event.instrument!r}")
        self._ended_matching(event)
        self.seq = seq
        self.events_applied += 1
        if isinstance(event, OrderFilled):
            self._fill(event)
        elif isinstance(event, OrderAccepted):
            self._accept(event)
        elif isinstance(event, OrderCanceled | OrderExpired):
            self._end(event.order_id, seq, event.client_id, event.client_order_id)
            self._balances(event.balances, seq)
        elif isinstance(event, OrderAmended):
            self._amend(event)
        elif isinstance(event, OrderTriggered):
            self._trigger(event)
        elif isinstance(event, OrderReplenished):
            self._replenish(event)
        elif isinstance(event, BookCleared):
            self._cleared(event)
        elif isinstance(event, InstrumentHalted | InstrumentResumed):
            halting = isinstance(event, InstrumentHalted)
            if self.halted == halting:
                raise ReplayError(f"{self.symbol}: seq {seq} {'halts' if halting else 'resumes'} an instrument "
                                  f"that is {'already halted' if halting else 'trading'}")
            self.halted = halting
        elif isinstance(event, Deposited | Withdrawn):
            kind = "deposited" if isinstance(event, Deposited) else "withdrawn"
            self._decided(event.transfer_id, transferred(
                kind, self.spec.units_to_amount(event.asset, event.amount), event.asset, event.client_id, seq), seq)
            self._balances(event.balances, seq)
        elif isinstance(event, OrderRejected):
            if event.transfer_id and event.reason is RejectReason.INSUFFICIENT_FUNDS:  # (as the engine remembers)
                self._decided(event.transfer_id, refused(seq, event.reason.value, event.text), seq)
        else:
            raise ReplayError(f"{self.symbol}: not an event: {event!r}")

    def _cleared(self, event: BookCleared) -> None:
        """A clear's count is every open order and waiting stop (their ``canceled`` events follow)."""
        if event.orders != len(self.book.orders) + len(self._stops):
            raise ReplayError(f"{self.symbol}: seq {event.seq} clears {event.orders} orders, but "
                              f"{len(self.book.orders)} are open and {len(self._stops)} stops wait")

    def state_hash(self) -> str:
        self._settle()
        accounts, fees, _ = self._ledger_image()
        return engine_state_hash(self.book, self.halted,
                                 digest(accounts, fees, (self._transfers_count, self._transfers_sum)),
                                 stops_digest(sorted(self._stops.values(), key=_order_id), self.last_price))

    def _decided(self, transfer_id: str, outcome: str, seq: int) -> None:
        """A transfer id decided on (as the engine remembers it: :meth:`exchange.core.balances.Ledger.remember`)."""
        if transfer_id in self.transfers:
            raise ReplayError(f"{self.symbol}: seq {seq} decides transfer {transfer_id!r}, decided before")
        self.transfers[transfer_id] = outcome
        self._transfers_count += 1
        self._transfers_sum = (self._transfers_sum + summarize([(transfer_id, outcome)])[1]) % 2**128

    def _ledger_image(self) -> tuple[list[tuple[str, int, int, int, int]], int, list[tuple[str, str]]]:
        return ([(c, a[0], a[1], a[2], a[3]) for c, a in sorted(self.accounts.items()) if any(a)], self.fees,
                sorted(self.transfers.items()))

    def _balances(self, balances: Sequence[Balance], seq: int) -> None:
        """The resulting balances an event carries become the applier's."""
        base, quote = self.spec.base_asset, self.spec.quote_asset
        for client, asset, available, reserved in balances:
            if available < 0 or reserved < 0:
                raise ReplayError(f"{self.symbol}: seq {seq} leaves {client!r} a negative {asset} balance "
                                  f"({available} available, {reserved} reserved)")
            if client == FEES_ACCOUNT:
                self.fees = available
                continue
            account = self.accounts.get(client)
            if account is None:
                account = self.accounts[client] = [0, 0, 0, 0]
            if asset == base:
                account[0], account[1] = available, reserved
            elif asset == quote:
                account[2], account[3] = available, reserved
            else:
                raise ReplayError(f"{self.symbol}: seq {seq} moves {asset!r}, neither {base} nor {quote}")

    def export_state(self) -> EngineState:
        """The image as an :class:`EngineState` (orders in priority order), like the engine's export."""
        if self._transient or self._refill is not None:
            busy = sorted([*self._transient, *([self._refill.order_id] if self._refill is not None else [])])
            raise ReplayError(f"{self.symbol}: orders {busy} are still being processed at seq "
                              f"{self.seq}; an image exists only between two commands")
        self._settle()
        done = self._dedupe.entries()
        accounts, fees, transfers = self._ledger_image()
        return EngineState(self.symbol, self.seq, self.next_order_id, self.next_trade_id,
                           resting_orders(self.book), done, self.halted,
                           done_complete=self._done_complete or len(done) >= self.spec.dedupe_window,
                           accounts=accounts, fees=fees, transfers=transfers,
                           transfers_complete=self._transfers_complete,
                           transfers_count=0 if self._transfers_complete else self._transfers_count,
                           transfers_sum=0 if self._transfers_complete else self._transfers_sum,
                           stops=stop_orders(self._stops.values()), last_price_ticks=self.last_price)

    @property
    def done(self) -> list[tuple[str, str, int]]:
        return self._dedupe.entries()

    def _remember(self, client_id: str, client_order_id: str, order_id: int, seq: int) -> None:
        try:
            self._dedupe.remember(client_id, client_order_id, order_id)
        except ValueError as exc:  # the engine rejects a remembered id, so it can never finish twice
            raise ReplayError(f"{self.symbol}: seq {seq}: {exc}") from None

    # -------------------------------------------------------------- events

    def _accept(self, ev: OrderAccepted) -> None:
        oid = ev.order_id
        if oid != self.next_order_id:
            raise ReplayError(f"{self.symbol}: seq {ev.seq} accepts order {oid} but the next order id is "
                              f"{self.next_order_id}")
        self.next_order_id = oid + 1
        self._balances(ev.balances, ev.seq)
        otype = ev.order_type
        if otype in (_STOP, _STOP_LIMIT):  # it waits (a stop buy's budget, funds, is what it holds)
            self._stops[oid] = waiting_stop(oid, ev.client_id, ev.client_order_id, ev.side, otype,
                                            ev.stop_price_ticks, ev.price_ticks, ev.qty_lots, ev.seq, ev.tif,
                                            ev.expire_ns, ev.stp, 0 if ev.funds else ev.reserved // ev.qty_lots,
                                            ev.funds)
        elif otype == _LIMIT and ev.tif in _RESTING_TIF:
            order: Order
            if ev.display_qty_lots:  # an iceberg: it shows all it has until its matching ends (see _settle)
                order = self._taking = Iceberg(oid, ev.client_id, ev.client_order_id, ev.side, ev.price_ticks,
                                               ev.qty_lots, ev.qty_lots, ev.seq, ev.expire_ns, ev.post_only, ev.stp,
                                               ev.reserved // ev.qty_lots, ev.display_qty_lots, 0)
            else:
                order = Order(oid, ev.client_id, ev.client_order_id, ev.side, ev.price_ticks, ev.qty_lots,
                              ev.qty_lots, ev.seq, ev.expire_ns, ev.post_only, ev.stp, ev.reserved // ev.qty_lots)
            self.book.add(order)
        else:
            self._transient[oid] = (ev.client_id, ev.client_order_id)

    def _trigger(self, ev: OrderTriggered) -> None:
        """A waiting stop's condition was met: it becomes a taker, as an accepted order does."""
        oid, seq = ev.order_id, ev.seq
        stop = self._stops.pop(oid, None)
        if stop is None:
            raise ReplayError(f"{self.symbol}: seq {seq} triggers order {oid}, which is not a waiting stop")
        self._owner(seq, oid, (stop.client_id, stop.client_order_id), (ev.client_id, ev.client_order_id))
        buy = stop.side is _BUY
        if (ev.stop_price_ticks, ev.price_ticks, ev.qty_lots, ev.order_type, ev.side) != (
                stop.stop, stop.price, stop.qty, stop.otype, stop.side) or not (
                ev.trigger_price_ticks >= stop.stop if buy else ev.trigger_price_ticks <= stop.stop):
            raise ReplayError(f"{self.symbol}: seq {seq} triggers order {oid} as a {ev.side} {ev.order_type} of "
                              f"{ev.qty_lots} at {ev.price_ticks} (stop {ev.stop_price_ticks}) by a trade at "
                              f"{ev.trigger_price_ticks}, but it waits as a {stop.side} {stop.otype} of {stop.qty} "
                              f"at {stop.price} (stop {stop.stop})")
        if stop.otype == _STOP_LIMIT and stop.tif in _RESTING_TIF:
            self.book.add(Order(oid, stop.client_id, stop.client_order_id, stop.side, stop.price, stop.qty, stop.qty,
                                seq, stop.expire_ns, False, stop.stp, stop.rate))
        else:
            self._transient[oid] = (stop.client_id, stop.client_order_id)

    def _replenish(self, ev: OrderReplenished) -> None:
        """The next slice of the iceberg whose slice the previous event (a fill) emptied joins the back of its
        level."""
        order, self._refill = self._refill, None
        if order is None or order.order_id != ev.order_id:
            raise ReplayError(f"{self.symbol}: seq {ev.seq} replenishes order {ev.order_id}, whose shown slice the "
                              "fill before it did not empty")
        self._owner(ev.seq, ev.order_id, (order.client_id, order.client_order_id), (ev.client_id, ev.client_order_id))
        hidden = order.hidden
        shown = order.display if order.display < hidden else hidden
        if (ev.shown_lots, ev.hidden_lots, ev.price_ticks) != (shown, hidden - shown, order.price):
            raise ReplayError(f"{self.symbol}: seq {ev.seq} replenishes order {ev.order_id} at {ev.price_ticks} "
                              f"showing {ev.shown_lots} and hiding {ev.hidden_lots}, but at {order.price} it hides "
                              f"{hidden} in slices of {order.display}")
        assert isinstance(order, Iceberg)
        self.book.replenish(self._level(order), order, ev.seq)

    def _ended_matching(self, event: Event) -> None:
        """Before ``event``: an emptied iceberg slice must be replenished by it, and an iceberg matching as a taker
        rests (:meth:`_settle`) unless ``event`` is part of that matching (one of its fills, or a maker's
        replenishment or self-trade cancel)."""
        if self._refill is None and self._taking is None:
            return
        if self._refill is not None and not isinstance(event, OrderReplenished):
            raise ReplayError(f"{self.symbol}: seq {event.seq} follows the fill of order {self._refill.order_id}'s "
                              f"shown slice, but is not its replenished event ({self._refill.hidden} lots are hidden)")
        if self._taking is None:
            return
        oid = self._taking.order_id
        if isinstance(event, OrderFilled):
            matching = event.taker_order_id == oid
        elif isinstance(event, OrderCanceled):
            matching = event.reason == _SELF_TRADE and event.order_id != oid
        else:
            matching = isinstance(event, OrderReplenished)
        if not matching:
            self._settle()

    def _settle(self) -> None:
        """The iceberg that was matching as a taker rests as the engine rests it: showing ``min(display, open)``,
        hiding the rest."""
        order, self._taking = self._taking, None
        if order is None or self.book.orders.get(order.order_id) is not order:
            return  # (none, or it finished while it matched)
        hidden = order.remaining - order.display
        if hidden > 0:
            level = self._level(order)
            level.total_lots -= hidden
            level.hidden += hidden
            order.remaining = order.display
            order.hidden = hidden

    def _level(self, order: Order) -> Level:
        level: Level = self.book.bids[-order.price] if order.side is _BUY else self.book.asks[order.price]
        return level

    def _fill(self, ev: OrderFilled) -> None:
        if ev.trade_id != self.next_trade_id:
            raise ReplayError(f"{self.symbol}: seq {ev.seq} is trade {ev.trade_id} but the next trade id is "
                              f"{self.next_trade_id}")
        self.next_trade_id = ev.trade_id + 1
        self.last_price = ev.price_ticks
        self._balances(ev.balances, ev.seq)
        self._reduce(ev.maker_order_id, ev.qty_lots, ev.maker_remaining_lots, ev.seq, ev.maker_client_id,
                     ev.maker_client_order_id, maker=True)
        self._reduce(ev.taker_order_id, ev.qty_lots, ev.taker_remaining_lots, ev.seq, ev.taker_client_id,
                     ev.taker_client_order_id, maker=False)

    def _owner(self, seq: int, oid: int, owner: tuple[str, str], named: tuple[str, str]) -> None:
        """The event at ``seq`` names ``named`` (client, client order id) for order ``oid``, owned by ``owner``."""
        if named != owner:
            raise ReplayError(f"{self.symbol}: seq {seq} names client {named[0]!r} (client order id {named[1]!r}) for "
                              f"order {oid}, which belongs to {owner[0]!r} ({owner[1]!r}): not an outcome of this "
                              "book (another writer's event, or an edited row)")

    def _reduce(self, oid: int, lots: int, left: int, seq: int, client: str, coid: str, *, maker: bool) -> None:
        order = self.book.orders.get(oid)
        if order is None:
            if maker or oid not in self._transient:
                raise ReplayError(f"{self.symbol}: seq {seq} fills order {oid}, which is not open")
            self._owner(seq, oid, self._transient[oid], (client, coid))
            if not left:
                client, coid = self._transient.pop(oid)
                self._remember(client, coid, oid, seq)
            return
        self._owner(seq, oid, (order.client_id, order.client_order_id), (client, coid))
        if order.remaining - lots != left:
            raise ReplayError(f"{self.symbol}: seq {seq} fills {lots} of order {oid} leaving {left}, but "
                              f"{order.remaining} was open")
        if not left and order.hidden:  # an iceberg's slice: it leaves the queue, its next one follows at once
            level = self._level(order)
            level.total_lots -= lots
            order.remaining = 0
            queue = level.orders
            while queue and not queue[0].remaining and queue[0] is not order:
                queue.popleft()  # (dead entries: they may go whenever)
            if queue and queue[0] is order:
                queue.popleft()
            else:
                queue.remove(order)
            self._refill = order
            return
        if not left:
            self.book.remove(order)  # subtracts the (last) open quantity from the level
            self._remember(order.client_id, order.client_order_id, oid, seq)
            return
        self._level(order).total_lots -= lots
        order.remaining = left

    def _end(self, oid: int, seq: int, client: str, coid: str) -> None:
        order = self.book.orders.get(oid) or self._stops.get(oid)
        if order is not None:
            self._owner(seq, oid, (order.client_id, order.client_order_id), (client, coid))
            if order.__class__ is Stop:
                del self._stops[oid]
            else:
                self.book.remove(order)
            self._remember(order.client_id, order.client_order_id, oid, seq)
            return
        ident = self._transient.pop(oid, None)
        if ident is None:
            raise ReplayError(f"{self.symbol}: seq {seq} ends order {oid}, which is not open")
        self._owner(seq, oid, ident, (client, coid))
        self._remember(ident[0], ident[1], oid, seq)

    def _amend(self, ev: OrderAmended) -> None:
        order = self.book.orders.get(ev.order_id)
        if order is None:
            stop = self._stops.get(ev.order_id)
            if stop is None:
                raise ReplayError(f"{self.symbol}: seq {ev.seq} amends order {ev.order_id}, which is not open")
            self._amend_stop(ev, stop)
            return
        self._owner(ev.seq, ev.order_id, (order.client_id, order.client_order_id), (ev.client_id, ev.client_order_id))
        self._balances(ev.balances, ev.seq)
        if not ev.requeued:
            lots = order.qty - ev.qty_lots
            if lots <= 0 or order.open - lots != ev.remaining_lots:
                raise ReplayError(f"{self.symbol}: seq {ev.seq} reduces order {ev.order_id} to {ev.qty_lots} "
                                  f"(open {ev.remaining_lots}) from {order.qty} (open {order.open})")
            self.book.reduce(order, lots)  # (an iceberg loses hidden quantity first)
            if order.hidden != ev.hidden_lots:
                raise ReplayError(f"{self.symbol}: seq {ev.seq} leaves order {ev.order_id} {ev.hidden_lots} lots "
                                  f"hidden, but reducing it leaves {order.hidden}")
            return
        self.book.remove(order)
        display, remaining = order.display, ev.remaining_lots
        if ev.hidden_lots != (remaining - display if display and display < remaining else 0):
            raise ReplayError(f"{self.symbol}: seq {ev.seq} re-queues order {ev.order_id} with {remaining} open and "
                              f"{ev.hidden_lots} hidden, but it shows {display or 'all'} at a time")
        rate = ev.reserved // remaining
        again: Order
        if display:  # it trades with all it has, then rests showing one slice (see _settle)
            again = self._taking = Iceberg(order.order_id, order.client_id, order.client_order_id, order.side,
                                           ev.price_ticks, ev.qty_lots, remaining, ev.seq, order.expire_ns,
                                           order.post_only, order.stp, rate, display, 0)
        else:
            again = Order(order.order_id, order.client_id, order.client_order_id, order.side, ev.price_ticks,
                          ev.qty_lots, remaining, ev.seq, order.expire_ns, order.post_only, order.stp, rate)
        self.book.add(again)

    def _amend_stop(self, ev: OrderAmended, stop: Stop) -> None:
        """A waiting stop's new stop price, price and quantity; re-queued (a new stop price or price, or more
        quantity) it goes behind the stops of its stop price: priority = this seq."""
        self._owner(ev.seq, ev.order_id, (stop.client_id, stop.client_order_id), (ev.client_id, ev.client_order_id))
        self._balances(ev.balances, ev.seq)
        requeued = ev.stop_price_ticks != stop.stop or ev.price_ticks != stop.price or ev.qty_lots > stop.qty
        if (ev.old_price_ticks, ev.old_qty_lots) != (stop.price, stop.qty) or ev.remaining_lots != ev.qty_lots \
                or ev.stop_price_ticks <= 0 or ev.requeued != requeued or (stop.otype == _STOP and ev.price_ticks):
            raise ReplayError(f"{self.symbol}: seq {ev.seq} amends waiting stop {ev.order_id} from {ev.old_qty_lots} "
                              f"at {ev.old_price_ticks} to {ev.qty_lots} at {ev.price_ticks}, stop "
                              f"{ev.stop_price_ticks} (re-queued {ev.requeued}), but it is a {stop.otype} of "
                              f"{stop.qty} at {stop.price}, stop {stop.stop}")
        stop.stop, stop.price, stop.qty, stop.remaining = ev.stop_price_ticks, ev.price_ticks, ev.qty_lots, ev.qty_lots
        if not stop.funds:  # (a budget holds the same whatever the quantity)
            stop.rate = ev.reserved // ev.qty_lots
        if requeued:
            stop.priority = ev.seq

