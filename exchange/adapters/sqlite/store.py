"""The SQLite store: one file, no server, the same semantics as PostgreSQL.

:class:`SqliteStore` implements :class:`~exchange.ports.Store` and
:class:`~exchange.ports.History` (so recovery checks it and ``exchange
recover --verify`` reads it) with the standard library's ``sqlite3``, and the
same rules as :class:`~exchange.adapters.postgres.PostgresStore`:

- one :meth:`~SqliteStore.commit` is ONE transaction holding the batch's
  events, trades, orders, positions, balances and transfers (:mod:`.ledger`), counters, input offsets and
  snapshots
  (rows from the pure :func:`exchange.projections.rows.derive_rows`);
- the batch must continue each instrument's stored sequence exactly (read
  inside the transaction, which ``BEGIN IMMEDIATE`` makes the only writer of the
  file); a gap or an overlap is refused and not retried, and a batch that is
  already durable (its acknowledgement was lost, recognised by its events) succeeds
  without writing twice;
- the batch's ownership epochs are checked first in that transaction, as in
  PostgreSQL (:class:`~exchange.ports.Fenced`); the file itself is held by one
  engine process (``exclusive``: a lock file), which SQLite is for;
- every update must hit an open order row; snapshots beyond ``snapshot_keep``
  per instrument are pruned in the same transaction.

Threading: ``sqlite3`` blocks, so every statement runs on ONE dedicated thread
(a single-worker executor that also owns the connection) and the event loop
only awaits it. One thread also serialises the store's work, so the caches of
counters and positions need no lock. The store is the one owner of the
connection, the thread and those caches.

Durability: the file is in WAL mode (readers -- ``recover --verify`` while the
daemon runs -- never block the writer) with ``synchronous = FULL`` by default:
each commit fsyncs the WAL, so a committed batch survives a power loss, not just
a crash of the process. That is the guarantee the daemon's rule "nothing is
published before it is durable" needs, and group commit pays one fsync per
batch, not per order. ``synchronous = "normal"`` (configurable) syncs only at
checkpoints: still safe against ``kill -9``, but an OS crash may lose the last
batches after they were shown.

What each error means, and which are retried, is in :mod:`.errors`; the migrations in
:mod:`.schema`; what :meth:`~SqliteStore.load` reads in :mod:`.loading`; the decimal columns'
strings in :mod:`.decimals`.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import structlog

from exchange.adapters.sqlite.decimals import _TextScale
from exchange.adapters.sqlite.errors import _commit_failure, _unavailable
from exchange.adapters.sqlite.ledger import _write_ledger
from exchange.adapters.sqlite.loading import _load_states, _read_positions
from exchange.adapters.sqlite.schema import _apply_migrations
from exchange.core.events import Event
from exchange.core.instruments import Instrument
from exchange.core.state import EngineState
from exchange.ports import Batch, Epochs, Fenced, InputReset, Position, Recovered, SnapshotRequest, StoreUnavailable
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
    derive_rows,
)
from exchange.projections.stored import acceptable, already_durable, same_as_stored

__all__ = ["SYNCHRONOUS_MODES", "SqliteStore"]

_log = structlog.get_logger("exchange.store")

T = TypeVar("T")
SYNCHRONOUS_MODES = ("full", "normal")
_decode_events = msgspec.json.Decoder(list[Event]).decode
_decode_state = msgspec.json.Decoder(EngineState).decode


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


_SQL_INSERT_EVENT = _insert("order_events", EVENT_COLUMNS)
_SQL_INSERT_TRADE = _insert("trades", TRADE_COLUMNS)
_SQL_INSERT_ORDER = _insert("orders", ORDER_COLUMNS)


def _numbered(fields: Sequence[str]) -> dict[str, str]:
    """Each field's parameter in a statement that takes a row of ``fields`` as it is: ``?1``, ``?2``..."""
    return {name: f"?{i}" for i, name in enumerate(fields, 1)}


# a row of UPDATE_FIELDS, then the new price and qty decimals (None: unchanged)
_U = _numbered((*UPDATE_FIELDS, "price", "qty"))
_SQL_UPDATE_ORDER = f"""
UPDATE orders SET
    remaining_lots = {_U["remaining_lots"]},
    filled_lots = filled_lots + {_U["filled_delta"]},
    qty_lots = COALESCE({_U["qty_lots"]}, qty_lots),
    price_ticks = COALESCE({_U["price_ticks"]}, price_ticks),
    priority = COALESCE({_U["priority"]}, priority),
    -- an order that is no longer open must not change: NULL violates NOT NULL and fails the batch
    status = CASE WHEN status IN ('open', 'partially_filled') THEN COALESCE({_U["status"]}, status) END,
    updated_seq = {_U["updated_seq"]},
    updated_ts_ns = {_U["updated_ts_ns"]},
    price = COALESCE({_U["price"]}, price),
    qty = COALESCE({_U["qty"]}, qty),
    rate = COALESCE({_U["rate"]}, rate),
    hidden_lots = COALESCE({_U["hidden_lots"]}, hidden_lots),
    stop_price_ticks = COALESCE({_U["stop_price_ticks"]}, stop_price_ticks),
    triggered_seq = COALESCE({_U["triggered_seq"]}, triggered_seq)
WHERE instrument = {_U["instrument"]} AND order_id = {_U["order_id"]}"""
_U_INSTRUMENT, _U_PRICE, _U_QTY = map(UPDATE_FIELDS.index, ("instrument", "price_ticks", "qty_lots"))
_O_FUNDS = ORDER_COLUMNS.index("funds")  # TEXT: a budget may outgrow 64 bits

# a row of POSITION_FIELDS with the integers as text (they may outgrow 64 bits), then the decimal columns
_P = _numbered((*POSITION_FIELDS, "net_qty", "realized_pnl"))
_SQL_POSITION_UPSERT = f"""
INSERT INTO positions (client_id, instrument, net_lots, cost, realized, updated_seq, net_qty, realized_pnl)
VALUES ({_P["client_id"]}, {_P["instrument"]}, {_P["net_lots"]}, {_P["cost"]}, {_P["realized"]}, {_P["updated_seq"]},
        {_P["net_qty"]}, {_P["realized_pnl"]})
ON CONFLICT (client_id, instrument) DO UPDATE SET
    net_lots = excluded.net_lots, cost = excluded.cost, realized = excluded.realized,
    net_qty = excluded.net_qty, realized_pnl = excluded.realized_pnl, updated_seq = excluded.updated_seq"""
_P_INSTRUMENT, _P_NET, _P_REALIZED = map(POSITION_FIELDS.index, ("instrument", "net_lots", "realized"))
_P_AS_TEXT = tuple(map(POSITION_FIELDS.index, ("net_lots", "cost", "realized")))

_SQL_PROGRESS_UPSERT = """
INSERT INTO engine_progress (instrument, seq, next_order_id, next_trade_id, halted) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (instrument) DO UPDATE SET
    seq = excluded.seq, next_order_id = excluded.next_order_id, next_trade_id = excluded.next_trade_id,
    halted = excluded.halted, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"""

_SQL_OFFSET_UPSERT = """
INSERT INTO input_offsets (instrument, topic, partition, last_offset) VALUES (?, ?, ?, ?)
ON CONFLICT (instrument, topic, partition) DO UPDATE SET last_offset = excluded.last_offset"""

_SQL_SNAPSHOT_UPSERT = """
INSERT INTO snapshots (instrument, seq, state_hash, order_count, state) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (instrument, seq) DO UPDATE SET
    state_hash = excluded.state_hash, order_count = excluded.order_count, state = excluded.state,
    taken_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"""

_SQL_SNAPSHOT_PRUNE = """
DELETE FROM snapshots WHERE instrument = ?1 AND seq NOT IN (
    SELECT seq FROM snapshots WHERE instrument = ?1 ORDER BY seq DESC LIMIT ?2)"""


def _lock_file(lock: Path, path: Path) -> int:
    """Hold an exclusive ``flock`` on ``lock`` (with this process's id in it); refuse if another process has it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreUnavailable(
            f"{path} is in use by another exchange process (pid {holder}, which holds {lock}): SQLite is for one "
            "engine process. Stop that process first, or run several on PostgreSQL ([storage] kind = "
            '"postgres"), where each instrument has one writer at a time.', retriable=False) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _stored_epochs(conn: sqlite3.Connection, instruments: Sequence[str],
                   partitions: Sequence[tuple[str, int]]) -> Epochs:
    """The stored epochs of these instruments and partitions (0: never taken)."""
    found = dict(conn.execute("SELECT instrument, epoch FROM instrument_owners WHERE instrument IN "
                              f"({', '.join('?' * len(instruments))})", list(instruments)).fetchall()
                 ) if instruments else {}
    parts = {(t, int(p)): int(e) for t, p, e in conn.execute("SELECT topic, partition, epoch FROM partition_owners")
             } if partitions else {}
    return Epochs({i: int(found.get(i, 0)) for i in instruments}, {p: parts.get(p, 0) for p in partitions})


def _moved_epochs(conn: sqlite3.Connection, batch: Batch) -> Epochs:
    """The batch's instruments and partitions whose stored epoch is no longer the one it carries."""
    stored = _stored_epochs(conn, sorted(batch.epochs), sorted(batch.partition_epochs))
    return Epochs({i: e for i, e in stored.instruments.items() if e != batch.epochs[i]},
                  {p: e for p, e in stored.partitions.items() if e != batch.partition_epochs[p]})


class SqliteStore:
    """Durable storage in one SQLite file (see the module docstring).

    ``path`` is created with its directory when missing. ``snapshot_keep``
    snapshots are kept per instrument. ``synchronous`` is ``"full"`` (default)
    or ``"normal"``. ``busy_timeout_s`` is how long a statement waits for a
    lock another process holds before failing (retriably).

    ``exclusive`` (the daemon's): while started, the store holds an exclusive lock on
    ``<path>.lock`` (``flock``, released by the kernel when the process ends, however it ends), and a
    second process that tries is refused at once, saying which process has the file. SQLite is for
    one engine process; several share a PostgreSQL database instead. Readers (``exchange recover
    --verify``) do not take it.
    """

    def __init__(self, path: str | Path, instruments: Iterable[Instrument], *, snapshot_keep: int = 3,
                 synchronous: str = "full", busy_timeout_s: float = 5.0, exclusive: bool = False) -> None:
        if snapshot_keep < 1:
            raise ValueError("snapshot_keep must be at least 1")
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, got {synchronous!r}")
        self.path = Path(path)
        self.specs: dict[str, Instrument] = {spec.symbol: spec for spec in instruments}
        self.snapshot_keep = snapshot_keep
        self.synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self.exclusive = exclusive
        self._lock_fd: int | None = None  # <path>.lock, held while started (exclusive)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used on the executor's thread only
        # per instrument: counters and positions as last committed (or loaded); touched on that thread only
        self._progress: dict[str, Progress] = {}
        self._positions: dict[str, dict[str, Position]] = {}
        self._scales = {symbol: _TextScale(spec) for symbol, spec in self.specs.items()}

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the file on the store's thread (no-op when open). Raises :class:`StoreUnavailable`."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        try:
            await self._call(self._open, f"opening {self.path}")
        except BaseException:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=False)
            raise

    async def stop(self) -> None:
        """Close the file once the statement in flight is done (no-op when closed)."""
        if self._executor is None:
            return
        try:
            await self._call(self._close, "closing the database")
        finally:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=False)

    async def __aenter__(self) -> SqliteStore:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _call(self, fn: Callable[..., T], doing: str, *args: Any,
                    classify: Callable[[BaseException, str, Path], StoreUnavailable] | None = None) -> T:
        """Run ``fn(*args)`` on the store's thread; classify what it raises (``classify``, by default
        :func:`_unavailable`)."""
        if self._executor is None:
            raise StoreUnavailable("the SQLite store is not started (or was stopped)", retriable=True)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except (StoreUnavailable, Fenced):
            raise
        except RowError as exc:
            raise StoreUnavailable(f"batch refused: {exc}", retriable=False) from exc
        except Exception as exc:
            raise (classify or _unavailable)(exc, doing, self.path) from exc

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.exclusive:
            self._lock_fd = _lock_file(Path(f"{self.path}.lock"), self.path)
        try:
            # autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            self._conn = conn
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreUnavailable(f"{self.path}: SQLite refused WAL mode (journal_mode is {mode!r}); put the "
                                       "file on a local file system", retriable=False)
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            conn.execute("PRAGMA foreign_keys = OFF")
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                conn.close()
        finally:
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                os.close(fd)  # releases the lock

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("the SQLite store is not started (or was stopped)", retriable=True)
        return self._conn

    # --------------------------------------------------------------- migrations

    async def migrate(self) -> list[str]:
        """Apply pending migrations in one transaction; return the names applied."""
        applied = await self._call(self._migrate, "migrating the schema")
        if applied:
            _log.info("schema migrated", applied=applied, path=str(self.path))
        return applied

    def _migrate(self) -> list[str]:
        return _apply_migrations(self._db())

    # ------------------------------------------------------------------- commit

    async def commit(self, batch: Batch) -> None:
        """Make ``batch`` durable in one transaction, or raise :class:`StoreUnavailable`."""
        await self._call(self._commit, f"committing a batch (last seq {batch.last_seq()})", batch,
                         classify=_commit_failure)

    def _commit(self, batch: Batch) -> None:
        acceptable(batch, self.specs)
        last = batch.last_seq()
        conn = self._db()
        symbols = sorted(last)
        loaded: dict[str, dict[str, Position]] = {}  # instruments whose state this attempt read from the file
        conn.execute("BEGIN IMMEDIATE")
        try:
            moved = _moved_epochs(conn, batch)
            if moved.instruments or moved.partitions:
                raise Fenced(moved)
            stored = {r[0]: Progress(r[1], r[2], r[3], bool(r[4])) for r in conn.execute(
                "SELECT instrument, seq, next_order_id, next_trade_id, halted FROM engine_progress WHERE instrument IN "
                f"({', '.join('?' * len(symbols))})", symbols)} if symbols else {}
            missing = [symbol for symbol in symbols if symbol not in self._progress]
            progress: dict[str, Progress] = self._progress
            if missing:
                loaded = {symbol: _read_positions(conn, symbol) for symbol in missing}
                progress = {**self._progress, **{s: stored.get(s) or Progress() for s in missing}}
            rows = derive_rows(batch, self.specs, progress, {**self._positions, **loaded}, self._scale)
            if already_durable(rows, stored):
                same_as_stored(rows, {symbol: [r[0] for r in conn.execute(
                    "SELECT payload FROM order_events WHERE instrument = ? AND seq >= ? AND seq <= ? ORDER BY seq",
                    (symbol, first, rows.progress[symbol].seq))] for symbol, first in rows.first_seq.items()})
                conn.rollback()
                # an earlier attempt committed but its acknowledgement was lost: nothing to write;
                # forget the cached state of these instruments, it is read from the file again
                for symbol in symbols:
                    self._progress.pop(symbol, None)
                    self._positions.pop(symbol, None)
                _log.warning("batch already durable; commit acknowledged without writing", last_seq=last)
                return
            self._write(conn, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        # durable: adopt the new counters and positions
        self._positions.update(loaded)
        for symbol, prog in rows.progress.items():
            self._progress[symbol] = prog
            changed = rows.positions.get(symbol)
            if changed:
                self._positions.setdefault(symbol, {}).update(changed)

    def _scale(self, spec: Instrument) -> Scale:
        return self._scales[spec.symbol]

    def _write(self, conn: sqlite3.Connection, rows: BatchRows) -> None:
        """Every row of one batch, inside the open transaction."""
        if rows.events:
            conn.executemany(_SQL_INSERT_EVENT, rows.events)
        if rows.trades:
            conn.executemany(_SQL_INSERT_TRADE, rows.trades)
        if rows.new_orders:
            conn.executemany(_SQL_INSERT_ORDER, [r if not r[_O_FUNDS] else (*r[:_O_FUNDS], str(r[_O_FUNDS]),
                                                                            *r[_O_FUNDS + 1:])
                                                 for r in rows.new_orders])
        if rows.order_updates:
            scales = self._scales
            params = []
            for u in rows.order_updates:
                scale = scales[u[_U_INSTRUMENT]]
                price, qty = u[_U_PRICE], u[_U_QTY]
                params.append((*u, scale.price(price) if price else None,  # (0: a stop's, no price: NULL)
                               scale.qty(qty) if qty is not None else None))
            done = conn.executemany(_SQL_UPDATE_ORDER, params).rowcount
            if done != len(params):
                raise StoreUnavailable(
                    f"{len(params)} stored orders should change but only {done} of their rows were found: the "
                    "orders table does not match the event stream (rows deleted, finished or edited by hand?). "
                    "Run `exchange recover --verify` and repair before restarting.", retriable=False)
        if rows.position_rows:
            positions = []
            for p in rows.position_rows:
                scale = self._scales[p[_P_INSTRUMENT]]
                row = list(p)
                for i in _P_AS_TEXT:
                    row[i] = str(p[i])
                positions.append((*row, scale.qty(p[_P_NET]), scale.money(p[_P_REALIZED])))
            conn.executemany(_SQL_POSITION_UPSERT, positions)
        _write_ledger(conn, rows, self._scales)
        if rows.progress:
            conn.executemany(_SQL_PROGRESS_UPSERT, [(s, p.seq, p.next_order_id, p.next_trade_id, p.halted)
                                                    for s, p in sorted(rows.progress.items())])
        if rows.offsets:
            conn.executemany(_SQL_OFFSET_UPSERT, [(*key, offset) for key, offset in sorted(rows.offsets.items())])
        if rows.snapshots:
            conn.executemany(_SQL_SNAPSHOT_UPSERT, rows.snapshots)
            conn.executemany(_SQL_SNAPSHOT_PRUNE, [(symbol, self.snapshot_keep)
                                                   for symbol in sorted({s[0] for s in rows.snapshots})])

    # --------------------------------------------------------------------- load

    async def load(self, instruments: Sequence[Instrument]) -> dict[str, Recovered]:
        """The durable state of each instrument (fresh when nothing is stored; see :mod:`.loading`); also warms
        the caches."""
        return await self._call(self._load, "loading the stored state", list(instruments))

    def _load(self, instruments: list[Instrument]) -> dict[str, Recovered]:
        out = _load_states(self._db(), instruments)
        for symbol, rec in out.items():
            self._progress[symbol] = Progress(rec.state.seq, rec.state.next_order_id, rec.state.next_trade_id,
                                              rec.state.halted)
            self._positions[symbol] = dict(rec.positions)
        return out

    # ---------------------------------------------------------------- ownership

    async def take(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]], owner: str) -> Epochs:
        """Bump the epochs of ``instruments`` and ``partitions`` in one transaction; return the new ones."""
        epochs = await self._call(self._take, "taking ownership", sorted(set(instruments)), sorted(set(partitions)),
                                  owner)
        return epochs

    def _take(self, instruments: list[str], partitions: list[tuple[str, int]], owner: str) -> Epochs:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO instrument_owners (instrument, epoch, owner) VALUES (?, 1, ?) "
                             "ON CONFLICT (instrument) DO UPDATE SET epoch = epoch + 1, owner = excluded.owner, "
                             "taken_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')", [(i, owner) for i in instruments])
            conn.executemany("INSERT INTO partition_owners (topic, partition, epoch, owner) VALUES (?, ?, 1, ?) "
                             "ON CONFLICT (topic, partition) DO UPDATE SET epoch = epoch + 1, owner = excluded.owner, "
                             "taken_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
                             [(t, p, owner) for t, p in partitions])
            epochs = _stored_epochs(conn, instruments, partitions)
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise
        return epochs

    async def epochs(self, instruments: Sequence[str], partitions: Sequence[tuple[str, int]]) -> Epochs:
        """The stored epochs of ``instruments`` and ``partitions`` (0: never taken)."""
        return await self._call(lambda: _stored_epochs(self._db(), sorted(set(instruments)), sorted(set(partitions))),
                                "reading the ownership epochs")

    # ------------------------------------------------------------------ lookups

    async def order_states(self, instrument: str, order_ids: Sequence[int]) -> list[dict[str, Any]]:
        """The current rows of some orders (by the unique (instrument, order_id) index), as wire dicts (an
        iceberg's ``remaining`` is all its open quantity, hidden included: what its owner has open)."""
        rows = await self._call(self._order_rows, f"reading orders of {instrument}", instrument, list(order_ids))
        spec = self.specs[instrument]
        return [{"type": "order_status", "instrument": instrument, "seq": r[12], "order_id": r[0],
                 "client_id": r[1], "client_order_id": r[2], "side": r[3], "order_type": r[4], "tif": r[5],
                 "price": r[6], "qty": r[7], "status": r[8], "filled": spec.lots_to_qty(r[9]),
                 "remaining": spec.lots_to_qty(r[10]), "accepted_seq": r[11]}
                for r in rows]

    def _order_rows(self, instrument: str, order_ids: list[int]) -> list[tuple[Any, ...]]:
        if not order_ids:
            return []
        return self._db().execute(
            "SELECT order_id, client_id, client_order_id, side, order_type, tif, price, qty, status, filled_lots, "
            "remaining_lots + hidden_lots, created_seq, updated_seq FROM orders WHERE instrument = ? AND order_id IN "
            f"({', '.join('?' * len(order_ids))}) ORDER BY order_id", (instrument, *order_ids)).fetchall()

    # ------------------------------------------------------------------ history

    async def latest_snapshot(self, instrument: str, max_seq: int | None = None) -> SnapshotRequest | None:
        """The newest stored snapshot of ``instrument`` (with ``seq <= max_seq`` if given), or None."""
        row = await self._call(self._snapshot_row, f"reading the latest snapshot of {instrument}", instrument,
                               max_seq)
        if row is None:
            return None
        return SnapshotRequest(instrument, _decode_state(row[1]), row[0])

    def _snapshot_row(self, instrument: str, max_seq: int | None) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._db().execute(
            "SELECT state_hash, state FROM snapshots WHERE instrument = ?1 AND (?2 IS NULL OR seq <= ?2) "
            "ORDER BY seq DESC LIMIT 1", (instrument, max_seq)).fetchone()
        return row

    async def read_events(self, instrument: str, after_seq: int, upto_seq: int | None = None, *,
                          chunk: int = 20_000) -> AsyncIterator[list[Event]]:
        """The stored events of ``instrument`` after ``after_seq`` (up to ``upto_seq``), in chunks, in order."""
        doing = f"reading the events of {instrument}"
        if upto_seq is None:
            upto_seq = await self._call(self._max_seq, doing, instrument)
        seq = after_seq
        while seq < upto_seq:
            end = min(seq + chunk, upto_seq)
            events = await self._call(self._events, doing, instrument, seq, end)
            seq = end
            if events:
                yield events

    def _max_seq(self, instrument: str) -> int:
        row = self._db().execute("SELECT max(seq) FROM order_events WHERE instrument = ?", (instrument,)).fetchone()
        return int(row[0] or 0)

    def _events(self, instrument: str, after: int, upto: int) -> list[Event]:
        # seqs are dense, so a seq range bounds each query's work
        rows = self._db().execute("SELECT payload FROM order_events WHERE instrument = ? AND seq > ? AND seq <= ? "
                                  "ORDER BY seq", (instrument, after, upto)).fetchall()
        return _decode_events(b"[" + b",".join([r[0] for r in rows]) + b"]") if rows else []

    # ------------------------------------------------------------- input ledger (see journal.InputLedger)

    async def input_offsets(self, topic: str) -> dict[tuple[str, int], int]:
        """The stored last offsets of ``topic`` per (instrument, partition); instrument "" is the partition's own."""
        return await self._call(self._input_offsets, "reading the input offsets", topic)

    def _input_offsets(self, topic: str) -> dict[tuple[str, int], int]:
        rows = self._db().execute("SELECT instrument, partition, last_offset FROM input_offsets WHERE topic = ?",
                                  (topic,)).fetchall()
        return {(r[0], int(r[1])): int(r[2]) for r in rows}

    async def request_input_reset(self, topic: str, partition: int, offset: int, operator: str,
                                  reason: str) -> InputReset:
        return await self._call(self._request_reset, "recording an input reset", topic, partition, offset,
                                operator, reason)

    def _request_reset(self, topic: str, partition: int, offset: int, operator: str, reason: str) -> InputReset:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute("INSERT INTO input_resets (topic, partition, to_offset, operator, reason) "
                               "VALUES (?, ?, ?, ?, ?)", (topic, partition, offset, operator, reason))
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise
        return InputReset(int(cur.lastrowid or 0), topic, partition, offset, operator, reason)

    async def input_resets(self, topic: str, *, pending: bool = True) -> list[InputReset]:
        return await self._call(self._resets, "reading the input resets", topic, pending)

    def _resets(self, topic: str, pending: bool) -> list[InputReset]:
        rows = self._db().execute(
            "SELECT id, topic, partition, to_offset, operator, reason, status, note FROM input_resets "
            "WHERE topic = ? AND (? = 0 OR status = 'requested') ORDER BY id", (topic, int(pending))).fetchall()
        return [InputReset(int(r[0]), r[1], int(r[2]), int(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    async def apply_input_reset(self, reset: InputReset, note: str) -> None:
        await self._call(self._decide_reset, "applying an input reset", reset, "applied", note)

    async def refuse_input_reset(self, reset: InputReset, note: str) -> None:
        await self._call(self._decide_reset, "refusing an input reset", reset, "refused", note)

    def _decide_reset(self, reset: InputReset, status: str, note: str) -> None:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if status == "applied":
                conn.execute("UPDATE input_offsets SET last_offset = ? WHERE topic = ? AND partition = ?",
                             (reset.offset - 1, reset.topic, reset.partition))
                conn.execute("INSERT INTO input_offsets (instrument, topic, partition, last_offset) VALUES "
                             "('', ?, ?, ?) ON CONFLICT (instrument, topic, partition) DO NOTHING",
                             (reset.topic, reset.partition, reset.offset - 1))
            conn.execute("UPDATE input_resets SET status = ?, note = ?, "
                         "decided_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ? AND status = 'requested'",
                         (status, note, reset.id))
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise
