"""Getting it running: a start that fails for a reason an operator puts right says what to do in one line,
without a traceback; ``exchange topics create`` creates the daemon's topics once.

The real CLI as a process, against the local PostgreSQL (a database and a role that do not exist, a port
nobody listens on) and the test broker (``kafka`` fixture).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.integration.conftest import ADMIN_DSN
from tests.support.broker import KafkaBroker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


def _closed_port() -> int:
    with socket.socket() as sock:  # bound, never listening: a connection is refused
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _config(tmp_path: Path, tag: str = "") -> Path:
    """The shipped configuration, with Redis off, no HTTP port, JSON logs and (with ``tag``) topics of its own."""
    text = (ROOT / "exchange" / "defaults" / "exchange.toml").read_text()
    text = re.sub(r"(?m)^enabled = true", "enabled = false", text) + '\n[http]\nport = 0\n\n[log]\nformat = "json"\n'
    if tag:
        text += (f'\n[kafka]\norders_topic = "orders-{tag}"\nevents_topic = "events-{tag}"\n'
                 f'trades_topic = "trades-{tag}"\ndead_letter_topic = "dlq-{tag}"\n')
    path = tmp_path / "exchange.toml"
    path.write_text(text)
    return path


def _exchange(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exchange", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, **env})


def _dsn(database: str, user: str = "") -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    if user:
        base = base.replace("://", f"://{user}@", 1)
    return f"{base}/{database}"


def _one_line(proc: subprocess.CompletedProcess[str], *advice: str) -> str:
    """Exit status 1, no traceback anywhere, and exactly one line (stdout or stderr) saying what to do."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if advice[0] in line]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert all(a in lines[0] for a in advice), lines[0]
    return lines[0]


def _fatal(proc: subprocess.CompletedProcess[str], *advice: str) -> dict[str, Any]:
    """``exchange run``: the one line is the critical JSON log line, with no ``exception`` field."""
    line: dict[str, Any] = json.loads(_one_line(proc, *advice))
    assert (line["level"], line["event"], line["exit_status"]) == ("critical", "fatal error; exiting", 1)
    assert "exception" not in line
    assert all(json.loads(other)["level"] != "critical" for other in proc.stderr.splitlines()[:-1])
    return line


def test_migrate_against_a_database_that_does_not_exist_says_to_create_it(tmp_path: Path) -> None:
    name = f"exchange_missing_{uuid.uuid4().hex[:8]}"
    proc = _exchange("migrate", "--config", str(_config(tmp_path)), EXCHANGE_POSTGRES_DSN=_dsn(name))
    line = _one_line(proc, f"has no database {name!r}", "createdb", f"CREATE DATABASE \"{name}\"", "exchange migrate")
    assert line.startswith("exchange migrate: PostgreSQL at ")


def test_migrate_against_a_closed_port_says_to_start_postgresql(tmp_path: Path) -> None:
    port = _closed_port()
    proc = _exchange("migrate", "--config", str(_config(tmp_path)),
                     EXCHANGE_POSTGRES_DSN=f"postgresql://127.0.0.1:{port}/exchange")
    _one_line(proc, f"PostgreSQL at 127.0.0.1:{port} does not answer", "ConnectionRefusedError", "start PostgreSQL",
              "[postgres] dsn")


def test_run_as_a_role_that_does_not_exist_names_the_user_and_what_to_check(tmp_path: Path) -> None:
    user = f"nobody_{uuid.uuid4().hex[:8]}"
    proc = _exchange("run", "--config", str(_config(tmp_path)), EXCHANGE_POSTGRES_DSN=_dsn("test", user))
    line = _fatal(proc, f"refused user {user!r}", "[postgres] dsn", "EXCHANGE_POSTGRES_PASSWORD", "createuser")
    assert line["error_type"] == "exchange.ports.StoreCannotOpen"


def test_run_with_no_broker_says_where_it_looked_and_to_start_one(tmp_path: Path, pg_dsn: str) -> None:
    port = _closed_port()
    proc = _exchange("run", "--config", str(_config(tmp_path)), EXCHANGE_POSTGRES_DSN=pg_dsn,
                     EXCHANGE_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}")
    line = _fatal(proc, f"no Kafka broker answers at 127.0.0.1:{port}", "EXCHANGE_KAFKA_BOOTSTRAP")
    assert line["error_type"] == "exchange.ports.CannotStart"


def _partitions(broker: KafkaBroker, names: list[str]) -> dict[str, int]:
    async def describe() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        await admin.start()
        try:
            described = await admin.describe_topics(names)
            return {d["topic"]: len(d["partitions"]) for d in described if d["error_code"] == 0}
        finally:
            await admin.close()

    return asyncio.run(describe())


def test_topics_create_makes_every_topic_with_the_partitions_asked_and_a_rerun_changes_nothing(
        tmp_path: Path, kafka: KafkaBroker) -> None:
    tag = uuid.uuid4().hex[:8]
    names = [f"orders-{tag}", f"dlq-{tag}", f"events-{tag}", f"trades-{tag}"]
    config = str(_config(tmp_path, tag))
    first = _exchange("topics", "create", "--partitions", "3", "--config", config,
                      EXCHANGE_KAFKA_BOOTSTRAP=kafka.bootstrap_servers)
    assert first.returncode == 0, first.stderr
    assert [line.split(":")[0] for line in first.stdout.splitlines()] == [f"created {n}" for n in names]
    assert "3 partitions, replication factor 1" in first.stdout
    assert _partitions(kafka, names) == dict.fromkeys(names, 3)

    again = _exchange("topics", "create", "--partitions", "5", "--config", config,
                      EXCHANGE_KAFKA_BOOTSTRAP=kafka.bootstrap_servers)
    assert again.returncode == 0, again.stderr
    assert [line.split(":")[0] for line in again.stdout.splitlines()] == [f"exists  {n}" for n in names]
    assert all("3 partitions" in line and "not 5: existing topics are not changed" in line
               for line in again.stdout.splitlines())
    assert _partitions(kafka, names) == dict.fromkeys(names, 3)


def test_topics_create_creates_only_the_missing_ones(tmp_path: Path, kafka: KafkaBroker) -> None:
    tag = uuid.uuid4().hex[:8]
    kafka.create_topics({f"orders-{tag}": 2})
    proc = _exchange("topics", "create", "--partitions", "4", "--config", str(_config(tmp_path, tag)),
                     EXCHANGE_KAFKA_BOOTSTRAP=kafka.bootstrap_servers)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"exists  orders-{tag}: 2 partitions (orders, key: instrument)")
    assert _partitions(kafka, [f"orders-{tag}", f"dlq-{tag}", f"events-{tag}", f"trades-{tag}"]) == {
        f"orders-{tag}": 2, f"dlq-{tag}": 4, f"events-{tag}": 4, f"trades-{tag}": 4}


def test_topics_create_with_no_broker_says_so_in_one_line(tmp_path: Path) -> None:
    port = _closed_port()
    proc = _exchange("topics", "create", "--partitions", "3", "--config", str(_config(tmp_path)),
                     EXCHANGE_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}")
    _one_line(proc, f"exchange topics: no Kafka broker answers at 127.0.0.1:{port}")


def test_a_missing_topic_the_broker_creates_on_first_use_is_a_warning_not_a_stop(kafka: KafkaBroker) -> None:
    from exchange.adapters.kafka.topics import Topic, check_topics
    from exchange.settings import KafkaSettings

    tag = uuid.uuid4().hex[:8]
    kafka.create_topics({f"orders-{tag}": 2})
    topics = [Topic(f"orders-{tag}", "orders", "instrument"), Topic(f"trades-{tag}", "trades", "instrument")]
    settings = KafkaSettings(bootstrap_servers=kafka.bootstrap_servers)
    assert asyncio.run(check_topics(settings, topics, options={})) == [f"trades-{tag}"]  # Tansu auto-creates
    assert asyncio.run(check_topics(settings, topics, options={})) == []
    assert set(_partitions(kafka, [t.name for t in topics])) == {t.name for t in topics}


def test_a_daemon_start_reports_no_kafka_failure_while_its_group_joins(tmp_path: Path, kafka: KafkaBroker,
                                                                       pg_dsn: str) -> None:
    """With the default session timeout the test broker takes seconds to answer the first JoinGroup: the
    probes during it are no failure (no "dependency unreachable", no reconnection counted)."""
    from exchange.core.instruments import Instrument
    from tests.integration.daemon import DaemonProcess, free_port, write_config

    topic = f"orders-{uuid.uuid4().hex[:8]}"
    kafka.create_topics({topic: 1, f"{topic}.dlq": 1, f"{topic}.events": 1, f"{topic}.trades": 1})
    port = free_port()
    config = write_config(tmp_path / "daemon.toml", instruments=[Instrument.from_decimals(
        "BTC-USD", tick_size="0.01", lot_size="0.001")], bootstrap=kafka.bootstrap_servers, dsn=pg_dsn,
        topic=topic, group_id=f"g-{topic}", http_port=port)
    config.write_text(config.read_text().replace("session_timeout_ms = 1000", "session_timeout_ms = 10000")
                      .replace("heartbeat_interval_ms = 100", "heartbeat_interval_ms = 3000"))
    daemon = DaemonProcess(config, port, tmp_path / "daemon.log")
    daemon.start()
    try:
        daemon.wait_ready(timeout=60)
        daemon.wait_log('"partitions assigned"', timeout=5)
        asyncio.run(asyncio.sleep(5))  # two more probe rounds, now against the joined group
        _, text = daemon.get("/metrics")
        _, ready = daemon.get("/readyz")
    finally:
        assert daemon.terminate() == 0
    log = (tmp_path / "daemon.log").read_text()
    assert "dependency unreachable" not in log, log
    assert "reachable again" not in log
    assert re.search(r'^exchange_reconnects_total\{target="kafka"\} [1-9]', text, re.MULTILINE) is None
    assert re.search(r'^exchange_dependency_up\{dependency="kafka"\} 1\.0$', text, re.MULTILINE), text
    assert ready["problems"] == []
