"""The SQLite file's schema: the migrations shipped with the package, and applying them.

:func:`migrations` lists ``exchange/migrations/sqlite/*.sql`` in the order they apply;
:func:`_apply_migrations` applies the pending ones in ONE transaction under the file's writer lock
(``BEGIN IMMEDIATE``: a second migrator waits, then sees ours) and records them in
``schema_migrations``, so running it again is harmless. Each migration is split into statements
(:func:`_statements`) because ``executescript`` would commit the open transaction.

Functions only (the connection belongs to the store, and these run on its thread); names with a
leading underscore are the package's own.
"""

from __future__ import annotations

import sqlite3
from importlib import resources

__all__ = ["migrations"]


def migrations() -> list[tuple[str, str]]:
    """The SQLite migrations shipped with the package as ``(name, sql)``, in the order they apply."""
    folder = resources.files("exchange.migrations").joinpath("sqlite")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


def _statements(script: str) -> list[str]:
    """Split a migration into statements (``executescript`` would commit the open transaction)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in pending.splitlines()):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {pending.strip()[:80]!r}")
    return out


def _apply_migrations(conn: sqlite3.Connection) -> list[str]:
    """Apply the pending migrations on ``conn`` in one transaction; return the names applied."""
    conn.execute("BEGIN IMMEDIATE")  # the file's writer lock: a second migrator waits, then sees ours
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, "
                     "applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))")
        done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
        applied: list[str] = []
        for name, sql in migrations():
            if name in done:
                continue
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (name) VALUES (?)", (name,))
            applied.append(name)
        conn.execute("COMMIT")
    except BaseException:
        conn.rollback()
        raise
    return applied
