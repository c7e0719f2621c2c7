"""The pure derivation of storage rows from journal batches (no database)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec
import pytest

from exchange import (
    AmendOrder,
    CancelOrder,
    Event,
    Instrument,
    MatchingEngine,
    OrderType,
    PlaceOrder,
    Side,
    TimeInForce,
)
from exchange.core.commands import Deposit, Withdraw
from exchange.core.state import RestingOrder, StopOrder
from exchange.ports import Applied, Batch, InputPosition, Position, SnapshotRequest
from exchange.projections.rows import (
    BALANCE_FIELDS,
    EVENT_COLUMNS,
    ORDER_COLUMNS,
    TRADE_COLUMNS,
    TRANSFER_COLUMNS,
    UPDATE_FIELDS,
    BatchRows,
    Progress,
    RowError,
    derive_rows,
)
from exchange.projections.stored import OPEN_ORDER_COLUMNS, STOP_COLUMNS, stored_ledger, waiting_stop
from tests.integration._workload import SPECS, SPECS_WITH_BALANCES, Workload
from tests.property.reference import dedupe_window

SPEC = Instrument.from_decimals("X", tick_size="0.05", lot_size="0.01")
SPECS_X = {"X": SPEC}
BUY, SELL = Side.BUY, Side.SELL


def place(client: str, coid: str, side: Side, price: int, qty: int, ts: int = 0, **kw: Any) -> PlaceOrder:
    return PlaceOrder("X", client, coid, side, OrderType.LIMIT, price, qty, ts_ns=ts, **kw)


class Driver:
    """An engine whose outcomes become batches; keeps the store-side counters and positions like the store."""

    def __init__(self, spec: Instrument = SPEC) -> None:
        self.engine = MatchingEngine(spec)
        self.specs = {spec.symbol: spec}
        self.offset = 0
        self.progress: dict[str, Progress] = {}
        self.positions: dict[str, dict[str, Position]] = {}

    def batch(self, *commands: Any) -> Batch:
        applied = []
        for command in commands:
            self.offset += 1
            applied.append(Applied(self.engine.symbol, self.engine.apply(command), InputPosition("in", 0, self.offset)))
        return Batch(applied)

    def rows(self, *commands: Any) -> BatchRows:
        rows = derive_rows(self.batch(*commands), self.specs, self.progress, self.positions)
        self.progress.update(rows.progress)
        for symbol, changed in rows.positions.items():
            self.positions.setdefault(symbol, {}).update(changed)
        return rows


def orders(rows: BatchRows) -> list[dict[str, Any]]:
    return [dict(zip(ORDER_COLUMNS, r, strict=True)) for r in rows.new_orders]


def test_an_order_accepted_and_finished_in_one_batch_is_inserted_in_its_final_state() -> None:
    d = Driver()
    rows = d.rows(place("alice", "a1", BUY, 2000, 500, ts=5),  # seq 1, rests
                  place("bob", "b1", SELL, 1990, 200, ts=6),  # 2 accepted, 3 fill: bob filled
                  CancelOrder("X", "alice", "a1", ts_ns=7))  # 4 canceled: alice canceled after 200 filled
    a1, b1 = orders(rows)
    assert {k: a1[k] for k in ("order_id", "status", "qty_lots", "remaining_lots", "filled_lots", "priority",
                               "created_seq", "updated_seq", "created_ts_ns", "updated_ts_ns", "price", "qty")} == {
        "order_id": 1, "status": "canceled", "qty_lots": 500, "remaining_lots": 0, "filled_lots": 200,
        "priority": 1, "created_seq": 1, "updated_seq": 4, "created_ts_ns": 5, "updated_ts_ns": 7,
        "price": Decimal("100.00"), "qty": Decimal("5.00")}
    assert (b1["status"], b1["remaining_lots"], b1["filled_lots"], b1["price"]) == (
        "filled", 0, 200, Decimal("99.50"))
    assert rows.order_updates == []
    assert [dict(zip(TRADE_COLUMNS, t, strict=True)) for t in rows.trades] == [{
        "instrument": "X", "trade_id": 1, "seq": 3, "ts_ns": 6, "price_ticks": 2000, "qty_lots": 200,
        "price": Decimal("100.00"), "qty": Decimal("2.00"), "aggressor_side": SELL, "maker_order_id": 1,
        "maker_client_id": "alice", "maker_client_order_id": "a1", "taker_order_id": 2, "taker_client_id": "bob",
        "taker_client_order_id": "b1"}]
    assert [(e[1], e[3], e[4], e[5]) for e in rows.events] == [
        (1, "accepted", 1, "alice"), (2, "accepted", 2, "bob"), (3, "filled", 2, "bob"), (4, "canceled", 1, "alice")]
    assert rows.progress == {"X": Progress(4, 3, 2)}
    assert rows.first_seq == {"X": 1}
    assert rows.offsets == {("X", "in", 0): 3}
    assert rows.positions == {"X": {"alice": Position(200, 400_000, 0), "bob": Position(-200, -400_000, 0)}}
    assert sorted(rows.position_rows) == [("alice", "X", 200, 400_000, 0, 3), ("bob", "X", -200, -400_000, 0, 3)]


def test_events_rows_carry_the_msgspec_payload() -> None:
    d = Driver()
    batch = d.batch(place("alice", "a1", BUY, 2000, 500), place("bob", "b1", SELL, 2000, 100),
                    place("bob", "b1", SELL, 2000, 100))
    rows = derive_rows(batch, SPECS_X, {}, {})
    assert all(len(e) == len(EVENT_COLUMNS) for e in rows.events)
    decoded = [msgspec.json.decode(e[-1], type=Event) for e in rows.events]
    assert decoded == [e for a in batch.applied for e in a.events]


def test_pre_existing_orders_become_relative_updates() -> None:
    d = Driver()
    d.rows(place("alice", "a1", BUY, 2000, 500), place("alice", "a2", BUY, 1990, 300),
           place("carol", "c1", SELL, 2100, 100))  # seqs 1-3, all rest
    rows = d.rows(place("bob", "b1", SELL, 2000, 100),  # 4 accepted, 5 fill a1 (400 left): b1 filled
                  AmendOrder("X", "alice", "a1", qty_lots=450),  # 6: reduce in place, keeps priority
                  AmendOrder("X", "alice", "a2", price_ticks=1995),  # 7: re-queued at a new price
                  CancelOrder("X", "carol", "c1"),  # 8
                  CancelOrder("X", "carol", "nope"))  # 9: rejected, no row change
    assert [(r["order_id"], r["status"]) for r in orders(rows)] == [(4, "filled")]
    updates = {u[1]: u for u in rows.order_updates}
    # UPDATE_FIELDS: (instrument, order_id, remaining, filled_delta, qty, price_ticks, priority, status, seq, ts,
    # rate, hidden_lots, stop_price_ticks, triggered_seq): a re-queue sets the rate (0 without balances); an amend,
    # a cancel or an expiry says what is hidden (nothing: these are no icebergs)
    assert updates[1] == ("X", 1, 350, 100, 450, 2000, None, "partially_filled", 6, 0, None, 0, None, None)
    assert updates[2] == ("X", 2, 300, 0, 300, 1995, 7, None, 7, 0, 0, 0, None, None)
    assert updates[3] == ("X", 3, 0, 0, None, None, None, "canceled", 8, 0, None, 0, None, None)
    assert all(len(u) == len(UPDATE_FIELDS) for u in rows.order_updates)
    assert len(rows.order_updates) == 3
    assert rows.first_seq == {"X": 4}
    assert rows.progress == {"X": Progress(9, 5, 2)}


def test_only_place_rejections_make_order_rows() -> None:
    d = Driver()
    rows = d.rows(place("alice", "a1", BUY, 2000, 500), place("alice", "a1", BUY, 2000, 500),
                  CancelOrder("X", "alice", "zzz"), place("alice", "bad", BUY, 2000, 0))
    rejected = [r for r in orders(rows) if r["status"] == "rejected"]
    assert [(r["created_seq"], r["order_id"], r["client_order_id"], r["reject_reason"], r["side"], r["qty_lots"])
            for r in rejected] == [(2, None, "a1", "duplicate_client_order_id", None, None),
                                   (4, None, "bad", "invalid_quantity", None, None)]
    assert all(r["reject_text"] for r in rejected)
    assert [e[4] for e in rows.events] == [1, 1, None, None]  # a duplicate names the original order


def test_counters_persist_through_batches_without_new_orders_or_trades() -> None:
    d = Driver()
    d.rows(place("alice", "a1", BUY, 2000, 500), place("bob", "b1", SELL, 2000, 100))
    rows = d.rows(CancelOrder("X", "alice", "a1"))
    assert rows.progress == {"X": Progress(4, 3, 2)}


def test_positions_start_from_the_given_ones_which_are_not_mutated() -> None:
    d = Driver()
    d.rows(place("alice", "a1", BUY, 2000, 500))
    before = {"X": {"alice": Position(100, 190_000, 7), "bob": Position(-50, -100_000, 0)}}
    frozen = {k: dict(v) for k, v in before.items()}
    batch = d.batch(place("bob", "b1", SELL, 2000, 100))
    rows = derive_rows(batch, SPECS_X, d.progress, before)
    assert before == frozen
    assert rows.positions["X"] == {"alice": Position(200, 390_000, 7), "bob": Position(-150, -300_000, 0)}


def test_self_trade_updates_one_client_twice() -> None:
    d = Driver()
    rows = d.rows(place("alice", "a1", BUY, 2000, 500), place("alice", "a2", SELL, 2000, 500))
    assert rows.positions == {"X": {"alice": Position(0, 0, 0)}}


def test_market_and_gtd_orders() -> None:
    d = Driver()
    rows = d.rows(place("alice", "a1", BUY, 2000, 500, ts=10, tif=TimeInForce.GTD, expire_ns=100),
                  PlaceOrder("X", "bob", "m1", SELL, OrderType.MARKET, 0, 700, TimeInForce.IOC, ts_ns=20),
                  place("carol", "c1", BUY, 2000, 5, ts=30, tif=TimeInForce.GTD, expire_ns=40),
                  place("dave", "d1", SELL, 2500, 5, ts=50))  # expires c1 first (seq 6)
    by_id = {r["order_id"]: r for r in orders(rows)}
    assert (by_id[2]["order_type"], by_id[2]["price"], by_id[2]["price_ticks"], by_id[2]["status"],
            by_id[2]["filled_lots"]) == (OrderType.MARKET, None, 0, "canceled", 500)
    assert (by_id[3]["status"], by_id[3]["expire_ns"], by_id[3]["tif"], by_id[3]["updated_seq"]) == (
        "expired", 40, TimeInForce.GTD, 6)


def test_bad_batches_are_refused() -> None:
    d = Driver()
    first = d.batch(place("alice", "a1", BUY, 2000, 500))
    second = d.batch(place("alice", "a2", BUY, 2000, 500))
    gap = Batch([*second.applied, *first.applied])
    with pytest.raises(RowError, match="consecutive"):
        derive_rows(gap, SPECS_X, {}, {})
    with pytest.raises(RowError, match="not configured"):
        derive_rows(first, {}, {}, {})


def test_offsets_keep_the_highest_per_partition_even_without_events() -> None:
    batch = Batch([Applied("X", [], InputPosition("in", 1, 7)), Applied("X", [], InputPosition("in", 1, 9)),
                   Applied("X", [], InputPosition("in", 2, 3)), Applied("X", [], None)])
    rows = derive_rows(batch, SPECS_X, {}, {})
    assert rows.offsets == {("X", "in", 1): 9, ("X", "in", 2): 3}
    assert rows.events == rows.new_orders == rows.order_updates == []
    assert rows.progress == {}


def test_snapshot_rows() -> None:
    d = Driver()
    batch = d.batch(place("alice", "a1", BUY, 2000, 500))
    state = d.engine.export_state()
    snap = SnapshotRequest("X", state, d.engine.state_hash())
    rows = derive_rows(Batch(batch.applied, [snap, snap]), SPECS_X, {}, {})  # twice at one seq: stored once
    assert [(s[0], s[1], s[2], s[3]) for s in rows.snapshots] == [("X", 1, d.engine.state_hash(), 1)]
    assert msgspec.json.decode(rows.snapshots[0][4], type=type(state)) == state


# ----------------------------------------------- a table simulated in memory


def _apply_to_table(table: dict[tuple[str, int], dict[str, Any]], rows: BatchRows) -> None:
    """What the store's COPY and UPDATE ... FROM unnest do, in Python."""
    for r in rows.new_orders:
        row = dict(zip(ORDER_COLUMNS, r, strict=True))
        if row["order_id"] is not None:
            table[(row["instrument"], row["order_id"])] = row
    for u in rows.order_updates:
        update = dict(zip(UPDATE_FIELDS, u, strict=True))
        row = table[(update["instrument"], update["order_id"])]
        assert row["status"] in ("open", "partially_filled")
        row["remaining_lots"] = update["remaining_lots"]
        row["filled_lots"] += update["filled_delta"]
        for name in ("qty_lots", "price_ticks", "priority", "status", "rate", "hidden_lots", "stop_price_ticks",
                     "triggered_seq"):  # None keeps the stored value
            if update[name] is not None:
                row[name] = update[name]
        row["updated_seq"] = update["updated_seq"]


def _loaded(table: dict[tuple[str, int], dict[str, Any]], trades: list[tuple[Any, ...]], symbol: str
            ) -> tuple[list[RestingOrder], list[StopOrder], int]:
    """What the stores' loading makes of the rows (their queries, in Python): the book's open orders in book
    order, the waiting stops in order_id order, the last trade's price."""
    mine = [r for (s, _), r in table.items() if s == symbol and r["status"] in ("open", "partially_filled")]
    waiting = [r for r in mine if r["stop_price_ticks"] and not r["triggered_seq"]]
    book = sorted((r for r in mine if not (r["stop_price_ticks"] and not r["triggered_seq"])),
                  key=lambda r: (r["side"], -r["price_ticks"] if r["side"] == BUY else r["price_ticks"], r["priority"]))
    orders = [RestingOrder(*(r[c] for c in OPEN_ORDER_COLUMNS)) for r in book]
    stops = [waiting_stop([r[c] for c in STOP_COLUMNS]) for r in sorted(waiting, key=lambda r: r["order_id"])]
    last = max((t for t in trades if t[0] == symbol), key=lambda t: t[1], default=None)
    return orders, stops, last[TRADE_COLUMNS.index("price_ticks")] if last else 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rows_follow_the_engine_over_a_random_stream(seed: int) -> None:
    work = Workload(seed=seed)
    specs = {s.symbol: s for s in SPECS}
    table: dict[tuple[str, int], dict[str, Any]] = {}
    trades: list[tuple[Any, ...]] = []
    progress: dict[str, Progress] = {}
    positions: dict[str, dict[str, Position]] = {}
    for batch in work.batches(2_000, max_batch=90):
        rows = derive_rows(batch, specs, progress, positions)
        _apply_to_table(table, rows)
        trades += rows.trades
        progress.update(rows.progress)
        for symbol, changed in rows.positions.items():
            positions.setdefault(symbol, {}).update(changed)
    for spec in SPECS:
        engine = work.engines[spec.symbol]
        assert progress[spec.symbol] == Progress(engine.seq, engine.next_order_id, engine.next_trade_id)
        open_rows = {oid: r for (s, oid), r in table.items()
                     if s == spec.symbol and r["status"] in ("open", "partially_filled")}
        image = engine.export_state()
        assert set(open_rows) == set(engine.book.orders) | {s.order_id for s in image.stops}
        for oid, o in engine.book.orders.items():
            r = open_rows[oid]
            assert (r["remaining_lots"], r["hidden_lots"], r["qty_lots"], r["price_ticks"], r["priority"],
                    r["filled_lots"]) == (o.remaining, o.hidden, o.qty, o.price, o.priority, o.qty - o.open)
        # the image loading makes of them: the book, the waiting stops, the last trade price
        assert _loaded(table, trades, spec.symbol) == (image.orders, image.stops, image.last_price_ticks)
        # the dedupe window: the rule over the finished orders by (updated_seq, priority), newest last
        finished = sorted((r for (s, _), r in table.items()
                           if s == spec.symbol and r["status"] in ("filled", "canceled", "expired")),
                          key=lambda r: (r["updated_seq"], r["priority"]))
        history = [(r["client_id"], r["client_order_id"], r["order_id"]) for r in finished]
        assert dedupe_window(history, spec.dedupe_window, spec.dedupe_per_client) == engine.export_state().done
    kinds = {r["order_type"] for r in table.values()}
    assert {OrderType.STOP, OrderType.STOP_LIMIT} <= kinds
    assert any(r["triggered_seq"] for r in table.values())
    assert any(r["display_lots"] for r in table.values())


# ------------------------------------------------------------- order types


class Table(Driver):
    """A driver whose batches go into the in-memory table, checked against the engine's image after each."""

    def __init__(self, spec: Instrument = SPEC) -> None:
        super().__init__(spec)
        self.table: dict[tuple[str, int], dict[str, Any]] = {}
        self.trades: list[tuple[Any, ...]] = []

    def rows(self, *commands: Any) -> BatchRows:
        rows = super().rows(*commands)
        _apply_to_table(self.table, rows)
        self.trades += rows.trades
        image = self.engine.export_state()
        assert _loaded(self.table, self.trades, self.engine.symbol) == (image.orders, image.stops,
                                                                         image.last_price_ticks)
        return rows

    def row(self, order_id: int) -> dict[str, Any]:
        return self.table[(self.engine.symbol, order_id)]


def test_a_stop_waits_in_its_row_then_triggers_and_rests_where_the_engine_put_it() -> None:
    t = Table()
    t.rows(place("alice", "a1", BUY, 2000, 5), place("bob", "b1", SELL, 2000, 5))  # seqs 1-3: a trade at 2000
    rows = t.rows(PlaceOrder("X", "carol", "s1", SELL, OrderType.STOP, 0, 3, stop_price_ticks=1990),  # 4: waits
                  PlaceOrder("X", "dave", "s2", BUY, OrderType.STOP_LIMIT, 2010, 4, TimeInForce.GTD, ts_ns=1,
                             expire_ns=10**12, stop_price_ticks=2005),  # 5: waits
                  AmendOrder("X", "dave", "s2", stop_price_ticks=2004, qty_lots=6))  # 6: moved behind
    s1, s2 = orders(rows)
    assert {k: s1[k] for k in ("order_type", "price_ticks", "price", "qty_lots", "remaining_lots", "status",
                               "priority", "stop_price_ticks", "triggered_seq", "funds", "tif")} == {
        "order_type": OrderType.STOP, "price_ticks": 0, "price": None, "qty_lots": 3, "remaining_lots": 3,
        "status": "open", "priority": 4, "stop_price_ticks": 1990, "triggered_seq": 0, "funds": 0,
        "tif": TimeInForce.GTC}
    assert (s2["order_type"], s2["price_ticks"], s2["qty_lots"], s2["remaining_lots"], s2["stop_price_ticks"],
            s2["priority"], s2["updated_seq"], s2["expire_ns"]) == (OrderType.STOP_LIMIT, 2010, 6, 6, 2004, 6, 6,
                                                                   10**12)
    assert [e[3] for e in rows.events] == ["accepted", "accepted", "amended"]

    # a trade at 1990 reaches s1: triggered at 10, a market sell that fills against erin's bid
    rows = t.rows(place("erin", "e1", BUY, 1990, 5), place("frank", "f1", SELL, 1990, 1))  # 7, 8, 9: the trade
    assert [(e[1], e[3], e[4], e[5]) for e in rows.events][3:] == [(10, "triggered", 3, "carol"),
                                                                   (11, "filled", 3, "carol")]
    assert {u[1]: dict(zip(UPDATE_FIELDS, u, strict=True)) for u in rows.order_updates}[3] == {
        "instrument": "X", "order_id": 3, "remaining_lots": 0, "filled_delta": 3, "qty_lots": None,
        "price_ticks": None, "priority": 10, "status": "filled", "updated_seq": 11, "updated_ts_ns": 0, "rate": None,
        "hidden_lots": None, "stop_price_ticks": None, "triggered_seq": 10}

    # a trade at 2005 reaches s2 (pre-existing): triggered, it buys what it can at 2010 and rests with the rest
    rows = t.rows(place("gina", "g1", SELL, 2005, 2), place("hank", "h1", BUY, 2005, 1))  # 12, 13, 14
    assert [e[3] for e in rows.events][3:] == ["triggered", "filled"]
    s2 = t.row(4)
    assert (s2["status"], s2["remaining_lots"], s2["filled_lots"], s2["triggered_seq"], s2["priority"]) == (
        "partially_filled", 5, 1, 15, 15)
    assert t.engine.export_state().stops == []
    assert t.engine.book.orders[4].priority == 15


def test_a_stop_buy_row_keeps_its_budget_and_holds_no_rate() -> None:
    t = Table(BQ)
    t.rows(Deposit("BQ", "alice", "Q", 10**24, "t-a"), Deposit("BQ", "bob", "B", 10, "t-b"),
           bq("bob", "b1", SELL, 990, 1), bq("alice", "a1", BUY, 990, 1))  # a trade at 990
    rows = t.rows(PlaceOrder("BQ", "alice", "s1", BUY, OrderType.STOP, 0, 5, stop_price_ticks=1000,
                             funds=10**23),  # more than 64 bits
                  PlaceOrder("BQ", "bob", "s2", SELL, OrderType.STOP_LIMIT, 900, 2, stop_price_ticks=950))
    s1, s2 = orders(rows)
    assert (s1["funds"], s1["rate"], s2["funds"], s2["rate"]) == (10**23, 0, 0, 1)
    rows = t.rows(AmendOrder("BQ", "alice", "s1", stop_price_ticks=1001, qty_lots=6))  # re-queued: still no rate
    assert [(u[1], u[RATE], u[UPDATE_FIELDS.index("stop_price_ticks")]) for u in rows.order_updates] == [
        (3, 0, 1001)]


def test_an_iceberg_row_shows_its_slice_hides_the_rest_and_replenishes() -> None:
    t = Table()
    rows = t.rows(place("alice", "i1", SELL, 2000, 10, display_qty_lots=4),  # 1: shows 4, hides 6
                  place("bob", "b1", SELL, 2000, 2),  # 2: behind it
                  place("carol", "c1", BUY, 2000, 5))  # 3; 4: i1's slice filled; 5: replenished; 6: b1 1 filled
    assert [e[3] for e in rows.events] == ["accepted"] * 3 + ["filled", "replenished", "filled"]
    i1 = t.row(1)
    assert (i1["remaining_lots"], i1["hidden_lots"], i1["display_lots"], i1["filled_lots"], i1["priority"],
            i1["status"]) == (4, 2, 4, 4, 5, "partially_filled")
    # an iceberg as a taker: all it has trades; it rests showing a slice of what is left
    rows = t.rows(place("dave", "i2", BUY, 2000, 12, display_qty_lots=3))  # 7; 8 b1; 9 i1; 10 replenished; 11 i1
    i2 = t.row(4)
    assert (i2["remaining_lots"], i2["hidden_lots"], i2["filled_lots"], i2["status"]) == (3, 2, 7, "partially_filled")
    assert t.row(1)["status"] == "filled"
    # amends work on the total: less takes hidden quantity first; a new price re-queues and trades with all it has
    rows = t.rows(AmendOrder("X", "dave", "i2", qty_lots=11))  # 12: hides 1
    assert (t.row(4)["remaining_lots"], t.row(4)["hidden_lots"]) == (3, 1)
    t.rows(place("erin", "e1", SELL, 2010, 3))  # 13
    rows = t.rows(AmendOrder("X", "dave", "i2", price_ticks=2010))  # 14: re-queued with 4 open; 15: buys 3
    assert (t.row(4)["remaining_lots"], t.row(4)["hidden_lots"], t.row(4)["priority"]) == (1, 0, 14)
    t.rows(CancelOrder("X", "dave", "i2"))
    assert (t.row(4)["remaining_lots"], t.row(4)["hidden_lots"], t.row(4)["status"]) == (0, 0, "canceled")


def test_a_fill_that_finishes_an_iceberg_replenished_during_it_and_its_taker_finishes_the_maker_first() -> None:
    """The iceberg's last slice was queued (replenished) during the taker's own matching, so its priority is
    above the taker's; the engine still finishes the maker first, and the rows must order them so."""
    t = Table(Instrument.from_decimals("X", tick_size="0.05", lot_size="0.01", dedupe_window=1))
    t.rows(place("alice", "i1", SELL, 2000, 6, display_qty_lots=4))  # 1
    rows = t.rows(place("bob", "b1", BUY, 2000, 6, tif=TimeInForce.IOC))  # 2; 3 fill; 4 replenished; 5 fill both
    assert [e[3] for e in rows.events] == ["accepted", "filled", "replenished", "filled"]
    i1, b1 = t.row(1), t.row(2)
    assert (i1["updated_seq"], b1["updated_seq"], i1["status"], b1["status"]) == (5, 5, "filled", "filled")
    assert i1["priority"] < b1["priority"]  # (the taker's minus one: it sorts first)
    finished = sorted(t.table.values(), key=lambda r: (r["updated_seq"], r["priority"]))
    history = [(r["client_id"], r["client_order_id"], r["order_id"]) for r in finished]
    assert dedupe_window(history, 1, 1) == t.engine.export_state().done == [("bob", "b1", 2)]


def test_halt_and_resume_are_stored_events_and_the_halted_flag_follows_them_across_batches() -> None:
    from exchange import HaltInstrument, ResumeInstrument

    d = Driver()
    rows = d.rows(place("alice", "a1", BUY, 2000, 5, ts=1), HaltInstrument("X", "ops", "why", 2),
                  place("bob", "b1", SELL, 2000, 5, ts=3))
    assert [(e[1], e[3], e[4], e[5]) for e in rows.events] == [
        (1, "accepted", 1, "alice"), (2, "halted", None, "ops"), (3, "rejected", None, "bob")]
    assert rows.progress["X"] == Progress(3, 2, 1, halted=True)
    assert [o["reject_reason"] for o in orders(rows)] == [None, "instrument_halted"]
    rows = d.rows(CancelOrder("X", "alice", "a1", ts_ns=4))  # a batch without halt events keeps the flag
    assert rows.progress["X"] == Progress(4, 2, 1, halted=True)
    rows = d.rows(ResumeInstrument("X", "ops", "", 5))
    assert rows.progress["X"] == Progress(5, 2, 1, halted=False)
    assert rows.events[0][3] == "resumed"


def test_a_clear_is_an_events_row_naming_the_operator_before_its_cancellations() -> None:
    from exchange import BookCleared, ClearBook

    d = Driver()
    d.rows(place("alice", "a1", BUY, 2000, 5, ts=1), place("bob", "b1", SELL, 2100, 5, ts=2))
    rows = d.rows(ClearBook("X", 3, "ops-anna", "end of day"), ClearBook("X", 4, "ops-anna"))
    assert [(e[1], e[2], e[3], e[4], e[5]) for e in rows.events] == [
        (3, 3, "cleared", None, "ops-anna"), (4, 3, "canceled", 1, "alice"), (5, 3, "canceled", 2, "bob"),
        (6, 4, "cleared", None, "ops-anna")]
    assert msgspec.json.decode(rows.events[0][6], type=Event) == BookCleared("X", 3, 3, "ops-anna", "end of day", 2)
    assert msgspec.json.decode(rows.events[3][6], type=Event) == BookCleared("X", 6, 4, "ops-anna", "", 0)
    assert [(u[1], u[7]) for u in rows.order_updates] == [(1, "canceled"), (2, "canceled")]
    assert rows.new_orders == []
    assert rows.progress["X"] == Progress(6, 3, 1)


# ------------------------------------------------------------------ balances

BQ = Instrument.from_decimals("BQ", tick_size="0.01", lot_size="0.1", balances=True, base_asset="B", quote_asset="Q",
                              maker_fee_bps=10, taker_fee_bps=30)


def bq(client: str, coid: str, side: Side, price: int, qty: int, **kw: Any) -> PlaceOrder:
    return PlaceOrder("BQ", client, coid, side, OrderType.LIMIT, price, qty, **kw)


RATE = UPDATE_FIELDS.index("rate")


def balances(rows: BatchRows) -> list[dict[str, Any]]:
    return [dict(zip(BALANCE_FIELDS, r, strict=True)) for r in rows.balance_rows]


def test_balances_rows_hold_the_last_value_per_account_and_transfers_what_the_engine_remembers() -> None:
    d = Driver(BQ)
    rows = d.rows(Deposit("BQ", "alice", "Q", 100_000, "t-a", 1),  # seq 1
                  Deposit("BQ", "bob", "B", 10, "t-b", 2),  # 2
                  bq("bob", "b1", SELL, 990, 4))  # 3: holds 4 B
    assert rows.balance_rows == [("BQ", "alice", "Q", 100_000, 0, 1), ("BQ", "bob", "B", 6, 4, 3)]
    assert [dict(zip(TRANSFER_COLUMNS, t, strict=True)) for t in rows.transfers] == [
        {"instrument": "BQ", "transfer_id": "t-a", "client_id": "alice", "asset": "Q", "kind": "deposit",
         "amount_units": 100_000, "amount": Decimal("100.000"), "status": "applied",
         "outcome": "deposited 100.000 Q for alice at seq 1", "seq": 1, "ts_ns": 1},
        {"instrument": "BQ", "transfer_id": "t-b", "client_id": "bob", "asset": "B", "kind": "deposit",
         "amount_units": 10, "amount": Decimal("1.0"), "status": "applied",
         "outcome": "deposited 1.0 B for bob at seq 2", "seq": 2, "ts_ns": 2}]
    assert [(e[1], e[3], e[4], e[5]) for e in rows.events] == [
        (1, "deposited", None, "alice"), (2, "deposited", None, "bob"), (3, "accepted", 1, "bob")]
    assert orders(rows)[0]["rate"] == 1  # a sell holds one lot of base per lot

    # alice's buy at 10.00 holds 1,000 + ceil(1,000 x 30 bps) = 1,003 a lot; the fill of 4 at the maker's 9.90:
    # notional 3,960, taker fee 12, maker fee 4; the cancel releases the last lot's 1,003
    rows = d.rows(bq("alice", "a1", BUY, 1000, 5),  # 4 accepted, 5 filled
                  CancelOrder("BQ", "alice", "a1"),  # 6
                  Withdraw("BQ", "bob", "Q", 5_000, "t-w", 7),  # 7: refused, bob has 3,956
                  Withdraw("BQ", "bob", "Q", 956, "t-w2", 8),  # 8
                  Withdraw("BQ", "bob", "Q", 1, "t-w", 9))  # 9: a duplicate transfer id, not remembered again
    assert balances(rows) == [
        {"instrument": "BQ", "client_id": "", "asset": "Q", "available": 16, "reserved": 0, "updated_seq": 5},
        {"instrument": "BQ", "client_id": "alice", "asset": "B", "available": 4, "reserved": 0, "updated_seq": 5},
        {"instrument": "BQ", "client_id": "alice", "asset": "Q", "available": 96_028, "reserved": 0,
         "updated_seq": 6},
        {"instrument": "BQ", "client_id": "bob", "asset": "B", "available": 6, "reserved": 0, "updated_seq": 5},
        {"instrument": "BQ", "client_id": "bob", "asset": "Q", "available": 3_000, "reserved": 0, "updated_seq": 8}]
    assert [(t[1], t[3], t[4], t[5], t[6], t[7], t[8], t[9]) for t in rows.transfers] == [
        ("t-w", None, "withdraw", None, None, "refused",
         "refused at seq 7: insufficient_funds (Q required 5.000, available 3.956)", 7),
        ("t-w2", "Q", "withdraw", 956, Decimal("0.956"), "applied", "withdrawn 0.956 Q for bob at seq 8", 8)]
    assert d.engine.ledger is not None
    assert sorted(d.engine.ledger.transfers.items()) == sorted([(t[1], t[8]) for t in rows.transfers] + [
        ("t-a", "deposited 100.000 Q for alice at seq 1"), ("t-b", "deposited 1.0 B for bob at seq 2")])
    (a1,) = orders(rows)
    assert (a1["rate"], a1["status"], a1["filled_lots"]) == (1003, "canceled", 4)
    assert [(u[1], u[RATE]) for u in rows.order_updates] == [(1, None)]  # b1 filled: its rate stays

    # a re-queuing amend of a stored order changes its rate (600 + ceil(1.8)); one that keeps priority does not
    d.rows(bq("alice", "a2", BUY, 500, 2), bq("alice", "a3", BUY, 400, 3))  # 10, 11
    rows = d.rows(AmendOrder("BQ", "alice", "a2", price_ticks=600), AmendOrder("BQ", "alice", "a3", qty_lots=2))
    assert [(u[1], u[RATE]) for u in rows.order_updates] == [(3, 602), (4, None)]
    assert {o.order_id: o.rate for o in d.engine.book.orders.values()} == {3: 602, 4: 402}


def test_a_market_buy_with_a_budget_holds_no_rate_and_the_budget_comes_back() -> None:
    d = Driver(BQ)
    d.rows(Deposit("BQ", "alice", "Q", 10_000, "t-a"), Deposit("BQ", "bob", "B", 10, "t-b"),
           bq("bob", "b1", SELL, 1000, 2))
    rows = d.rows(PlaceOrder("BQ", "alice", "m1", BUY, OrderType.MARKET, 0, 5, TimeInForce.IOC, funds=3_000))
    (m1,) = orders(rows)
    assert (m1["rate"], m1["status"], m1["filled_lots"]) == (0, "canceled", 2)
    # 2 lots at 10.00 cost 2,000 + 6 in fees; the rest of the budget is available again
    assert {(b[1], b[2]): (b[3], b[4]) for b in rows.balance_rows if b[1] == "alice"} == {
        ("alice", "B"): (2, 0), ("alice", "Q"): (7_994, 0)}


def test_stored_ledger_is_the_engine_image_and_names_a_row_that_disagrees_with_itself() -> None:
    d = Driver(BQ)
    rows = d.rows(Deposit("BQ", "alice", "Q", 100_000, "t-a"), Deposit("BQ", "bob", "B", 10, "t-b"),
                  bq("bob", "b1", SELL, 990, 4), bq("alice", "a1", BUY, 1000, 5),
                  Withdraw("BQ", "bob", "B", 99, "t-w"),  # refused: bob has 6 B available
                  Withdraw("BQ", "alice", "B", 4, "t-x"))  # alice's whole base: all zero, so no account of B
    # as loading reads them: (client_id, asset, available, reserved) as text or Decimals, and
    # (transfer_id, client_id, asset, kind, amount_units, status, outcome, seq)
    stored = [(b[1], b[2], str(b[3]), Decimal(b[4])) for b in rows.balance_rows]
    transfers = [(t[1], t[2], t[3], t[4], t[5], t[7], t[8], t[9]) for t in rows.transfers]
    image = stored_ledger(BQ, stored, transfers)
    state = d.engine.export_state()
    assert image == (state.accounts, state.fees, state.transfers)
    assert ("alice", 0, 0, 95_025, 1_003) in state.accounts  # (alice's B row is all zero: no account of its own)

    edited = [(t[0], t[1], t[2], t[3], t[4] + 1 if t[4] else t[4], *t[5:]) for t in transfers]
    _, _, remembered = stored_ledger(BQ, [], edited)
    outcomes = dict(remembered)
    assert outcomes["t-a"] == ("deposited 100.000 Q for alice at seq 1 "
                               "[the row says: deposited 100.001 Q for alice at seq 1]")
    assert outcomes["t-w"] == dict(state.transfers)["t-w"]  # a refused one: nothing to say of its amount
    moved = [(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7] + 1) for t in transfers]
    assert all("[the row says: " in outcome for _, outcome in stored_ledger(BQ, [], moved)[2])
    with pytest.raises(RowError, match="neither B nor Q"):
        stored_ledger(BQ, [("alice", "Z", 1, 0)], [])
    with pytest.raises(RowError, match="fees account"):
        stored_ledger(BQ, [("", "Q", 1, 1)], [])


@pytest.mark.parametrize("seed", [4, 5])
def test_balances_rows_follow_the_engine_over_a_random_stream(seed: int) -> None:
    work = Workload(SPECS_WITH_BALANCES, seed=seed)
    specs = {s.symbol: s for s in SPECS_WITH_BALANCES}
    table: dict[tuple[str, int], dict[str, Any]] = {}
    ledger: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    transfers: dict[tuple[str, str], tuple[Any, ...]] = {}
    progress: dict[str, Progress] = {}
    positions: dict[str, dict[str, Position]] = {}
    for batch in work.batches(3_000, max_batch=90):
        rows = derive_rows(batch, specs, progress, positions)
        _apply_to_table(table, rows)
        for b in rows.balance_rows:
            ledger[(b[0], b[1], b[2])] = b
        for t in rows.transfers:
            assert (t[0], t[1]) not in transfers
            transfers[(t[0], t[1])] = t
        progress.update(rows.progress)
        for symbol, changed in rows.positions.items():
            positions.setdefault(symbol, {}).update(changed)
    for spec in SPECS_WITH_BALANCES:
        engine = work.engines[spec.symbol]
        rates = {oid: (r["rate"], int(r["funds"])) for (s, oid), r in table.items()
                 if s == spec.symbol and r["status"] in ("open", "partially_filled")}
        state = engine.export_state()
        assert rates == {**{o.order_id: (o.rate, 0) for o in state.orders},
                         **{o.order_id: (o.rate, o.funds) for o in state.stops}}
        image = stored_ledger(spec, [b[1:5] for k, b in ledger.items() if k[0] == spec.symbol],
                              [(t[1], t[2], t[3], t[4], t[5], t[7], t[8], t[9])
                               for k, t in transfers.items() if k[0] == spec.symbol])
        assert image == (state.accounts, state.fees, state.transfers)
    assert BALANCED_SYMBOL in {k[0] for k in ledger}
    assert {t[7] for t in transfers.values()} == {"applied", "refused"}
    assert any(r["rate"] > 1 for r in table.values() if r["side"] == BUY)


BALANCED_SYMBOL = SPECS_WITH_BALANCES[-1].symbol
