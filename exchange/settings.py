"""Configuration: TOML files into frozen dataclasses, strictly.

An unknown key fails at start-up with a message naming the key and the file;
so does a value of the wrong type. Each section is read by one small function
so that new sections stay independent of each other.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from exchange.instruments import Instrument

__all__ = [
    "ConfigError",
    "EngineSettings",
    "HttpSettings",
    "JournalSettings",
    "KafkaSettings",
    "LogSettings",
    "PostgresSettings",
    "Settings",
    "load_instruments",
    "load_settings",
    "parse_instruments",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    orders_topic: str = "orders"
    events_topic: str = "order-events"
    dead_letter_topic: str = "orders.dlq"
    group_id: str = "exchange"
    publish_events: bool = True  # durable order events to events_topic
    fetch_max_wait_ms: int = 10  # how long a fetch may wait for data (a latency floor on brokers that do not wake it)
    session_timeout_ms: int = 10_000  # how soon the group notices a dead daemon
    heartbeat_interval_ms: int = 3_000


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    dsn: str = "postgresql://127.0.0.1:5432/exchange"  # EXCHANGE_POSTGRES_DSN overrides
    migrate_on_start: bool = True
    pool_size: int = 4


@dataclass(frozen=True, slots=True)
class JournalSettings:
    max_events: int = 5000  # a batch is committed when it holds this many events ...
    linger_ms: float = 2.0  # ... or when its first item has waited this long
    queue_size: int = 256  # chunks between the loops and the writer (back-pressure bound)


@dataclass(frozen=True, slots=True)
class EngineSettings:
    queue_size: int = 10_000  # commands waiting per instrument before the consumer pauses
    snapshot_interval_s: float = 60.0
    snapshot_keep: int = 3
    shutdown_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8080  # 0 disables the HTTP endpoints


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"
    format: str = "auto"  # json | console | auto (console on a terminal)


@dataclass(frozen=True, slots=True)
class Settings:
    instruments: tuple[Instrument, ...]
    kafka: KafkaSettings = KafkaSettings()
    postgres: PostgresSettings = PostgresSettings()
    journal: JournalSettings = JournalSettings()
    engine: EngineSettings = EngineSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
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


def _section(top: Table, name: str, cls: type[T]) -> T:
    """Read a ``[name]`` table into the dataclass ``cls``; its fields and defaults are the schema."""
    table = top.table(name)
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        default = getattr(cls(), f.name)
        kind: tuple[type[Any], ...] = (int, float) if isinstance(default, float) else (type(default),)
        values[f.name] = table.get(f.name, kind, default)
    table.finish()
    return cls(**values)


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Load and validate a whole configuration file; ``EXCHANGE_*`` environment variables override."""
    path = Path(path)
    env = os.environ if env is None else env
    top = Table(_read(path), str(path))
    instruments = parse_instruments(top.get("instruments", list), str(path))
    kafka = _section(top, "kafka", KafkaSettings)
    postgres = _section(top, "postgres", PostgresSettings)
    settings = Settings(
        instruments=instruments,
        kafka=replace(kafka, bootstrap_servers=env.get("EXCHANGE_KAFKA_BOOTSTRAP", kafka.bootstrap_servers)),
        postgres=replace(postgres, dsn=env.get("EXCHANGE_POSTGRES_DSN", postgres.dsn)),
        journal=_section(top, "journal", JournalSettings),
        engine=_section(top, "engine", EngineSettings),
        http=_section(top, "http", HttpSettings),
        log=_section(top, "log", LogSettings),
        source=path,
    )
    top.finish()
    return settings


def load_instruments(path: str | Path) -> tuple[Instrument, ...]:
    """Only the ``[[instruments]]`` of a file (other sections are ignored, not checked)."""
    path = Path(path)
    return parse_instruments(Table(_read(path), str(path)).get("instruments", list), str(path))
