"""PostgreSQL storage: group commit of journal batches, and the durable state at start-up.

:class:`PostgresStore` implements :class:`~exchange.ports.Store` (and
:class:`~exchange.ports.History` for recovery) with asyncpg.

One :meth:`~PostgresStore.commit` is ONE transaction. A small batch is one
round trip: a call of ``exchange_commit_batch`` (migration 007) with the
whole batch as one JSON document. A large one (or one with snapshots) is a handful of
round trips whatever its size: events, trades and new orders go in by binary
COPY, then the same function changes the pre-existing orders, positions,
counters and offsets, then the snapshots are written. The rows come from
the pure :func:`exchange.projections.rows.derive_rows`. Per-row Python work is kept
to building tuples: the NUMERIC columns of COPied rows are pre-encoded and
cached (see "NUMERIC on the wire" below) and the updated rows' decimals are
computed by the server.

The store's connections plan for the real table sizes rather than lagging
statistics (no hash/merge joins, no bitmap scans: see ``_SESSION_SETTINGS``),
and are handed back to the pool without asyncpg's reset round trip.

Safety nets, all inside that transaction:

- the batch must continue each instrument's stored sequence exactly
  (``engine_progress`` rows are locked ``FOR UPDATE`` and compared): a gap or an
  overlap means two writers or a bad replay and is refused, not retried;
- a batch that is already durable (a commit whose acknowledgement was lost) is
  recognised and succeeds without writing anything twice;
- every update must hit an open order row.

Positions are absolute values computed from an in-memory cache (filled by
:meth:`load`, or lazily per instrument); a commit computes the new values into
a copy and the cache adopts it only after the transaction committed, so a
failed commit is retried with the same batch and gives the same result.

Errors of a commit: only what the batch's own content causes is final --
SQLSTATE classes 22 (data exception) and 23 (integrity violation), the
function's own check (EXU01 rows missing), a batch
that does not continue the stored sequence, and Python-side encoding errors of
the batch's values -- and raises ``StoreUnavailable(retriable=False)`` with a
message saying what to check. Everything else is the database going away, and
the journal writer retries it with backoff: ``StoreUnavailable(retriable=True)``
for lost connections, whatever exception the driver raises for them (asyncpg's
``InternalClientError`` when the server ended a session under it, interface
errors, a cancellation inside its pool), ``OSError``, timeouts, and every other
server error (a revoked privilege, a dropped table: an operator can put those
right while the daemon waits). Outside commits (start-up, lookups) lost
connections, ``OSError``, timeouts and the server's transient classes (08, 40,
53, 57, 58) are retriable and anything else is not.

Every connection is leased for one block of work (:meth:`PostgresStore._lease`):
if the block fails, for whatever reason, the connection is closed -- a statement
still running is cancelled first -- before its pool holder is free again, so a
broken or confused connection is never handed out twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import msgspec
import structlog

from exchange.core.dedupe import NewestFirstWindow
from exchange.core.events import Event
from exchange.core.instruments import Instrument
from exchange.core.matching import EngineState, RestingOrder
from exchange.core.types import Side, StpMode
from exchange.migrations import apply_migrations
from exchange.ports import Batch, InputReset, Position, Recovered, SnapshotRequest, StoreUnavailable
from exchange.projections.rows import (
    EVENT_COLUMNS,
    ORDER_COLUMNS,
    POSITION_FIELDS,
    TRADE_COLUMNS,
    UPDATE_FIELDS,
    BatchRows,
    Progress,
    RowError,
    Scale,
    already_durable,
    derive_rows,
)
from exchange.settings import PostgresSettings

__all__ = ["PostgresStore", "connect_options"]

_log = structlog.get_logger("exchange.store")
_recovery_log = structlog.get_logger("exchange.recovery")  # loading is part of recovery

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

_Conn: TypeAlias = "asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]"
_Leased: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

_RETRIABLE_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
# connection-time refusals an operator clears without touching the daemon: database not accepting
# connections (ALLOW_CONNECTIONS false, shutting down), lock timeouts, a database being restored
_RETRIABLE_SQLSTATES = frozenset({"55000", "55006", "55P03", "3D000"})
_SIDES = {s.value: s for s in Side}
_STPS = {s.value: s for s in StpMode}
_decode_events = msgspec.json.Decoder(list[Event]).decode
_decode_state = msgspec.json.Decoder(EngineState).decode

_SQL_PROGRESS_LOCK = """
SELECT instrument, seq, next_order_id, next_trade_id, halted FROM engine_progress
WHERE instrument = ANY($1::text[]) ORDER BY instrument FOR UPDATE"""

_SQL_COMMIT_BATCH = "SELECT exchange_commit_batch($1::text::jsonb)"
# the document's rows are arrays; exchange_commit_batch finds each field by its name, at the position these
# give (the rows' shapes are defined in exchange.projections.rows, and here for the document's own rows)
_PROGRESS_FIELDS = ("instrument", "first_seq", "last_seq", "next_order_id", "next_trade_id", "halted")
_STEP_FIELDS = ("instrument", "tick", "lot")
_OFFSET_FIELDS = ("instrument", "topic", "partition", "last_offset")
_FIELDS = {"progress": _PROGRESS_FIELDS, "steps": _STEP_FIELDS, "events": EVENT_COLUMNS, "trades": TRADE_COLUMNS,
           "orders": ORDER_COLUMNS, "updates": UPDATE_FIELDS, "positions": POSITION_FIELDS, "offsets": _OFFSET_FIELDS}
_FIELDS_JSON = msgspec.Raw(msgspec.json.encode(
    {kind: {name: i for i, name in enumerate(fields)} for kind, fields in _FIELDS.items()}))

_SQL_POSITIONS = """
SELECT instrument, client_id, net_lots, cost, realized FROM positions WHERE instrument = ANY($1::text[])"""

_SQL_SNAPSHOTS_INSERT = """
INSERT INTO snapshots (instrument, seq, state_hash, order_count, state)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::integer[], $5::bytea[])
ON CONFLICT (instrument, seq) DO UPDATE SET
    state_hash = EXCLUDED.state_hash, order_count = EXCLUDED.order_count, state = EXCLUDED.state,
    taken_at = now()"""

_SQL_SNAPSHOTS_PRUNE = """
DELETE FROM snapshots AS s USING (
    SELECT instrument, seq, row_number() OVER (PARTITION BY instrument ORDER BY seq DESC) AS n
    FROM snapshots WHERE instrument = ANY($1::text[])) AS k
WHERE s.instrument = k.instrument AND s.seq = k.seq AND k.n > $2"""

_SQL_OPEN_ORDERS = """
SELECT order_id, client_id, client_order_id, side, price_ticks, qty_lots, remaining_lots, priority, expire_ns,
       post_only, stp
FROM orders
WHERE instrument = $1 AND status IN ('open', 'partially_filled')
ORDER BY side, CASE WHEN side = 'buy' THEN -price_ticks ELSE price_ticks END, priority"""

# the dedupe window: finished orders newest first, one page below the last row read (see _read_window)
_SQL_DONE = """
SELECT client_id, client_order_id, order_id, updated_seq, priority FROM orders
WHERE instrument = $1 AND status IN ('filled', 'canceled', 'expired') AND (updated_seq, priority) < ($2, $3)
ORDER BY updated_seq DESC, priority DESC
LIMIT $4"""
_ABOVE_EVERY_ROW = 2**63 - 1  # an (updated_seq, priority) bound no row reaches: the first page


async def _read_window(conn: _Conn, spec: Instrument) -> list[tuple[str, str, int]]:
    """An instrument's dedupe window from its finished orders, read newest first (:class:`NewestFirstWindow`).

    Pages of ``orders_finished_idx`` in descending order, each below the last row read, so every page is
    an index range scan whatever the planner believes of the table. It stops when the window is full, which
    may take more than ``dedupe_window`` rows, up to every finished order of the instrument, when a few
    clients finished most of them: their rows beyond their ``dedupe_per_client`` newest are read and
    skipped. Memory stays within the window and a page. A long read logs its progress once a second.
    """
    window = NewestFirstWindow(spec.dedupe_window, spec.dedupe_per_client)
    started = logged = time.monotonic()
    seq = priority = _ABOVE_EVERY_ROW
    while True:
        page = min(_LOAD_CHUNK, max(1_000, spec.dedupe_window - len(window)))
        rows = await conn.fetch(_SQL_DONE, spec.symbol, seq, priority, page)
        full = False
        for r in rows:
            if not window.add(r[0], r[1], r[2]):
                full = True
                break
        if full or len(rows) < page:
            break
        seq, priority = rows[-1][3], rows[-1][4]
        now = time.monotonic()
        if now - logged >= _LOG_EVERY_S:
            logged = now
            _recovery_log.info("loading the dedupe window", instrument=spec.symbol, rows_read=window.rows,
                               remembered=len(window), elapsed_s=round(now - started, 3))
    if window.rows >= _LOAD_CHUNK:
        _recovery_log.info("dedupe window loaded", instrument=spec.symbol, rows_read=window.rows,
                           remembered=len(window), elapsed_s=round(time.monotonic() - started, 3))
    return window.entries()

# Every statement here reads or writes a few rows through a unique index, walks an index in its order,
# or is a COPY. Statistics lag far behind tables that grow by thousands of rows a second, and then the
# planner picks plans that are fine for the tiny table it believes in and ruinous for the real one: a
# batch's ``UPDATE orders ... FROM (its rows)`` as a hash join over every open order (or a generic
# plan scanning them once per updated row), a chunk of the event journal as a bitmap scan plus an
# on-disk sort of everything after it. Seconds instead of milliseconds, so those plan shapes are off.
_SESSION_SETTINGS = {"jit": "off", "enable_hashjoin": "off", "enable_mergejoin": "off",
                     "enable_bitmapscan": "off"}
_LOAD_CHUNK = 50_000
_LOG_EVERY_S = 1.0


def connect_options(postgres: PostgresSettings) -> dict[str, Any]:
    """The asyncpg keyword arguments for authentication and TLS, from ``[postgres]`` settings.

    The password travels as its own argument, never inside the DSN, so no DSN
    the daemon could print holds it. ``sslmode`` has libpq's meaning; a mode
    alone is passed as is (asyncpg then uses the system CAs); with a CA file or
    a client certificate an :class:`ssl.SSLContext` is built: ``verify-full``
    checks the certificate and the host name, ``verify-ca`` the certificate
    only, the weaker modes encrypt without verifying. A DSN may also carry
    ``sslmode=...`` itself; these settings win.
    """
    options: dict[str, Any] = {}
    if postgres.password:
        options["password"] = postgres.password
    mode = postgres.sslmode
    if not mode:
        return options
    if mode == "disable" or not (postgres.sslrootcert or postgres.sslcert):
        options["ssl"] = mode
        return options
    context = ssl.create_default_context(cafile=postgres.sslrootcert or None)
    if mode in ("verify-ca", "verify-full"):
        context.check_hostname = mode == "verify-full"
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if postgres.sslcert:
        context.load_cert_chain(postgres.sslcert, postgres.sslkey or None)
    options["ssl"] = context
    return options


class PostgresStore:
    """Durable storage in PostgreSQL (see the module docstring).

    ``pool_size`` bounds the connections (the journal uses one at a time, for its one
    commit in flight; loading, checks and lookups may use others). ``snapshot_keep`` snapshots are kept
    per instrument. ``command_timeout`` bounds every statement and
    ``connect_timeout`` every connection attempt and pool acquisition (seconds).
    Batches of up to ``one_statement_max_events`` events commit in one round trip
    (:meth:`_commit_one_statement`); larger ones by COPY, which is cheaper per row:
    ``bench/commit.py`` puts the crossover between 80 and 300 events here.
    """

    def __init__(self, dsn: str, instruments: Iterable[Instrument], *, pool_size: int = 4, snapshot_keep: int = 3,
                 command_timeout: float = 60.0, connect_timeout: float = 10.0,
                 application_name: str = "exchange", one_statement_max_events: int = 250,
                 connect_options: Mapping[str, Any] | None = None) -> None:
        if snapshot_keep < 1:
            raise ValueError("snapshot_keep must be at least 1")
        self.dsn = dsn
        self.one_statement_max_events = one_statement_max_events
        self.specs: dict[str, Instrument] = {spec.symbol: spec for spec in instruments}
        self.pool_size = pool_size
        self.snapshot_keep = snapshot_keep
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.application_name = application_name
        self.connect_options = dict(connect_options or {})  # password, ssl: see connect_options()
        self._pool: asyncpg.Pool | None = None
        # per instrument: counters and positions as last committed (or loaded)
        self._progress: dict[str, Progress] = {}
        self._positions: dict[str, dict[str, Position]] = {}
        self._scales = {symbol: _WireScale(spec) for symbol, spec in self.specs.items()}
        self._server_scales = {symbol: _ServerScale(spec) for symbol, spec in self.specs.items()}
        self._step_rows = {symbol: (symbol, format(sc.tick, "f"), format(sc.lot, "f"))
                           for symbol, sc in self._server_scales.items()}
        self.one_statement_commits = 0  # how many batches took the one-statement path (tests)

    def _scale(self, spec: Instrument) -> Scale:
        return self._scales[spec.symbol]

    def _server_scale(self, spec: Instrument) -> Scale:
        return self._server_scales[spec.symbol]

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the connection pool (no-op when open). Raises :class:`StoreUnavailable`."""
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self.pool_size, command_timeout=self.command_timeout,
                timeout=self.connect_timeout,
                server_settings=_SESSION_SETTINGS | {"application_name": self.application_name},
                init=_init_connection, reset=_reset_connection, **self.connect_options)
        except Exception as exc:
            raise _unavailable(exc, "connecting to PostgreSQL") from exc

    async def ping(self) -> None:
        """A cheap round trip (``SELECT 1`` on a pooled connection); raises when the database cannot be reached."""
        async with self._lease(self._require_pool()) as conn:
            await conn.fetchval("SELECT 1")

    async def stop(self) -> None:
        """Close the pool, waiting a bounded time for connections in use (no-op when closed)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self.connect_timeout)
        except Exception:  # timed out, or a connection's own close failed (asyncpg's InternalClientError too)
            pool.terminate()

    async def __aenter__(self) -> PostgresStore:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL store is not started (or was stopped)", retriable=True)
        return self._pool

    @contextlib.asynccontextmanager
    async def _lease(self, pool: asyncpg.Pool) -> AsyncIterator[_Leased]:
        """A pooled connection for one block of work; the pool hands it out again only if the block ended well.

        If the block raises anything at all, the connection is closed before its holder is free again:
        asyncpg gives a connection back in whatever state it is in, and after the server ended a session
        under it that may be one no statement can run in (``InternalClientError``: "cannot switch to
        state 12; another operation (2) is in progress"), or a cancellation or timeout may be still under
        way. The close lets a cancellation already requested finish, and cancels a statement still
        running, so that nothing of it goes on in the server once this returns (bounded by
        ``connect_timeout``; after that the socket is simply dropped); a connection the server has ended
        is just cleaned up. The pool opens a fresh one when it is needed.

        A cancellation the driver raises although nobody cancelled this task (a race in its pool) becomes a
        retriable :class:`StoreUnavailable`. A failure to give the connection back after the block ended
        well is logged, not raised: the block's outcome stands, and asyncpg has dropped that connection.
        """
        conn = await pool.acquire(timeout=self.connect_timeout)
        try:
            yield conn
        except BaseException as exc:
            await self._retire(conn)
            if isinstance(exc, asyncio.CancelledError) and not _cancelling():
                raise StoreUnavailable("a cancellation inside the PostgreSQL driver, nobody asked for it; the "
                                       "connection is dropped", retriable=True) from exc
            raise
        finally:
            await _give_back(pool, conn)

    async def _retire(self, conn: _Leased) -> None:
        """Close ``conn`` for good (see :meth:`_lease`); drop it where even that fails. Never raises, but a
        cancellation of this task."""
        try:
            await conn.close(timeout=self.connect_timeout)
        except asyncio.CancelledError:
            _terminate(conn)
            raise
        except Exception:  # released already (the driver closed it), or the close itself failed
            _terminate(conn)

    # --------------------------------------------------------------- migrations

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied."""
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn:
                applied = await apply_migrations(conn)
        except Exception as exc:
            raise _unavailable(exc, "migrating the schema") from exc
        if applied:
            _log.info("schema migrated", applied=applied)
        return applied

    # ------------------------------------------------------------------- commit

    def _forget(self, symbols: Iterable[str]) -> None:
        """Drop the cached state of ``symbols`` (read from the database again by their next commit)."""
        for symbol in symbols:
            self._progress.pop(symbol, None)
            self._positions.pop(symbol, None)

    def _adopt(self, rows: BatchRows) -> None:
        """``rows`` are durable: the committed counters and positions move to their end."""
        for symbol, prog in rows.progress.items():
            self._progress[symbol] = prog
            changed = rows.positions.get(symbol)
            if changed:
                self._positions.setdefault(symbol, {}).update(changed)

    async def commit(self, batch: Batch) -> None:
        """Make ``batch`` durable in one transaction, or raise :class:`StoreUnavailable`.

        The journal writer commits one batch at a time, in order, and retries a failed commit with the
        same batch. A small batch of loaded instruments takes the one-statement path, anything else
        (more than ``one_statement_max_events`` events, snapshots, an instrument this store has not
        loaded) the COPY path.
        """
        last = batch.last_seq()  # the batch's last seq per instrument
        if last and all(symbol in self._progress and self._progress[symbol].seq >= seq
                        for symbol, seq in last.items()):
            return  # this store already committed it: a retry after success
        pool = self._require_pool()
        symbols = sorted(last)
        if not batch.snapshots and self._small(batch) and all(symbol in self._progress for symbol in symbols):
            await self._commit_one_statement(pool, batch, symbols, last)
        else:
            await self._commit_copy(pool, batch, symbols, last)

    def _small(self, batch: Batch) -> bool:
        """At most ``one_statement_max_events`` events (counting stops there)."""
        n, limit = 0, self.one_statement_max_events
        for item in batch.applied:
            n += len(item.events)
            if n > limit:
                return False
        return True

    async def _commit_copy(self, pool: asyncpg.Pool, batch: Batch, symbols: list[str], last: dict[str, int]) -> None:
        loaded: dict[str, dict[str, Position]] = {}  # instruments whose state this attempt read from the database
        try:
            async with self._lease(pool) as conn, conn.transaction():
                stored = {r["instrument"]: Progress(r["seq"], r["next_order_id"], r["next_trade_id"], r["halted"])
                          for r in await conn.fetch(_SQL_PROGRESS_LOCK, symbols)}
                missing = [symbol for symbol in symbols if symbol not in self._progress]
                loaded = {symbol: {} for symbol in missing}
                if missing:
                    for r in await conn.fetch(_SQL_POSITIONS, missing):
                        loaded[r["instrument"]][r["client_id"]] = Position(
                            int(r["net_lots"]), int(r["cost"]), int(r["realized"]))
                progress = {**self._progress, **{s: stored.get(s) or Progress() for s in missing}}
                rows = derive_rows(batch, self.specs, progress, {**self._positions, **loaded}, self._scale)
                if already_durable(rows, stored):
                    # an earlier attempt committed but its acknowledgement was lost: nothing to write;
                    # forget the cached state of these instruments, it is reloaded from the database
                    self._forget(symbols)
                    _log.warning("batch already durable; commit acknowledged without writing", last_seq=last)
                    return
                await self._write(conn, rows)
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise _commit_failure(exc, last) from exc
        # durable: adopt the new counters and positions
        self._positions.update(loaded)
        self._adopt(rows)

    async def _commit_one_statement(self, pool: asyncpg.Pool, batch: Batch, symbols: list[str],
                                    last: dict[str, int]) -> None:
        """A small batch in ONE round trip: ``exchange_commit_batch`` (migration 007) in its own transaction.

        A batch of a few dozen events spends most of a multi-statement commit
        waiting on round trips (about ten, each a scheduling hop on a busy
        machine). Here the rows travel as one JSON document (msgspec writes it in
        microseconds), the server computes the decimal columns, and the function
        checks the sequence and the updated-row count itself. It needs each
        instrument's counters and positions from this store's cache: they are
        its rows' basis.
        """
        try:
            rows = derive_rows(batch, self.specs, self._progress, self._positions, self._server_scale)
            document = self._document(rows, copied=False)
            async with self._lease(pool) as conn:
                answer = await conn.fetchval(_SQL_COMMIT_BATCH, document)
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise _commit_failure(exc, last) from exc
        if answer is not None:  # nothing was written: the stored sequence is not where the batch starts
            stored = {symbol: Progress(seq) for symbol, seq in msgspec.json.decode(answer, type=dict[str, int]).items()}
            if not already_durable(rows, stored):  # raises if it is neither durable nor next
                raise StoreUnavailable(f"batch refused by the database although it continues {stored}",
                                       retriable=False)
            self._forget(symbols)
            _log.warning("batch already durable; commit acknowledged without writing", last_seq=last)
            return
        self.one_statement_commits += 1
        self._adopt(rows)

    def _document(self, rows: BatchRows, *, copied: bool) -> str:
        """The batch as ``exchange_commit_batch`` takes it; without events, trades and new orders if ``copied``.

        One JSON document: msgspec writes it in a fraction of a microsecond per row, where asyncpg's array
        parameters cost about 2 us per row of Python (an isinstance check for every element). The rows
        are arrays; ``fields`` says where each field is in them (see :data:`_FIELDS`).
        """
        return _encode_json({
            "fields": _FIELDS_JSON,
            "progress": [(symbol, rows.first_seq[symbol], p.seq, p.next_order_id, p.next_trade_id, p.halted)
                         for symbol, p in sorted(rows.progress.items())],
            "steps": list(self._step_rows.values()),
            "events": [] if copied else rows.events, "trades": [] if copied else rows.trades,
            "orders": [] if copied else rows.new_orders,
            "updates": rows.order_updates, "positions": rows.position_rows,
            "offsets": [(*key, offset) for key, offset in sorted(rows.offsets.items())],
        }).decode()

    async def _write(self, conn: _Conn, rows: BatchRows) -> None:
        """Every row of one batch on one connection inside its transaction: the new rows (events, trades,
        new orders) by COPY; the rest -- updated orders, positions, counters, offsets -- as the one-statement
        path writes it; then the batch's snapshots."""
        if rows.events:
            await conn.copy_records_to_table("order_events", records=rows.events, columns=EVENT_COLUMNS)
        if rows.trades:
            await conn.copy_records_to_table("trades", records=rows.trades, columns=TRADE_COLUMNS)
        if rows.new_orders:
            await conn.copy_records_to_table("orders", records=rows.new_orders, columns=ORDER_COLUMNS)
        if await conn.fetchval(_SQL_COMMIT_BATCH, self._document(rows, copied=True)) is not None:
            raise _moved()
        if rows.snapshots:
            await conn.execute(_SQL_SNAPSHOTS_INSERT, *_columns(rows.snapshots, 5))
            await conn.execute(_SQL_SNAPSHOTS_PRUNE, sorted({s[0] for s in rows.snapshots}), self.snapshot_keep)

    # --------------------------------------------------------------------- load

    async def load(self, instruments: Sequence[Instrument]) -> dict[str, Recovered]:
        """The durable state of each instrument (fresh when nothing is stored); also warms the caches."""
        pool = self._require_pool()
        out: dict[str, Recovered] = {}
        try:
            async with self._lease(pool) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.execute("SET LOCAL work_mem = '256MB'")  # sort the open orders in memory
                for spec in instruments:
                    out[spec.symbol] = await self._load_one(conn, spec)
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise _unavailable(exc, "loading the stored state") from exc
        for symbol, rec in out.items():
            self._progress[symbol] = Progress(rec.state.seq, rec.state.next_order_id, rec.state.next_trade_id,
                                              rec.state.halted)
            self._positions[symbol] = dict(rec.positions)
        return out

    async def _load_one(self, conn: _Conn, spec: Instrument) -> Recovered:
        symbol = spec.symbol
        started = time.monotonic()
        row = await conn.fetchrow(
            "SELECT seq, next_order_id, next_trade_id, halted FROM engine_progress WHERE instrument = $1", symbol)
        progress = (Progress(row["seq"], row["next_order_id"], row["next_trade_id"], row["halted"]) if row
                    else Progress())
        orders: list[RestingOrder] = []
        sides, stps = _SIDES, _STPS
        cursor = await conn.cursor(_SQL_OPEN_ORDERS, symbol)
        logged = started
        while True:
            chunk = await cursor.fetch(_LOAD_CHUNK)
            orders.extend(RestingOrder(r[0], r[1], r[2], sides[r[3]], r[4], r[5], r[6], r[7], r[8], r[9], stps[r[10]])
                          for r in chunk)
            if len(chunk) < _LOAD_CHUNK:
                break
            now = time.monotonic()
            if now - logged >= _LOG_EVERY_S:
                logged = now
                _recovery_log.info("loading open orders", instrument=symbol, orders_loaded=len(orders),
                          elapsed_s=round(now - started, 3))
        done: list[tuple[str, str, int]] = []
        if spec.dedupe_window:
            done = await _read_window(conn, spec)
        offsets = {(r[0], r[1]): r[2] for r in await conn.fetch(
            "SELECT topic, partition, last_offset FROM input_offsets WHERE instrument = $1", symbol)}
        positions = {r[0]: Position(int(r[1]), int(r[2]), int(r[3])) for r in await conn.fetch(
            "SELECT client_id, net_lots, cost, realized FROM positions WHERE instrument = $1", symbol)}
        state = EngineState(symbol, progress.seq, progress.next_order_id, progress.next_trade_id, orders, done,
                            progress.halted)
        if len(orders) >= _LOAD_CHUNK:
            _recovery_log.info("open orders loaded", instrument=symbol, orders_loaded=len(orders),
                      elapsed_s=round(time.monotonic() - started, 3))
        return Recovered(state, offsets, positions)

    # ------------------------------------------------------------------ lookups

    async def order_states(self, instrument: str, order_ids: Sequence[int]) -> list[dict[str, Any]]:
        """The current rows of some orders (by the unique (instrument, order_id) index), as wire dicts."""
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn:
                rows = await conn.fetch(
                    "SELECT order_id, client_id, client_order_id, side, order_type, tif, price::text AS price, "
                    "qty::text AS qty, status, filled_lots, remaining_lots, created_seq, updated_seq "
                    "FROM orders WHERE instrument = $1 AND order_id = ANY($2::bigint[]) ORDER BY order_id",
                    instrument, list(order_ids), timeout=self.command_timeout)
        except Exception as exc:
            raise _unavailable(exc, f"reading orders of {instrument}") from exc
        spec = self.specs[instrument]
        return [{"type": "order_status", "instrument": instrument, "seq": r["updated_seq"],
                 "order_id": r["order_id"], "client_id": r["client_id"], "client_order_id": r["client_order_id"],
                 "side": r["side"], "order_type": r["order_type"], "tif": r["tif"], "price": r["price"],
                 "qty": r["qty"], "status": r["status"], "filled": spec.lots_to_qty(r["filled_lots"]),
                 "remaining": spec.lots_to_qty(r["remaining_lots"]), "accepted_seq": r["created_seq"]}
                for r in rows]

    # ------------------------------------------------------- publish watermark

    async def published_seqs(self) -> dict[str, int]:
        """The fan-out's "published through seq" per instrument (see :mod:`exchange.pipeline.fanout`)."""
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn:
                rows = await conn.fetch("SELECT instrument, seq FROM publish_progress", timeout=self.command_timeout)
        except Exception as exc:
            raise _unavailable(exc, "reading the publish watermark") from exc
        return {r["instrument"]: r["seq"] for r in rows}

    async def record_published(self, seqs: Mapping[str, int]) -> None:
        """Store the watermark (never moving it back)."""
        pool = self._require_pool()
        names = sorted(seqs)
        try:
            async with self._lease(pool) as conn:
                await conn.execute(
                    "INSERT INTO publish_progress (instrument, seq) SELECT * FROM unnest($1::text[], $2::bigint[]) "
                    "ON CONFLICT (instrument) DO UPDATE SET seq = GREATEST(publish_progress.seq, EXCLUDED.seq), "
                    "updated_at = now()", names, [seqs[n] for n in names], timeout=self.command_timeout)
        except Exception as exc:
            raise _unavailable(exc, "storing the publish watermark") from exc

    # ------------------------------------------------------------------ history

    async def latest_snapshot(self, instrument: str, max_seq: int | None = None) -> SnapshotRequest | None:
        """The newest stored snapshot of ``instrument`` (with ``seq <= max_seq`` if given), or None."""
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn:
                row = await conn.fetchrow(
                    "SELECT seq, state_hash, state FROM snapshots WHERE instrument = $1 "
                    "AND ($2::bigint IS NULL OR seq <= $2) ORDER BY seq DESC LIMIT 1", instrument, max_seq,
                    timeout=self.command_timeout)
        except Exception as exc:
            raise _unavailable(exc, f"reading the latest snapshot of {instrument}") from exc
        if row is None:
            return None
        return SnapshotRequest(instrument, _decode_state(row["state"]), row["state_hash"])

    async def read_events(self, instrument: str, after_seq: int, upto_seq: int | None = None, *,
                          chunk: int = 20_000) -> AsyncIterator[list[Event]]:
        """The stored events of ``instrument`` after ``after_seq`` (up to ``upto_seq``), in chunks, in order."""
        pool = self._require_pool()

        async def fetch(after: int, upto: int) -> list[Event]:
            # seqs are dense, so a seq range bounds each query's work whatever the statistics say
            async with self._lease(pool) as conn:
                rows = await conn.fetch(
                    "SELECT payload FROM order_events WHERE instrument = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
                    instrument, after, upto, timeout=self.command_timeout)
            return _decode_events(b"[" + b",".join([r[0] for r in rows]) + b"]") if rows else []

        pending: asyncio.Task[list[Event]] | None = None
        try:
            if upto_seq is None:
                async with self._lease(pool) as conn:
                    upto_seq = await conn.fetchval("SELECT max(seq) FROM order_events WHERE instrument = $1",
                                                   instrument, timeout=self.command_timeout) or 0
            seq = after_seq
            while seq < upto_seq:
                if pending is None:
                    pending = asyncio.ensure_future(fetch(seq, min(seq + chunk, upto_seq)))
                events = await pending
                seq = min(seq + chunk, upto_seq)
                # the server reads the next chunk while the caller works through this one
                pending = asyncio.ensure_future(fetch(seq, min(seq + chunk, upto_seq))) if seq < upto_seq else None
                if events:
                    yield events
        except Exception as exc:
            raise _unavailable(exc, f"reading the events of {instrument}") from exc
        finally:
            if pending is not None:  # the caller stopped early: drop the read-ahead
                pending.add_done_callback(_retrieve)
                pending.cancel()

    # ------------------------------------------------------------- input ledger (see journal.InputLedger)

    async def input_offsets(self, topic: str) -> dict[tuple[str, int], int]:
        """The stored last offsets of ``topic`` per (instrument, partition); instrument "" is the partition's own."""
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn:
                rows = await conn.fetch("SELECT instrument, partition, last_offset FROM input_offsets "
                                        "WHERE topic = $1", topic, timeout=self.command_timeout)
        except Exception as exc:
            raise _unavailable(exc, "reading the input offsets") from exc
        return {(r["instrument"], r["partition"]): r["last_offset"] for r in rows}

    async def request_input_reset(self, topic: str, partition: int, offset: int, operator: str,
                                  reason: str) -> InputReset:
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn:
                reset_id = await conn.fetchval(
                    "INSERT INTO input_resets (topic, partition, to_offset, operator, reason) "
                    "VALUES ($1, $2, $3, $4, $5) RETURNING id", topic, partition, offset, operator, reason,
                    timeout=self.command_timeout)
        except Exception as exc:
            raise _unavailable(exc, "recording an input reset") from exc
        return InputReset(reset_id, topic, partition, offset, operator, reason)

    async def input_resets(self, topic: str, *, pending: bool = True) -> list[InputReset]:
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn:
                rows = await conn.fetch(
                    "SELECT id, topic, partition, to_offset, operator, reason, status, note FROM input_resets "
                    "WHERE topic = $1 AND (NOT $2 OR status = 'requested') ORDER BY id", topic, pending,
                    timeout=self.command_timeout)
        except Exception as exc:
            raise _unavailable(exc, "reading the input resets") from exc
        return [InputReset(r["id"], r["topic"], r["partition"], r["to_offset"], r["operator"], r["reason"],
                           r["status"], r["note"]) for r in rows]

    async def apply_input_reset(self, reset: InputReset, note: str) -> None:
        await self._decide_reset(reset, "applied", note)

    async def refuse_input_reset(self, reset: InputReset, note: str) -> None:
        await self._decide_reset(reset, "refused", note)

    async def _decide_reset(self, reset: InputReset, status: str, note: str) -> None:
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn, conn.transaction():
                if status == "applied":
                    await conn.execute("UPDATE input_offsets SET last_offset = $3 WHERE topic = $1 AND partition = $2",
                                       reset.topic, reset.partition, reset.offset - 1)
                    await conn.execute(
                        "INSERT INTO input_offsets (instrument, topic, partition, last_offset) VALUES ('', $1, $2, $3) "
                        "ON CONFLICT (instrument, topic, partition) DO NOTHING",
                        reset.topic, reset.partition, reset.offset - 1)
                await conn.execute("UPDATE input_resets SET status = $2, note = $3, decided_at = now() "
                                   "WHERE id = $1 AND status = 'requested'", reset.id, status, note)
        except Exception as exc:
            raise _unavailable(exc, f"deciding input reset {reset.id}") from exc


_CONTENT_SQLSTATE_CLASSES = frozenset({"22", "23"})  # data exception, integrity constraint violation


def _commit_failure(exc: BaseException, last: Mapping[str, int]) -> StoreUnavailable:
    """Classify what a commit raised: final only if the batch's own content caused it (see the module
    docstring); anything else -- whatever the driver raises when the database goes away -- is retriable.

    ``EXU01`` is exchange_commit_batch finding stored orders missing."""
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, RowError):
        return StoreUnavailable(f"batch refused: {exc}", retriable=False)
    doing = f"committing a batch (last seq {dict(last)})"
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state == "EXU01":
            return _rows_missing(exc.args[0] if exc.args else str(exc))
        refused = _unavailable(exc, doing)
        if state[:2] in _CONTENT_SQLSTATE_CLASSES or refused.retriable:
            return refused
        return StoreUnavailable(f"{refused} (retrying)", retriable=True)
    if _bad_value(exc):
        return StoreUnavailable(f"bad data while {doing}: {type(exc).__name__}: {exc}; check the batch's events "
                                "against the instrument limits", retriable=False)
    return StoreUnavailable(f"PostgreSQL connection failed while {doing}: {type(exc).__name__}: {exc}; the "
                            "connection is dropped and the batch retried", retriable=True)


def _bad_value(exc: BaseException) -> bool:
    """Did encoding one of the batch's values fail, on this side: the raw error of a COPY row's codec, of our
    NUMERIC or JSON encoders? (A parameter asyncpg cannot encode is its ``DataError``, SQLSTATE 22000.)"""
    if isinstance(exc, asyncpg.InterfaceError):  # the driver's own errors are about the connection
        return False
    return isinstance(exc, ValueError | TypeError | OverflowError | struct.error | msgspec.MsgspecError)


def _moved() -> StoreUnavailable:
    return StoreUnavailable("the stored sequence moved while this transaction held its lock; another writer? "
                            "Stop the daemon and run `exchange recover --verify`.", retriable=False)


def _rows_missing(what: str) -> StoreUnavailable:
    return StoreUnavailable(
        f"{what}: the orders table does not match the event stream (rows deleted, finished or edited by "
        "hand?). Run `exchange recover --verify` and repair before restarting.", retriable=False)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a dropped task's outcome as seen (no "exception was never retrieved" noise)."""
    if not task.cancelled():
        task.exception()


def _cancelling() -> bool:
    """Is the current task being cancelled (as opposed to a CancelledError raised by some future inside)?"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _terminate(conn: _Leased) -> None:
    """Drop ``conn``'s socket at once (a no-op on a connection the pool has back already)."""
    with contextlib.suppress(Exception):
        conn.terminate()


async def _give_back(pool: asyncpg.Pool, conn: _Leased) -> None:
    """``pool.release(conn)``, which never fails the block before it: a connection that cannot be reset is
    dropped by asyncpg (and one the server ended meanwhile is no longer checked out: "release() called on
    a free connection holder"). Only a cancellation of this task goes on."""
    try:
        await pool.release(conn)
    except asyncio.CancelledError:
        if _cancelling():
            raise
        _terminate(conn)
        _log.warning("a cancellation inside the PostgreSQL driver while a connection went back to its pool; "
                     "the connection is dropped")
    except Exception as exc:
        _terminate(conn)
        _log.warning("a connection could not go back to its pool; it is dropped", error=f"{type(exc).__name__}: {exc}")


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows -> one list per column (for ``unnest``)."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


_encode_json = msgspec.json.Encoder().encode


def _unavailable(exc: BaseException, doing: str) -> StoreUnavailable:
    """Classify a driver/server error: transient ones are retriable, the rest say what to check."""
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        detail = f"{type(exc).__name__} [{state}] {exc}"
        if state[:2] in _RETRIABLE_SQLSTATE_CLASSES or state in _RETRIABLE_SQLSTATES:
            return StoreUnavailable(f"PostgreSQL unavailable while {doing}: {detail}", retriable=True)
        extra = []
        for name in ("constraint_name", "table_name", "column_name", "detail"):
            value = getattr(exc, name, None)
            if value:
                extra.append(f"{name.split('_')[0]}={value}")
        if extra:
            detail += f" ({', '.join(extra)})"
        if state == "23502" and getattr(exc, "column_name", None) == "status":
            advice = ("the batch changes an order that the orders table says is no longer open: the table does "
                      "not match the event stream (edited by hand?). Run `exchange recover --verify` and repair "
                      "it before restarting")
        elif state.startswith("23"):
            advice = ("a row already exists or breaks a constraint: check that only one engine writes each "
                      "instrument and that it resumed from the stored state (engine_progress, input_offsets)")
        elif state.startswith("22"):
            advice = "a value does not fit its column: check the instrument limits and the event that failed"
        elif state in ("42P01", "42703", "42883"):
            advice = "the schema is missing or old: run the migrations (`exchange migrate`)"
        elif state.startswith("42"):
            advice = "the SQL was refused: check the schema version and the database user's privileges"
        elif state.startswith("28"):
            advice = "authentication failed: check the DSN's user and password"
        else:
            advice = "see the PostgreSQL log for this error"
        return StoreUnavailable(f"PostgreSQL refused {doing}: {detail}; {advice}", retriable=False)
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError | OSError | TimeoutError
                  | ConnectionError):  # (InternalClientError: a connection the server ended under the driver)
        return StoreUnavailable(f"PostgreSQL unreachable while {doing}: {type(exc).__name__}: {exc}",
                                retriable=True)
    if isinstance(exc, ValueError | TypeError | OverflowError | msgspec.MsgspecError):
        return StoreUnavailable(f"bad data while {doing}: {type(exc).__name__}: {exc}; check the batch's events "
                                "against the instrument limits", retriable=False)
    return StoreUnavailable(f"unexpected error while {doing}: {type(exc).__name__}: {exc}", retriable=False)


# ------------------------------------------------------------------ NUMERIC on the wire
#
# asyncpg's own NUMERIC encoder goes through Decimal.as_tuple() for every value: about 1 us, two of
# them per order row, which made the decimal columns the largest single cost of a COPY. The store's
# connections use the codec below instead: a value that is already ``bytes`` is PostgreSQL's binary
# NUMERIC and passes through untouched, so :class:`_WireScale` hands out prices and quantities
# encoded once and cached (they repeat: prices cluster near the touch, sizes are round numbers).
# Decimals and ints still work (slower, in Python); reads give Decimals.

_NUMERIC_HEAD = struct.Struct("!hhHh")  # ndigits, weight (in base-10000 digits), sign, display scale
_NUMERIC_NEG, _NUMERIC_NAN, _NUMERIC_PINF, _NUMERIC_NINF = 0x4000, 0xC000, 0xD000, 0xF000
_SCALE_CACHE_MAX = 200_000


def numeric_binary(units: int, scale: int) -> bytes:
    """PostgreSQL's binary NUMERIC for ``units * 10**-scale``, with exactly ``scale`` decimals."""
    sign = 0
    if units < 0:
        sign, units = _NUMERIC_NEG, -units
    pad = -scale % 4  # align the fraction to whole base-10000 digits
    if pad:
        units *= 10**pad
    groups: list[int] = []  # base-10000 digits, least significant first
    while units:
        units, digit = divmod(units, 10_000)
        groups.append(digit)
    if not groups:
        return _NUMERIC_HEAD.pack(0, 0, 0, scale)
    weight = len(groups) - (scale + pad) // 4 - 1
    low = 0
    while not groups[low]:  # trailing zero digits are implied
        low += 1
    digits = groups[low:][::-1]
    return _NUMERIC_HEAD.pack(len(digits), weight, sign, scale) + struct.pack(f"!{len(digits)}H", *digits)


def _encode_numeric(value: Any) -> bytes:
    if value.__class__ is bytes:
        return value
    if isinstance(value, int):
        return numeric_binary(value, 0)
    if isinstance(value, Decimal) and value.is_finite():
        sign, digits, exponent = value.as_tuple()
        units = int("".join(map(str, digits)) or "0")
        assert isinstance(exponent, int)
        if exponent > 0:
            units, exponent = units * 10**exponent, 0
        return numeric_binary(-units if sign else units, -exponent)
    raise TypeError(f"cannot store {value!r} as NUMERIC")


def _decode_numeric(data: bytes) -> Decimal:
    ndigits, weight, sign, dscale = _NUMERIC_HEAD.unpack_from(data)
    if sign == _NUMERIC_NAN:
        return Decimal("NaN")
    if sign in (_NUMERIC_PINF, _NUMERIC_NINF):
        return Decimal("-Infinity" if sign == _NUMERIC_NINF else "Infinity")
    units = 0
    for digit in struct.unpack_from(f"!{ndigits}H", data, _NUMERIC_HEAD.size):
        units = units * 10_000 + digit
    exponent = 4 * (weight - ndigits + 1)  # value = units * 10**exponent
    if exponent >= -dscale:
        units *= 10 ** (exponent + dscale)
    else:
        units //= 10 ** (-dscale - exponent)  # digits past the display scale are zeros
    return Decimal(f"{'-' if sign == _NUMERIC_NEG else ''}{units}E-{dscale}")


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """Make a released connection ready for its next use.

    asyncpg's default (unlock advisory locks, CLOSE ALL, UNLISTEN, RESET ALL)
    costs a round trip per commit and undoes nothing this store leaves behind:
    it keeps no session state but the startup settings, releases its advisory
    lock itself and uses cursors only inside transactions. Only a transaction
    left open (its rollback failed) is closed.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("numeric", schema="pg_catalog", encoder=_encode_numeric, decoder=_decode_numeric,
                              format="binary")


class _ServerScale(Scale):
    """For the one-statement path: no decimals here, the server computes them from the ticks and lots."""

    __slots__ = ()

    def price(self, ticks: int) -> None:
        return None

    def qty(self, lots: int) -> None:
        return None


class _WireScale(Scale):
    """A :class:`Scale` whose values are binary NUMERICs, cached per tick and lot count."""

    __slots__ = ("_lot_scale", "_lot_units", "_prices", "_qtys", "_tick_scale", "_tick_units")

    def __init__(self, spec: Instrument) -> None:
        super().__init__(spec)
        self._tick_units, self._tick_scale = spec.tick_units, spec.tick_scale
        self._lot_units, self._lot_scale = spec.lot_units, spec.lot_scale
        self._prices: dict[int, bytes] = {}
        self._qtys: dict[int, bytes] = {}

    def price(self, ticks: int) -> bytes:
        value = self._prices.get(ticks)
        if value is None:
            if len(self._prices) >= _SCALE_CACHE_MAX:
                self._prices.clear()
            value = self._prices[ticks] = numeric_binary(ticks * self._tick_units, self._tick_scale)
        return value

    def qty(self, lots: int) -> bytes:
        value = self._qtys.get(lots)
        if value is None:
            if len(self._qtys) >= _SCALE_CACHE_MAX:
                self._qtys.clear()
            value = self._qtys[lots] = numeric_binary(lots * self._lot_units, self._lot_scale)
        return value

    def money(self, units: int) -> bytes:
        return numeric_binary(units * self._tick_units * self._lot_units, self._tick_scale + self._lot_scale)
