"""The PostgreSQL store: group commit of journal batches, lookups, history, the publish watermark and input ledger.

:class:`PostgresStore` implements :class:`~exchange.ports.Store` (and
:class:`~exchange.ports.History` for recovery) with asyncpg.

One :meth:`~PostgresStore.commit` is ONE transaction. A small batch is one
round trip: a call of ``exchange_commit_batch`` (migration 010) with the
whole batch as one JSON document (:mod:`.document`). A large one (or one with snapshots) is a handful of
round trips whatever its size: events, trades, new orders and transfers go in by binary
COPY, then the same function changes the pre-existing orders, positions, balances,
counters and offsets, then the snapshots are written. The rows come from
the pure :func:`exchange.projections.rows.derive_rows`. Per-row Python work is kept
to building tuples: the NUMERIC columns of COPied rows are pre-encoded and
cached (see :mod:`.numeric`) and the updated rows' decimals are
computed by the server.

Safety nets, all inside that transaction:

- fencing: the batch carries the ownership epoch of each of its instruments and orders
  partitions (taken by :meth:`~PostgresStore.take`); their rows are locked ``FOR SHARE`` and
  compared first, and a batch prepared under an epoch another process has bumped since is
  refused (:class:`~exchange.ports.Fenced`) with nothing written (migration 008);
- the batch must continue each instrument's stored sequence exactly
  (``engine_progress`` rows are locked ``FOR UPDATE`` and compared): a gap or an
  overlap means two writers or a bad replay and is refused, not retried;
- a batch that is already durable (a commit whose acknowledgement was lost) is
  recognised by content -- its events must be the stored ones, byte for byte -- and
  succeeds without writing anything twice;
- every update must hit an open order row.

Positions are absolute values computed from an in-memory cache (filled by
:meth:`~PostgresStore.load`, or lazily per instrument); a commit computes the new values into
a copy and the cache adopts it only after the transaction committed, so a
failed commit is retried with the same batch and gives the same result. The store is the one owner of
that cache, of the counters and of the pool.

Every connection is leased for one block of work and closed if the block fails (see
:mod:`.connection`); what each error means, and which are retried, is in :mod:`.errors`; what
:meth:`~PostgresStore.load` reads is in :mod:`.loading`; the ownership epochs and the check of a batch
found already durable in :mod:`.fencing`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import asyncpg
import msgspec
import structlog

from exchange.adapters.postgres.connection import _Conn, _create_pool, _lease_connection, _Leased
from exchange.adapters.postgres.document import _document, _step_row
from exchange.adapters.postgres.errors import _commit_failure, _connect_failure, _moved, _unavailable
from exchange.adapters.postgres.fencing import _epoch_rows, _fenced, _same_as_stored, _stored_epochs, _take
from exchange.adapters.postgres.loading import _load_states
from exchange.adapters.postgres.numeric import _ServerScale, _WireScale
from exchange.core.events import Event
from exchange.core.instruments import Instrument
from exchange.core.state import EngineState
from exchange.migrations import apply_migrations
from exchange.ports import Batch, Epochs, Fenced, InputReset, Position, Recovered, SnapshotRequest, StoreUnavailable
from exchange.projections.rows import (
    EVENT_COLUMNS,
    ORDER_COLUMNS,
    TRADE_COLUMNS,
    TRANSFER_COLUMNS,
    BatchRows,
    Progress,
    Scale,
    derive_rows,
)
from exchange.projections.stored import acceptable, already_durable

__all__ = ["PostgresStore"]

_log = structlog.get_logger("exchange.store")

_decode_events = msgspec.json.Decoder(list[Event]).decode
_decode_state = msgspec.json.Decoder(EngineState).decode
_encode_json = msgspec.json.Encoder().encode

_SQL_PROGRESS_LOCK = """
SELECT instrument, seq, next_order_id, next_trade_id, halted FROM engine_progress
WHERE instrument = ANY($1::text[]) ORDER BY instrument FOR UPDATE"""

_SQL_COMMIT_BATCH = "SELECT exchange_commit_batch($1::text::jsonb)"
_SQL_FENCE = "SELECT exchange_fence($1::text::jsonb)"

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
        self._step_rows = [_step_row(self.specs[symbol], sc.tick, sc.lot) for symbol, sc in self._server_scales.items()]
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
            self._pool = await _create_pool(
                self.dsn, pool_size=self.pool_size, command_timeout=self.command_timeout,
                connect_timeout=self.connect_timeout, application_name=self.application_name,
                options=self.connect_options)
        except Exception as exc:
            raise _connect_failure(exc, self.dsn) from exc

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

    def _lease(self, pool: asyncpg.Pool) -> contextlib.AbstractAsyncContextManager[_Leased]:
        """A pooled connection for one block of work, closed if the block fails
        (:func:`~exchange.adapters.postgres.connection._lease_connection`)."""
        return _lease_connection(pool, self.connect_timeout)

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
        """Make ``batch`` durable in one transaction, or raise :class:`StoreUnavailable` (or :class:`Fenced`).

        The journal writer commits one batch at a time, in order, and retries a failed commit with the
        same batch. A small batch of loaded instruments takes the one-statement path, anything else
        (more than ``one_statement_max_events`` events, snapshots, an instrument this store has not
        loaded) the COPY path.
        """
        acceptable(batch, self.specs)
        last = batch.last_seq()  # the batch's last seq per instrument
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
                # fenced first: the COPYs below must not collide with rows a new owner wrote
                fenced = await conn.fetchval(_SQL_FENCE, _encode_json(_epoch_rows(batch)).decode())
                if fenced is not None:
                    raise _fenced(fenced)
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
                    await _same_as_stored(conn, rows)
                    self._forget(symbols)
                    _log.warning("batch already durable; commit acknowledged without writing", last_seq=last)
                    return
                await self._write(conn, rows, batch)
        except (StoreUnavailable, Fenced):
            raise
        except Exception as exc:
            raise _commit_failure(exc, last) from exc
        # durable: adopt the new counters and positions
        self._positions.update(loaded)
        self._adopt(rows)

    async def _commit_one_statement(self, pool: asyncpg.Pool, batch: Batch, symbols: list[str],
                                    last: dict[str, int]) -> None:
        """A small batch in ONE round trip: ``exchange_commit_batch`` (migration 010) in its own transaction.

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
            document = self._document(rows, batch, copied=False)
            async with self._lease(pool) as conn:
                answer = await conn.fetchval(_SQL_COMMIT_BATCH, document)
                if answer is not None:  # nothing was written: fenced, or not where the stored sequence is
                    refusal = msgspec.json.decode(answer, type=dict[str, Any])
                    if "fenced" in refusal:
                        raise _fenced(answer)
                    stored = {symbol: Progress(seq) for symbol, seq in refusal["stored"].items()}
                    if not already_durable(rows, stored):  # raises if it is neither durable nor next
                        raise StoreUnavailable(f"batch refused by the database although it continues {stored}",
                                               retriable=False)
                    await _same_as_stored(conn, rows)
        except (StoreUnavailable, Fenced):
            raise
        except Exception as exc:
            raise _commit_failure(exc, last) from exc
        if answer is not None:
            self._forget(symbols)
            _log.warning("batch already durable; commit acknowledged without writing", last_seq=last)
            return
        self.one_statement_commits += 1
        self._adopt(rows)

    def _document(self, rows: BatchRows, batch: Batch, *, copied: bool) -> str:
        """The batch as ``exchange_commit_batch`` takes it (:func:`.document._document`); without the rows
        the COPY path copies if ``copied``."""
        return _document(rows, batch, self._step_rows, copied=copied)

    async def _write(self, conn: _Conn, rows: BatchRows, batch: Batch) -> None:
        """Every row of one batch on one connection inside its transaction: the new rows (events, trades,
        new orders, transfers) by COPY; the rest -- updated orders, positions, balances, counters, offsets -- as
        the one-statement path writes it; then the batch's snapshots."""
        if rows.events:
            await conn.copy_records_to_table("order_events", records=rows.events, columns=EVENT_COLUMNS)
        if rows.trades:
            await conn.copy_records_to_table("trades", records=rows.trades, columns=TRADE_COLUMNS)
        if rows.new_orders:
            await conn.copy_records_to_table("orders", records=rows.new_orders, columns=ORDER_COLUMNS)
        if rows.transfers:
            await conn.copy_records_to_table("transfers", records=rows.transfers, columns=TRANSFER_COLUMNS)
        if await conn.fetchval(_SQL_COMMIT_BATCH, self._document(rows, batch, copied=True)) is not None:
            raise _moved()  # (the epochs were checked first, and their rows are locked since)
        if rows.snapshots:
            await conn.execute(_SQL_SNAPSHOTS_INSERT, *_columns(rows.snapshots, 5))
            await conn.execute(_SQL_SNAPSHOTS_PRUNE, sorted({s[0] for s in rows.snapshots}), self.snapshot_keep)

    # --------------------------------------------------------------------- load

    async def load(self, instruments: Sequence[Instrument]) -> dict[str, Recovered]:
        """The durable state of each instrument (fresh when nothing is stored; see :mod:`.loading`); also warms
        the caches."""
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                out = await _load_states(conn, instruments)
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise _unavailable(exc, "loading the stored state") from exc
        for symbol, rec in out.items():
            self._progress[symbol] = Progress(rec.state.seq, rec.state.next_order_id, rec.state.next_trade_id,
                                              rec.state.halted)
            self._positions[symbol] = dict(rec.positions)
        return out

    # ---------------------------------------------------------------- ownership

    async def take(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]], owner: str) -> Epochs:
        """Bump the epochs of ``instruments`` and ``partitions`` in one transaction and return the new ones (see
        :mod:`.fencing`). Waits for a commit under the old epochs to end (at most 2 s, then a retriable error)."""
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn, conn.transaction():
                epochs = await _take(conn, instruments, partitions, owner)
        except Exception as exc:
            raise _unavailable(exc, "taking ownership of " + ", ".join(
                [*sorted(instruments), *(f"{t}[{p}]" for t, p in sorted(partitions))])) from exc
        return epochs

    async def epochs(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]]) -> Epochs:
        """The stored epochs of ``instruments`` and ``partitions`` (0: never taken)."""
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn:
                return await _stored_epochs(conn, instruments, partitions, self.command_timeout)
        except Exception as exc:
            raise _unavailable(exc, "reading the ownership epochs") from exc

    # ------------------------------------------------------------------ lookups

    async def order_states(self, instrument: str, order_ids: Sequence[int]) -> list[dict[str, Any]]:
        """The current rows of some orders (by the unique (instrument, order_id) index), as wire dicts (an
        iceberg's ``remaining`` is all its open quantity, hidden included: what its owner has open)."""
        pool = self._require_pool()
        try:
            async with self._lease(pool) as conn:
                rows = await conn.fetch(
                    "SELECT order_id, client_id, client_order_id, side, order_type, tif, price::text AS price, "
                    "qty::text AS qty, status, filled_lots, remaining_lots + hidden_lots AS remaining_lots, "
                    "created_seq, updated_seq FROM orders WHERE instrument = $1 AND order_id = ANY($2::bigint[]) "
                    "ORDER BY order_id",
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



def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a dropped task's outcome as seen (no "exception was never retrieved" noise)."""
    if not task.cancelled():
        task.exception()



def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows -> one list per column (for ``unnest``)."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]

