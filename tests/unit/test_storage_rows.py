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
from exchange.ports import Applied, Batch, InputPosition, Position, SnapshotRequest
from exchange.projections.rows import (
    EVENT_COLUMNS,
    ORDER_COLUMNS,
    TRADE_COLUMNS,
    UPDATE_FIELDS,
    BatchRows,
    Progress,
    RowError,
    derive_rows,
)
from tests.integration._workload import SPECS, Workload
from tests.property.reference import dedupe_window

SPEC = Instrument.from_decimals("X", tick_size="0.05", lot_size="0.01")
SPECS_X = {"X": SPEC}
BUY, SELL = Side.BUY, Side.SELL


def place(client: str, coid: str, side: Side, price: int, qty: int, ts: int = 0, **kw: Any) -> PlaceOrder:
    return PlaceOrder("X", client, coid, side, OrderType.LIMIT, price, qty, ts_ns=ts, **kw)


class Driver:
    """An engine whose outcomes become batches; keeps the store-side counters and positions like the store."""

    def __init__(self) -> None:
        self.engine = MatchingEngine(SPEC)
        self.offset = 0
        self.progress: dict[str, Progress] = {}
        self.positions: dict[str, dict[str, Position]] = {}

    def batch(self, *commands: Any) -> Batch:
        applied = []
        for command in commands:
            self.offset += 1
            applied.append(Applied("X", self.engine.apply(command), InputPosition("in", 0, self.offset)))
        return Batch(applied)

    def rows(self, *commands: Any) -> BatchRows:
        rows = derive_rows(self.batch(*commands), SPECS_X, self.progress, self.positions)
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
    # UPDATE_FIELDS: (instrument, order_id, remaining, filled_delta, qty, price_ticks, priority, status, seq, ts)
    assert updates[1] == ("X", 1, 350, 100, 450, 2000, None, "partially_filled", 6, 0)
    assert updates[2] == ("X", 2, 300, 0, 300, 1995, 7, None, 7, 0)
    assert updates[3] == ("X", 3, 0, 0, None, None, None, "canceled", 8, 0)
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
    for inst, oid, remaining, delta, qty, price, priority, status, seq, _ts in rows.order_updates:
        row = table[(inst, oid)]
        assert row["status"] in ("open", "partially_filled")
        row["remaining_lots"] = remaining
        row["filled_lots"] += delta
        row["qty_lots"] = row["qty_lots"] if qty is None else qty
        row["price_ticks"] = row["price_ticks"] if price is None else price
        row["priority"] = row["priority"] if priority is None else priority
        row["status"] = row["status"] if status is None else status
        row["updated_seq"] = seq


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rows_follow_the_engine_over_a_random_stream(seed: int) -> None:
    work = Workload(seed=seed)
    specs = {s.symbol: s for s in SPECS}
    table: dict[tuple[str, int], dict[str, Any]] = {}
    progress: dict[str, Progress] = {}
    positions: dict[str, dict[str, Position]] = {}
    for batch in work.batches(2_000, max_batch=90):
        rows = derive_rows(batch, specs, progress, positions)
        _apply_to_table(table, rows)
        progress.update(rows.progress)
        for symbol, changed in rows.positions.items():
            positions.setdefault(symbol, {}).update(changed)
    for spec in SPECS:
        engine = work.engines[spec.symbol]
        assert progress[spec.symbol] == Progress(engine.seq, engine.next_order_id, engine.next_trade_id)
        open_rows = {oid: r for (s, oid), r in table.items()
                     if s == spec.symbol and r["status"] in ("open", "partially_filled")}
        assert set(open_rows) == set(engine.book.orders)
        for oid, o in engine.book.orders.items():
            r = open_rows[oid]
            assert (r["remaining_lots"], r["qty_lots"], r["price_ticks"], r["priority"], r["filled_lots"]) == (
                o.remaining, o.qty, o.price, o.priority, o.qty - o.remaining)
        # the dedupe window: the rule over the finished orders by (updated_seq, priority), newest last
        finished = sorted((r for (s, _), r in table.items()
                           if s == spec.symbol and r["status"] in ("filled", "canceled", "expired")),
                          key=lambda r: (r["updated_seq"], r["priority"]))
        history = [(r["client_id"], r["client_order_id"], r["order_id"]) for r in finished]
        assert dedupe_window(history, spec.dedupe_window, spec.dedupe_per_client) == engine.export_state().done


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
