"""PostgreSQL storage: group commit of journal batches, and the durable state at start-up.

:class:`PostgresStore` implements :class:`~exchange.ports.Store` (and
:class:`~exchange.ports.History` for recovery) with asyncpg. Split by role:

- :mod:`.store`: :class:`PostgresStore`, the one owner of the pool and of the committed counters and
  positions: both commit paths (one ``exchange_commit_batch`` statement, or COPY), their safety nets,
  lookups, history reads, the publish watermark and the input ledger;
- :mod:`.connection`: :func:`connect_options` (authentication, TLS), the session settings, and each
  connection's life in the pool (set-up, reset, lease, close, give-back);
- :mod:`.document`: the batch as one JSON document for ``exchange_commit_batch``;
- :mod:`.loading`: what :meth:`PostgresStore.load` reads at start-up, the dedupe window and the
  balances included;
- :mod:`.errors`: what a failure means (SQLSTATE and driver errors to a retriable or final
  :class:`~exchange.ports.StoreUnavailable`);
- :mod:`.numeric`: the binary NUMERIC codec and the two commit paths' :class:`~exchange.projections.rows.Scale`.

Names with a leading underscore in those modules are the package's own: its modules share them,
nothing outside the package (but its tests) uses them.
"""

from exchange.adapters.postgres.connection import connect_options
from exchange.adapters.postgres.store import PostgresStore

__all__ = ["PostgresStore", "connect_options"]
