"""Instrument specifications and the one place where decimals become integers.

Inside the core a price is an integer number of ticks and a quantity an integer
number of lots. Decimal text exists only at the edges (wire, config, display);
every conversion between the two goes through :class:`Instrument`.

Conversion is exact: a value off the tick or lot grid, zero, negative, NaN,
infinite, in exponent notation, a binary float, or absurdly large is refused
with a :class:`ConversionError` naming the reason. Nothing is ever rounded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from exchange.core.types import RejectReason, StpMode

__all__ = [
    "MAX_AMOUNT_UNITS",
    "MAX_PRICE_TICKS",
    "MAX_QTY_LOTS",
    "ConversionError",
    "Instrument",
    "parse_decimal",
]

# Hard caps that keep every integer inside a signed 64-bit column and every
# notional (price * qty) inside NUMERIC comfortably. Per-instrument limits are
# usually far tighter.
MAX_PRICE_TICKS = 10**15
MAX_QTY_LOTS = 10**15
MAX_AMOUNT_UNITS = 10**24  # a deposit, withdrawal or budget, in its asset's units (balances are NUMERIC columns)
_MAX_FEE_BPS = 10_000  # a fee of 100% of the notional at most
_MAX_DIGITS = 30  # integer digits + fraction digits accepted in a decimal string
_MAX_SCALE = 18  # at most this many fraction digits

_POW10: tuple[int, ...] = tuple(10**n for n in range(_MAX_SCALE + _MAX_DIGITS + 1))
_DECIMAL = re.compile(r"([0-9]+)(?:\.([0-9]+))?")
# decimal strings already converted, per instrument: prices cluster around the market and sizes repeat, so
# most messages hit (the e2e flow has about 750 distinct prices and 150 sizes in 200,000 orders); a full
# cache is emptied and refills, so whatever the input it holds at most this many strings of each kind
# (both full: about a megabyte per instrument)
_CACHE_MAX = 4096


class ConversionError(ValueError):
    """A decimal that cannot become ticks or lots; carries a machine-readable reason."""

    def __init__(self, reason: RejectReason, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


def parse_decimal(value: object, what: str, reason: RejectReason) -> tuple[int, int]:
    """Parse a non-negative decimal into ``(units, scale)`` with value = units / 10**scale.

    Accepts a decimal string in plain notation (``"101.25"``) or a JSON integer.
    Refuses floats (already rounded by the time we see them), booleans, signs,
    exponents, NaN, infinities and anything longer than 30 digits.
    """
    if value.__class__ is str:  # the common case, without the regex: "123" or "123.45", ASCII digits only
        whole, dot, frac = value.partition(".")
        if (whole.isdigit() and whole.isascii() and (not dot or (frac.isdigit() and frac.isascii()))
                and len(whole) + len(frac) <= _MAX_DIGITS and len(frac) <= _MAX_SCALE):
            return int(whole + frac), len(frac)
    if isinstance(value, bool) or value is None:
        raise ConversionError(reason, f"{what} is missing or not a number: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConversionError(reason, f"{what} must be positive, got {value}")
        text = str(value)
    elif isinstance(value, str):
        text = value
    elif isinstance(value, float):
        raise ConversionError(
            reason, f"{what} must be a decimal string such as \"101.25\", not a JSON float ({value!r})"
        )
    else:
        raise ConversionError(reason, f"{what} must be a decimal string, got {type(value).__name__}")
    match = _DECIMAL.fullmatch(text)
    if match is None:
        lowered = text.strip().lower()
        if lowered.lstrip("+-") in ("nan", "inf", "infinity", "snan"):
            raise ConversionError(reason, f"{what} must be a finite number, got {text[:40]!r}")
        if lowered.startswith("-"):
            raise ConversionError(reason, f"{what} must be positive, got {text[:40]!r}")
        raise ConversionError(
            reason,
            f"{what} must be a plain decimal such as \"101.25\" (no sign, exponent or spaces), got {text[:40]!r}",
        )
    whole, frac = match.group(1), match.group(2) or ""
    if len(whole) + len(frac) > _MAX_DIGITS or len(frac) > _MAX_SCALE:
        raise ConversionError(reason, f"{what} has too many digits: {text[:40]!r}")
    return int(whole + frac), len(frac)


def _format(units: int, scale: int) -> str:
    if scale == 0:
        return str(units)
    digits = str(units).rjust(scale + 1, "0")
    return f"{digits[:-scale]}.{digits[-scale:]}"


@dataclass(frozen=True, slots=True)
class Instrument:
    """An instrument's trading rules. Build it with :meth:`from_decimals`.

    ``tick_units / 10**tick_scale`` is the price step and ``lot_units /
    10**lot_scale`` the quantity step. ``min_qty_lots``/``max_qty_lots`` bound an
    order's quantity; ``max_price_ticks`` bounds a limit price.
    ``price_band_bps`` protects market orders: they never trade further than
    this many basis points from the best opposite price at their arrival.
    ``stp_default`` applies to orders that do not choose a self-trade prevention
    mode. ``dedupe_window`` is how many finished orders' client order ids are
    remembered so that a resubmission cannot create a second order, and
    ``dedupe_per_client`` how many of them one client may hold: a finished order
    is remembered while it is among its client's ``dedupe_per_client`` most
    recently finished orders and among the ``dedupe_window`` most recent of those
    (see :class:`exchange.core.dedupe.DedupeWindow`). A value above
    ``dedupe_window`` behaves as ``dedupe_window``.

    ``balances``: the engine keeps each client's balances of ``base_asset`` (in lots) and
    ``quote_asset`` (in quote units of tick x lot, so that every trade's notional, price
    ticks times lots, is a whole number of them), reserves what an order needs when it is
    accepted and settles fills at the maker's price, charging ``maker_fee_bps`` and
    ``taker_fee_bps`` (basis points of the notional, in the quote asset; a negative maker
    fee is a rebate): see :mod:`exchange.core.balances`.
    """

    symbol: str
    tick_units: int
    tick_scale: int
    lot_units: int
    lot_scale: int
    min_qty_lots: int = 1
    max_qty_lots: int = MAX_QTY_LOTS
    max_price_ticks: int = MAX_PRICE_TICKS
    price_band_bps: int | None = None
    stp_default: StpMode = StpMode.NONE
    dedupe_window: int = 1_000_000
    dedupe_per_client: int = 10_000
    balances: bool = False
    base_asset: str = ""
    quote_asset: str = ""
    maker_fee_bps: int = 0
    taker_fee_bps: int = 0
    # decimal string -> ticks / lots, for strings converted without error (see _CACHE_MAX); not part of the spec
    _ticks_of: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _lots_of: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_decimals(
        cls,
        symbol: str,
        *,
        tick_size: str,
        lot_size: str,
        min_qty: str | None = None,
        max_qty: str | None = None,
        max_price: str | None = None,
        price_band_bps: int | None = None,
        stp_default: StpMode | str = StpMode.NONE,
        dedupe_window: int = 1_000_000,
        dedupe_per_client: int = 10_000,
        balances: bool = False,
        base_asset: str | None = None,
        quote_asset: str | None = None,
        maker_fee_bps: int = 0,
        taker_fee_bps: int = 0,
    ) -> Instrument:
        """Build a spec from decimal strings; raises ``ValueError`` naming the bad field."""
        if not symbol or not symbol.strip() or len(symbol) > 64:
            raise ValueError(f"instrument symbol must be 1-64 characters, got {symbol!r}")
        try:
            tick_units, tick_scale = parse_decimal(tick_size, "tick_size", RejectReason.INVALID_PRICE)
            lot_units, lot_scale = parse_decimal(lot_size, "lot_size", RejectReason.INVALID_QUANTITY)
        except ConversionError as exc:
            raise ValueError(f"{symbol}: {exc.text}") from None
        if tick_units == 0 or lot_units == 0:
            raise ValueError(f"{symbol}: tick_size and lot_size must be greater than zero")
        try:
            stp = StpMode(stp_default)
        except ValueError:
            choices = ", ".join(m.value for m in StpMode)
            raise ValueError(f"{symbol}: stp_default must be one of {choices}, got {stp_default!r}") from None
        if price_band_bps is not None and not (0 < price_band_bps <= 100_000):
            raise ValueError(f"{symbol}: price_band_bps must be between 1 and 100000, got {price_band_bps}")
        if dedupe_window < 0:
            raise ValueError(f"{symbol}: dedupe_window must not be negative")
        if dedupe_per_client.__class__ is not int or dedupe_per_client < 1:
            raise ValueError(f"{symbol}: dedupe_per_client must be an integer of at least 1, got {dedupe_per_client!r}")
        spec = cls(symbol, tick_units, tick_scale, lot_units, lot_scale, stp_default=stp,
                   price_band_bps=price_band_bps, dedupe_window=dedupe_window)
        def limit(name: str, value: str | None, convert: Callable[[object], int], default: int) -> int:
            try:
                return convert(value) if value is not None else default
            except ConversionError as exc:
                raise ValueError(f"{symbol}: {name}: {exc.text}") from None

        min_lots = limit("min_qty", min_qty, spec.qty_to_lots, 1)
        max_lots = limit("max_qty", max_qty, spec.qty_to_lots, MAX_QTY_LOTS)
        max_ticks = limit("max_price", max_price, spec.price_to_ticks, MAX_PRICE_TICKS)
        if min_lots > max_lots:
            raise ValueError(f"{symbol}: min_qty {min_qty} is above max_qty {max_qty}")
        base, quote = _assets(symbol, base_asset, quote_asset)
        if balances and not (base and quote):
            raise ValueError(f"{symbol}: balances need base_asset and quote_asset (or a symbol such as BTC-USD)")
        _check_fees(symbol, maker_fee_bps, taker_fee_bps)
        return cls(symbol, tick_units, tick_scale, lot_units, lot_scale, min_lots, max_lots,
                   max_ticks, price_band_bps, stp, dedupe_window, dedupe_per_client, balances, base, quote,
                   maker_fee_bps, taker_fee_bps)

    @property
    def tick_size(self) -> str:
        return _format(self.tick_units, self.tick_scale)

    @property
    def lot_size(self) -> str:
        return _format(self.lot_units, self.lot_scale)

    def price_to_ticks(self, value: object) -> int:
        """``"101.25"`` -> ticks. Raises :class:`ConversionError` (``invalid_price``)."""
        return _cached_steps(self._ticks_of, value, "price", RejectReason.INVALID_PRICE, self.tick_units,
                             self.tick_scale, MAX_PRICE_TICKS)

    def qty_to_lots(self, value: object) -> int:
        """``"0.5"`` -> lots. Raises :class:`ConversionError` (``invalid_quantity``)."""
        return _cached_steps(self._lots_of, value, "quantity", RejectReason.INVALID_QUANTITY, self.lot_units,
                             self.lot_scale, MAX_QTY_LOTS)

    def ticks_to_price(self, ticks: int) -> str:
        """Ticks -> decimal string with the tick's number of decimals."""
        return _format(ticks * self.tick_units, self.tick_scale)

    def lots_to_qty(self, lots: int) -> str:
        """Lots -> decimal string with the lot's number of decimals."""
        return _format(lots * self.lot_units, self.lot_scale)

    # ---- balances: amounts of the base asset are lots, of the quote asset units of tick x lot

    def amount_to_units(self, asset: str, value: object) -> int:
        """A decimal amount of ``asset`` -> its units (lots, or quote units). Raises :class:`ConversionError`
        (``invalid_amount``) off the asset's grid, zero or too large; ``unknown_asset`` for another asset."""
        if asset == self.base_asset:
            return _to_steps(value, "amount", RejectReason.INVALID_AMOUNT, self.lot_units, self.lot_scale,
                             MAX_AMOUNT_UNITS)
        if asset == self.quote_asset:
            return _to_steps(value, "amount", RejectReason.INVALID_AMOUNT, self.tick_units * self.lot_units,
                             self.tick_scale + self.lot_scale, MAX_AMOUNT_UNITS)
        raise ConversionError(RejectReason.UNKNOWN_ASSET, f"{self.symbol} keeps balances of {self.base_asset} and "
                              f"{self.quote_asset}, not {str(asset)[:40]!r}")

    def units_to_amount(self, asset: str, units: int) -> str:
        """Units of ``asset`` (the base or the quote asset) -> a decimal string (a minus sign when negative)."""
        sign, units = ("-", -units) if units < 0 else ("", units)
        if asset == self.base_asset:
            return sign + _format(units * self.lot_units, self.lot_scale)
        return sign + _format(units * self.tick_units * self.lot_units, self.tick_scale + self.lot_scale)


def _check_fees(symbol: str, maker_fee_bps: int, taker_fee_bps: int) -> None:
    """Fees within +-100%, no taker rebate, and no maker rebate above the taker fee; ``ValueError`` otherwise."""
    for name, bps in (("maker_fee_bps", maker_fee_bps), ("taker_fee_bps", taker_fee_bps)):
        if bps.__class__ is not int or not -_MAX_FEE_BPS <= bps <= _MAX_FEE_BPS:
            raise ValueError(f"{symbol}: {name} must be an integer between -{_MAX_FEE_BPS} and {_MAX_FEE_BPS} "
                             f"(basis points of the notional), got {bps!r}")
    if taker_fee_bps < 0:
        raise ValueError(f"{symbol}: taker_fee_bps must not be negative, got {taker_fee_bps} (a rebate is for "
                         "makers: a negative maker_fee_bps)")
    if maker_fee_bps + taker_fee_bps < 0:
        raise ValueError(f"{symbol}: a maker rebate of {-maker_fee_bps} bps above the taker fee of "
                         f"{taker_fee_bps} bps would pay out more on every trade than the venue takes in")


def _assets(symbol: str, base: str | None, quote: str | None) -> tuple[str, str]:
    """The base and quote asset: as given, else the two halves of a symbol such as ``BTC-USD`` or ``BTC/USD``."""
    if base is None or quote is None:
        for sep in ("-", "/"):
            halves = symbol.split(sep)
            if len(halves) == 2 and all(halves):
                base, quote = base if base is not None else halves[0], quote if quote is not None else halves[1]
                break
    base, quote = base or "", quote or ""
    if base and base == quote:
        raise ValueError(f"{symbol}: base_asset and quote_asset must differ, both are {base!r}")
    return base, quote


def _cached_steps(cache: dict[str, int], value: object, what: str, reason: RejectReason, step_units: int,
                  step_scale: int, cap: int) -> int:
    """:func:`_to_steps`, remembering decimal strings converted without error in ``cache``."""
    if type(value) is not str:
        return _to_steps(value, what, reason, step_units, step_scale, cap)
    steps = cache.get(value)
    if steps is None:
        steps = _to_steps(value, what, reason, step_units, step_scale, cap)
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[value] = steps
    return steps


def _to_steps(value: object, what: str, reason: RejectReason, step_units: int, step_scale: int, cap: int) -> int:
    units, scale = parse_decimal(value, what, reason)
    # value / step = (units / 10**scale) / (step_units / 10**step_scale)
    # value / step = (units / 10**scale) / (step_units / 10**step_scale), in integers only
    if scale <= step_scale:
        steps, rest = divmod(units * _POW10[step_scale - scale], step_units)
    else:
        steps, rest = divmod(units, step_units * _POW10[scale - step_scale])
    if rest:
        raise ConversionError(reason, f"{what} {value} is not a multiple of {_format(step_units, step_scale)}")
    if steps == 0:
        raise ConversionError(reason, f"{what} must be greater than zero, got {value}")
    if steps > cap:
        step = _format(step_units, step_scale)
        raise ConversionError(reason, f"{what} {str(value)[:40]} is too large: at most {cap:.0e} "
                              f"{'ticks' if what == 'price' else 'lots'} of {step}, which is "
                              f"{_format(cap * step_units, step_scale)}")
    return steps
