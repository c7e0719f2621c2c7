"""Instrument specs and the exact decimal <-> ticks/lots conversion (nothing is ever rounded)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange import ConversionError, Instrument, RejectReason, StpMode
from exchange.core import instruments
from exchange.core.instruments import MAX_PRICE_TICKS, MAX_QTY_LOTS

INVALID_PRICE = RejectReason.INVALID_PRICE
INVALID_QUANTITY = RejectReason.INVALID_QUANTITY


def spec(tick_size: str = "0.01", lot_size: str = "1", **kwargs: Any) -> Instrument:
    return Instrument.from_decimals("T", tick_size=tick_size, lot_size=lot_size, **kwargs)


# ------------------------------------------------------------------ specs


def test_from_decimals_stores_integer_steps_and_defaults() -> None:
    s = spec("0.05", "0.001")
    assert (s.symbol, s.tick_units, s.tick_scale, s.lot_units, s.lot_scale) == ("T", 5, 2, 1, 3)
    assert (s.tick_size, s.lot_size) == ("0.05", "0.001")
    assert (s.min_qty_lots, s.max_qty_lots, s.max_price_ticks) == (1, MAX_QTY_LOTS, MAX_PRICE_TICKS)
    assert (s.price_band_bps, s.stp_default, s.dedupe_window) == (None, StpMode.NONE, 1_000_000)


def test_from_decimals_converts_limits_to_steps() -> None:
    s = spec("0.01", "0.1", min_qty="0.5", max_qty="1000", max_price="99999.99", price_band_bps=250,
             stp_default="cancel_both", dedupe_window=10)
    assert (s.min_qty_lots, s.max_qty_lots, s.max_price_ticks) == (5, 10_000, 9_999_999)
    assert (s.price_band_bps, s.stp_default, s.dedupe_window) == (250, StpMode.CANCEL_BOTH, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tick_size": "0"}, "greater than zero"),
        ({"lot_size": "0.000"}, "greater than zero"),
        ({"tick_size": "-0.01"}, "tick_size must be positive"),
        ({"tick_size": "abc"}, "tick_size must be a plain decimal"),
        ({"tick_size": "1e-2"}, "tick_size must be a plain decimal"),
        ({"tick_size": "NaN"}, "tick_size must be a finite number"),
        ({"lot_size": "inf"}, "lot_size must be a finite number"),
        ({"tick_size": 0.01}, "tick_size must be a decimal string"),
        ({"lot_size": None}, "lot_size is missing"),
        ({"tick_size": "0." + "0" * 18 + "1"}, "tick_size has too many digits"),
        ({"stp_default": "sometimes"}, "stp_default must be one of none, cancel_resting"),
        ({"price_band_bps": 0}, "price_band_bps must be between 1 and 100000"),
        ({"price_band_bps": 100_001}, "price_band_bps must be between 1 and 100000"),
        ({"price_band_bps": -5}, "price_band_bps must be between 1 and 100000"),
        ({"dedupe_window": -1}, "dedupe_window must not be negative"),
        ({"min_qty": "10", "max_qty": "5"}, "min_qty 10 is above max_qty 5"),
        ({"min_qty": "0"}, "greater than zero"),
        ({"max_price": "-1"}, "must be positive"),
    ],
)
def test_bad_spec_raises_value_error_naming_the_problem(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"tick_size": "0.01", "lot_size": "1", **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        Instrument.from_decimals("T", **args)
    assert str(info.value).startswith("T: ")  # names the instrument too


@pytest.mark.parametrize("symbol", ["", "   ", "X" * 65])
def test_bad_symbol_rejected(symbol: str) -> None:
    with pytest.raises(ValueError, match="symbol must be 1-64 characters"):
        Instrument.from_decimals(symbol, tick_size="0.01", lot_size="1")


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_qty", "1.5"), ("max_qty", "2.5"), ("max_price", "100.005"), ("max_price", "1e6")],
)
def test_off_grid_limit_names_the_field(field: str, value: str) -> None:
    # from_decimals promises a ValueError "naming the bad field"
    with pytest.raises(ValueError, match=field):
        spec("0.01", "1", **{field: value})


# ------------------------------------------------------- price <-> ticks


@pytest.mark.parametrize(
    ("tick", "price", "ticks"),
    [
        ("0.01", "101.25", 10125),
        ("0.01", "0.01", 1),
        ("0.01", "101.250000", 10125),  # trailing zeros are still exact
        ("0.01", "0101.2", 10120),  # leading zeros and fewer decimals than the tick
        ("0.01", "7", 700),
        ("0.01", 7, 700),  # a JSON integer
        ("0.05", "1.05", 21),
        ("0.25", "3.75", 15),
        ("5", "15", 3),
        ("0.5", "1000000", 2_000_000),
        ("0.00000001", "0.00000001", 1),
        ("0.00000001", "12345.67890123", 1_234_567_890_123),
        ("0.000000000000000001", "0.000000000000000003", 3),
        ("0.01", "10000000000000.00", MAX_PRICE_TICKS),  # exactly the cap
    ],
)
def test_price_to_ticks_on_grid(tick: str, price: object, ticks: int) -> None:
    assert spec(tick).price_to_ticks(price) == ticks


@pytest.mark.parametrize(
    ("tick", "price", "message"),
    [
        ("0.01", "101.255", "not a multiple of 0.01"),
        ("0.01", "0.001", "not a multiple of 0.01"),
        ("0.05", "1.07", "not a multiple of 0.05"),
        ("5", "12", "not a multiple of 5"),
        ("0.00000001", "0.000000001", "not a multiple of 0.00000001"),
        ("0.01", "0", "greater than zero"),
        ("0.01", "0.00", "greater than zero"),
        ("0.01", 0, "greater than zero"),
        ("0.01", "-1", "must be positive"),
        ("0.01", "-0", "must be positive"),
        ("0.01", -100, "must be positive"),
        ("0.01", "NaN", "finite"),
        ("0.01", "nan", "finite"),
        ("0.01", "sNaN", "finite"),
        ("0.01", "inf", "finite"),
        ("0.01", "-Infinity", "finite"),
        ("0.01", "+inf", "finite"),
        ("0.01", "1e3", "plain decimal"),
        ("0.01", "1E3", "plain decimal"),
        ("0.01", "+1", "plain decimal"),
        ("0.01", " 1", "plain decimal"),
        ("0.01", "1 ", "plain decimal"),
        ("0.01", "101.25\n", "plain decimal"),
        ("0.01", "1,000", "plain decimal"),
        ("0.01", ".5", "plain decimal"),
        ("0.01", "5.", "plain decimal"),
        ("0.01", "0x10", "plain decimal"),
        ("0.01", "", "plain decimal"),
        ("0.01", "١٠٠", "plain decimal"),  # non-ASCII digits
        ("0.01", 101.25, "not a JSON float"),  # floats are refused, never rounded
        ("0.01", 1.0, "not a JSON float"),
        ("0.01", float("nan"), "not a JSON float"),
        ("0.01", True, "not a number"),
        ("0.01", None, "missing"),
        ("0.01", b"101.25", "must be a decimal string"),
        ("0.01", "10000000000000.01", "too large"),  # one tick above the cap
        ("0.01", "9" * 30, "too large"),
        ("0.01", "9" * 31, "too many digits"),
        ("0.01", 10**40, "too many digits"),
        ("0.01", "1." + "0" * 19, "too many digits"),
    ],
)
def test_price_to_ticks_refuses(tick: str, price: object, message: str) -> None:
    with pytest.raises(ConversionError, match=message) as info:
        spec(tick).price_to_ticks(price)
    assert info.value.reason is INVALID_PRICE
    assert isinstance(info.value, ValueError)
    assert info.value.text == str(info.value)


@pytest.mark.parametrize(
    ("tick", "ticks", "price"),
    [
        ("0.01", 10125, "101.25"),
        ("0.01", 1, "0.01"),
        ("0.01", 100, "1.00"),
        ("0.01", 0, "0.00"),
        ("0.05", 21, "1.05"),
        ("5", 3, "15"),
        ("0.00000001", 1, "0.00000001"),
        ("0.00000001", 1_234_567_890_123, "12345.67890123"),
        ("0.01", MAX_PRICE_TICKS, "10000000000000.00"),
    ],
)
def test_ticks_to_price(tick: str, ticks: int, price: str) -> None:
    assert spec(tick).ticks_to_price(ticks) == price


# -------------------------------------------------------- qty <-> lots


@pytest.mark.parametrize(
    ("lot", "qty", "lots"),
    [
        ("1", "10", 10),
        ("1", 10, 10),
        ("0.001", "2.5", 2500),
        ("0.001", "0.001", 1),
        ("0.1", "1.10", 11),
        ("100", "2500", 25),
        ("0.00000001", "0.12345678", 12_345_678),
        ("1", str(MAX_QTY_LOTS), MAX_QTY_LOTS),
    ],
)
def test_qty_to_lots_on_grid(lot: str, qty: object, lots: int) -> None:
    assert spec(lot_size=lot).qty_to_lots(qty) == lots


@pytest.mark.parametrize(
    ("lot", "qty", "message"),
    [
        ("1", "1.5", "not a multiple of 1"),
        ("0.001", "0.0005", "not a multiple of 0.001"),
        ("100", "150", "not a multiple of 100"),
        ("1", "0", "greater than zero"),
        ("1", "-3", "must be positive"),
        ("1", "NaN", "finite"),
        ("1", "Infinity", "finite"),
        ("1", "1e3", "plain decimal"),
        ("1", 3.0, "not a JSON float"),
        ("1", str(MAX_QTY_LOTS + 1), "too large"),
        ("1", "1" * 31, "too many digits"),
    ],
)
def test_qty_to_lots_refuses(lot: str, qty: object, message: str) -> None:
    with pytest.raises(ConversionError, match=message) as info:
        spec(lot_size=lot).qty_to_lots(qty)
    assert info.value.reason is INVALID_QUANTITY


@pytest.mark.parametrize(
    ("lot", "lots", "qty"),
    [("1", 10, "10"), ("0.001", 2500, "2.500"), ("0.001", 1, "0.001"), ("100", 25, "2500"),
     ("0.00000001", 12_345_678, "0.12345678")],
)
def test_lots_to_qty(lot: str, lots: int, qty: str) -> None:
    assert spec(lot_size=lot).lots_to_qty(lots) == qty


@pytest.mark.parametrize("step", ["0.01", "0.05", "0.25", "5", "0.00000001", "0.000000000000000001", "1"])
@pytest.mark.parametrize("n", [1, 2, 7, 99, 100, 101, 12_345, 10**9 + 7, MAX_PRICE_TICKS])
def test_round_trips(step: str, n: int) -> None:
    s = spec(step, step)
    assert s.price_to_ticks(s.ticks_to_price(n)) == n
    assert s.qty_to_lots(s.lots_to_qty(n)) == n
    text = s.ticks_to_price(n)
    assert s.ticks_to_price(s.price_to_ticks(text)) == text


# ------------------------------------------------------------------ the conversion cache

_DECIMALS = st.one_of(
    st.from_regex(r"[0-9]{1,6}(\.[0-9]{0,4})?", fullmatch=True),  # mostly valid, some off the grid or zero
    st.sampled_from(["", "-1", "1e3", "NaN", " 1", "1.2.3", "0", "0.00"]),
)


@given(st.lists(_DECIMALS, min_size=1, max_size=40))
def test_cached_conversions_equal_fresh_ones_and_errors_are_never_cached(texts: list[str]) -> None:
    cached = spec("0.05", "0.001")
    for text in texts + texts:  # the second pass reads what the first one cached
        fresh = spec("0.05", "0.001")  # a new spec has an empty cache
        for convert, again in ((cached.price_to_ticks, fresh.price_to_ticks), (cached.qty_to_lots, fresh.qty_to_lots)):
            try:
                expected: object = again(text)
            except ConversionError as exc:
                expected = (exc.reason, exc.text)
            try:
                got: object = convert(text)
            except ConversionError as exc:
                got = (exc.reason, exc.text)
            assert got == expected
    assert cached == spec("0.05", "0.001")  # the cache is not part of the spec's value
    assert hash(cached) == hash(spec("0.05", "0.001"))


def test_conversion_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instruments, "_CACHE_MAX", 3)
    s = spec()
    for n in range(1, 10):
        assert s.price_to_ticks(f"{n}.01") == n * 100 + 1
        assert s.qty_to_lots(str(n)) == n
        assert len(s._ticks_of) <= 3
        assert len(s._lots_of) <= 3
    assert s.price_to_ticks("1.01") == 101  # emptied and refilled, still exact
