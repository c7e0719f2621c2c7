"""A seeded random command stream driven through real engines, cut into journal batches.

Shared by the storage and recovery integration tests. Commands cover the whole
vocabulary: limit GTC/IOC/FOK/GTD, market IOC/FOK, post-only, STP modes,
cancels by client order id and by order id (of live, finished and unknown
orders), amends that keep or lose priority (and cross), cancel-all, reused
client order ids, edge rejections; several clients, so self-trades happen.
Order types too: stop and stop-limit orders (some rejected ``stop_would_trigger``) that wait
and trigger, in cascades now and then, stop-limits of every time in force, icebergs (GTC, GTD,
IOC, post-only) whose slices replenish, and cancels and amends of waiting stops (stop price,
price, quantity; some rejected).

An instrument that keeps balances (:data:`BALANCED`, in :data:`SPECS_WITH_BALANCES`) first funds every
client (a deposit of each asset), then now and then deposits or withdraws (some withdrawals more than is
available: refused and remembered; some transfer ids reused: rejected as duplicates), and sends market
buys and stop buys with a budget (``funds``) besides the rest; orders beyond a client's means are rejected
``insufficient_funds``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import msgspec

from exchange import (
    AmendOrder,
    CancelAll,
    CancelOrder,
    Command,
    Event,
    Instrument,
    MatchingEngine,
    OrderFilled,
    OrderType,
    PlaceOrder,
    RejectInput,
    RejectReason,
    Side,
    StpMode,
    TimeInForce,
)
from exchange.core.book import Stop
from exchange.core.commands import Deposit, Withdraw
from exchange.ports import Applied, Batch, InputPosition, Position, SnapshotRequest
from exchange.projections.positions import apply_fill

TOPIC = "orders"

SPECS: list[Instrument] = [
    Instrument.from_decimals("AAA-USD", tick_size="0.01", lot_size="1", max_qty="60"),
    Instrument.from_decimals("BBB-USD", tick_size="0.5", lot_size="0.001", max_qty="0.08", dedupe_window=7,
                             stp_default="cancel_resting", price_band_bps=500),
]
# balances: base CCC in lots of 0.1, quote USD in units of 0.01 x 0.1 = 0.001; a maker rebate, a taker fee
BALANCED = Instrument.from_decimals("CCC-USD", tick_size="0.01", lot_size="0.1", max_qty="60", balances=True,
                                   maker_fee_bps=-2, taker_fee_bps=25, price_band_bps=800)
SPECS_WITH_BALANCES: list[Instrument] = [*SPECS, BALANCED]
CLIENTS = ["alice", "bob", "carol", "dave", "erin", "frank"]
_STPS: list[StpMode | None] = [None, None, None, StpMode.NONE, StpMode.CANCEL_RESTING, StpMode.CANCEL_INCOMING,
                               StpMode.CANCEL_BOTH]


class Workload:
    """Engines for ``specs`` fed by a seeded random command stream."""

    def __init__(self, specs: Sequence[Instrument] = SPECS, seed: int = 1) -> None:
        self.specs = list(specs)
        self.engines = {spec.symbol: MatchingEngine(spec) for spec in self.specs}
        self.partition = {spec.symbol: i for i, spec in enumerate(self.specs)}
        self.offsets = {spec.symbol: -1 for spec in self.specs}
        self.rng = random.Random(seed)
        self.ts = 1_000_000_000_000
        self.coids: dict[tuple[str, str], list[str]] = {}
        self.n = 0
        self.events: list[Event] = []  # every event, in the order produced
        # balances: every client is funded first; transfer ids used so far (some are sent again)
        self.funding: dict[str, list[Command]] = {
            spec.symbol: [Deposit(spec.symbol, client, asset, amount, f"fund-{client}-{asset}")
                          for client in CLIENTS
                          for asset, amount in ((spec.base_asset, 150), (spec.quote_asset, 40_000))]
            for spec in self.specs if spec.balances}
        self.transfer_ids: list[str] = []
        self.stops: dict[str, list[tuple[str, str]]] = {spec.symbol: [] for spec in self.specs}  # placed stops

    # ------------------------------------------------------------- commands

    def _coid(self, symbol: str, client: str) -> str:
        used = self.coids.setdefault((symbol, client), [])
        if used and self.rng.random() < 0.06:
            return self.rng.choice(used)  # reuse: a duplicate while remembered, a fresh order after
        self.n += 1
        coid = f"{client[0]}{self.n}"
        used.append(coid)
        return coid

    def command(self, symbol: str | None = None) -> Command:
        rng = self.rng
        self.ts += rng.randrange(0, 2_000_000)
        ts = self.ts
        symbol = symbol or rng.choice(self.specs).symbol
        engine = self.engines[symbol]
        spec = engine.spec
        funding = self.funding.get(symbol)
        if funding:
            return msgspec.structs.replace(funding.pop(0), ts_ns=ts)
        client = rng.choice(CLIENTS)
        if spec.balances:
            money = self._money(spec, client, ts)
            if money is not None:
                return money
        live = list(engine.book.orders.values())
        mid = 200
        x = rng.random()
        if x < 0.05:
            waiting = self._waiting(symbol)
            if waiting:
                return self._stop_change(symbol, rng.choice(waiting), ts)
        if x < 0.16 and live:
            order = rng.choice(live)
            if rng.random() < 0.8:
                client = order.client_id
            if rng.random() < 0.5:
                return CancelOrder(symbol, client, order.client_order_id, ts_ns=ts)
            return CancelOrder(symbol, client, order_id=order.order_id, ts_ns=ts)
        if x < 0.19:  # cancel something that is probably not open
            return CancelOrder(symbol, client, order_id=rng.randrange(1, engine.next_order_id + 3), ts_ns=ts)
        if x < 0.31 and live:
            order = rng.choice(live)
            filled = order.qty - order.open
            kind = rng.random()
            price: int | None = None
            qty: int | None = None
            if kind < 0.35:
                qty = max(filled + 1, order.qty - rng.randrange(1, 4))  # keep priority (or a no-op: rejected)
            elif kind < 0.7:
                price = max(1, order.price + rng.randrange(-6, 7))
            else:
                qty = min(spec.max_qty_lots, order.qty + rng.randrange(1, 6))
                if rng.random() < 0.3:
                    price = max(1, order.price + rng.randrange(-3, 4))
            return AmendOrder(symbol, order.client_id, order.client_order_id, price_ticks=price, qty_lots=qty,
                              ts_ns=ts)
        if x < 0.32:
            return CancelAll(client, symbol, ts_ns=ts)
        if x < 0.33:
            return RejectInput(symbol, client, self._coid(symbol, client), RejectReason.INVALID_PRICE,
                               "price 1.001 is not a multiple of 0.01", ts_ns=ts)
        side = Side.BUY if rng.random() < 0.5 else Side.SELL
        qty = rng.randrange(1, min(spec.max_qty_lots, 25) + 1)
        if rng.random() < 0.02:
            qty = spec.max_qty_lots + 1  # rejected: invalid quantity
        offset = rng.randrange(-8, 9)
        price = mid + (offset if side is Side.SELL else -offset)
        stp = rng.choice(_STPS)
        y = rng.random()
        coid = self._coid(symbol, client)
        z = rng.random()
        if z < 0.1:
            return self._stop(engine, client, coid, side, qty, stp, ts)
        if z < 0.18:  # an iceberg: a slice of 1 lot up to all of it
            tif = rng.choice([TimeInForce.GTC, TimeInForce.GTC, TimeInForce.GTD, TimeInForce.IOC])
            return PlaceOrder(symbol, client, coid, side, OrderType.LIMIT, price, qty, tif, ts_ns=ts, stp=stp,
                              post_only=tif is not TimeInForce.IOC and rng.random() < 0.08,
                              expire_ns=ts + rng.randrange(1, 60) * 1_000_000 if tif is TimeInForce.GTD else 0,
                              display_qty_lots=rng.randrange(1, qty + 1))
        if y < 0.55:
            return PlaceOrder(symbol, client, coid, side, OrderType.LIMIT, price, qty, ts_ns=ts, stp=stp,
                              post_only=rng.random() < 0.08)
        if y < 0.67:
            return PlaceOrder(symbol, client, coid, side, OrderType.LIMIT, price, qty, TimeInForce.GTD, ts_ns=ts,
                              stp=stp, expire_ns=ts + rng.randrange(1, 60) * 1_000_000)
        if y < 0.8:
            return PlaceOrder(symbol, client, coid, side, OrderType.LIMIT, price, qty, TimeInForce.IOC, ts_ns=ts,
                              stp=stp)
        if y < 0.88:
            return PlaceOrder(symbol, client, coid, side, OrderType.LIMIT, price, qty, TimeInForce.FOK, ts_ns=ts,
                              stp=stp)
        tif = TimeInForce.IOC if rng.random() < 0.7 else TimeInForce.FOK
        funds = 0
        if spec.balances and side is Side.BUY and rng.random() < 0.5:
            funds = rng.randrange(1, qty * 230 + 2)  # a budget: sometimes less than the quantity costs
        return PlaceOrder(symbol, client, coid, side, OrderType.MARKET, 0, qty, tif, ts_ns=ts, stp=stp, funds=funds)

    def _stop(self, engine: MatchingEngine, client: str, coid: str, side: Side, qty: int, stp: StpMode | None,
              ts: int) -> PlaceOrder:
        """A stop or stop-limit order whose stop price is near the last trade's (a few already reached: rejected
        ``stop_would_trigger``); a stop buy on an instrument with balances names its budget."""
        rng = self.rng
        symbol = engine.symbol
        last = engine.last_price or 200
        stop = max(1, last + (rng.randrange(-2, 9) if side is Side.BUY else -rng.randrange(-2, 9)))
        self.stops[symbol].append((client, coid))
        if rng.random() < 0.5:
            tif = TimeInForce.GTD if rng.random() < 0.2 else TimeInForce.GTC
            funds = rng.randrange(1, qty * 230 + 2) if engine.spec.balances and side is Side.BUY else 0
            return PlaceOrder(symbol, client, coid, side, OrderType.STOP, 0, qty, tif, ts_ns=ts, stp=stp,
                              expire_ns=ts + rng.randrange(1, 90) * 1_000_000 if tif is TimeInForce.GTD else 0,
                              stop_price_ticks=stop, funds=funds)
        tif = rng.choice([TimeInForce.GTC, TimeInForce.GTC, TimeInForce.GTD, TimeInForce.IOC, TimeInForce.FOK])
        price = max(1, stop + rng.randrange(-2, 5) * (1 if side is Side.BUY else -1))
        return PlaceOrder(symbol, client, coid, side, OrderType.STOP_LIMIT, price, qty, tif, ts_ns=ts, stp=stp,
                          expire_ns=ts + rng.randrange(1, 90) * 1_000_000 if tif is TimeInForce.GTD else 0,
                          stop_price_ticks=stop)

    def _waiting(self, symbol: str) -> list[Stop]:
        """The stops of ``symbol`` still waiting (the placed ones the engine holds as stops), oldest first."""
        engine = self.engines[symbol]
        waiting = [o for c, coid in self.stops[symbol] if isinstance(o := engine.open_order(c, coid), Stop)]
        self.stops[symbol] = [(o.client_id, o.client_order_id) for o in waiting]
        return waiting

    def _stop_change(self, symbol: str, stop: Stop, ts: int) -> Command:
        """A cancel or an amend of a waiting stop: its stop price (sometimes one already reached), a stop-limit's
        price, its quantity (less: it keeps its place among its stop price's, more: behind them)."""
        rng = self.rng
        if rng.random() < 0.35:
            return CancelOrder(symbol, stop.client_id, stop.client_order_id, ts_ns=ts)
        kind = rng.random()
        new_stop = price = qty = None
        if kind < 0.4:
            new_stop = max(1, stop.stop + rng.randrange(-4, 5))
        elif kind < 0.6 and stop.otype is OrderType.STOP_LIMIT:
            price = max(1, stop.price + rng.randrange(-3, 4))
        else:
            qty = max(1, min(self.engines[symbol].spec.max_qty_lots, stop.qty + rng.randrange(-3, 4)))
            if rng.random() < 0.3:
                new_stop = max(1, stop.stop + rng.randrange(-2, 3))
        return AmendOrder(symbol, stop.client_id, stop.client_order_id, price_ticks=price, qty_lots=qty, ts_ns=ts,
                          stop_price_ticks=new_stop)

    def _money(self, spec: Instrument, client: str, ts: int) -> Command | None:
        """Now and then a deposit or a withdrawal (else None): of either asset, sometimes more than is available
        (refused), sometimes under a transfer id used before (a duplicate)."""
        rng = self.rng
        x = rng.random()
        if x >= 0.07:
            return None
        base = rng.random() < 0.5
        asset = spec.base_asset if base else spec.quote_asset
        amount = rng.randrange(1, 400) if base else rng.randrange(1, 100_000)
        if self.transfer_ids and rng.random() < 0.05:
            tid = rng.choice(self.transfer_ids)
        else:
            self.n += 1
            tid = f"t{self.n}"
            self.transfer_ids.append(tid)
        if x < 0.03:
            return Deposit(spec.symbol, client, asset, amount, tid, ts)
        return Withdraw(spec.symbol, client, asset, amount, tid, ts)

    def apply(self, command: Command) -> Applied:
        symbol = command.instrument
        assert symbol is not None
        events = self.engines[symbol].apply(command)
        self.events.extend(events)
        self.offsets[symbol] += 1
        return Applied(symbol, events, InputPosition(TOPIC, self.partition[symbol], self.offsets[symbol]))

    def snapshot(self, symbol: str, *, window: bool = False) -> SnapshotRequest:
        """As the daemon takes it (without the dedupe window), or with it if ``window`` (as earlier versions)."""
        engine = self.engines[symbol]
        return SnapshotRequest(symbol, engine.export_state(window=window), engine.state_hash())

    def batches(self, commands: int, *, max_batch: int = 120, snapshot_every: int = 5,
                snapshot_window: bool = False) -> list[Batch]:
        """Apply ``commands`` random commands; cut the outcomes into batches, with snapshots now and then."""
        out: list[Batch] = []
        left = commands
        while left:
            size = min(left, self.rng.randrange(1, max_batch + 1))
            left -= size
            applied = [self.apply(self.command()) for _ in range(size)]
            snaps: list[SnapshotRequest] = []
            if snapshot_every and len(out) % snapshot_every == snapshot_every - 1:
                snaps = [self.snapshot(s, window=snapshot_window) for s in self.engines if self.rng.random() < 0.8]
            out.append(stamped(Batch(applied, snaps)))
        return out


def stamped(batch: Batch, epoch: int = 1) -> Batch:
    """``batch`` as a writer that took its instruments and partitions prepares it: under ``epoch`` each (1: the
    first take on a fresh database, as :meth:`tests.integration._backends.Backend.store` does)."""
    instruments = {a.instrument for a in batch.applied} | {s.instrument for s in batch.snapshots}
    return dataclasses.replace(batch, epochs=dict.fromkeys(instruments, epoch),
                               partition_epochs=dict.fromkeys(batch.partitions, epoch))


def fills(events: Sequence[Event]) -> list[Any]:
    from exchange import OrderFilled

    return [e for e in events if isinstance(e, OrderFilled)]


def positions_from_fills(events: Sequence[Event]) -> dict[tuple[str, str], Position]:
    """Every client's position per instrument, recomputed from the fills alone."""
    out: dict[tuple[str, str], Position] = {}
    for e in events:
        if isinstance(e, OrderFilled):
            maker_side = Side.SELL if e.aggressor_side is Side.BUY else Side.BUY
            for client, side in ((e.maker_client_id, maker_side), (e.taker_client_id, e.aggressor_side)):
                key = (e.instrument, client)
                out[key] = apply_fill(out.get(key, Position()), side, e.price_ticks, e.qty_lots)
    return out
