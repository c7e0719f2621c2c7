"""What an installed package offers a user outside the repository.

- ``exchange --version`` names the distribution (``exchange`` is taken on PyPI) and its version, installed
  or run from a source tree on PYTHONPATH;
- the default configurations ship inside the package (``exchange/defaults/``, package data) and load;
  each exists once: not again in ``config/``, which keeps only what deployments mount;
- from any directory the demo uses the shipped demo configuration; the other commands use
  ``config/exchange.toml`` in the working directory if there is one, else the shipped default, and an
  explicit ``--config`` always wins;
- the LICENSE is the Apache License 2.0 text, unmodified, and the package metadata declares it.

The wheel's contents (defaults and migrations in, no tests) are checked by building one by hand: too
slow for a unit test.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from exchange.cli import main as cli
from exchange.settings import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEFAULTS = ROOT / "exchange" / "defaults"
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is not the repository, and no EXCHANGE_* overrides."""
    monkeypatch.chdir(tmp_path)
    for var in [v for v in os.environ if v.startswith("EXCHANGE_")]:
        monkeypatch.delenv(var)
    return tmp_path


def test_version_names_the_distribution_and_its_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.DISTRIBUTION == PYPROJECT["project"]["name"] != "exchange"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{cli.DISTRIBUTION} {PYPROJECT['project']['version']}"), out
    assert out == cli.version_text() + "\n"


def test_version_from_a_source_tree_that_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.metadata, "version", missing)
    assert cli.version_text() == (f"{cli.DISTRIBUTION} {PYPROJECT['project']['version']} "
                                  f"(not installed: the source tree at {ROOT})")


def test_the_shipped_defaults_load_and_are_package_data() -> None:
    served = load_settings(cli.shipped_config("exchange.toml"), env={})
    assert (served.storage.kind, served.order_source.kind, served.publisher.kind) == ("postgres", "kafka", "kafka")
    demo = load_settings(cli.shipped_config("demo.toml"), env={})
    assert (demo.storage.kind, demo.order_source.kind, demo.publisher.marketdata) == ("sqlite", "generator", "memory")
    assert [dataclasses.replace(spec, balances=True) for spec in served.instruments] == list(demo.instruments)
    assert (served.risk.balances, demo.risk.balances) == (False, True)  # the demo shows balances at work
    shipped = sorted(p.name for p in DEFAULTS.iterdir() if p.suffix == ".toml")
    assert shipped == ["demo.toml", "exchange.toml"]
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["exchange"]
    for name in shipped:
        assert any(fnmatch.fnmatch(f"defaults/{name}", pattern) for pattern in patterns), name
        assert not (ROOT / "config" / name).exists(), f"config/{name} would be a second copy of defaults/{name}"


def test_the_demo_uses_the_shipped_demo_configuration_from_any_directory(
        elsewhere: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[Settings] = []

    def run_demo(settings: Settings, **_: Any) -> int:
        ran.append(settings)
        return 0

    monkeypatch.setattr("exchange.cli.demo.run_demo", run_demo)
    (elsewhere / "config").mkdir()
    (elsewhere / "config" / "exchange.toml").write_text("not even TOML [")  # the demo does not read it
    assert cli.main(["demo", "--seconds", "1"]) == 0
    assert ran[0].source == cli.shipped_config("demo.toml")
    assert ran[0].source.is_file()
    assert ran[0].storage.path == ".exchange/demo.sqlite"  # relative to the working directory: here


def test_other_commands_use_the_local_file_else_the_shipped_default(elsewhere: Path) -> None:
    assert cli.config_path(None) == cli.shipped_config("exchange.toml")
    local = elsewhere / "config" / "exchange.toml"
    local.parent.mkdir()
    local.write_text((DEFAULTS / "exchange.toml").read_text())
    assert cli.config_path(None) == cli.LOCAL_CONFIG
    assert cli.config_path(None, demo=True) == cli.shipped_config("demo.toml")
    given = elsewhere / "mine.toml"
    given.write_text("")
    assert cli.config_path(str(given)) == given  # --config always wins
    assert cli.config_path(str(given), demo=True) == given


def test_a_missing_config_file_says_what_to_do(elsewhere: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such configuration file; pass an existing file, or "
                                          r"leave out --config to use config/exchange\.toml in the working"):
        cli.config_path("nope.toml")
    with pytest.raises(ConfigError, match="leave out --config to use the demo configuration shipped in the package"):
        cli.config_path(str(elsewhere), demo=True)  # a directory is no file either
    assert cli.main(["config", "check", "--config", "nope.toml"]) == 2


def test_config_check_names_the_shipped_default_and_its_output_starts_a_local_file(
        elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "check"]) == 0
    out = capsys.readouterr()
    shipped = cli.shipped_config("exchange.toml")
    assert f"# {shipped}: OK (3 instruments), the configuration shipped in the package" in out.err
    local = elsewhere / "config" / "exchange.toml"  # what the shipped file's header suggests
    local.parent.mkdir()
    local.write_text(out.out)
    assert cli.main(["config", "check"]) == 0
    again = capsys.readouterr()
    assert again.err.startswith("# config/exchange.toml: OK (3 instruments)\n")
    assert load_settings(local) == dataclasses.replace(load_settings(shipped), source=local)


def test_replay_uses_the_shipped_instruments_from_any_directory(
        elsewhere: Path, capsys: pytest.CaptureFixture[str]) -> None:
    session = elsewhere / "session.jsonl"
    session.write_text('{"op": "place", "instrument": "SOL-USD", "client_id": "a", "client_order_id": "a-1", '
                       '"side": "sell", "price": "20.000", "qty": "1.00", "ts_ns": 1}\n'
                       '{"op": "place", "instrument": "SOL-USD", "client_id": "b", "client_order_id": "b-1", '
                       '"side": "buy", "price": "20.000", "qty": "0.50", "ts_ns": 2}\n')
    assert cli.main(["replay", str(session)]) == 0
    out = capsys.readouterr()
    events = [[event["type"] for event in json.loads(line)["events"]] for line in out.out.splitlines()]
    assert events == [["accepted"], ["accepted", "filled"]]  # SOL-USD's tick and lot from the shipped file
    assert out.err == ""


def test_the_license_is_the_apache_license_unmodified() -> None:
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
