"""Average-cost positions from fills: integers only, floor division on partial closes."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.core.events import OrderFilled
from exchange.core.types import Side, StpMode
from exchange.ports import Position
from exchange.projections.positions import apply_fill, apply_fills
from tests.unit._helpers import ALICE, BOB, buy, make_engine, sell

BUY, SELL = Side.BUY, Side.SELL
FLAT = Position()


def fills(position: Position, *steps: tuple[Side, int, int]) -> Position:
    for side, price, lots in steps:
        position = apply_fill(position, side, price, lots)
    return position


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # opening and adding: cost is the sum of price * lots, signed
        ([(BUY, 100, 3)], Position(3, 300, 0)),
        ([(SELL, 100, 3)], Position(-3, -300, 0)),
        ([(BUY, 100, 3), (BUY, 110, 1)], Position(4, 410, 0)),
        ([(SELL, 100, 3), (SELL, 90, 2)], Position(-5, -480, 0)),
        # reducing a long realizes (price - average cost) on the closed lots
        ([(BUY, 100, 4), (SELL, 110, 1)], Position(3, 300, 10)),
        ([(BUY, 100, 4), (SELL, 90, 4)], Position(0, 0, -40)),
        # reducing a short: profit when buying back cheaper
        ([(SELL, 100, 4), (BUY, 90, 1)], Position(-3, -300, 10)),
        ([(SELL, 100, 4), (BUY, 120, 4)], Position(0, 0, -80)),
        # the removed cost is floor(cost * closed / |net|): 310 * 1 // 3 = 103
        ([(BUY, 100, 2), (BUY, 110, 1), (SELL, 120, 1)], Position(2, 207, 17)),
        # a short: -310 * 1 // 3 = -104 (floor, towards minus infinity)
        ([(SELL, 100, 2), (SELL, 110, 1), (BUY, 90, 1)], Position(-2, -206, 14)),
        # crossing through zero closes everything, then opens the rest at the fill price
        ([(BUY, 100, 2), (SELL, 105, 5)], Position(-3, -315, 10)),
        ([(SELL, 100, 2), (BUY, 105, 5)], Position(3, 315, -10)),
        # a round trip on the same client (a self-trade is two fills of one client)
        ([(BUY, 100, 2), (SELL, 100, 2)], Position(0, 0, 0)),
    ],
)
def test_apply_fill(steps: list[tuple[Side, int, int]], expected: Position) -> None:
    assert fills(FLAT, *steps) == expected


def test_apply_fills_folds_an_engines_fills_maker_first() -> None:
    engine = make_engine()
    events = [*engine.apply(sell("a1", 100, 5, client=ALICE)),
              *engine.apply(buy("b1", 100, 3, client=BOB)),  # bob buys 3 from alice
              *engine.apply(buy("a2", 101, 2, client=ALICE, stp=StpMode.NONE)),  # alice buys 2 from herself
              *engine.apply(sell("b2", 90, 1, client=BOB))]  # rests: nothing to trade against
    assert [type(e) for e in events].count(OrderFilled) == 2
    positions: dict[str, Position] = {"carol": Position(1, 50, 0)}  # folded into, not replaced
    apply_fills(positions, events)
    # alice: sold 3 at 100; then, as the maker, sold 2 more (short 5, cost -500) and, as the taker, bought
    # 2 back at 100: 2/5 of the cost removed, nothing realized
    assert positions == {"carol": Position(1, 50, 0), ALICE: Position(-3, -300, 0), BOB: Position(3, 300, 0)}


def test_side_may_be_a_plain_string() -> None:
    assert apply_fill(FLAT, "buy", 10, 1) == Position(1, 10, 0)  # type: ignore[arg-type]
    assert apply_fill(FLAT, "sell", 10, 1) == Position(-1, -10, 0)  # type: ignore[arg-type]


def test_big_numbers_stay_exact() -> None:
    big = 10**15
    p = fills(FLAT, (BUY, big, big), (BUY, big - 1, big), (SELL, big + 7, big))
    assert p.net_lots == big
    assert p.cost == (2 * big * big - big) - (2 * big * big - big) * big // (2 * big)


step = st.tuples(st.sampled_from([BUY, SELL]), st.integers(1, 10_000), st.integers(1, 1_000))


@given(st.lists(step, max_size=40))
def test_invariants(steps: list[tuple[Side, int, int]]) -> None:
    p = FLAT
    net = 0
    cash = 0  # money paid (negative) or received (positive)
    for side, price, lots in steps:
        before = p
        p = apply_fill(p, side, price, lots)
        signed = lots if side is BUY else -lots
        net += signed
        cash -= price * signed
        assert p.net_lots == net
        if p.net_lots == 0:
            assert p.cost == 0
        else:
            # the average cost of the open lots lies within the fill prices seen
            avg = Fraction(p.cost, p.net_lots)
            assert 1 <= avg <= 10_000
        if before.net_lots and (before.net_lots > 0) != (signed > 0) and lots > abs(before.net_lots):
            assert p.cost == price * p.net_lots  # crossed: the rest opens at the fill price
        # realized P&L == cash flow + signed cost of the open lots: rounding creates or loses nothing
        assert p.realized == cash + p.cost
