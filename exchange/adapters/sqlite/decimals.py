"""Exact decimal strings for SQLite's TEXT decimal columns (prices, quantities, money).

:func:`decimal_text` writes ``units * 10**-scale`` exactly; :class:`_TextScale` is the store's
:class:`~exchange.projections.rows.Scale`, caching the strings per tick and lot count.

A pure function and the Scale class (the store owns its instances, and so their caches); names with a
leading underscore are the package's own.
"""

from __future__ import annotations

from exchange.core.instruments import Instrument
from exchange.projections.rows import Scale


def decimal_text(units: int, scale: int) -> str:
    """``units * 10**-scale`` as an exact decimal string with ``scale`` decimals (negative allowed)."""
    sign, digits = ("-", str(-units)) if units < 0 else ("", str(units))
    if not scale:
        return sign + digits
    digits = digits.rjust(scale + 1, "0")
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}"


class _TextScale(Scale):
    """A :class:`Scale` that gives exact decimal strings (the TEXT decimal columns), cached."""

    __slots__ = ("_prices", "_qtys", "_spec")

    def __init__(self, spec: Instrument) -> None:
        super().__init__(spec)
        self._spec = spec
        self._prices: dict[int, str] = {}
        self._qtys: dict[int, str] = {}

    def price(self, ticks: int) -> str:
        value = self._prices.get(ticks)
        if value is None:
            if len(self._prices) > 100_000:
                self._prices.clear()
            value = self._prices[ticks] = self._spec.ticks_to_price(ticks)
        return value

    def qty(self, lots: int) -> str:
        value = self._qtys.get(lots)
        if value is None:
            if len(self._qtys) > 100_000:
                self._qtys.clear()
            value = self._qtys[lots] = decimal_text(lots * self._spec.lot_units, self._spec.lot_scale)
        return value

    def money(self, units: int) -> str:
        """Tick*lot units in quote currency."""
        spec = self._spec
        return decimal_text(units * spec.tick_units * spec.lot_units, spec.tick_scale + spec.lot_scale)

    def amount(self, asset: str, units: int) -> str:
        """Units of the base asset (lots) or of the quote asset (tick x lot) in the asset's own units."""
        spec = self._spec
        if asset == spec.base_asset:
            return decimal_text(units * spec.lot_units, spec.lot_scale)
        return self.money(units)

