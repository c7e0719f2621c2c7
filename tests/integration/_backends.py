"""The stores the contract tests run against: PostgreSQL on each commit path, and SQLite (see ``test_stores.py``).

:class:`Backend` is a factory of started, migrated stores on ONE fresh database, plus plain SQL access to it
for checking rows (the SQL used is portable); a test module's ``backend`` fixture, parametrized over
:data:`BACKENDS`, gets one per kind from :func:`make_backend`: ``postgres-one-statement``, ``postgres-copy``
and ``sqlite``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from exchange import Instrument
from exchange.adapters.postgres import PostgresStore
from exchange.adapters.sqlite import SqliteStore
from tests.integration._workload import SPECS

AnyStore = PostgresStore | SqliteStore


@dataclass
class Backend:
    kind: str  # postgres | sqlite
    new_store: Callable[..., AnyStore]  # (specs) -> a store on this test's database, not started
    fetch: Callable[[str], Awaitable[list[dict[str, Any]]]]
    execute: Callable[[str], Awaitable[None]]
    one_statement: bool = False  # PostgreSQL's one-statement commit path
    taken: set[str] = field(default_factory=set)  # instruments and partitions taken on this database

    async def store(self, specs: Sequence[Instrument] = SPECS,
                    partitions: Sequence[tuple[str, int]] = ()) -> AnyStore:
        """A started, migrated store; the first one takes the instruments and partitions (epoch 1 each, which
        :func:`tests.integration._workload.stamped` batches carry), later ones share that ownership."""
        store = self.new_store(specs)
        await store.start()
        await store.migrate()
        instruments = [spec.symbol for spec in specs if spec.symbol not in self.taken]
        keys = [key for key in partitions if f"{key}" not in self.taken]
        if instruments or keys:
            await store.take(instruments, keys, "test")
            self.taken.update([*instruments, *map(str, keys)])
        if self.one_statement:
            await store.load(specs)
        return store


def _postgres(dsn: str, one_statement: bool) -> Backend:
    async def fetch(sql: str) -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [dict(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    max_events = 1000 if one_statement else 0
    return Backend("postgres", lambda specs: PostgresStore(dsn, specs, pool_size=2,
                                                           one_statement_max_events=max_events),
                   fetch, execute, one_statement)


def _sqlite(path: Path) -> Backend:
    def query(sql: str) -> list[dict[str, Any]]:
        conn = sqlite3.connect(path)
        conn.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in conn.execute(sql)]
            conn.commit()
            return rows
        finally:
            conn.close()

    async def fetch(sql: str) -> list[dict[str, Any]]:
        return query(sql)

    async def execute(sql: str) -> None:
        query(sql)

    return Backend("sqlite", lambda specs: SqliteStore(path, specs), fetch, execute)


BACKENDS = ["postgres-one-statement", "postgres-copy", "sqlite"]


def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The backend a test module's ``backend`` fixture (``params=BACKENDS``) gives for ``request.param``."""
    if request.param.startswith("postgres"):
        return _postgres(request.getfixturevalue("pg_dsn"), request.param == "postgres-one-statement")
    return _sqlite(tmp_path / "exchange.sqlite")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def dec(value: Any) -> Decimal | None:
    """A decimal column as a Decimal (PostgreSQL NUMERIC, or SQLite's exact TEXT)."""
    return None if value is None else Decimal(str(value))
