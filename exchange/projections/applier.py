"""Rebuild an engine image from a starting state plus the events that followed it.

:class:`EventApplier` is the inverse of the matching engine's output: it never
matches anything, it only follows what the events say happened, on the same
:class:`exchange.core.book.OrderBook`, so its :meth:`~EventApplier.state_hash` is
comparable with :meth:`exchange.core.matching.MatchingEngine.state_hash`.

Rules (one event at a time, sequence numbers strictly +1):

- ``accepted``: the order id counter moves past it. A GTC/GTD limit order joins
  the back of its level at once with priority = this seq: nothing else can
  enter that level before the same command's fills end, so the queue order is
  the engine's. IOC/FOK/market orders are only tracked until they end;
- ``filled``: the trade id counter moves past it; the maker's and the taker's
  open quantity become the event's remaining quantities; an order with none
  left is finished (the maker first: the engine finishes it first);
- ``canceled``/``expired``: the order leaves the book and is finished;
- ``amended``: a kept-priority amend lowers the quantity in place; a re-queue
  takes the order out and puts it back at the back of its (new) level with
  priority = this seq; fills or a self-trade cancel may follow;
- ``halted``/``resumed``: the halted flag is set/cleared (it is part of the
  state and of its hash, as in the engine);
- ``cleared``: nothing changes (the ``canceled`` events that follow do), but
  its count must be the number of open orders;
- ``rejected``: nothing changes but the seq.

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
from exchange.core.book import Order, OrderBook
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
    Withdrawn,
)
from exchange.core.instruments import Instrument
from exchange.core.state import EngineState, engine_state_hash, resting_orders
from exchange.core.types import OrderType, RejectReason, Side, StpMode, TimeInForce

__all__ = ["EventApplier", "ReplayError"]

_BUY = Side.BUY
_LIMIT = OrderType.LIMIT
_RESTING_TIF = (TimeInForce.GTC, TimeInForce.GTD)


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
            self.book.add(Order(r.order_id, r.client_id, r.client_order_id, Side(r.side), r.price_ticks, r.qty_lots,
                                r.remaining_lots, r.priority, r.expire_ns, r.post_only, StpMode(r.stp), r.rate))
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
        elif isinstance(event, BookCleared):
            if event.orders != len(self.book.orders):
                raise ReplayError(f"{self.symbol}: seq {seq} clears {event.orders} orders, but "
                                  f"{len(self.book.orders)} are open")
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

    def state_hash(self) -> str:
        accounts, fees, _ = self._ledger_image()
        return engine_state_hash(self.book, self.halted,
                                 digest(accounts, fees, (self._transfers_count, self._transfers_sum)))

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
        if self._transient:
            raise ReplayError(f"{self.symbol}: orders {sorted(self._transient)} are still being processed at seq "
                              f"{self.seq}; an image exists only between two commands")
        done = self._dedupe.entries()
        accounts, fees, transfers = self._ledger_image()
        return EngineState(self.symbol, self.seq, self.next_order_id, self.next_trade_id,
                           resting_orders(self.book), done, self.halted,
                           done_complete=self._done_complete or len(done) >= self.spec.dedupe_window,
                           accounts=accounts, fees=fees, transfers=transfers,
                           transfers_complete=self._transfers_complete,
                           transfers_count=0 if self._transfers_complete else self._transfers_count,
                           transfers_sum=0 if self._transfers_complete else self._transfers_sum)

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
        if ev.order_type == _LIMIT and ev.tif in _RESTING_TIF:
            self.book.add(Order(oid, ev.client_id, ev.client_order_id, ev.side, ev.price_ticks, ev.qty_lots,
                                ev.qty_lots, ev.seq, ev.expire_ns, ev.post_only, ev.stp, ev.reserved // ev.qty_lots))
        else:
            self._transient[oid] = (ev.client_id, ev.client_order_id)

    def _fill(self, ev: OrderFilled) -> None:
        if ev.trade_id != self.next_trade_id:
            raise ReplayError(f"{self.symbol}: seq {ev.seq} is trade {ev.trade_id} but the next trade id is "
                              f"{self.next_trade_id}")
        self.next_trade_id = ev.trade_id + 1
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
        if not left:
            self.book.remove(order)  # subtracts the (last) open quantity from the level
            self._remember(order.client_id, order.client_order_id, oid, seq)
            return
        levels = self.book.bids if order.side is _BUY else self.book.asks
        levels[-order.price if order.side is _BUY else order.price].total_lots -= lots
        order.remaining = left

    def _end(self, oid: int, seq: int, client: str, coid: str) -> None:
        order = self.book.orders.get(oid)
        if order is not None:
            self._owner(seq, oid, (order.client_id, order.client_order_id), (client, coid))
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
            raise ReplayError(f"{self.symbol}: seq {ev.seq} amends order {ev.order_id}, which is not open")
        self._owner(ev.seq, ev.order_id, (order.client_id, order.client_order_id), (ev.client_id, ev.client_order_id))
        self._balances(ev.balances, ev.seq)
        if not ev.requeued:
            lots = order.qty - ev.qty_lots
            if lots <= 0 or order.remaining - lots != ev.remaining_lots:
                raise ReplayError(f"{self.symbol}: seq {ev.seq} reduces order {ev.order_id} to {ev.qty_lots} "
                                  f"(open {ev.remaining_lots}) from {order.qty} (open {order.remaining})")
            self.book.reduce(order, lots)
            return
        self.book.remove(order)
        self.book.add(Order(order.order_id, order.client_id, order.client_order_id, order.side, ev.price_ticks,
                            ev.qty_lots, ev.remaining_lots, ev.seq, order.expire_ns, order.post_only, order.stp,
                            ev.reserved // ev.remaining_lots))

