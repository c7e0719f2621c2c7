"""Balances in storage, on every store (PostgreSQL on both commit paths, SQLite): exact rows, round trips,
recovery and the offline verify, a lost acknowledgement.

An instrument that keeps balances stores, with each batch, the last value of every (client, asset) its events
moved (the fees account is client ''), the transfers the engine remembers and each order's ``rate``; loading
gives them back as the engine image, so that the rebuilt engine is the live one (same state hash, same
future), and recovery and ``recover --verify`` check them against the events.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from exchange import AmendOrder, CancelOrder, Instrument, MatchingEngine, OrderType, PlaceOrder, Side
from exchange.core.commands import Deposit, Withdraw
from exchange.core.instruments import MAX_AMOUNT_UNITS
from exchange.ports import Applied, Batch, InputPosition
from recovery.rebuild import RecoveryError, recover
from recovery.verify import verify_store
from tests.integration._backends import BACKENDS, AnyStore, Backend, dec, make_backend, run
from tests.integration._workload import BALANCED, SPECS_WITH_BALANCES, Workload, stamped

pytestmark = pytest.mark.integration


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend(request, tmp_path)


BQ = Instrument.from_decimals("BQ", tick_size="0.01", lot_size="0.1", balances=True, base_asset="B", quote_asset="Q",
                              maker_fee_bps=10, taker_fee_bps=30)


def _buy(client: str, coid: str, price: int, qty: int) -> PlaceOrder:
    return PlaceOrder("BQ", client, coid, Side.BUY, OrderType.LIMIT, price, qty)


def _sell(client: str, coid: str, price: int, qty: int) -> PlaceOrder:
    return PlaceOrder("BQ", client, coid, Side.SELL, OrderType.LIMIT, price, qty)


class Feed:
    """An engine whose outcomes become stamped batches, one input offset per command."""

    def __init__(self, spec: Instrument) -> None:
        self.engine = MatchingEngine(spec)
        self.offset = 0

    def batch(self, *commands: Any) -> Batch:
        applied = []
        for command in commands:
            self.offset += 1
            command = command if command.ts_ns else _at(command, self.offset)
            applied.append(Applied(self.engine.symbol, self.engine.apply(command), InputPosition("in", 0, self.offset)))
        return stamped(Batch(applied))


def _at(command: Any, ts: int) -> Any:
    return msgspec.structs.replace(command, ts_ns=ts)


async def _balances(backend: Backend) -> dict[tuple[str, str], tuple[Any, ...]]:
    rows = await backend.fetch("SELECT * FROM balances WHERE instrument = 'BQ'")
    return {(r["client_id"], r["asset"]): (int(r["available"]), int(r["reserved"]), dec(r["available_amount"]),
                                           dec(r["reserved_amount"]), r["updated_seq"]) for r in rows}


async def _transfers(backend: Backend) -> dict[str, tuple[Any, ...]]:
    rows = await backend.fetch("SELECT * FROM transfers WHERE instrument = 'BQ'")
    return {r["transfer_id"]: (r["client_id"], r["asset"], r["kind"],
                               None if r["amount_units"] is None else int(r["amount_units"]), dec(r["amount"]),
                               r["status"], r["outcome"], r["seq"], r["ts_ns"]) for r in rows}


def test_balances_and_transfers_rows_are_exactly_what_the_events_say(backend: Backend) -> None:
    feed = Feed(BQ)
    batches = [
        feed.batch(Deposit("BQ", "alice", "Q", 100_000, "t-a"),  # seq 1
                   Deposit("BQ", "bob", "B", 10, "t-b"),  # 2
                   _sell("bob", "b1", 990, 4)),  # 3: holds 4 B
        # alice's buy at 10.00 holds 1,003 a lot (the price and the 30 bps taker fee, rounded up); 4 lots fill at
        # the maker's 9.90: notional 3,960, taker fee 12, maker fee 4, and 40 of the 4,012 held come back at once
        feed.batch(_buy("alice", "a1", 1000, 5),  # 4 accepted, 5 filled
                   CancelOrder("BQ", "alice", "a1"),  # 6: releases the last lot's 1,003
                   Withdraw("BQ", "bob", "Q", 5_000, "t-w"),  # 7: refused, bob has 3,956
                   Withdraw("BQ", "bob", "Q", 956, "t-w2"),  # 8
                   Withdraw("BQ", "bob", "Q", 1, "t-w")),  # 9: a duplicate transfer id: rejected, nothing stored
        feed.batch(_buy("alice", "a2", 500, 2)),  # 10: holds 2 x 502
        feed.batch(AmendOrder("BQ", "alice", "a2", price_ticks=600)),  # 11: re-queued, holds 2 x 602
    ]

    async def scenario() -> None:
        store = await backend.store([BQ])
        try:
            await store.commit(batches[0])
            assert await _balances(backend) == {
                ("alice", "Q"): (100_000, 0, Decimal("100.000"), Decimal("0.000"), 1),
                ("bob", "B"): (6, 4, Decimal("0.6"), Decimal("0.4"), 3)}
            for batch in batches[1:]:
                await store.commit(batch)
            assert await _balances(backend) == {
                ("", "Q"): (16, 0, Decimal("0.016"), Decimal("0.000"), 5),  # the fees account
                ("alice", "B"): (4, 0, Decimal("0.4"), Decimal("0.0"), 5),
                ("alice", "Q"): (94_824, 1_204, Decimal("94.824"), Decimal("1.204"), 11),
                ("bob", "B"): (6, 0, Decimal("0.6"), Decimal("0.0"), 5),
                ("bob", "Q"): (3_000, 0, Decimal("3.000"), Decimal("0.000"), 8)}
            assert await _transfers(backend) == {
                "t-a": ("alice", "Q", "deposit", 100_000, Decimal("100.000"), "applied",
                        "deposited 100.000 Q for alice at seq 1", 1, 1),
                "t-b": ("bob", "B", "deposit", 10, Decimal("1.0"), "applied", "deposited 1.0 B for bob at seq 2", 2,
                        2),
                "t-w": ("bob", None, "withdraw", None, None, "refused",
                        "refused at seq 7: insufficient_funds (Q required 5.000, available 3.956)", 7, 6),
                "t-w2": ("bob", "Q", "withdraw", 956, Decimal("0.956"), "applied", "withdrawn 0.956 Q for bob at seq 8",
                         8, 7)}
            orders = await backend.fetch("SELECT order_id, status, rate FROM orders WHERE instrument = 'BQ' "
                                         "AND order_id IS NOT NULL ORDER BY order_id")
            assert [(r["order_id"], r["status"], r["rate"]) for r in orders] == [
                (1, "filled", 1), (2, "canceled", 1003), (3, "open", 602)]
            events = await backend.fetch("SELECT seq, type, order_id, client_id FROM order_events "
                                         "WHERE instrument = 'BQ' AND type IN ('deposited', 'withdrawn') ORDER BY seq")
            assert [(r["seq"], r["type"], r["order_id"], r["client_id"]) for r in events] == [
                (1, "deposited", None, "alice"), (2, "deposited", None, "bob"), (8, "withdrawn", None, "bob")]

            state = (await store.load([BQ]))["BQ"].state
            live = feed.engine.export_state()
            assert state == live
            assert (state.accounts, state.fees) == ([("alice", 4, 0, 94_824, 1_204), ("bob", 6, 0, 3_000, 0)], 16)
            assert MatchingEngine.from_state(BQ, state).state_hash() == feed.engine.state_hash()
            recovered = await recover(store, [BQ])
            assert recovered["BQ"].state == live
            report = await verify_store(store, [BQ])
            assert report.ok, report.render()
            assert ("balances: the 2 clients' balances and the fees account match the events; B and Q are conserved"
                    in report.render())
        finally:
            await store.stop()

    run(scenario())


def test_amounts_beyond_64_bits_are_stored_exactly(backend: Backend) -> None:
    """A deposit of the largest amount of each asset, at the finest steps: balances of 10^24 units, and
    decimals with 36 places, on every store."""
    spec = Instrument.from_decimals("TINY", tick_size="0.000000000000000001", lot_size="0.000000000000000001",
                                    balances=True, base_asset="B", quote_asset="Q")
    feed = Feed(spec)
    batch = feed.batch(Deposit("TINY", "whale", "B", MAX_AMOUNT_UNITS, "big-b"),
                       Deposit("TINY", "whale", "Q", MAX_AMOUNT_UNITS, "big-q"),
                       Deposit("TINY", "whale", "Q", MAX_AMOUNT_UNITS, "big-q2"),
                       Withdraw("TINY", "whale", "Q", MAX_AMOUNT_UNITS, "big-w"))

    async def scenario() -> None:
        store = await backend.store([spec])
        try:
            await store.commit(batch)
            rows = await backend.fetch("SELECT asset, available, available_amount FROM balances ORDER BY asset")
            assert [(r["asset"], int(r["available"]), dec(r["available_amount"])) for r in rows] == [
                ("B", 10**24, Decimal(10**6)), ("Q", 10**24, Decimal("1E-12"))]
            amounts = await backend.fetch("SELECT transfer_id, amount_units, amount FROM transfers "
                                          "ORDER BY transfer_id")
            assert [(r["transfer_id"], int(r["amount_units"]), dec(r["amount"])) for r in amounts] == [
                ("big-b", 10**24, Decimal(10**6)), ("big-q", 10**24, Decimal("1E-12")),
                ("big-q2", 10**24, Decimal("1E-12")), ("big-w", 10**24, Decimal("1E-12"))]
            recovered = await recover(store, [spec])
            assert recovered["TINY"].state == feed.engine.export_state()
        finally:
            await store.stop()

    run(scenario())


def test_waiting_stops_hold_what_they_will_need_and_recover_with_it(backend: Backend) -> None:
    """A stop buy holds its budget (beyond 64 bits here), a stop-limit sell its lots and an iceberg all it has
    open; the rows keep it (``funds``, ``rate``, ``hidden_lots``) and loading, recovery and verify (whose reserve
    check counts what waiting stops and hidden quantity hold) agree with the events."""
    feed = Feed(BQ)
    batches = [feed.batch(Deposit("BQ", "alice", "Q", 10**24, "t-a"), Deposit("BQ", "bob", "B", 100, "t-b"),
                          _sell("bob", "b1", 1000, 1), _buy("alice", "a1", 1000, 1)),  # a trade at 1000
               feed.batch(PlaceOrder("BQ", "alice", "s1", Side.BUY, OrderType.STOP, 0, 5, stop_price_ticks=1100,
                                     funds=10**23),
                          PlaceOrder("BQ", "bob", "s2", Side.SELL, OrderType.STOP_LIMIT, 900, 7, stop_price_ticks=950),
                          PlaceOrder("BQ", "bob", "i1", Side.SELL, OrderType.LIMIT, 1200, 9, display_qty_lots=2),
                          AmendOrder("BQ", "bob", "s2", qty_lots=6, stop_price_ticks=940))]
    state = feed.engine.export_state()
    assert [(s.client_order_id, s.rate, s.funds) for s in state.stops] == [("s1", 0, 10**23), ("s2", 1, 0)]
    assert ("bob", 100 - 1 - 6 - 9, 6 + 9, 999, 0) in state.accounts  # (and the trade's 1,000 quote less its maker fee)

    async def scenario() -> None:
        store = await backend.store([BQ])
        try:
            for batch in batches:
                await store.commit(batch)
            stored = await backend.fetch("SELECT * FROM orders WHERE instrument = 'BQ'")
            rows = {r["client_order_id"]: r for r in stored}
            assert (int(rows["s1"]["funds"]), rows["s1"]["rate"], rows["s2"]["rate"]) == (10**23, 0, 1)
            assert (rows["i1"]["remaining_lots"], rows["i1"]["hidden_lots"], rows["i1"]["rate"]) == (2, 7, 1)
            recovered = await recover(store, [BQ])
            assert recovered["BQ"].state == state
            report = await verify_store(store, [BQ])
            assert report.ok, report.render()
            assert "every reserve is what the open orders hold" in report.render()
        finally:
            await store.stop()

    run(scenario())


# ------------------------------------------------------------- a random stream


@pytest.mark.parametrize("seed", [1, 2])
def test_a_random_stream_with_balances_round_trips_and_recovers(backend: Backend, seed: int) -> None:
    work = Workload(SPECS_WITH_BALANCES, seed=seed)
    batches = work.batches(2_500, max_batch=150, snapshot_every=4)
    spec = BALANCED

    async def scenario() -> None:
        store = await backend.store(SPECS_WITH_BALANCES)
        try:
            for batch in batches:
                await store.commit(batch)
            recovered = await recover(store, SPECS_WITH_BALANCES)
            report = await verify_store(store, SPECS_WITH_BALANCES)
        finally:
            await store.stop()
        assert report.ok, report.render()
        live = work.engines[spec.symbol]
        state = recovered[spec.symbol].state
        assert state == live.export_state()
        assert state.accounts
        assert state.fees
        assert state.transfers
        rebuilt = MatchingEngine.from_state(spec, state)
        assert rebuilt.state_hash() == live.state_hash()
        for _ in range(400):  # the same future: identical events for the same next commands
            command = work.command(spec.symbol)
            assert rebuilt.apply(command) == live.apply(command)
        # the rows: every remembered transfer, the last balance of every account
        ledger = live.ledger
        assert ledger is not None
        stored = {r["transfer_id"]: r["outcome"]
                  for r in await backend.fetch(f"SELECT * FROM transfers WHERE instrument = '{spec.symbol}'")}
        assert stored == dict(recovered[spec.symbol].state.transfers)
        rows = await backend.fetch(f"SELECT * FROM balances WHERE instrument = '{spec.symbol}'")
        assert {(r["client_id"], r["asset"]): (int(r["available"]), int(r["reserved"])) for r in rows
                if r["client_id"] and (int(r["available"]) or int(r["reserved"]))} == {
            (c, a): v for c, *acc in state.accounts
            for a, v in ((spec.base_asset, tuple(acc[:2])), (spec.quote_asset, tuple(acc[2:]))) if any(v)}
        for r in rows:
            unit = Decimal(spec.lot_size) * (1 if r["asset"] == spec.base_asset else Decimal(spec.tick_size))
            assert (dec(r["available_amount"]), dec(r["reserved_amount"])) == (
                int(r["available"]) * unit, int(r["reserved"]) * unit)

    run(scenario())


def test_a_batch_with_balances_whose_acknowledgement_was_lost_is_not_written_twice(backend: Backend) -> None:
    work = Workload(SPECS_WITH_BALANCES, seed=6)
    batches = work.batches(400, max_batch=60)

    async def scenario() -> None:
        writer = await backend.store(SPECS_WITH_BALANCES)
        retrier = await backend.store(SPECS_WITH_BALANCES)
        try:
            await writer.load(SPECS_WITH_BALANCES)
            await retrier.load(SPECS_WITH_BALANCES)  # its caches stay at seq 0, like a writer whose commit "failed"
            await writer.commit(batches[0])
            await retrier.commit(batches[0])  # already durable: acknowledged, nothing written
            for batch in batches[1:]:
                await retrier.commit(batch)
            await retrier.commit(batches[-1])
            recovered = await recover(retrier, SPECS_WITH_BALANCES)
        finally:
            await writer.stop()
            await retrier.stop()
        for spec in SPECS_WITH_BALANCES:
            assert recovered[spec.symbol].state == work.engines[spec.symbol].export_state()
        produced = [e for b in batches for a in b.applied for e in a.events if type(e).__name__ == "Deposited"]
        count = (await backend.fetch("SELECT count(*) AS n FROM transfers WHERE status = 'applied' "
                                     "AND kind = 'deposit'"))[0]["n"]
        assert count == len(produced) > 12

    run(scenario())


# ------------------------------------------------------------- doctored rows


async def _healthy(store: AnyStore, work: Workload) -> None:
    recovered = await recover(store, SPECS_WITH_BALANCES)
    for spec in SPECS_WITH_BALANCES:
        assert recovered[spec.symbol].state == work.engines[spec.symbol].export_state()
    report = await verify_store(store, SPECS_WITH_BALANCES)
    assert report.ok, report.render()


async def _caught(store: AnyStore, *expected: str) -> str:
    """Recovery refuses the store and verify reports it, both naming what is wrong (recovery: the first of
    ``expected``); returns verify's report."""
    with pytest.raises(RecoveryError, match=BALANCED.symbol) as info:
        await recover(store, SPECS_WITH_BALANCES)
    assert expected[0] in str(info.value)
    report = await verify_store(store, SPECS_WITH_BALANCES)
    assert not report.ok
    rendered = report.render()
    assert f"{BALANCED.symbol}: MISMATCH" in rendered
    for text in expected:
        assert text in rendered, rendered
    assert all(inst.ok for inst in report.instruments if inst.instrument != BALANCED.symbol), rendered
    return rendered


def test_recover_and_verify_catch_a_doctored_balance_transfer_or_rate(backend: Backend) -> None:
    work = Workload(SPECS_WITH_BALANCES, seed=25)
    batches = work.batches(1_500, max_batch=100, snapshot_every=3)
    live = work.engines[BALANCED.symbol]
    assert live.ledger is not None
    client = next(c for c, a in sorted(live.ledger.accounts.items()) if a[2])
    applied = next(t for t, outcome in sorted(live.ledger.transfers.items()) if not outcome.startswith("refused"))
    symbol, quote = BALANCED.symbol, BALANCED.quote_asset
    where = f"WHERE instrument = '{symbol}'"

    async def scenario() -> None:
        store = await backend.store(SPECS_WITH_BALANCES)
        try:
            for batch in batches:
                await store.commit(batch)
            await _healthy(store, work)
            doctor = backend.execute

            # a balance: the client and the asset are named, and the quote asset is no longer conserved
            await doctor(f"UPDATE balances SET available = available + 7 {where} AND client_id = '{client}' "
                         f"AND asset = '{quote}'")
            account = live.ledger.accounts[client]  # type: ignore[union-attr]
            rendered = await _caught(
                store, f"{client} {quote} available {account[2] + 7} reserved {account[3]} (open orders) vs "
                       f"available {account[2]} reserved {account[3]}",
                f"balances (stored): {quote} is not conserved")
            assert "balances (full replay)" not in rendered  # the events are consistent
            await doctor(f"UPDATE balances SET available = available - 7 {where} AND client_id = '{client}' "
                         f"AND asset = '{quote}'")
            await _healthy(store, work)

            # the fees account
            await doctor(f"UPDATE balances SET available = available + 1 {where} AND client_id = ''")
            await _caught(store, f"the fees account holds {live.ledger.fees + 1} {quote}")  # type: ignore[union-attr]
            await doctor(f"UPDATE balances SET available = available - 1 {where} AND client_id = ''")

            # a transfer's amount, its outcome, the row itself
            await doctor(f"UPDATE transfers SET amount_units = amount_units + 1 {where} AND transfer_id = '{applied}'")
            # (recovery compares with the latest snapshot, which holds the transfers' summary, not their list:
            # it sees that they differ; verify's full replay names the transfer)
            await _caught(store, "the transfers remembered differ", f"transfers remembered with another outcome, "
                          f"first '{applied}'", "[the row says: ")
            await doctor(f"UPDATE transfers SET amount_units = amount_units - 1 {where} AND transfer_id = '{applied}'")
            await _healthy(store, work)
            await doctor(f"UPDATE transfers SET outcome = 'deposited 1 nothing' {where} AND transfer_id = '{applied}'")
            await _caught(store, "the transfers remembered differ",
                          f"transfers remembered with another outcome, first '{applied}'")
            outcome = live.ledger.transfers[applied]  # type: ignore[union-attr]
            await doctor(f"UPDATE transfers SET outcome = '{outcome}' {where} AND transfer_id = '{applied}'")
            await _healthy(store, work)
            await doctor(f"DELETE FROM transfers {where} AND transfer_id = '{applied}'")
            await _caught(store, "the transfers remembered differ", f"transfers remembered only in full replay: "
                          f"['{applied}']")
        finally:
            await store.stop()

    run(scenario())


def test_verify_flags_a_reserve_that_the_open_orders_do_not_hold(backend: Backend) -> None:
    work = Workload(SPECS_WITH_BALANCES, seed=26)
    batches = work.batches(1_200, max_batch=100, snapshot_every=0)
    live = work.engines[BALANCED.symbol]
    resting = next(o for o in sorted(live.book.orders.values(), key=lambda o: o.order_id) if o.side is Side.BUY)
    asset = BALANCED.quote_asset

    async def scenario() -> None:
        store = await backend.store(SPECS_WITH_BALANCES)
        try:
            for batch in batches:
                await store.commit(batch)
            await _healthy(store, work)
            await backend.execute(f"UPDATE orders SET rate = rate + 1 WHERE instrument = '{BALANCED.symbol}' "
                                  f"AND order_id = {resting.order_id}")
            account = live.ledger.accounts[resting.client_id]  # type: ignore[union-attr]
            await _caught(store, f"orders differ, first {resting.order_id}",
                          f"balances (stored): 1 reserves are not what the open orders hold: {resting.client_id} has "
                          f"{account[3]} {asset} reserved, its open orders hold {account[3] + resting.remaining}")
        finally:
            await store.stop()

    run(scenario())


def test_verify_flags_events_that_do_not_conserve_money(backend: Backend) -> None:
    """A deposit event whose amount was edited: the balances its events carry no longer add up to the deposits
    minus the withdrawals (the full replay's own check), and the transfer it remembers differs."""
    work = Workload(SPECS_WITH_BALANCES, seed=27)
    batches = work.batches(600, max_batch=100, snapshot_every=0)
    symbol, base = BALANCED.symbol, BALANCED.base_asset
    if backend.kind == "postgres":
        payload = ("convert_to(replace(convert_from(payload, 'UTF8'), '\"amount\":150,', '\"amount\":151,'), "
                   "'UTF8')")
    else:
        payload = "CAST(replace(CAST(payload AS TEXT), '\"amount\":150,', '\"amount\":151,') AS BLOB)"

    async def scenario() -> None:
        store = await backend.store(SPECS_WITH_BALANCES)
        try:
            for batch in batches:
                await store.commit(batch)
            await _healthy(store, work)
            await backend.execute(f"UPDATE order_events SET payload = {payload} WHERE instrument = '{symbol}' "
                                  "AND seq = 1")
            rendered = await _caught(store, "transfers remembered with another outcome, first 'fund-alice-CCC'",
                                     f"balances (full replay): {base} is not conserved: the deposits minus the "
                                     "withdrawals in the events are",
                                     f"balances (stored): {base} is not conserved")
            assert "'deposited 15.1 CCC for alice at seq 1'" in rendered
        finally:
            await store.stop()

    run(scenario())
