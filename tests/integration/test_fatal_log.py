"""A fatal error ends the process with one JSON line saying why, and exit status 1.

The long-running commands as processes (``exchange run``, ``exchange demo``, ``exchange recover``),
each with an embedded configuration that fails at start-up at once and without any server: an SQLite
store below a regular file (its directory cannot be created, whoever runs the test), or a file that
is not a database. Every line on stderr is JSON; the last one is the critical line with the reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from exchange.telemetry.logging import MAX_TRACEBACK_CHARS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


def config(tmp_path: Path, store: Path) -> Path:
    """The shipped demo configuration (SQLite, the order generator, no servers) with its store at ``store``."""
    text = (ROOT / "exchange" / "defaults" / "demo.toml").read_text()
    path = tmp_path / "broken.toml"
    path.write_text(re.sub(r'(?m)^path = ".*"', f'path = "{store}"', text))
    return path


def exchange(*args: str) -> tuple[int, list[dict[str, Any]]]:
    proc = subprocess.run([sys.executable, "-m", "exchange", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    lines = proc.stderr.splitlines()
    assert lines, proc.stdout
    return proc.returncode, [json.loads(line) for line in lines]  # every line is JSON, or this fails naming it


def assert_fatal(line: dict[str, Any], error_type: str, error: str) -> None:
    assert (line["level"], line["event"], line["exit_status"]) == ("critical", "fatal error; exiting", 1)
    assert (line["error_type"], error in line["error"]) == (error_type, True), line["error"]
    assert line["exception"].startswith(("Traceback (most recent call last):", "  + Exception Group Traceback"))
    assert len(line["exception"]) <= MAX_TRACEBACK_CHARS


@pytest.mark.parametrize("command", ["run", "demo"])
def test_a_daemon_that_cannot_start_exits_1_after_one_json_line_saying_why(tmp_path: Path, command: str) -> None:
    (tmp_path / "a-file").write_text("not a directory\n")
    broken = config(tmp_path, tmp_path / "a-file" / "store" / "exchange.sqlite")
    status, lines = exchange(command, "--config", str(broken), *(["--headless"] if command == "demo" else []))
    assert status == 1
    assert_fatal(lines[-1], "exchange.ports.StoreUnavailable", "Not a directory")
    assert [line["level"] for line in lines[:-1]] == ["info"] * (len(lines) - 1)  # nothing else went wrong


def test_recover_on_a_file_that_is_not_a_database_exits_1_after_one_json_line(tmp_path: Path) -> None:
    store = tmp_path / "exchange.sqlite"
    store.write_bytes(b"this is not an SQLite database, whatever its name says\n" * 100)
    status, lines = exchange("recover", "--verify", "--config", str(config(tmp_path, store)))
    assert status == 1
    assert_fatal(lines[-1], "exchange.ports.StoreUnavailable", "not a database")
