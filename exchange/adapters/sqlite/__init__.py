"""SQLite storage for the embedded default: one file, no server, the same semantics as PostgreSQL.

:class:`SqliteStore` implements :class:`~exchange.ports.Store` and :class:`~exchange.ports.History`
with the standard library's ``sqlite3``. Split by role:

- :mod:`.store`: :class:`SqliteStore`, the one owner of the file's connection, its thread and the
  committed counters and positions: the commit (one transaction, its safety nets), lookups, history
  reads and the input ledger; ``SYNCHRONOUS_MODES``;
- :mod:`.schema`: :func:`migrations` shipped with the package, and applying them;
- :mod:`.loading`: what :meth:`SqliteStore.load` reads at start-up, the dedupe window included;
- :mod:`.ledger`: balances and transfers, written with each batch and read back at start-up;
- :mod:`.errors`: what a failure means (SQLite and driver errors to a retriable or final
  :class:`~exchange.ports.StoreUnavailable`);
- :mod:`.decimals`: exact decimal strings for the TEXT decimal columns, and the store's
  :class:`~exchange.projections.rows.Scale`.

Names with a leading underscore in those modules are the package's own: its modules share them,
nothing outside the package (but its tests) uses them.
"""

from exchange.adapters.sqlite.schema import migrations
from exchange.adapters.sqlite.store import SYNCHRONOUS_MODES, SqliteStore

__all__ = ["SYNCHRONOUS_MODES", "SqliteStore", "migrations"]
