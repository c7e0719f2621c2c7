"""Balances: exact event lists for reservation, settlement at the maker's price, fees, release and transfers.

The instrument ``T`` trades base ``B`` (lots) against quote ``Q``; a price is ticks of 0.01 and a quote
unit is a tick times a lot, so a fill of ``q`` lots at ``p`` ticks has a notional of ``p * q`` quote units.
Every test also checks the invariants after each command (:func:`check`): nothing negative, money
conserved per asset, each client's reserved amount what its open orders hold.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from exchange import (
    CancelReason,
    Event,
    Instrument,
    MatchingEngine,
    OrderAccepted,
    OrderAmended,
    OrderFilled,
    OrderRejected,
    PlaceOrder,
    RejectReason,
    StpMode,
)
from exchange.core.balances import Ledger
from exchange.core.commands import ClearBook, Deposit, RejectInput, Withdraw
from exchange.core.events import Deposited, Withdrawn
from exchange.pipeline.router import Router
from exchange.projections.applier import EventApplier
from exchange.wire.auth import Verifier, sign
from exchange.wire.codec import WireEncoder, decode_command, encode_event, event_to_wire
from tests.unit._helpers import (
    ALICE,
    ANY_TEXT,
    BOB,
    BUY,
    FOK,
    FOK_UNFILLED,
    GTD,
    IOC,
    IOC_REMAINDER,
    MARKET,
    SELF_TRADE,
    SELL,
    SYM,
    accepted,
    amend,
    buy,
    cancel,
    canceled,
    expired,
    filled,
    market,
    rejected,
    sell,
)


def spec(**kwargs: Any) -> Instrument:
    options: dict[str, Any] = {"balances": True, "base_asset": "B", "quote_asset": "Q", "taker_fee_bps": 30,
                               "maker_fee_bps": 10, **kwargs}
    return Instrument.from_decimals(SYM, tick_size="0.01", lot_size="1", **options)


class Venue:
    """An engine with balances, the money sent in and out per asset (for the conservation check), every event."""

    def __init__(self, **kwargs: Any) -> None:
        self.engine = MatchingEngine(spec(**kwargs))
        self.net = {"B": 0, "Q": 0}
        self.events: list[Event] = []

    def __call__(self, *commands: Any) -> list[Event]:
        out: list[Event] = []
        for command in commands:
            events = self.engine.apply(command)
            for e in events:
                if isinstance(e, Deposited):
                    self.net[e.asset] += e.amount
                elif isinstance(e, Withdrawn):
                    self.net[e.asset] -= e.amount
            out += events
            self.events += events
            check(self.engine, self.net)
        return out


def check(engine: MatchingEngine, net: dict[str, int]) -> None:
    """The ledger's invariants (see exchange.core.balances)."""
    ledger = engine.ledger
    assert ledger is not None
    accounts = ledger.accounts
    assert all(x >= 0 for a in accounts.values() for x in a), accounts
    assert sum(a[0] + a[1] for a in accounts.values()) == net["B"]
    assert sum(a[2] + a[3] for a in accounts.values()) + ledger.fees == net["Q"]
    holds: dict[str, list[int]] = {}
    for order in engine.book.iter_orders():
        entry = holds.setdefault(order.client_id, [0, 0])
        entry[order.side is BUY] += order.remaining * order.rate
    for client, account in accounts.items():
        assert [account[1], account[3]] == holds.get(client, [0, 0]), (client, account, holds.get(client))


def deposit(client: str, asset: str, amount: int, tid: str) -> Deposit:
    return Deposit(SYM, client, asset, amount, tid)


def withdraw(client: str, asset: str, amount: int, tid: str) -> Withdraw:
    return Withdraw(SYM, client, asset, amount, tid)


def with_(event: Any, **fields: Any) -> Any:
    return msgspec.structs.replace(event, **fields)


def funded(**kwargs: Any) -> Venue:
    venue = Venue(**kwargs)
    venue(deposit(ALICE, "Q", 100_000, "t-a"), deposit(BOB, "B", 10, "t-b"))
    return venue


# ---------------------------------------------------------------- reserve, settle, release


def test_a_buy_holds_price_and_fee_per_lot_and_a_fill_at_a_better_price_gives_the_rest_back() -> None:
    v = funded()  # seq 1, 2
    # bob's sell holds its 4 lots; alice's buy at 10.00 holds 1,000 + ceil(1,000 x 30 bps) = 1,003 a lot
    assert v(sell("b1", 990, 4, client=BOB)) == [
        with_(accepted(3, 1, "b1", SELL, 990, 4, client=BOB), reserved=4, balances=[(BOB, "B", 6, 4)])]
    events = v(buy("a1", 1000, 5))
    # the fill is at the maker's 9.90: notional 3,960; taker fee ceil(11.88) = 12, maker fee ceil(3.96) = 4.
    # alice's 4 filled lots held 4,012: 3,972 spent, 40 back at once; bob receives 3,960 - 4
    assert events == [
        with_(accepted(4, 2, "a1", BUY, 1000, 5), reserved=5015, balances=[(ALICE, "Q", 94985, 5015)]),
        with_(filled(5, 1, 990, 4, BUY, (1, BOB, "b1", 0), (2, ALICE, "a1", 1)), maker_fee=4, taker_fee=12,
              balances=[(ALICE, "B", 4, 0), (ALICE, "Q", 95025, 1003), (BOB, "B", 6, 0), (BOB, "Q", 3956, 0),
                        ("", "Q", 16, 0)]),
    ]
    assert v(cancel("a1")) == [
        with_(canceled(6, 2, "a1", BUY, 1000, 1), released=1003, balances=[(ALICE, "Q", 96028, 0)])]


def test_fees_round_up_to_a_unit_and_a_maker_rebate_rounds_towards_zero() -> None:
    v = funded(maker_fee_bps=-5, taker_fee_bps=7)
    v(sell("b1", 999, 1, client=BOB))
    events = v(buy("a1", 999, 1))
    # notional 999: taker fee ceil(0.6993) = 1; maker rebate 0.4995 rounds to 0 in the venue's favour
    assert (events[-1].maker_fee, events[-1].taker_fee) == (0, 1)
    v(sell("b2", 4000, 1, client=BOB))
    events = v(buy("a2", 4000, 1))
    # notional 4,000: taker fee ceil(2.8) = 3, maker rebate ceil(-2.0) = -2: bob receives 4,002
    assert (events[-1].maker_fee, events[-1].taker_fee) == (-2, 3)
    assert (BOB, "Q", 999 + 4002, 0) in events[-1].balances
    assert ("", "Q", 1 + 3 - 2, 0) in events[-1].balances


def test_partial_fills_then_cancel_release_what_is_left() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=0)
    v(buy("a1", 500, 6))  # holds 3,000
    v(sell("b1", 500, 2, client=BOB), sell("b2", 400, 1, client=BOB))
    assert v.engine.ledger is not None
    assert v.engine.ledger.accounts[ALICE] == [3, 0, 97000 + 0, 1500]  # 3 lots bought at the maker's 5.00
    events = v(cancel("a1"))
    assert events == [with_(canceled(8, 1, "a1", BUY, 500, 3), released=1500, balances=[(ALICE, "Q", 98500, 0)])]


def test_an_amend_holds_more_or_gives_back_and_is_refused_when_the_money_is_not_there() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=0)
    v(buy("a1", 1000, 10))  # holds 10,000
    assert v(amend("a1", qty=4)) == [  # down: keeps its place, 6,000 back
        with_(OrderAmended(SYM, 4, 0, 1, ALICE, "a1", BUY, 1000, 1000, 10, 4, 4, False), reserved=4000,
              balances=[(ALICE, "Q", 96000, 4000)])]
    assert v(amend("a1", price=2000)) == [  # a new price: 4 lots at 20.00 hold 8,000
        with_(OrderAmended(SYM, 5, 0, 1, ALICE, "a1", BUY, 1000, 2000, 4, 4, 4, True), reserved=8000,
              balances=[(ALICE, "Q", 92000, 8000)])]
    assert v(amend("a1", qty=50)) == [  # 50 lots at 20.00 need 92,000 more; 92,000 is available: exactly enough
        with_(OrderAmended(SYM, 6, 0, 1, ALICE, "a1", BUY, 2000, 2000, 4, 50, 50, True), reserved=100000,
              balances=[(ALICE, "Q", 0, 100000)])]
    before = v.engine.export_state()
    assert v(amend("a1", qty=51)) == [
        OrderRejected(SYM, 7, 0, ALICE, "a1", 1, "amend", RejectReason.INSUFFICIENT_FUNDS, ANY_TEXT)]
    assert v.events[-1].text == "the amend needs 20.00 more Q, available 0.00"  # type: ignore[union-attr]
    after = v.engine.export_state()
    assert (after.orders, after.accounts) == (before.orders, before.accounts)  # the order exactly as it was


def test_a_market_buy_spends_its_budget_fees_included_and_gets_the_rest_back() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=100)  # a 1% taker fee
    v(sell("b1", 1000, 3, client=BOB), sell("b2", 1100, 5, client=BOB))
    events = v(PlaceOrder(SYM, ALICE, "a1", BUY, MARKET, 0, 100, IOC, funds=3500))
    # 3 lots at 10.00 cost 3,000 + 30 = 3,030; then 470 buys no lot at 11.00 (1,100 + 11): the rest is canceled
    assert events == [
        with_(accepted(5, 3, "a1", BUY, 0, 100, otype=MARKET, tif=IOC), reserved=3500, funds=3500,
              balances=[(ALICE, "Q", 96500, 3500)]),
        with_(filled(6, 1, 1000, 3, BUY, (1, BOB, "b1", 0), (3, ALICE, "a1", 97)), maker_fee=0, taker_fee=30,
              balances=[(ALICE, "B", 3, 0), (ALICE, "Q", 96500, 470), (BOB, "B", 2, 5), (BOB, "Q", 3000, 0),
                        ("", "Q", 30, 0)]),
        with_(canceled(7, 3, "a1", BUY, 0, 97, IOC_REMAINDER), released=470, balances=[(ALICE, "Q", 96970, 0)]),
    ]
    # a budget with a quantity: complete after 2 lots, the rest of the budget goes back with the last fill
    events = v(PlaceOrder(SYM, ALICE, "a2", BUY, MARKET, 0, 2, IOC, funds=5000))
    assert [type(e) for e in events] == [OrderAccepted, OrderFilled]
    assert events[-1].balances[1] == (ALICE, "Q", 96970 - 2 * 1100 - 22, 0)  # type: ignore[union-attr]


def test_a_market_buy_without_a_budget_holds_its_band_limit_or_is_refused_without_a_band() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=0)
    v(sell("b1", 1000, 1, client=BOB))
    assert v(market("a1", BUY, 1)) == [
        rejected(4, RejectReason.INVALID_ORDER, "a1")]  # no price band: name a budget
    banded = funded(maker_fee_bps=0, taker_fee_bps=0, price_band_bps=500)
    banded(sell("b1", 1000, 1, client=BOB))
    events = banded(market("a1", BUY, 2))
    assert events[0] == with_(accepted(4, 2, "a1", BUY, 0, 2, otype=MARKET, tif=IOC), reserved=2100,
                              balances=[(ALICE, "Q", 97900, 2100)])  # 2 lots at the band's 10.50
    assert events[-1] == with_(canceled(6, 2, "a1", BUY, 0, 1, IOC_REMAINDER), released=1050,
                               balances=[(ALICE, "Q", 99000, 0)])


def test_insufficient_funds_is_refused_and_says_what_was_needed_and_what_is_available() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=0)
    assert v(buy("a1", 100_000, 2)) == [rejected(3, RejectReason.INSUFFICIENT_FUNDS, "a1")]
    assert v.events[-1].text == "Q required 2000.00, available 1000.00"  # type: ignore[union-attr]
    assert v(sell("b1", 1, 11, client=BOB)) == [rejected(4, RejectReason.INSUFFICIENT_FUNDS, "b1", client=BOB)]
    assert v.events[-1].text == "B required 11, available 10"  # type: ignore[union-attr]
    assert v(sell("a2", 1, 1)) == [rejected(5, RejectReason.INSUFFICIENT_FUNDS, "a2")]  # alice has no B


def test_self_trade_prevention_gives_the_canceled_maker_its_reservation_back() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=0)
    v(deposit(BOB, "Q", 5000, "t-bq"), buy("b1", 400, 5, client=BOB))  # bob holds 2,000 Q
    events = v(sell("b2", 400, 3, client=BOB, stp=StpMode.CANCEL_RESTING))
    assert events[1] == with_(canceled(6, 1, "b1", BUY, 400, 5, SELF_TRADE, client=BOB), released=2000,
                              balances=[(BOB, "Q", 5000, 0)])


def test_a_fok_that_cannot_fill_holds_nothing_after() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=0)
    v(sell("b1", 1000, 1, client=BOB))
    assert v(buy("a1", 1000, 2, tif=FOK)) == [
        with_(accepted(4, 2, "a1", BUY, 1000, 2, tif=FOK), reserved=2000, balances=[(ALICE, "Q", 98000, 2000)]),
        with_(canceled(5, 2, "a1", BUY, 1000, 2, FOK_UNFILLED), released=2000, balances=[(ALICE, "Q", 100000, 0)]),
    ]


def test_expiry_and_clear_release_what_orders_hold() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=0)
    v(buy("a1", 100, 3, tif=GTD, ts=1, expire_ns=10), sell("b1", 200, 2, client=BOB))
    events = v(buy("a2", 50, 1, ts=10))
    assert events[0] == with_(expired(5, 1, "a1", BUY, 100, 3, ts=10), released=300,
                              balances=[(ALICE, "Q", 100000, 0)])
    events = v(ClearBook(SYM, 11, "ops", "end of day"))
    assert events[1:] == [
        with_(canceled(8, 3, "a2", BUY, 50, 1, CancelReason.CLEARED, ts=11), released=50,
              balances=[(ALICE, "Q", 100000, 0)]),
        with_(canceled(9, 2, "b1", SELL, 200, 2, CancelReason.CLEARED, client=BOB, ts=11), released=2,
              balances=[(BOB, "B", 10, 0)]),
    ]


# ---------------------------------------------------------------- transfers


def test_deposits_and_withdrawals_are_idempotent_by_transfer_id_and_name_the_original_outcome() -> None:
    v = Venue()
    assert v(deposit(ALICE, "Q", 500, "t-1")) == [Deposited(SYM, 1, 0, ALICE, "Q", 500, "t-1", [(ALICE, "Q", 500, 0)])]
    again = v(deposit(ALICE, "Q", 500, "t-1"))
    assert again == [OrderRejected(SYM, 2, 0, ALICE, None, None, "deposit", RejectReason.DUPLICATE_TRANSFER_ID,
                                   "transfer 't-1' was seen before: deposited 5.00 Q for alice at seq 1", "t-1")]
    assert v(withdraw(ALICE, "Q", 200, "t-2")) == [Withdrawn(SYM, 3, 0, ALICE, "Q", 200, "t-2", [(ALICE, "Q", 300, 0)])]
    short = v(withdraw(ALICE, "Q", 301, "t-3"))
    assert short == [OrderRejected(SYM, 4, 0, ALICE, None, None, "withdraw", RejectReason.INSUFFICIENT_FUNDS,
                                   "Q required 3.01, available 3.00", "t-3")]
    assert v(withdraw(ALICE, "Q", 300, "t-3"))[0].text == (  # type: ignore[union-attr]
        "transfer 't-3' was seen before: refused at seq 4: insufficient_funds (Q required 3.01, available 3.00)")
    assert v(withdraw(ALICE, "Q", 300, "t-4"))[0].balances == [(ALICE, "Q", 0, 0)]  # type: ignore[union-attr]
    assert v.engine.ledger is not None
    assert ALICE not in v.engine.ledger.accounts  # holds nothing: no account


def test_a_withdrawal_takes_only_what_is_available_never_what_is_reserved() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=0)
    v(buy("a1", 1000, 60))  # holds 60,000 of 100,000
    assert v(withdraw(ALICE, "Q", 40_001, "w-1"))[0].reason is RejectReason.INSUFFICIENT_FUNDS  # type: ignore
    assert v(withdraw(ALICE, "Q", 40_000, "w-2"))[0].balances == [(ALICE, "Q", 0, 60000)]  # type: ignore


@pytest.mark.parametrize(("command", "reason"), [
    (Deposit(SYM, ALICE, "EUR", 5, "x"), RejectReason.UNKNOWN_ASSET),
    (Deposit(SYM, ALICE, "Q", 0, "x"), RejectReason.INVALID_AMOUNT),
    (Withdraw(SYM, ALICE, "B", -1, "x"), RejectReason.INVALID_AMOUNT),
    (Deposit(SYM, ALICE, "Q", 5, ""), RejectReason.MALFORMED),
])
def test_a_transfer_that_cannot_be_understood_is_refused_and_not_remembered(command: Any, reason: RejectReason) -> None:
    v = Venue()
    assert [e.reason for e in v(command)] == [reason]  # type: ignore[union-attr]
    assert v.engine.ledger is not None
    assert v.engine.ledger.transfers == {}


def test_an_instrument_without_balances_refuses_transfers_and_budgets() -> None:
    engine = MatchingEngine(Instrument.from_decimals(SYM, tick_size="0.01", lot_size="1"))
    assert [e.reason for e in engine.apply(Deposit(SYM, ALICE, "Q", 5, "x"))] == [  # type: ignore[union-attr]
        RejectReason.BALANCES_DISABLED]
    assert [e.reason for e in engine.apply(PlaceOrder(SYM, ALICE, "a", BUY, MARKET, 0, 1, IOC, funds=5))] == [
        RejectReason.INVALID_ORDER]  # type: ignore[union-attr]
    assert engine.ledger is None
    assert msgspec.json.encode(engine.apply(buy("a1", 100, 1))[0]) == msgspec.json.encode(
        accepted(3, 1, "a1", BUY, 100, 1))  # the events are what they always were


# ---------------------------------------------------------------- the engine image


def test_balances_survive_an_image_and_a_replay_of_the_events() -> None:
    v = funded(price_band_bps=1000)
    v(sell("b1", 990, 4, client=BOB), buy("a1", 1000, 5), sell("b2", 1200, 3, client=BOB),
      amend("a1", price=1001), withdraw(BOB, "B", 1, "w-1"), withdraw(BOB, "B", 99, "w-2"),
      market("a2", BUY, 1), PlaceOrder(SYM, ALICE, "a3", BUY, MARKET, 0, 5, IOC, funds=2000))
    state = v.engine.export_state()
    assert state.accounts
    assert state.fees
    assert state.transfers
    again = MatchingEngine.from_state(v.engine.spec, state)
    assert again.export_state() == state
    assert again.state_hash() == v.engine.state_hash()
    applier = EventApplier(v.engine.spec)
    applier.apply_all(v.events)
    assert applier.export_state() == state
    assert applier.state_hash() == v.engine.state_hash()
    # the hash covers the balances: the same book with other balances hashes differently
    other = msgspec.structs.replace(state, fees=state.fees + 1)
    assert MatchingEngine.from_state(v.engine.spec, other).state_hash() != v.engine.state_hash()


def test_the_reservation_covers_any_way_an_order_fills() -> None:
    """A buy of q lots at P holds q x (P + ceil(P x bps)); however it fills at P or better, in lots of any size,
    the fills never cost more than that (fees round up per fill, and ceil(q x) <= q ceil(x))."""
    ledger = Ledger(spec(taker_fee_bps=7, maker_fee_bps=3))
    for price in (1, 3, 99, 1000, 12345):
        rate = ledger.rate(True, price)
        for lots in range(1, 30):
            for p in (price, max(1, price - 1), max(1, price // 2)):
                fee = -((-p * lots * 7) // 10_000)
                assert p * lots + fee <= lots * rate


def test_amend_and_limit_orders_use_the_fee_rates_of_their_instrument() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=0)
    assert v(buy("a1", 100, 1))[0].reserved == 100  # type: ignore[union-attr]
    w = funded(maker_fee_bps=20, taker_fee_bps=0)
    assert w(buy("a1", 100, 1))[0].reserved == 101  # type: ignore[union-attr]  # the larger fee: the maker's


# ---------------------------------------------------------------- the wire


def test_transfers_and_budgets_decode_from_decimal_strings_in_their_asset() -> None:
    specs = {SYM: spec()}
    msg = {"op": "deposit", "instrument": SYM, "client_id": ALICE, "asset": "Q", "amount": "12.34", "transfer_id": "t"}
    assert decode_command(msg, specs, ts_ns=5) == Deposit(SYM, ALICE, "Q", 1234, "t", 5)
    assert decode_command({**msg, "op": "withdraw", "asset": "B", "amount": "3"}, specs, ts_ns=5) == Withdraw(
        SYM, ALICE, "B", 3, "t", 5)
    place = {"op": "place", "instrument": SYM, "client_id": ALICE, "client_order_id": "m", "side": "buy",
             "type": "market", "qty": "5", "funds": "20.00"}
    assert decode_command(place, specs, ts_ns=5) == PlaceOrder(SYM, ALICE, "m", BUY, MARKET, 0, 5, IOC, 5,
                                                                funds=2000)


@pytest.mark.parametrize(("fields", "reason", "transfer_id"), [
    ({"amount": "1.234"}, RejectReason.INVALID_AMOUNT, "t"),  # off the quote grid of 0.01
    ({"amount": "0"}, RejectReason.INVALID_AMOUNT, "t"),
    ({"amount": 5.0}, RejectReason.INVALID_AMOUNT, "t"),  # a decimal string, not a JSON float
    ({"amount": "-1"}, RejectReason.INVALID_AMOUNT, "t"),
    ({"asset": "EUR"}, RejectReason.UNKNOWN_ASSET, "t"),
    ({"asset": None}, RejectReason.UNKNOWN_ASSET, "t"),
    ({"transfer_id": None}, RejectReason.MALFORMED, ""),
    ({"transfer_id": "x" * 65}, RejectReason.MALFORMED, ""),
])
def test_a_transfer_the_edge_cannot_read_is_a_sequenced_rejection_naming_its_transfer(
        fields: dict[str, Any], reason: RejectReason, transfer_id: str) -> None:
    msg = {"op": "deposit", "instrument": SYM, "client_id": ALICE, "asset": "Q", "amount": "1", "transfer_id": "t",
           **fields}
    command = decode_command(msg, {SYM: spec()}, ts_ns=0)
    assert isinstance(command, RejectInput)
    assert (command.reason, command.command, command.transfer_id) == (reason, "deposit", transfer_id)
    events = Venue()(command)
    assert [(e.reason, e.transfer_id) for e in events] == [(reason, transfer_id)]  # type: ignore[union-attr]


def test_budgets_and_transfers_are_refused_where_they_make_no_sense() -> None:
    plain = {SYM: Instrument.from_decimals(SYM, tick_size="0.01", lot_size="1")}
    deposit_msg = {"op": "deposit", "instrument": SYM, "client_id": ALICE, "asset": "Q", "amount": "1",
                   "transfer_id": "t"}
    assert decode_command(deposit_msg, plain, ts_ns=0).reason is RejectReason.BALANCES_DISABLED  # type: ignore
    limit = {"op": "place", "instrument": SYM, "client_id": ALICE, "client_order_id": "l", "side": "buy",
             "price": "1", "qty": "1", "funds": "5"}
    assert decode_command(limit, {SYM: spec()}, ts_ns=0).reason is RejectReason.INVALID_ORDER  # type: ignore
    market_sell = {**limit, "type": "market", "side": "sell", "price": None}
    assert decode_command(market_sell, {SYM: spec()}, ts_ns=0).reason is RejectReason.INVALID_ORDER  # type: ignore
    assert decode_command({**market_sell, "side": "buy"}, plain, ts_ns=0).reason is RejectReason.INVALID_ORDER  # type: ignore


def test_an_unsigned_transfer_is_not_authorized_and_a_signed_one_is_applied() -> None:
    keys = {"funding": b"s3cret"}
    router = Router({SYM: spec()}, verifier=Verifier(keys))
    msg = {"op": "deposit", "instrument": SYM, "client_id": ALICE, "asset": "Q", "amount": "1", "transfer_id": "t"}
    refused = router.route_message(msg, 10**18)
    assert isinstance(refused, RejectInput)
    assert (refused.reason, refused.client_id, refused.transfer_id) == (RejectReason.NOT_AUTHORIZED, ALICE, "t")
    assert router.route_message(sign(msg, "funding", keys["funding"], 10**12), 10**18) == Deposit(
        SYM, ALICE, "Q", 100, "t", 10**18)


def test_balance_fields_go_out_as_decimals_in_their_asset_and_only_where_balances_are_kept() -> None:
    v = funded(price_band_bps=1000)
    v(sell("b1", 990, 4, client=BOB), buy("a1", 1000, 5), amend("a1", qty=2), cancel("a1"),
      withdraw(BOB, "B", 1, "w-1"), PlaceOrder(SYM, ALICE, "a3", BUY, MARKET, 0, 5, IOC, funds=2000),
      withdraw(BOB, "B", 99, "w-2"))
    encoder = WireEncoder(v.engine.spec)
    wire = [msgspec.json.decode(encoder.encode(e)) for e in v.events]
    assert [encoder.encode(e) for e in v.events] == [encode_event(e, v.engine.spec) for e in v.events]
    assert wire[0] == {"type": "deposited", "instrument": SYM, "seq": 1, "ts_ns": 0, "client_id": ALICE,
                       "asset": "Q", "amount": "1000.00", "transfer_id": "t-a",
                       "balances": [{"client_id": ALICE, "asset": "Q", "available": "1000.00", "reserved": "0.00"}]}
    accepted_sell, accepted_buy, fill = wire[2], wire[3], wire[4]
    assert (accepted_sell["reserved"], accepted_buy["reserved"]) == ("4", "50.15")  # base for a sell, quote for a buy
    assert (fill["maker_fee"], fill["taker_fee"]) == ("0.04", "0.12")  # 39.60 x 10 and 30 bps, rounded up
    assert {b["client_id"] for b in fill["balances"]} == {ALICE, BOB, ""}  # "" the venue's fees account
    assert "funds" not in accepted_buy
    budget = next(w for w in wire if w.get("client_order_id") == "a3" and w["type"] == "accepted")
    assert budget["funds"] == "20.00"
    refused = wire[-1]
    assert (refused["type"], refused["reason"], refused["transfer_id"]) == ("rejected", "insufficient_funds", "w-2")
    plain = Instrument.from_decimals(SYM, tick_size="0.01", lot_size="1")
    engine = MatchingEngine(plain)
    out = engine.apply(buy("a1", 100, 1)) + engine.apply(cancel("a1"))
    for e in out:
        assert set(msgspec.json.decode(WireEncoder(plain).encode(e))) == set(event_to_wire(e, plain))
        assert not {"reserved", "released", "balances", "maker_fee", "funds"} & set(event_to_wire(e, plain))


def test_the_example_session_replays_as_the_readme_says() -> None:
    import io
    from pathlib import Path

    from exchange.cli.replay import replay
    from exchange.settings import load_instruments

    root = Path(__file__).resolve().parents[2]
    out = io.BytesIO()
    lines = (root / "examples" / "balances.jsonl").read_bytes().splitlines()
    replay(lines, out, load_instruments(root / "exchange" / "defaults" / "demo.toml"))
    answers = [msgspec.json.decode(line) for line in out.getvalue().splitlines()]
    assert len(answers) == len(lines)
    assert not [a for a in answers if "error" in a]
    reasons = [e["reason"] for a in answers for e in a.get("events", ()) if e["type"] == "rejected"]
    assert reasons == ["insufficient_funds", "duplicate_transfer_id"]
    book = answers[-1]["snapshot"]["BTC-USD"]
    assert book["fees"]["asset"] == "USD"
    assert book["fees"]["amount"] != "0.000000"
    assert {b["client_id"] for b in book["balances"]} == {"alice", "bob"}


def test_market_data_follows_a_book_with_balances_and_publishes_no_money() -> None:
    from exchange.projections.marketdata import MarketData

    v = funded()
    v(sell("b1", 990, 4, client=BOB), buy("a1", 1000, 5), withdraw(BOB, "B", 1, "w-1"), cancel("a1"))
    view = MarketData(v.engine.spec)
    messages = view.apply(v.events)
    assert view.seq == v.engine.seq
    for _, message in messages:
        assert b"balances" not in message
        assert b"reserved" not in message
        assert b"fee" not in message


def test_a_snapshot_leaves_the_transfer_ids_out_but_its_hash_still_covers_them() -> None:
    v = funded()
    v(deposit(ALICE, "B", 3, "t-c"), withdraw(BOB, "B", 99, "t-d"))  # applied, and refused: both remembered
    snapshot = v.engine.export_state(window=False)
    assert (snapshot.transfers, snapshot.transfers_complete, snapshot.transfers_count) == ([], False, 4)
    with pytest.raises(ValueError, match="leaves out the transfer ids"):
        MatchingEngine.from_state(v.engine.spec, msgspec.structs.replace(snapshot, done_complete=True))
    start = len(v.events)
    v(deposit(BOB, "Q", 5, "t-e"), sell("b1", 100, 1, client=BOB))
    applier = EventApplier(v.engine.spec, snapshot)
    applier.apply_all(v.events[start:])
    assert applier.state_hash() == v.engine.state_hash()
    assert dict(applier.export_state().transfers) == {"t-e": v.engine.ledger.transfers["t-e"]}  # type: ignore
    # one transfer id remembered otherwise (a doctored row) changes the hash
    full = v.engine.export_state()
    doctored = msgspec.structs.replace(full, transfers=[(t, o + "!") if t == "t-c" else (t, o)
                                                        for t, o in full.transfers])
    assert MatchingEngine.from_state(v.engine.spec, doctored).state_hash() != v.engine.state_hash()


def test_a_fok_market_buy_whose_budget_cannot_pay_for_all_of_it_is_canceled_untouched() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=0)
    v(sell("b1", 100, 5, client=BOB))
    fok = PlaceOrder(SYM, ALICE, "a1", BUY, MARKET, 0, 5, FOK, funds=250)  # 5 lots at 1.00 cost 500
    assert v(fok) == [
        with_(accepted(4, 2, "a1", BUY, 0, 5, otype=MARKET, tif=FOK), reserved=250, funds=250,
              balances=[(ALICE, "Q", 99750, 250)]),
        with_(canceled(5, 2, "a1", BUY, 0, 5, FOK_UNFILLED), released=250, balances=[(ALICE, "Q", 100000, 0)]),
    ]
    assert v(PlaceOrder(SYM, ALICE, "a2", BUY, MARKET, 0, 2, FOK, funds=200))[1].qty_lots == 2  # type: ignore


def test_a_spent_budget_stops_the_order_before_self_trade_prevention_cancels_anything() -> None:
    v = funded(maker_fee_bps=0, taker_fee_bps=0)
    v(deposit(ALICE, "B", 1, "t-own"), sell("b1", 100, 1, client=BOB), sell("a-own", 101, 1))  # her ask behind
    v.events.clear()
    out = v(PlaceOrder(SYM, ALICE, "a1", BUY, MARKET, 0, 3, IOC, funds=100, stp=StpMode.CANCEL_RESTING))
    assert [type(e).__name__ for e in out] == ["OrderAccepted", "OrderFilled", "OrderCanceled"]
    assert out[-1].reason is IOC_REMAINDER  # type: ignore[union-attr]
    assert v.engine.open_order(ALICE, "a-own") is not None  # still resting: the budget stopped first
