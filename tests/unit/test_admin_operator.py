"""`exchange admin` journals who asks: --operator, $USER or $LOGNAME, and refuses to guess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exchange.cli.admin import operator_name
from exchange.settings import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_the_operator_is_given_or_the_login_name_never_a_placeholder() -> None:
    assert operator_name("alice", {"USER": "bob"}) == "alice"
    assert operator_name(None, {"USER": "bob", "LOGNAME": "carol"}) == "bob"
    assert operator_name(None, {"USER": "", "LOGNAME": "carol"}) == "carol"
    with pytest.raises(ConfigError, match="pass --operator NAME"):
        operator_name(None, {})
    with pytest.raises(ConfigError, match="--operator is empty"):
        operator_name("  ", {"USER": "bob"})


@pytest.mark.parametrize("action", [["halt", "BTC-USD"], ["accept-offset", "0", "--offset", "5", "--reason", "x"]])
def test_admin_without_user_logname_or_operator_refuses_before_sending_anything(action: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("USER", "LOGNAME")}
    env["EXCHANGE_ADMIN_KEYS"] = "k:0123456789abcdef0123456789abcdef"
    done = subprocess.run([sys.executable, "-m", "exchange", "admin", *action, "--timeout", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "$USER and $LOGNAME are both unset: pass --operator NAME" in done.stderr
