"""Drive :class:`exchange.core.matching.MatchingEngine` and the naive reference side by side.

:class:`Harness` applies one command to both, compares the events whole (with
the prose ``text`` of rejections blanked out) and checks, after every command,
the invariants that must hold whatever the command was:

- no exception escapes ``apply``;
- ``engine.book.check_invariants()`` passes;
- the book, read straight from its levels, is never crossed; each level's total
  and count match its live orders; priorities increase strictly along a level;
- the resting orders (ids, owners, price, total and open quantity, expiry,
  flags) equal the reference's, in the same priority order, and each one's
  priority is the ``seq`` of the event that queued it (accept or re-queuing
  amend);
- sequence numbers go up by exactly one per event, with no gaps, and end at
  ``engine.seq``; trade ids likewise;
- quantity is conserved, tracked from the events alone: for every order,
  filled + open + canceled + expired == its current total quantity, and the
  buy side filled exactly as much as the sell side;
- every fill is between opposite sides, at a price the taker accepted, and
  never between two orders of one owner when the taker asked for STP;
- the dedupe window (``export_state().done``) is the reference's, which
  recomputes the rule from the whole history of finished orders;
- stops and icebergs: the waiting stops (``export_state().stops``, every field,
  priority included) and the last trade price are the reference's; each
  resting iceberg's display, shown and hidden lots are the reference's; a
  ``triggered`` event names a trade of the same command whose price meets the
  stop's condition, comes once per stop, and only a triggered stop ever trades;
  an iceberg maker's fill leaves at most its slice showing, and one that leaves
  nothing showing while lots are open is followed at once by its
  ``replenished`` event, whose shown + hidden lots are all that is open; a
  level's hidden total is its icebergs' hidden lots; waiting stops count as
  open in the conservation of quantity;
- after every command, ``MatchingEngine.from_state(spec, engine.export_state())``
  has the engine's state hash.

On an instrument with balances (:meth:`Harness.check_balances`), also:

- no balance is negative, the fees account included;
- money is conserved per asset: deposits minus withdrawals (summed from the
  ``deposited``/``withdrawn`` events) equal every client's available plus
  reserved, plus the fees account for the quote asset;
- each client's reserved amounts equal what its open orders hold: ``remaining *
  rate`` of its buys (quote) and of its sells (base, a rate of 1), with the rate
  the reference computed for each order (and the engine's stored rate equal to
  it), an iceberg's hidden lots included; a waiting stop holds the same at its
  price, a stop buy its budget (``funds``);
- the engine's accounts, fees account and remembered transfer ids equal the
  reference's;
- the ``balances`` carried by the events, applied in order, give exactly the
  engine's accounts and fees account: the events name every balance they change;
- a ``duplicate_transfer_id`` rejection names the seq of the original outcome.

Without balances the engine keeps no ledger and the events carry none of the
balance fields (the reference's events are compared whole, defaults included).

:meth:`Harness.final_checks` also rebuilds the engine from its exported state
(through a JSON round trip) and replays the whole command history into a fresh
engine, asserting byte-identical events.
"""

from __future__ import annotations

import enum
import functools
import itertools
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from exchange.core.commands import AmendOrder, Deposit, PlaceOrder, Withdraw
from exchange.core.events import (
    Deposited,
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
from exchange.core.matching import MatchingEngine
from exchange.core.state import EngineState
from exchange.core.types import OrderType, RejectReason, Side, StpMode

from .reference import ReferenceBook, RefStop

__all__ = ["SPECS", "Harness", "fmt_command", "normalise"]

SPECS: dict[str, Instrument] = {
    # no band, default STP none, big dedupe window but at most 6 ids a client
    "plain": Instrument.from_decimals("PLAIN", tick_size="0.01", lot_size="1", max_qty="40", max_price="2.00",
                                      dedupe_per_client=6),
    # market orders banded to 3% of the best opposite price; a dedupe window of 7 finished orders, 3 a client
    "band": Instrument.from_decimals("BAND", tick_size="1", lot_size="1", max_qty="40", max_price="200",
                                     price_band_bps=300, dedupe_window=7, dedupe_per_client=3),
    # narrow band (0.6%: less than one tick at ~100), STP cancel_resting by default, 2-lot minimum,
    # a dedupe window of 4 finished orders, 2 a client
    "tight": Instrument.from_decimals("TIGHT", tick_size="1", lot_size="0.5", min_qty="1", max_qty="20",
                                      max_price="200", price_band_bps=60, stp_default="cancel_resting",
                                      dedupe_window=4, dedupe_per_client=2),
    # STP cancel_both by default, no dedupe memory at all, band of 100% (sells may go to any price)
    "nomemory": Instrument.from_decimals("NOMEM", tick_size="1", lot_size="1", max_qty="40", max_price="200",
                                         price_band_bps=10_000, stp_default="cancel_both", dedupe_window=0),
    # balances of FEE (lots) and USD (quote units of 0.01 x 1): fees of 0.15% (maker) and 0.35% (taker),
    # big enough at ~100 ticks a lot that the per-fill rounding up matters; market buys banded to 5%
    "fees": Instrument.from_decimals("FEE-USD", tick_size="0.01", lot_size="1", max_qty="40", max_price="2.00",
                                     price_band_bps=500, dedupe_per_client=6, balances=True, maker_fee_bps=15,
                                     taker_fee_bps=35),
    # balances of REB (lots of 0.5) and EUR: a maker rebate of 0.25% (rounded towards zero: none below a
    # notional of 400) and a taker fee of 0.4%; no price band (a market buy must name its budget);
    # STP cancel_resting by default; a dedupe window of 8, 4 a client
    "rebate": Instrument.from_decimals("REB", tick_size="1", lot_size="0.5", max_qty="20", max_price="200",
                                       stp_default="cancel_resting", dedupe_window=8, dedupe_per_client=4,
                                       balances=True, base_asset="REB", quote_asset="EUR", maker_fee_bps=-25,
                                       taker_fee_bps=40),
}


def normalise(event: Any) -> Any:
    """An event with the free-form rejection text blanked (the reference does not reproduce prose)."""
    if isinstance(event, OrderRejected):
        return msgspec.structs.replace(event, text="")
    return event


def _fmt_value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)


@functools.cache
def _defaults(cls: type[Any]) -> dict[str, Any]:
    return {f.name: f.default for f in msgspec.structs.fields(cls)}


def fmt_command(cmd: Any) -> str:
    """Python source that rebuilds ``cmd`` exactly (enum members vs plain strings preserved)."""
    fields = msgspec.structs.asdict(cmd)
    defaults = _defaults(type(cmd))
    args = ", ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items()
                     if defaults.get(k, msgspec.NODEFAULT) is msgspec.NODEFAULT or defaults[k] != v)
    return f"{type(cmd).__name__}({args})"


@dataclass
class _Ledger:
    side: Side
    client_id: str
    order_type: OrderType
    stp: StpMode
    limit: int  # current limit price (0 for market)
    total: int
    expire_ns: int
    queued_seq: int  # seq of the event that last queued it: its time priority if it rests
    stop: int = 0  # a stop's stop price
    display: int = 0  # an iceberg's slice
    filled: int = 0
    canceled: int = 0
    expired: int = 0
    triggered: bool = False

    @property
    def open(self) -> int:
        return self.total - self.filled - self.canceled - self.expired

    @property
    def waits(self) -> bool:
        """A stop not triggered yet (it must not trade)."""
        return self.order_type in (OrderType.STOP, OrderType.STOP_LIMIT) and not self.triggered


class Harness:
    def __init__(self, spec: Instrument) -> None:
        self.spec = spec
        self.engine = MatchingEngine(spec)
        self.ref = ReferenceBook(spec)
        self.history: list[Any] = []
        self.encoded: list[bytes] = []  # msgspec.json.encode of each command's events
        self.ledger: dict[int, _Ledger] = {}
        self.last_seq = 0
        self.last_trade_id = 0
        self.finished: list[tuple[str, str]] = []  # (client, client order id) of finished orders, in order
        # balances, from the events alone: deposits - withdrawals per asset, and every (client, asset) balance
        # as the last event that named it left it ("" is the fees account)
        self.net: dict[str, int] = {spec.base_asset: 0, spec.quote_asset: 0}
        self.told: dict[tuple[str, str], tuple[int, int]] = {}
        self.checked_hash = self.engine.state_hash()  # the engine's state hash when it was last checked

    # ------------------------------------------------------------------ step

    def step(self, cmd: Any) -> list[Any]:
        self.history.append(cmd)
        try:
            events = self.engine.apply(cmd)
        except Exception as exc:  # pragma: no cover - reported as a failure
            raise AssertionError(f"engine.apply raised {exc!r} on {fmt_command(cmd)}") from exc
        self.encoded.append(msgspec.json.encode(events))
        expected = self.ref.apply(cmd)
        got = [normalise(e) for e in events]
        assert got == expected, (
            f"engine and reference disagree on {fmt_command(cmd)}\n engine:    {got}\n reference: {expected}")
        for e in events:
            if isinstance(e, OrderRejected):
                assert isinstance(e.text, str), e
                assert e.text, f"rejection without text: {e}"
                if e.reason is RejectReason.DUPLICATE_TRANSFER_ID and isinstance(cmd, Deposit | Withdraw):
                    # a repeated transfer is told the seq of the original outcome
                    assert re.search(rf"\bat seq {self.ref.transfers[e.transfer_id]}\b", e.text), e
        self._track(cmd, events)
        self.check_book()
        self.checked_hash = self.engine.state_hash()
        restored = MatchingEngine.from_state(self.spec, self.engine.export_state())
        assert restored.state_hash() == self.checked_hash, (
            f"after {fmt_command(cmd)} an engine restored from the exported state hashes differently")
        return events

    def unchanged(self) -> None:
        """Nothing touched the engine or the reference since the last check (cheaper than checking again)."""
        assert self.engine.seq == self.ref.seq == self.last_seq, (self.engine.seq, self.ref.seq, self.last_seq)
        assert self.engine.state_hash() == self.checked_hash, "the engine changed outside a command"

    # -------------------------------------------------------------- tracking

    def _track(self, cmd: Any, events: list[Any]) -> None:
        trades: dict[int, int] = {}  # trade id -> price, of this command
        replenish: int | None = None  # the iceberg whose replenished event must come next
        for e in events:
            assert e.instrument == self.spec.symbol, e
            if replenish is not None:
                assert isinstance(e, OrderReplenished), f"iceberg {replenish}'s slice was filled, then came {e}"
                assert e.order_id == replenish, f"iceberg {replenish}'s slice was filled, then came {e}"
                replenish = None
            for client, asset, available, reserved in getattr(e, "balances", ()):
                self.told[client, asset] = (available, reserved)
            if isinstance(e, Deposited | Withdrawn):
                assert e.amount > 0, e
                self.net[e.asset] += e.amount if isinstance(e, Deposited) else -e.amount
            assert e.seq == self.last_seq + 1, f"sequence gap: {self.last_seq} -> {e.seq}"
            self.last_seq = e.seq
            assert e.ts_ns == cmd.ts_ns, f"event timestamp {e.ts_ns} is not the input's {cmd.ts_ns}"
            if isinstance(e, OrderAccepted):
                assert e.order_id == len(self.ledger) + 1, f"order ids not consecutive: {e.order_id}"
                assert e.order_id not in self.ledger
                otype = OrderType(e.order_type)
                assert bool(e.stop_price_ticks) == (otype in (OrderType.STOP, OrderType.STOP_LIMIT)), e
                assert not e.display_qty_lots or otype == OrderType.LIMIT, e
                self.ledger[e.order_id] = _Ledger(Side(e.side), e.client_id, otype, StpMode(e.stp), e.price_ticks,
                                                  e.qty_lots, e.expire_ns, e.seq, e.stop_price_ticks,
                                                  e.display_qty_lots)
            elif isinstance(e, OrderTriggered):
                entry = self.ledger[e.order_id]
                assert entry.waits, f"{e}: not a waiting stop"
                assert (e.side, e.order_type, e.stop_price_ticks, e.price_ticks, e.qty_lots) == (
                    entry.side, entry.order_type, entry.stop, entry.limit, entry.total), e
                assert trades.get(e.trade_id) == e.trigger_price_ticks, f"{e}: not a trade of this command"
                if e.side == Side.BUY:
                    assert e.trigger_price_ticks >= e.stop_price_ticks, f"buy stop triggered below its stop: {e}"
                else:
                    assert e.trigger_price_ticks <= e.stop_price_ticks, f"sell stop triggered above its stop: {e}"
                entry.triggered = True
                entry.queued_seq = e.seq
            elif isinstance(e, OrderFilled):
                assert e.qty_lots > 0
                assert e.trade_id == self.last_trade_id + 1, f"trade ids not consecutive: {e.trade_id}"
                self.last_trade_id = e.trade_id
                trades[e.trade_id] = e.price_ticks
                maker, taker = self.ledger[e.maker_order_id], self.ledger[e.taker_order_id]
                assert not maker.waits, f"a waiting stop traded: {e}"
                assert not taker.waits, f"a waiting stop traded: {e}"
                assert e.maker_order_id != e.taker_order_id
                assert taker.side == e.aggressor_side, f"aggressor side is not the taker's: {e}"
                assert maker.side != taker.side, f"same-side fill {e}"
                assert maker.limit == e.price_ticks, f"fill not at the maker's price: {e}"
                if taker.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT):
                    if taker.side == Side.BUY:
                        assert e.price_ticks <= taker.limit, f"buy filled above its limit: {e}"
                    else:
                        assert e.price_ticks >= taker.limit, f"sell filled below its limit: {e}"
                if taker.stp != StpMode.NONE:
                    assert e.maker_client_id != e.taker_client_id, f"self-trade despite STP {taker.stp}: {e}"
                maker.filled += e.qty_lots
                taker.filled += e.qty_lots
                if maker.display:  # an iceberg: what is left of its slice shows
                    assert e.maker_remaining_lots <= min(maker.open, maker.display), e
                    if not e.maker_remaining_lots and maker.open:
                        replenish = e.maker_order_id
                else:
                    assert maker.open == e.maker_remaining_lots, e
                assert taker.open == e.taker_remaining_lots, e
                if not maker.open:
                    self.finished.append((e.maker_client_id, e.maker_client_order_id))
                if not e.taker_remaining_lots:
                    self.finished.append((e.taker_client_id, e.taker_client_order_id))
            elif isinstance(e, OrderReplenished):
                entry = self.ledger[e.order_id]
                assert 0 < e.shown_lots <= entry.display, e
                assert e.shown_lots + e.hidden_lots == entry.open, e
                assert (e.price_ticks, e.side) == (entry.limit, entry.side), e
                entry.queued_seq = e.seq
            elif isinstance(e, OrderCanceled):
                assert e.canceled_lots > 0, e
                entry = self.ledger[e.order_id]
                entry.canceled += e.canceled_lots
                assert entry.open == 0, f"{e}: {entry.open} lots still open"
                self.finished.append((e.client_id, e.client_order_id))
            elif isinstance(e, OrderExpired):
                entry = self.ledger[e.order_id]
                assert e.expired_lots > 0, e
                assert 0 < entry.expire_ns <= cmd.ts_ns, f"expired early: {e}"
                entry.expired += e.expired_lots
                assert entry.open == 0, f"{e}: {entry.open} lots still open"
                self.finished.append((e.client_id, e.client_order_id))
            elif isinstance(e, OrderAmended):
                entry = self.ledger[e.order_id]
                assert entry.total == e.old_qty_lots, e
                assert entry.limit == e.old_price_ticks, e
                assert isinstance(cmd, AmendOrder), e
                assert e.qty_lots > entry.filled, e
                assert entry.waits or e.stop_price_ticks == 0, e
                assert e.requeued == (e.price_ticks != e.old_price_ticks or e.qty_lots > e.old_qty_lots
                                      or (entry.waits and e.stop_price_ticks != entry.stop)), e
                entry.total = e.qty_lots
                entry.limit = e.price_ticks
                if entry.waits:
                    assert e.stop_price_ticks > 0, e
                    entry.stop = e.stop_price_ticks
                if e.requeued:
                    entry.queued_seq = e.seq
                assert e.remaining_lots == entry.open, e
                if not entry.display:
                    assert e.hidden_lots == 0, e
                elif e.requeued:  # what would not show if it rested as it is
                    assert e.hidden_lots == e.remaining_lots - min(entry.display, e.remaining_lots), e
                else:  # some of it still shows
                    assert 0 <= e.hidden_lots < e.remaining_lots, e
        assert replenish is None, f"iceberg {replenish} was not replenished"
        assert self.engine.seq == self.last_seq, f"engine.seq {self.engine.seq} != last event seq {self.last_seq}"
        assert self.engine.next_order_id == len(self.ledger) + 1
        assert self.engine.next_trade_id == self.last_trade_id + 1
        if isinstance(cmd, PlaceOrder) and events and isinstance(events[-1], OrderRejected):
            assert not any(isinstance(e, OrderAccepted) for e in events)

    # ------------------------------------------------------------- the book

    def check_book(self) -> None:
        engine, ref = self.engine, self.ref
        engine.book.check_invariants()
        # read the structure directly, not through check_invariants
        seen_prices: dict[Side, list[int]] = {Side.BUY: [], Side.SELL: []}
        for side in (Side.BUY, Side.SELL):
            for level in engine.book.levels(side):
                live = [o for o in level.orders if o.remaining > 0]
                assert live, f"empty level {level.price} kept"
                assert level.total_lots == sum(o.remaining for o in live), f"level {level.price} total is wrong"
                assert level.count == len(live), f"level {level.price} count is wrong"
                assert level.hidden == sum(o.hidden for o in live), f"level {level.price} hidden total is wrong"
                prios = [o.priority for o in live]
                assert all(a < b for a, b in itertools.pairwise(prios)), f"not FIFO: {prios}"
                assert all(o.price == level.price and o.side == side for o in live)
                seen_prices[side].append(level.price)
        bids, asks = seen_prices[Side.BUY], seen_prices[Side.SELL]
        assert all(a > b for a, b in itertools.pairwise(bids)), f"bid levels out of order {bids}"
        assert all(a < b for a, b in itertools.pairwise(asks)), f"ask levels out of order {asks}"
        assert not bids or not asks or bids[0] < asks[0], f"book crossed: {bids[0]} >= {asks[0]}"
        assert engine.book.best_bid() == (bids[0] if bids else None)
        assert engine.book.best_ask() == (asks[0] if asks else None)
        state = engine.export_state()
        window = state.done
        assert window == ref.done, f"dedupe windows differ\n engine:    {window}\n reference: {ref.done}"

        resting = state.orders
        got = [(r.order_id, r.client_id, r.client_order_id, Side(r.side), r.price_ticks, r.qty_lots,
                r.remaining_lots, r.display_lots, r.hidden_lots, r.priority, r.expire_ns, r.post_only,
                StpMode(r.stp), r.rate) for r in resting]
        want = [(o.order_id, o.client_id, o.client_order_id, o.side, o.price, o.qty, o.shown, o.display, o.hidden,
                 o.priority, o.expire_ns, o.post_only, o.stp, o.rate) for o in ref.orders()]
        assert got == want, f"resting orders differ\n engine:    {got}\n reference: {want}"
        for r in resting:  # documented: priority = seq of the accept / re-queuing amend / trigger / replenish
            assert r.priority == self.ledger[r.order_id].queued_seq, f"order {r.order_id} priority {r.priority}"
        assert len(engine.book) == len(want)
        got_stops = [msgspec.structs.astuple(s) for s in state.stops]
        want_stops = [(s.order_id, s.client_id, s.client_order_id, s.side, s.otype, s.stop, s.price, s.qty,
                       s.priority, s.tif, s.expire_ns, s.stp, s.rate, s.funds)
                      for s in sorted(ref.stops, key=lambda s: s.order_id)]
        assert got_stops == want_stops, f"waiting stops differ\n engine:    {got_stops}\n reference: {want_stops}"
        assert [s.order_id for s in state.stops] == [oid for oid, entry in self.ledger.items()
                                                     if entry.waits and entry.open], "waiting stops per the events"
        for s in state.stops:
            assert s.priority == self.ledger[s.order_id].queued_seq, f"stop {s.order_id} priority {s.priority}"
        assert state.last_price_ticks == engine.last_price == ref.last_price, (
            f"last trade price: engine {engine.last_price}, reference {ref.last_price}")

        # conservation, from the events alone
        open_lots = {oid: o.remaining + o.hidden for oid, o in engine.book.orders.items()}
        open_lots.update((s.order_id, s.qty_lots) for s in state.stops)
        buy_filled = sell_filled = 0
        for oid, entry in self.ledger.items():
            left = open_lots.get(oid, 0)
            assert entry.filled + left + entry.canceled + entry.expired == entry.total, (
                f"order {oid}: filled {entry.filled} + open {left} + canceled {entry.canceled} "
                f"+ expired {entry.expired} != total {entry.total}")
            if entry.side == Side.BUY:
                buy_filled += entry.filled
            else:
                sell_filled += entry.filled
            if entry.order_type in (OrderType.MARKET, OrderType.STOP):  # (a waiting stop is not in the book)
                assert oid not in engine.book.orders, f"market order {oid} rests"
        assert buy_filled == sell_filled, f"buys filled {buy_filled} != sells filled {sell_filled}"
        self.check_balances(state)

    def check_balances(self, state: EngineState) -> None:
        """The balance invariants (see the module docstring) in ``state``, the engine's image; on an instrument
        without balances, that there are none."""
        engine, ref, spec = self.engine, self.ref, self.spec
        if not spec.balances:
            assert engine.ledger is None
            assert (state.accounts, state.fees, state.transfers) == ([], 0, []), state
            assert not self.told, self.told
            return
        base, quote = spec.base_asset, spec.quote_asset
        accounts, fees = state.accounts, state.fees
        assert all(min(a[1:]) >= 0 for a in accounts), f"a negative balance: {accounts}"
        assert fees >= 0, f"the fees account is negative: {fees}"
        assert all(any(a[1:]) for a in accounts), f"an empty account is kept: {accounts}"
        assert sum(a[1] + a[2] for a in accounts) == self.net[base], (
            f"{base} not conserved: deposited - withdrawn {self.net[base]}, held {accounts}")
        assert sum(a[3] + a[4] for a in accounts) + fees == self.net[quote], (
            f"{quote} not conserved: deposited - withdrawn {self.net[quote]}, held {accounts} + fees {fees}")
        held: dict[str, list[int]] = {}  # client -> [base reserved, quote reserved] its open orders hold
        for o in ref.everything():
            entry = held.setdefault(o.client_id, [0, 0])
            if o.side == Side.BUY and isinstance(o, RefStop) and o.otype == OrderType.STOP:
                assert (o.rate, o.funds > 0) == (0, True), f"{o}: a waiting stop buy holds its budget"
                entry[1] += o.funds
            elif o.side == Side.BUY:
                assert o.rate == ref.rate(Side.BUY, o.price), f"{o} holds at a rate not its price's"
                entry[1] += o.remaining * o.rate
            else:
                assert o.rate == 1, o
                entry[0] += o.remaining
        for client, _, base_reserved, _, quote_reserved in accounts:
            assert [base_reserved, quote_reserved] == held.pop(client, [0, 0]), (
                f"{client} has reserved {base_reserved} {base} and {quote_reserved} {quote}, its open orders "
                f"hold {held.get(client)}: {ref.orders()}")
        assert not any(any(v) for v in held.values()), f"open orders hold what no account has reserved: {held}"
        want = ref.accounts_image()
        assert accounts == want, f"balances differ\n engine:    {accounts}\n reference: {want}"
        assert fees == ref.fees, f"fees differ: engine {fees}, reference {ref.fees}"
        assert sorted(t for t, _ in state.transfers) == sorted(ref.transfers), (
            f"remembered transfers differ\n engine:    {state.transfers}\n reference: {ref.transfers}")
        assert self.net == ref.deposited, (self.net, ref.deposited)
        told = {key: value for key, value in self.told.items() if key[0] and any(value)}
        image = {(c, asset): value for c, ba, br, qa, qr in accounts
                 for asset, value in ((base, (ba, br)), (quote, (qa, qr))) if any(value)}
        assert told == image, f"the events' balances are not the engine's\n events: {told}\n engine: {image}"
        assert self.told.get(("", quote), (0, 0)) == (fees, 0), (self.told.get(("", quote)), fees)

    # ---------------------------------------------------------------- final

    def final_checks(self) -> None:
        spec, engine = self.spec, self.engine
        state = engine.export_state()
        restored = MatchingEngine.from_state(spec, state)
        assert restored.state_hash() == engine.state_hash()
        assert restored.export_state() == state
        wire = msgspec.json.decode(msgspec.json.encode(state), type=EngineState)
        assert MatchingEngine.from_state(spec, wire).state_hash() == engine.state_hash()

        fresh = MatchingEngine(spec)
        for i, cmd in enumerate(self.history):
            again = msgspec.json.encode(fresh.apply(cmd))
            assert again == self.encoded[i], f"replay diverged at command {i}: {fmt_command(cmd)}"
        assert fresh.state_hash() == engine.state_hash()
        assert fresh.export_state() == state

    def restart(self) -> None:
        """Replace the engine by one rebuilt from its exported state (as after a daemon restart)."""
        state = self.engine.export_state()
        wire = msgspec.json.decode(msgspec.json.encode(state), type=EngineState)
        restored = MatchingEngine.from_state(self.spec, wire)
        assert restored.state_hash() == self.engine.state_hash()
        self.engine = restored
        self.check_book()
        self.checked_hash = restored.state_hash()
