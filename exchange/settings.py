"""Configuration: TOML files into frozen dataclasses, strictly.

An unknown key fails at start-up with a message naming the key and the file;
so does a value of the wrong type or outside its choices. Each section is read
by one small function so that new sections stay independent of each other.

Connection strings and secrets can come from the environment instead of the
file (:data:`ENV_OVERRIDES`), so a file checked into a repository never needs
to hold a password. :func:`render_settings` prints the effective
configuration with every secret masked (:func:`mask_secrets`): any field whose
name says password, secret, token or credentials, in any section, and the
password part of any URL or DSN.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from exchange.core.instruments import Instrument

__all__ = [
    "ENV_OVERRIDES",
    "ConfigError",
    "EngineSettings",
    "HttpSettings",
    "JournalSettings",
    "KafkaSettings",
    "LogSettings",
    "PostgresSettings",
    "PublisherSettings",
    "RedisSettings",
    "RiskSettings",
    "Settings",
    "SourceSettings",
    "StorageSettings",
    "load_instruments",
    "load_settings",
    "mask_secrets",
    "parse_instruments",
    "render_settings",
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
    publish_events: bool = True  # durable order events to events_topic, trades to trades_topic
    trades_topic: str = "trades"  # keyed by instrument; "" publishes no trades topic
    batch_records: bool = True  # one record per client (events) / instrument (trades) per round; false: per event
    fetch_max_wait_ms: int = 10  # how long a fetch may wait for data (a latency floor on brokers that do not wake it)
    max_message_bytes: int = 65_536  # an input message above this is dead-lettered unread (message_too_large)
    max_record_bytes: int = 1_000_000  # every record the daemon produces stays under this (the broker's limit)
    session_timeout_ms: int = 10_000  # how soon the group notices a dead daemon
    heartbeat_interval_ms: int = 3_000
    # authentication and encryption (aiokafka); see exchange.adapters.kafka.client_options
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str = "PLAIN"  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 (with SASL_*)
    sasl_username: str = ""  # EXCHANGE_KAFKA_SASL_USERNAME overrides
    sasl_password: str = ""  # EXCHANGE_KAFKA_SASL_PASSWORD overrides
    ssl_cafile: str = ""  # CA bundle to verify the brokers (default: the system's)
    ssl_certfile: str = ""  # client certificate (mutual TLS)
    ssl_keyfile: str = ""
    ssl_check_hostname: bool = True


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    dsn: str = "postgresql://127.0.0.1:5432/exchange"  # EXCHANGE_POSTGRES_DSN overrides
    migrate_on_start: bool = True
    pool_size: int = 4
    password: str = ""  # EXCHANGE_POSTGRES_PASSWORD overrides; kept out of the DSN so it is never printed
    sslmode: str = ""  # disable | allow | prefer | require | verify-ca | verify-full ("": libpq's default, prefer)
    sslrootcert: str = ""  # CA bundle for verify-ca / verify-full (default: the system's)
    sslcert: str = ""  # client certificate (mutual TLS)
    sslkey: str = ""


@dataclass(frozen=True, slots=True)
class StorageSettings:
    kind: str = "postgres"  # postgres ([postgres] section) | sqlite (one file, no server)
    path: str = ".exchange/exchange.sqlite"  # sqlite: the database file, relative to the working directory
    synchronous: str = "full"  # sqlite: full (a commit survives a power loss) | normal (survives a crash only)


@dataclass(frozen=True, slots=True)
class SourceSettings:
    kind: str = "kafka"  # kafka ([kafka] section) | generator (a seeded order flow, in process)
    rate: float = 1000.0  # generator: orders per second
    seed: int = 1  # generator: the same seed gives the same orders (and lets a restart replay them)
    clients: int = 20  # generator: how many clients send orders


@dataclass(frozen=True, slots=True)
class PublisherSettings:
    kind: str = "kafka"  # kafka: durable events to [kafka] events_topic | none: no order events or trades to Kafka
    # redis: market data over Redis pub/sub when [redis] enabled (else none) | memory: an in-process bus
    # (exchange.pipeline.fanout.MemorySink, Daemon.marketdata) with the same channels, key and messages
    marketdata: str = "redis"


@dataclass(frozen=True, slots=True)
class JournalSettings:
    max_events: int = 5000  # a batch is committed when it holds this many events ...
    linger_ms: float = 2.0  # ... or when its first item has waited this long (see JournalWriter.run)
    queue_size: int = 256  # chunks (up to 128 commands each) between the loops and the writer (back-pressure bound)
    publish_queue_size: int = 64  # durable batches waiting for the publishers before the writer waits


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
class RedisSettings:
    """Market-data fan-out over Redis pub/sub (see README "Market data")."""

    enabled: bool = False
    url: str = "redis://127.0.0.1:6379/0"
    username: str = ""
    password: str = ""  # EXCHANGE_REDIS_PASSWORD overrides; never logged
    tls: bool = False
    tls_ca_file: str = ""  # CA bundle to verify the server with (default: the system's)
    prefix: str = "md."
    l2_channel: str = "{prefix}{instrument}.l2"
    l3_channel: str = "{prefix}{instrument}.l3"
    trades_channel: str = "{prefix}{instrument}.trades"
    bbo_channel: str = "{prefix}{instrument}.bbo"
    heartbeat_channel: str = "{prefix}{instrument}.heartbeat"
    book_key: str = "{prefix}{instrument}.book"
    book_depth: int = 0  # levels per side in the book key and the l2 view; 0: the whole book
    book_refresh_ms: float = 100.0  # the book key is rewritten at most this often (and on every heartbeat)
    heartbeat_interval_s: float = 1.0
    connect_timeout_s: float = 1.0

    def name(self, template: str, instrument: str) -> str:
        """A channel or key name for an instrument."""
        return template.format(prefix=self.prefix, instrument=instrument)

    def channel(self, kind: str, instrument: str) -> str:
        """The channel of ``kind`` (l2, l3, trades, bbo, heartbeat; "book": the book key) for ``instrument``."""
        return self.name(self.book_key if kind == "book" else getattr(self, f"{kind}_channel"), instrument)

    def redacted_url(self) -> str:
        """The URL without a password, for logs."""
        scheme, sep, rest = self.url.partition("://")
        if "@" in rest:
            rest = "***@" + rest.rpartition("@")[2]
        return scheme + sep + rest


@dataclass(frozen=True, slots=True)
class RiskSettings:
    balances: bool = False  # every instrument keeps balances unless its [[instruments]] entry says otherwise


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
    redis: RedisSettings = RedisSettings()
    source: Path | None = None
    storage: StorageSettings = StorageSettings()
    order_source: SourceSettings = SourceSettings()  # the [source] section (``source`` is the file read)
    publisher: PublisherSettings = PublisherSettings()
    risk: RiskSettings = RiskSettings()

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
                              + "; check the spelling against the keys that `exchange config check` prints")


def _names(kinds: tuple[type[Any], ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", dict: "a table", list: "a list",
             float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_instruments(entries: list[Any], where: str, *, balances: bool = False) -> tuple[Instrument, ...]:
    """Read ``[[instruments]]`` entries; ``balances`` is ``[risk] balances``, what an entry without its own
    ``balances`` key gets."""
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
                dedupe_per_client=t.get("dedupe_per_client", int, 10_000),
                balances=t.get("balances", bool, balances),
                base_asset=t.get("base_asset", str, None),
                quote_asset=t.get("quote_asset", str, None),
                maker_fee_bps=t.get("maker_fee_bps", int, 0),
                taker_fee_bps=t.get("taker_fee_bps", int, 0),
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


# (section, key) -> the environment variable that overrides it: connection strings and secrets
ENV_OVERRIDES: dict[tuple[str, str], str] = {
    ("kafka", "bootstrap_servers"): "EXCHANGE_KAFKA_BOOTSTRAP",
    ("kafka", "sasl_username"): "EXCHANGE_KAFKA_SASL_USERNAME",
    ("kafka", "sasl_password"): "EXCHANGE_KAFKA_SASL_PASSWORD",
    ("postgres", "dsn"): "EXCHANGE_POSTGRES_DSN",
    ("postgres", "password"): "EXCHANGE_POSTGRES_PASSWORD",
    ("redis", "password"): "EXCHANGE_REDIS_PASSWORD",
    ("http", "port"): "EXCHANGE_HTTP_PORT",  # several processes on one host: one port each
}

# allowed values of string settings: (section, key) -> choices
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("kafka", "security_protocol"): ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    ("kafka", "sasl_mechanism"): ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    ("postgres", "sslmode"): ("", "disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    ("log", "level"): ("debug", "info", "warning", "error", "critical"),
    ("log", "format"): ("auto", "json", "console"),
    ("storage", "kind"): ("postgres", "sqlite"),
    ("storage", "synchronous"): ("full", "normal"),
    ("source", "kind"): ("kafka", "generator"),
    ("publisher", "kind"): ("kafka", "none"),
    ("publisher", "marketdata"): ("redis", "memory"),
}

# settings that name files: they must exist when set
_FILES = {("kafka", "ssl_cafile"), ("kafka", "ssl_certfile"), ("kafka", "ssl_keyfile"),
          ("postgres", "sslrootcert"), ("postgres", "sslcert"), ("postgres", "sslkey"), ("redis", "tls_ca_file")}


def _overridden(section: T, name: str, env: Mapping[str, str]) -> T:
    """``section`` with the environment overrides of ``[name]`` applied (an integer setting's as an integer)."""
    changes: dict[str, Any] = {}
    for (sec, key), var in ENV_OVERRIDES.items():
        if sec != name or var not in env:
            continue
        value: Any = env[var]
        if isinstance(getattr(section, key), int):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{var}={value!r}: [{name}] {key} must be an integer") from None
        changes[key] = value
    return replace(section, **changes) if changes else section  # type: ignore[type-var]


def _validate(name: str, section: Any, where: str) -> None:
    for f in fields(section):
        value = getattr(section, f.name)
        choices = CHOICES.get((name, f.name))
        if choices is not None and value not in choices:
            raise ConfigError(f"{where} [{name}]: {f.name!r} must be one of "
                              f"{', '.join(repr(c) for c in choices if c)}; got {value!r}")
        if (name, f.name) in _FILES and value and not Path(value).is_file():
            raise ConfigError(f"{where} [{name}]: {f.name!r} names {value!r}, which is not a readable file")
    if name == "kafka" and section.security_protocol.startswith("SASL_") and not (
            section.sasl_username and section.sasl_password):
        raise ConfigError(f"{where} [kafka]: security_protocol {section.security_protocol} needs sasl_username "
                          "and sasl_password (set EXCHANGE_KAFKA_SASL_PASSWORD rather than writing it in the file)")
    if name == "kafka" and bool(section.ssl_certfile) != bool(section.ssl_keyfile):
        raise ConfigError(f"{where} [kafka]: ssl_certfile and ssl_keyfile go together (mutual TLS)")
    if name == "postgres" and bool(section.sslcert) != bool(section.sslkey):
        raise ConfigError(f"{where} [postgres]: sslcert and sslkey go together (mutual TLS)")


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Load and validate a whole configuration file; ``EXCHANGE_*`` environment variables override
    (see :data:`ENV_OVERRIDES`)."""
    path = Path(path)
    env = os.environ if env is None else env
    top = Table(_read(path), str(path))
    risk = _section(top, "risk", RiskSettings)
    instruments = parse_instruments(top.get("instruments", list), str(path), balances=risk.balances)
    sections: dict[str, Any] = {name: _overridden(_section(top, name, cls), name, env) for name, cls in (
        ("kafka", KafkaSettings), ("postgres", PostgresSettings), ("journal", JournalSettings),
        ("engine", EngineSettings), ("http", HttpSettings), ("log", LogSettings), ("redis", RedisSettings))}
    adapters: dict[str, Any] = {name: _section(top, name, cls) for name, cls in (
        ("storage", StorageSettings), ("source", SourceSettings), ("publisher", PublisherSettings))}
    for name, section in (sections | adapters).items():
        _validate(name, section, str(path))
    _validate_redis(sections["redis"], str(path))
    settings = Settings(instruments=instruments, source=path, storage=adapters["storage"],
                        order_source=adapters["source"], publisher=adapters["publisher"], risk=risk, **sections)
    top.finish()
    _check_adapters(settings, str(path))
    return settings


def _check_adapters(settings: Settings, where: str) -> None:
    """The adapters' values beyond their choices (:data:`CHOICES`), and combinations that work."""
    if not settings.order_source.rate > 0:
        raise ConfigError(f"{where} [source]: 'rate' must be a positive number of orders per second")
    if settings.order_source.clients < 1:
        raise ConfigError(f"{where} [source]: 'clients' must be at least 1")
    if settings.postgres.pool_size < 1:
        raise ConfigError(f"{where} [postgres]: 'pool_size' must be at least 1 (4 is the default: the journal "
                          "commits on one, lookups and probes use the others)")
    if settings.kafka.max_message_bytes < 1024:
        raise ConfigError(f"{where} [kafka]: 'max_message_bytes' must be at least 1024 (an order is a few hundred "
                          "bytes; 65536 is the default)")
    if settings.kafka.max_record_bytes < 16_384:
        raise ConfigError(f"{where} [kafka]: 'max_record_bytes' must be at least 16384 (keep it at or below the "
                          "brokers' message.max.bytes; 1000000 is the default)")
    if settings.order_source.kind == "kafka" and settings.publisher.kind != "kafka":
        raise ConfigError(f"{where} [publisher]: kind 'none' needs [source] kind 'generator': the Kafka source "
                          "sends dead letters and rejections through the Kafka publisher")
    if settings.publisher.marketdata == "memory" and settings.redis.enabled:
        raise ConfigError(f"{where} [publisher]: marketdata 'memory' publishes in process, not to Redis: set "
                          "[redis] enabled = false, or marketdata = \"redis\"")
    if settings.storage.kind == "sqlite" and not settings.storage.path:
        raise ConfigError(f"{where} [storage]: 'path' must name the SQLite file")


def _validate_redis(redis: RedisSettings, where: str) -> None:
    """Channel and key templates use only {prefix} and {instrument}, and name the instrument."""
    for f in fields(RedisSettings):
        if f.name.endswith(("_channel", "_key")):
            template = getattr(redis, f.name)
            try:
                probe = template.format(prefix="", instrument="X")
            except (KeyError, IndexError, ValueError):
                probe = ""
            if "{instrument}" not in template or not probe:
                raise ConfigError(f"{where} [redis]: {f.name!r} must contain {{instrument}} and may use only "
                                  f"{{prefix}} and {{instrument}}; got {template!r}")
    if redis.book_depth < 0:
        raise ConfigError(f"{where} [redis]: 'book_depth' must be 0 (the whole book) or positive")
    if redis.heartbeat_interval_s <= 0:
        raise ConfigError(f"{where} [redis]: 'heartbeat_interval_s' must be positive")


# ------------------------------------------------------------------ printing, with secrets masked

MASK = "***"
_SECRET_NAME = re.compile(r"password|secret|token|credential", re.IGNORECASE)
# Every pattern here takes time linear in its subject, whatever it holds (log lines carry values from
# producers). A URL's scheme is matched only from the start of its run of scheme characters (the
# lookbehind; a scheme is a letter then letters, digits, "+", "-", "."): a bare
# ``[a-zA-Z][a-zA-Z0-9+.-]*://`` tried at every letter of a run of n letters without "://" takes n²/2 steps
# (6.7 s for 100 KB). Which spans are masked is the same; the test keeps the old pattern as its reference.
_SCHEME = r"(?<![a-zA-Z0-9+.-])[0-9+.-]*[a-zA-Z][a-zA-Z0-9+.-]*://"
_URL_PASSWORD = re.compile(rf"(?P<head>{_SCHEME}[^/@:\s]*:)(?P<secret>[^/@\s]+)(?P<tail>@)")
_KV_PASSWORD = re.compile(r"(?P<head>\b(?:password|sslpassword)\s*=\s*)(?P<secret>'[^']*'|[^\s&]+)", re.IGNORECASE)
# A prefix of a longer text may end inside a URL's password whose "@" was cut off (see mask_cut).
_OPEN_URL_PASSWORD = re.compile(rf"{_SCHEME}[^/@:\s]*:(?P<secret>[^/@\s]+)\Z")


def mask_secrets(value: Any, key: str = "") -> Any:
    """``value`` with secrets replaced by ``***``: whole values under secret-sounding keys (at any depth),
    and the password part of URLs/DSNs (``scheme://user:PASSWORD@host``, ``password=...``) anywhere.
    Linear in the length of every string."""
    if isinstance(value, Mapping):
        return {k: mask_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_secrets(v, key) for v in value]
    if isinstance(value, str):
        if value and _SECRET_NAME.search(key):
            return MASK
        value = _URL_PASSWORD.sub(lambda m: m["head"] + MASK + m["tail"], value)
        return _KV_PASSWORD.sub(lambda m: m["head"] + MASK, value)
    return value


def mask_cut(prefix: str) -> str:
    """``prefix``, the start of a longer text, with a secret that the cut leaves open at its end masked.

    The rest of a cut-off secret is gone, and so is what marks it as one: the ``@`` after a URL's password,
    the closing quote of ``password='...'``. :func:`mask_secrets` alone would then leave the part before the
    cut in clear (``postgresql://u:hunt``). An unquoted ``password=hunt`` needs nothing here. Whatever the
    cut, ``mask_secrets(mask_cut(text[:n]))`` shows no character that ``mask_secrets(text)`` masks."""
    url = _OPEN_URL_PASSWORD.search(prefix)
    head = prefix if url is None else prefix[:url.start("secret")]
    quote = _open_quote(head)
    if quote is not None:
        return head[:quote] + MASK
    return prefix if url is None else head + MASK


def _open_quote(text: str) -> int | None:
    """Where a quoted ``password='...`` value starts that ``text`` does not close, quotes paired as
    :func:`mask_secrets` pairs them: left to right, once the URL passwords (which may hold quotes) are masked."""
    pieces: list[str] = []
    moves: list[tuple[int, int]] = []  # (where a masked URL password ends in the masked text, the shift there)
    last = moved = 0
    for m in _URL_PASSWORD.finditer(text):
        start, end = m.span("secret")
        pieces += [text[last:start], MASK]
        moved += len(MASK) - (end - start)
        moves.append((end + moved, moved))
        last = end
    for m in _KV_PASSWORD.finditer("".join(pieces) + text[last:]):
        secret = m["secret"]
        if secret[0] == "'" and (len(secret) == 1 or secret[-1] != "'"):  # no closing quote: the fallback matched
            at = m.start("secret")
            return at - next((shift for end, shift in reversed(moves) if end <= at), 0)
    return None


def settings_dict(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain TOML-shaped data (instruments as decimal strings)."""
    out: dict[str, Any] = {}
    for f in fields(settings):
        if f.name in ("instruments", "source"):
            continue
        section = getattr(settings, f.name)
        name = "source" if f.name == "order_source" else f.name  # the TOML section it was read from
        out[name] = {sf.name: getattr(section, sf.name) for sf in fields(section)}
    out["instruments"] = [_instrument_dict(spec) for spec in settings.instruments]
    return out


def _instrument_dict(spec: Instrument) -> dict[str, Any]:
    d: dict[str, Any] = {"symbol": spec.symbol, "tick_size": spec.ticks_to_price(1),
                         "lot_size": spec.lots_to_qty(1), "min_qty": spec.lots_to_qty(spec.min_qty_lots),
                         "max_qty": spec.lots_to_qty(spec.max_qty_lots),
                         "max_price": spec.ticks_to_price(spec.max_price_ticks)}
    if spec.price_band_bps is not None:
        d["price_band_bps"] = spec.price_band_bps
    d["stp_default"] = str(spec.stp_default)
    d["dedupe_window"] = spec.dedupe_window
    d["dedupe_per_client"] = spec.dedupe_per_client
    d["balances"] = spec.balances
    if spec.base_asset:
        d["base_asset"], d["quote_asset"] = spec.base_asset, spec.quote_asset
    d["maker_fee_bps"], d["taker_fee_bps"] = spec.maker_fee_bps, spec.taker_fee_bps
    return d


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def render_settings(settings: Settings, env: Mapping[str, str] | None = None) -> str:
    """The effective configuration as TOML, secrets masked, with a note on which values came from the
    environment. Loading the output again gives the same settings (apart from the masked secrets)."""
    env = os.environ if env is None else env
    data = mask_secrets(settings_dict(settings))
    lines = [f"# effective configuration of {settings.source}" if settings.source else "# effective configuration"]
    for name, section in data.items():
        if name == "instruments":
            continue
        lines += ["", f"[{name}]"]
        for key, value in section.items():
            var = ENV_OVERRIDES.get((name, key))
            note = f"  # from {var}" if var and var in env else ""
            lines.append(f"{key} = {_toml_value(value)}{note}")
    for spec in data["instruments"]:
        lines += ["", "[[instruments]]"] + [f"{k} = {_toml_value(v)}" for k, v in spec.items()]
    return "\n".join(lines) + "\n"


def load_instruments(path: str | Path) -> tuple[Instrument, ...]:
    """Only the ``[[instruments]]`` of a file (other sections are ignored, not checked)."""
    path = Path(path)
    top = Table(_read(path), str(path))
    default = top.table("risk").get("balances", bool, False)
    return parse_instruments(top.get("instruments", list), str(path), balances=default)
