"""The adapter choices in the configuration: [storage], [source], [publisher]."""

from __future__ import annotations

from pathlib import Path

import pytest

from exchange.settings import ConfigError, load_settings

ROOT = Path(__file__).parents[2]
INSTRUMENT = '[[instruments]]\nsymbol = "X"\ntick_size = "0.01"\nlot_size = "1"\n'


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(INSTRUMENT + text)
    return path


def test_the_shipped_configurations() -> None:
    demo = load_settings(ROOT / "exchange/defaults/demo.toml")
    assert (demo.storage.kind, demo.order_source.kind, demo.publisher.kind) == ("sqlite", "generator", "none")
    assert (demo.publisher.marketdata, demo.redis.enabled) == ("memory", False)  # the in-process bus
    assert demo.storage.path == ".exchange/demo.sqlite"
    assert demo.storage.synchronous == "full"
    assert demo.order_source.rate > 0
    served = load_settings(ROOT / "exchange/defaults/exchange.toml")  # no adapter sections: the servers, as before
    assert (served.storage.kind, served.order_source.kind, served.publisher.kind) == ("postgres", "kafka", "kafka")
    assert (served.publisher.marketdata, served.redis.enabled) == ("redis", True)
    compose = load_settings(ROOT / "config" / "compose.toml")  # the stack publishes market data to its redis service
    assert (compose.publisher.marketdata, compose.redis.enabled) == ("redis", True)


def test_generator_settings_are_read(tmp_path: Path) -> None:
    s = load_settings(config(tmp_path, '[source]\nkind = "generator"\nrate = 250.5\nseed = 9\nclients = 3\n'
                                       '[storage]\nkind = "sqlite"\npath = "x/y.sqlite"\nsynchronous = "normal"\n'))
    assert (s.order_source.rate, s.order_source.seed, s.order_source.clients) == (250.5, 9, 3)
    assert (s.storage.path, s.storage.synchronous) == ("x/y.sqlite", "normal")
    assert s.publisher.kind == "kafka"  # a generator may still publish to Kafka


@pytest.mark.parametrize(("text", "message"), [
    ('[storage]\nkind = "sqlite"\nfile = "x"\n', "[storage]: unknown key 'file'"),
    ('[source]\nkind = "generator"\nspeed = 5\n', "[source]: unknown key 'speed'"),
    ('[publisher]\nkind = "none"\ntopic = "x"\n', "[publisher]: unknown key 'topic'"),
    ('[storage]\nkind = "mysql"\n', "[storage]: 'kind' must be one of 'postgres', 'sqlite'; got 'mysql'"),
    ('[storage]\nkind = "sqlite"\nsynchronous = "off"\n', "'synchronous' must be one of 'full', 'normal'"),
    ('[source]\nkind = "file"\n', "[source]: 'kind' must be one of 'kafka', 'generator'"),
    ('[source]\nkind = "generator"\nrate = 0\n', "'rate' must be a positive number"),
    ('[source]\nkind = "generator"\nrate = "fast"\n', "'rate' must be an integer or a number"),
    ('[source]\nkind = "generator"\nclients = 0\n', "'clients' must be at least 1"),
    ('[publisher]\nkind = "none"\n', "kind 'none' needs [source] kind 'generator'"),
    ('[storage]\nkind = "sqlite"\npath = ""\n', "'path' must name the SQLite file"),
    ('[publisher]\nmarketdata = "zeromq"\n', "[publisher]: 'marketdata' must be one of 'redis', 'memory'; got"),
    ('[publisher]\nmarketdata = "memory"\n[redis]\nenabled = true\n',
     "marketdata 'memory' publishes in process, not to Redis: set [redis] enabled = false"),
])
def test_bad_adapter_settings_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
