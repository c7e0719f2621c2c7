"""Configuration: TOML files into frozen dataclasses, strictly.

An unknown key fails at start-up with a message naming the key and the file;
so does a value of the wrong type. Each section is read by one small function
so that new sections stay independent of each other.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from exchange.instruments import Instrument

__all__ = ["ConfigError", "Settings", "load_instruments", "load_settings", "parse_instruments"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Settings:
    instruments: tuple[Instrument, ...]
    source: Path | None = None

    def instrument_map(self) -> dict[str, Instrument]:
        return {spec.symbol: spec for spec in self.instruments}


class Table:
    """A TOML table being read: typed getters, and a check that nothing unknown is left."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self._data = dict(data)
        self._used: set[str] = set()
        self.where = where

    def get(self, key: str, kind: type[T] | tuple[type[Any], ...], default: Any = ...) -> Any:
        self._used.add(key)
        if key not in self._data:
            if default is ...:
                raise ConfigError(f"{self.where}: missing required key {key!r}")
            return default
        value = self._data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self.where}: {key!r} must be {_names(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise ConfigError(f"{self.where}: {key!r} must be {_names(kinds)}, got {value!r}")
        return value

    def table(self, key: str) -> Table:
        value = self.get(key, dict, {})
        return Table(value, f"{self.where} [{key}]")

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key {unknown[0]!r}"
                              + (f" (and {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else "")
                              + "; check the spelling against config/exchange.toml")


def _names(kinds: tuple[type[Any], ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", dict: "a table", list: "a list",
             float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_instruments(entries: list[Any], where: str) -> tuple[Instrument, ...]:
    """Read ``[[instruments]]`` entries."""
    specs: list[Instrument] = []
    seen: set[str] = set()
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: [[instruments]] entry {n} must be a table")
        t = Table(entry, f"{where} [[instruments]] #{n}")
        symbol = t.get("symbol", str)
        try:
            spec = Instrument.from_decimals(
                symbol,
                tick_size=t.get("tick_size", str),
                lot_size=t.get("lot_size", str),
                min_qty=t.get("min_qty", str, None),
                max_qty=t.get("max_qty", str, None),
                max_price=t.get("max_price", str, None),
                price_band_bps=t.get("price_band_bps", int, None),
                stp_default=t.get("stp_default", str, "none"),
                dedupe_window=t.get("dedupe_window", int, 1_000_000),
            )
        except ValueError as exc:
            raise ConfigError(f"{t.where}: {exc}") from None
        t.finish()
        if symbol in seen:
            raise ConfigError(f"{where}: instrument {symbol!r} is defined twice")
        seen.add(symbol)
        specs.append(spec)
    if not specs:
        raise ConfigError(f"{where}: no [[instruments]] defined")
    return tuple(specs)


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_settings(path: str | Path) -> Settings:
    """Load and validate a whole configuration file."""
    path = Path(path)
    top = Table(_read(path), str(path))
    instruments = parse_instruments(top.get("instruments", list), str(path))
    top.finish()
    return Settings(instruments=instruments, source=path)


def load_instruments(path: str | Path) -> tuple[Instrument, ...]:
    """Only the ``[[instruments]]`` of a file (other sections are ignored, not checked)."""
    path = Path(path)
    return parse_instruments(Table(_read(path), str(path)).get("instruments", list), str(path))
