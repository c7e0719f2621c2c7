"""Stateless property test: any list of commands, however wrong, keeps the engine sound.

Cheaper and wider than the state machine: commands are drawn independently of
the book, from small id spaces so that they still collide (duplicate client
order ids, cancels and amends of real, finished and never-issued orders), with
every enum given as a member, a plain string or an unknown string, and with
quantities, prices and expiries in and out of range (including ``True`` as a
quantity). Each list is applied to the engine and the reference through
:class:`~tests.property.harness.Harness`: no exception may escape ``apply``,
the events must equal the reference's and every invariant must hold after
every command; at the end snapshot restore and replay must be exact.

On the instruments that keep balances, deposits and withdrawals of either asset
(or an unknown one, or wild amounts, under colliding transfer ids) and market
buys with a budget come in too; elsewhere they must be refused. Stops and
stop-limits (stop prices around the market, every time in force, sometimes a
budget), icebergs (sometimes showing more than they have) and amends naming a
stop price come in as well, and wild places carry stop prices and display
quantities where they do not belong.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from exchange.core.instruments import Instrument
from exchange.core.types import OrderType, RejectReason, Side, StpMode, TimeInForce

from .harness import SPECS, Harness

clients = st.sampled_from(["alice", "bob", "carol"] * 3 + [""])
coids = st.sampled_from([f"k{i}" for i in range(16)] + [""])
order_ids = st.one_of(st.none(), st.integers(-1, 40))
SELF = "<self>"  # replaced by the symbol of the engine under test
instruments = st.sampled_from([SELF] * 6 + ["ELSEWHERE"])


def _enum_values(enum: Any, junk: list[str]) -> st.SearchStrategy[Any]:
    """Mostly members, often plain strings, now and then something unknown."""
    members = list(enum)
    return st.sampled_from(members * 4 + [m.value for m in members] * 2 + junk)


sides = _enum_values(Side, ["BUY", "bid"])
otypes = _enum_values(OrderType, ["stop_loss", "iceberg"])
tifs = _enum_values(TimeInForce, ["DAY", "gtc"])
stps = st.one_of(st.none(), st.none(), _enum_values(StpMode, ["cancel_oldest"]))
qtys = st.one_of(st.integers(1, 15), st.integers(1, 15), st.integers(1, 15), st.integers(-1, 0),
                 st.sampled_from([True, 41, 10**16]))
prices = st.one_of(st.integers(90, 110), st.integers(90, 110), st.integers(90, 110),
                   st.sampled_from([0, -1, 201, 10**16]))

BASE, QUOTE = "<base>", "<quote>"  # replaced by the assets of the engine under test
amounts = st.one_of(st.integers(1, 3_000), st.integers(1, 3_000), st.integers(1, 40),
                    st.sampled_from([0, -1, True, 10**24, 10**24 + 1]))
transfer_ids = st.sampled_from([f"t{i}" for i in range(10)] + [""])
_transfer_fields = {"instrument": instruments, "client_id": clients,
                    "asset": st.sampled_from([BASE, QUOTE, QUOTE, "XYZ"]), "amount": amounts,
                    "transfer_id": transfer_ids}
transfers = st.one_of(st.builds(Deposit, **_transfer_fields), st.builds(Withdraw, **_transfer_fields))
# market buys with a budget (now and then a sell or a limit with one, or a budget that is no amount)
budget_buys = st.builds(
    PlaceOrder, instrument=st.just(SELF), client_id=st.sampled_from(["alice", "bob", "carol"]),
    client_order_id=coids, side=st.sampled_from([Side.BUY, Side.BUY, Side.BUY, Side.SELL]),
    order_type=st.sampled_from([OrderType.MARKET] * 3 + [OrderType.LIMIT]), price_ticks=st.just(100),
    qty_lots=st.integers(1, 20), tif=st.sampled_from([TimeInForce.IOC, TimeInForce.FOK]), stp=stps,
    funds=st.one_of(st.integers(1, 3_000), st.integers(1, 3_000), st.sampled_from([-1, True, 10**24 + 1])))

# ts_ns and expire_ns are filled in later, relative to a clock that only moves forward;
# ``expire_ns`` here is an offset from the command's time (0: none, or a valid one for GTD), or
# EXPIRE_AT_ZERO for the absolute time 0 (a valid-looking GTD expiry when the clock starts negative).
EXPIRE_AT_ZERO = -(10**18)
wild_places = st.builds(
    PlaceOrder, instrument=instruments, client_id=clients, client_order_id=coids, side=sides, order_type=otypes,
    price_ticks=prices, qty_lots=qtys, tif=tifs, stp=stps,
    expire_ns=st.sampled_from([0] * 10 + [-3, 1, 5, 20, 60, EXPIRE_AT_ZERO]),
    post_only=st.sampled_from([False, False, False, True]),
    stop_price_ticks=st.one_of(st.just(0), st.just(0), prices), display_qty_lots=st.one_of(st.just(0), qtys))
# well-formed orders (enums as members or plain strings), so that books build up and trade
good_limits = st.builds(
    PlaceOrder, instrument=st.just(SELF), client_id=st.sampled_from(["alice", "bob", "carol"]),
    client_order_id=coids, side=st.sampled_from([Side.BUY, Side.SELL, "buy", "sell"]),
    order_type=st.just(OrderType.LIMIT), price_ticks=st.integers(95, 105), qty_lots=st.integers(1, 10),
    tif=st.sampled_from([TimeInForce.GTC] * 4 + [TimeInForce.IOC, TimeInForce.FOK, TimeInForce.GTD, "GTC"]),
    stp=stps, post_only=st.sampled_from([False] * 5 + [True]), expire_ns=st.just(0))
# stops and stop-limits around the market (a budget now and then, needed for a stop buy with balances)
good_stops = st.builds(
    PlaceOrder, instrument=st.just(SELF), client_id=st.sampled_from(["alice", "bob", "carol"]),
    client_order_id=coids, side=st.sampled_from([Side.BUY, Side.SELL]),
    order_type=st.sampled_from([OrderType.STOP, OrderType.STOP_LIMIT]), price_ticks=st.integers(93, 107),
    qty_lots=st.integers(1, 10), tif=st.sampled_from([TimeInForce.GTC] * 3 + [TimeInForce.GTD, TimeInForce.IOC,
                                                                              TimeInForce.FOK]),
    stp=stps, expire_ns=st.just(0), stop_price_ticks=st.integers(93, 107),
    funds=st.sampled_from([0, 0, 500, 3_000]))
# icebergs: limit orders showing a slice (now and then a slice larger than the order)
icebergs = st.builds(
    PlaceOrder, instrument=st.just(SELF), client_id=st.sampled_from(["alice", "bob", "carol"]),
    client_order_id=coids, side=st.sampled_from([Side.BUY, Side.SELL]), order_type=st.just(OrderType.LIMIT),
    price_ticks=st.integers(95, 105), qty_lots=st.integers(2, 15),
    tif=st.sampled_from([TimeInForce.GTC] * 4 + [TimeInForce.IOC, TimeInForce.FOK, TimeInForce.GTD]),
    stp=stps, post_only=st.sampled_from([False] * 5 + [True]), expire_ns=st.just(0),
    display_qty_lots=st.integers(1, 6))
good_markets = st.builds(
    PlaceOrder, instrument=st.just(SELF), client_id=st.sampled_from(["alice", "bob", "carol"]),
    client_order_id=coids, side=st.sampled_from([Side.BUY, Side.SELL]), order_type=st.just(OrderType.MARKET),
    price_ticks=st.just(0), qty_lots=st.integers(1, 20), tif=st.sampled_from([TimeInForce.IOC, TimeInForce.FOK]),
    stp=stps)
cancels = st.builds(CancelOrder, instrument=instruments, client_id=clients,
                    client_order_id=st.one_of(st.none(), coids), order_id=order_ids)
amends = st.builds(AmendOrder, instrument=instruments, client_id=clients, client_order_id=st.one_of(st.none(), coids),
                   order_id=order_ids, price_ticks=st.one_of(st.none(), prices), qty_lots=st.one_of(st.none(), qtys),
                   stop_price_ticks=st.one_of(st.none(), st.none(), prices))
others = st.one_of(
    st.builds(CancelAll, client_id=clients, instrument=st.one_of(st.none(), instruments)),
    st.builds(ClearBook, instrument=instruments),
    st.builds(HaltInstrument, instrument=instruments, client_id=st.just("ops"), text=st.just("")),
    st.builds(ResumeInstrument, instrument=instruments, client_id=st.just("ops"), text=st.just("")),
    st.builds(ResumeInstrument, instrument=instruments, client_id=st.just("ops"), text=st.just("")),
    st.builds(RejectInput, instrument=instruments, client_id=clients, client_order_id=st.one_of(st.none(), coids),
              reason=st.sampled_from(list(RejectReason)), text=st.just("bad input"),
              command=st.sampled_from(["place", "cancel", "amend"])),
    st.builds(RejectInput, instrument=instruments, client_id=clients, client_order_id=st.none(),
              reason=st.sampled_from(list(RejectReason)), text=st.just("bad transfer"),
              command=st.sampled_from(["deposit", "withdraw"]), transfer_id=transfer_ids),
)
# (st.one_of flattens and de-duplicates its branches, so weights need sampled_from + flatmap)
_weighted = ([good_limits] * 8 + [good_markets] * 2 + [wild_places] * 2 + [cancels] * 3 + [amends] * 3 + [others]
             + [transfers] * 3 + [budget_buys] + [good_stops] * 3 + [icebergs] * 2)
commands = st.sampled_from(_weighted).flatmap(lambda strategy: strategy)
steps = st.lists(st.tuples(commands, st.integers(0, 10)), min_size=20, max_size=100)


def _concrete(cmd: Any, spec: Instrument, ts: int) -> Any:
    """The drawn command for this engine's instrument at time ``ts``."""
    changes: dict[str, Any] = {"ts_ns": ts}
    if cmd.instrument == SELF:
        changes["instrument"] = spec.symbol
    if isinstance(cmd, Deposit | Withdraw):
        assets = {BASE: spec.base_asset or "BASE", QUOTE: spec.quote_asset or "QUOTE"}
        changes["asset"] = assets.get(cmd.asset, cmd.asset)
    if isinstance(cmd, PlaceOrder):
        offset = cmd.expire_ns or (15 if cmd.tif == TimeInForce.GTD else 0)
        changes["expire_ns"] = 0 if offset in (0, EXPIRE_AT_ZERO) else ts + offset
    return msgspec.structs.replace(cmd, **changes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
          print_blob=True)
@given(which=st.sampled_from(sorted(SPECS)), start=st.sampled_from([1_000, 1_000, 0, -30]), steps=steps,
       funded=st.sampled_from([(), ("alice", "bob"), ("alice", "bob", "carol"), ("alice", "bob", "carol")]))
def test_any_command_list_keeps_the_engine_sound(which: str, start: int, steps: list[tuple[Any, int]],
                                                 funded: tuple[str, ...]) -> None:
    """``start`` is the first input time; zero and negative starts probe the GTD expiry checks. On an instrument
    with balances the ``funded`` clients first get plenty of both assets, so that their orders trade."""
    h = Harness(SPECS[which])
    ts = start
    for client in funded if h.spec.balances else ():
        for asset, amount in ((h.spec.base_asset, 2_000), (h.spec.quote_asset, 200_000)):
            h.step(Deposit(h.spec.symbol, client, asset, amount, f"funding-{client}-{asset}", ts))
    for cmd, dt in steps:
        ts += dt
        h.step(_concrete(cmd, h.spec, ts))
    h.final_checks()
