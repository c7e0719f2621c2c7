"""NUMERIC on the wire: the store's binary NUMERIC codec, and the :class:`Scale` classes of its two commit paths.

asyncpg's own NUMERIC encoder goes through Decimal.as_tuple() for every value: about 1 us, two of
them per order row, which made the decimal columns the largest single cost of a COPY. The store's
connections use the codec below instead (registered by
:func:`~exchange.adapters.postgres.connection._init_connection`): a value that is already ``bytes``
is PostgreSQL's binary NUMERIC and passes through untouched, so :class:`_WireScale` hands out prices
and quantities encoded once and cached (they repeat: prices cluster near the touch, sizes are round
numbers). Decimals and ints still work (slower, in Python); reads give Decimals.

:class:`_ServerScale` is the one-statement path's: it gives no decimals at all, the server computes
them from the ticks and lots.

Pure functions and the two Scale classes (each store owns its instances, and so their caches); names
with a leading underscore are the package's own.
"""

from __future__ import annotations

import struct
from decimal import Decimal
from typing import Any

from exchange.core.instruments import Instrument
from exchange.projections.rows import Scale

_NUMERIC_HEAD = struct.Struct("!hhHh")  # ndigits, weight (in base-10000 digits), sign, display scale
_NUMERIC_NEG, _NUMERIC_NAN, _NUMERIC_PINF, _NUMERIC_NINF = 0x4000, 0xC000, 0xD000, 0xF000
_SCALE_CACHE_MAX = 200_000


def numeric_binary(units: int, scale: int) -> bytes:
    """PostgreSQL's binary NUMERIC for ``units * 10**-scale``, with exactly ``scale`` decimals."""
    sign = 0
    if units < 0:
        sign, units = _NUMERIC_NEG, -units
    pad = -scale % 4  # align the fraction to whole base-10000 digits
    if pad:
        units *= 10**pad
    groups: list[int] = []  # base-10000 digits, least significant first
    while units:
        units, digit = divmod(units, 10_000)
        groups.append(digit)
    if not groups:
        return _NUMERIC_HEAD.pack(0, 0, 0, scale)
    weight = len(groups) - (scale + pad) // 4 - 1
    low = 0
    while not groups[low]:  # trailing zero digits are implied
        low += 1
    digits = groups[low:][::-1]
    return _NUMERIC_HEAD.pack(len(digits), weight, sign, scale) + struct.pack(f"!{len(digits)}H", *digits)


def _encode_numeric(value: Any) -> bytes:
    if value.__class__ is bytes:
        return value
    if isinstance(value, int):
        return numeric_binary(value, 0)
    if isinstance(value, Decimal) and value.is_finite():
        sign, digits, exponent = value.as_tuple()
        units = int("".join(map(str, digits)) or "0")
        assert isinstance(exponent, int)
        if exponent > 0:
            units, exponent = units * 10**exponent, 0
        return numeric_binary(-units if sign else units, -exponent)
    raise TypeError(f"cannot store {value!r} as NUMERIC")


def _decode_numeric(data: bytes) -> Decimal:
    ndigits, weight, sign, dscale = _NUMERIC_HEAD.unpack_from(data)
    if sign == _NUMERIC_NAN:
        return Decimal("NaN")
    if sign in (_NUMERIC_PINF, _NUMERIC_NINF):
        return Decimal("-Infinity" if sign == _NUMERIC_NINF else "Infinity")
    units = 0
    for digit in struct.unpack_from(f"!{ndigits}H", data, _NUMERIC_HEAD.size):
        units = units * 10_000 + digit
    exponent = 4 * (weight - ndigits + 1)  # value = units * 10**exponent
    if exponent >= -dscale:
        units *= 10 ** (exponent + dscale)
    else:
        units //= 10 ** (-dscale - exponent)  # digits past the display scale are zeros
    return Decimal(f"{'-' if sign == _NUMERIC_NEG else ''}{units}E-{dscale}")


class _ServerScale(Scale):
    """For the one-statement path: no decimals here, the server computes them from the ticks and lots."""

    __slots__ = ()

    def price(self, ticks: int) -> None:
        return None

    def qty(self, lots: int) -> None:
        return None

    def amount(self, asset: str, units: int) -> None:
        return None


class _WireScale(Scale):
    """A :class:`Scale` whose values are binary NUMERICs, cached per tick and lot count."""

    __slots__ = ("_lot_scale", "_lot_units", "_prices", "_qtys", "_tick_scale", "_tick_units")

    def __init__(self, spec: Instrument) -> None:
        super().__init__(spec)
        self._tick_units, self._tick_scale = spec.tick_units, spec.tick_scale
        self._lot_units, self._lot_scale = spec.lot_units, spec.lot_scale
        self._prices: dict[int, bytes] = {}
        self._qtys: dict[int, bytes] = {}

    def price(self, ticks: int) -> bytes:
        value = self._prices.get(ticks)
        if value is None:
            if len(self._prices) >= _SCALE_CACHE_MAX:
                self._prices.clear()
            value = self._prices[ticks] = numeric_binary(ticks * self._tick_units, self._tick_scale)
        return value

    def qty(self, lots: int) -> bytes:
        value = self._qtys.get(lots)
        if value is None:
            if len(self._qtys) >= _SCALE_CACHE_MAX:
                self._qtys.clear()
            value = self._qtys[lots] = numeric_binary(lots * self._lot_units, self._lot_scale)
        return value

    def money(self, units: int) -> bytes:
        return numeric_binary(units * self._tick_units * self._lot_units, self._tick_scale + self._lot_scale)

    def amount(self, asset: str, units: int) -> bytes:
        """A transfer's amount (not cached: transfers are few)."""
        if asset == self.base_asset:
            return numeric_binary(units * self._lot_units, self._lot_scale)
        return self.money(units)
