"""Versioned SQL migrations for the PostgreSQL store.

The ``NNN_name.sql`` files beside this module are applied in name order, each
in its own transaction, and recorded in ``schema_migrations``; a migration
already recorded is skipped, so running them again is harmless. A session-level
advisory lock keeps two processes from migrating at once.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

__all__ = ["apply_migrations", "available"]

_LOCK_KEY = 0x65786368616E6765  # "exchange" in ASCII: one advisory lock for the migrator


def available() -> list[tuple[str, str]]:
    """Every migration shipped with the package as ``(name, sql)``, in the order they apply."""
    files = [f for f in resources.files(__name__).iterdir() if f.name.endswith(".sql")]
    return [(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in sorted(files, key=lambda f: f.name)]


async def apply_migrations(conn: asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]) -> list[str]:
    """Apply the pending migrations on ``conn``; return the names applied (empty when up to date)."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {row["name"] for row in await conn.fetch("SELECT name FROM schema_migrations")}
        applied: list[str] = []
        for name, sql in available():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
