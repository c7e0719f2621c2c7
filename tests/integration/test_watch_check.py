"""`exchange watch --check` against the configured store: a daemon on SQLite (no PostgreSQL anywhere)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_watch_check_reads_the_sqlite_store_the_daemon_wrote(redis_server: RedisServer, tmp_path: Path) -> None:
    text = (ROOT / "exchange" / "defaults" / "demo.toml").read_text()
    text = text.replace('path = ".exchange/demo.sqlite"', f'path = "{tmp_path / "demo.sqlite"}"')
    text = text.replace('marketdata = "memory"', 'marketdata = "redis"')
    assert 'marketdata = "redis"' in text
    assert str(tmp_path) in text
    config = tmp_path / "sqlite.toml"
    config.write_text(text + f'\n[redis]\nenabled = true\nurl = "{redis_server.url}"\n')
    env = {**os.environ, "EXCHANGE_POSTGRES_DSN": "postgresql://127.0.0.1:1/nowhere"}  # reading it would fail
    client = redis.Redis(port=redis_server.port)
    with (tmp_path / "daemon.log").open("wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "exchange", "run", "--config", str(config)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 60
            while json.loads(client.get("md.BTC-USD.book") or b'{"seq": 0}')["seq"] < 200:
                assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
                assert time.monotonic() < deadline, "no book key at seq 200 in 60 s"
                time.sleep(0.1)
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    done = subprocess.run([sys.executable, "-m", "exchange", "watch", "BTC-USD", "--check", "--seconds", "0.5",
                           "--config", str(config)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"equals the persisted book ({tmp_path / 'demo.sqlite'}) at seq" in done.stdout

    missing = config.read_text().replace(str(tmp_path / "demo.sqlite"), str(tmp_path / "nothing.sqlite"))
    config.write_text(missing)
    refused = subprocess.run([sys.executable, "-m", "exchange", "watch", "BTC-USD", "--check", "--config",
                              str(config)], capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "no such SQLite store" in refused.stderr
    assert "--config" in refused.stderr
