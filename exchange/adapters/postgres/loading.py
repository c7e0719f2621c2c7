"""Loading at start-up: each instrument's durable state read from PostgreSQL, as functions over a connection.

:func:`_load_states` reads, inside the read-only repeatable-read transaction the store holds, each
instrument's counters, its open orders in book order (price-time priority, each with its ``rate``; an
iceberg with its slice and hidden quantity), its waiting stops and its last trade price (see
:mod:`exchange.projections.stored`), its dedupe window (:func:`_read_window`), its input offsets, its
positions and its balances and remembered transfers (:func:`_read_ledger`), and gives them as
:class:`~exchange.ports.Recovered`. The store warms
its caches from the result. Every read walks an index in its order and goes a chunk or a page at a time,
so memory stays within what is kept; a long read logs its progress once a second (on the recovery
logger: loading is part of recovery).

Functions and constants only; names with a leading underscore are the package's own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import asyncpg
import structlog

from exchange.adapters.postgres.connection import _Conn
from exchange.core.dedupe import NewestFirstWindow
from exchange.core.instruments import Instrument
from exchange.core.state import EngineState, RestingOrder, StopOrder
from exchange.core.types import Side, StpMode
from exchange.ports import Position, Recovered, StoreUnavailable
from exchange.projections.rows import Progress, RowError
from exchange.projections.stored import OPEN_ORDER_COLUMNS, STOP_COLUMNS, stored_ledger, waiting_stop

_recovery_log = structlog.get_logger("exchange.recovery")  # loading is part of recovery

_SIDES = {s.value: s for s in Side}
_STPS = {s.value: s for s in StpMode}
_LOAD_CHUNK = 50_000
_LOG_EVERY_S = 1.0

# the open orders in the book (not the waiting stops), in book order
_SQL_OPEN_ORDERS = f"""
SELECT {', '.join(OPEN_ORDER_COLUMNS)}
FROM orders
WHERE instrument = $1 AND status IN ('open', 'partially_filled') AND (stop_price_ticks = 0 OR triggered_seq <> 0)
ORDER BY side, CASE WHEN side = 'buy' THEN -price_ticks ELSE price_ticks END, priority"""
# the stop and stop-limit orders waiting for their stop price, in order_id order
_SQL_STOPS = f"""
SELECT {', '.join(STOP_COLUMNS)}
FROM orders
WHERE instrument = $1 AND status IN ('open', 'partially_filled') AND stop_price_ticks > 0 AND triggered_seq = 0
ORDER BY order_id"""
# the last trade's price (0: none yet)
_SQL_LAST_PRICE = "SELECT price_ticks FROM trades WHERE instrument = $1 ORDER BY trade_id DESC LIMIT 1"

# the dedupe window: finished orders newest first, one page below the last row read (see _read_window)
_SQL_DONE = """
SELECT client_id, client_order_id, order_id, updated_seq, priority FROM orders
WHERE instrument = $1 AND status IN ('filled', 'canceled', 'expired') AND (updated_seq, priority) < ($2, $3)
ORDER BY updated_seq DESC, priority DESC
LIMIT $4"""
_ABOVE_EVERY_ROW = 2**63 - 1  # an (updated_seq, priority) bound no row reaches: the first page

_SQL_BALANCES = "SELECT client_id, asset, available, reserved FROM balances WHERE instrument = $1"
_SQL_TRANSFERS = """
SELECT transfer_id, client_id, asset, kind, amount_units, status, outcome, seq FROM transfers WHERE instrument = $1
ORDER BY transfer_id"""


async def _load_states(conn: _Conn, instruments: Sequence[Instrument]) -> dict[str, Recovered]:
    """The durable state of each instrument (fresh when nothing is stored), read on ``conn`` inside the
    caller's read-only transaction (one snapshot for every instrument)."""
    await conn.execute("SET LOCAL work_mem = '256MB'")  # sort the open orders in memory
    return {spec.symbol: await _load_one(conn, spec) for spec in instruments}


async def _load_one(conn: _Conn, spec: Instrument) -> Recovered:
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
        orders.extend(RestingOrder(r[0], r[1], r[2], sides[r[3]], r[4], r[5], r[6], r[7], r[8], r[9], stps[r[10]],
                                   r[11], r[12], r[13]) for r in chunk)
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
    accounts, fees, transfers = await _read_ledger(conn, spec)
    stops: list[StopOrder] = [waiting_stop(r) for r in await _read_all(conn, _SQL_STOPS, symbol)]
    last_price = await conn.fetchval(_SQL_LAST_PRICE, symbol) or 0
    state = EngineState(symbol, progress.seq, progress.next_order_id, progress.next_trade_id, orders, done,
                        progress.halted, accounts=accounts, fees=fees, transfers=transfers, stops=stops,
                        last_price_ticks=last_price)
    if len(orders) >= _LOAD_CHUNK:
        _recovery_log.info("open orders loaded", instrument=symbol, orders_loaded=len(orders),
                           elapsed_s=round(time.monotonic() - started, 3))
    return Recovered(state, offsets, positions)


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


async def _read_ledger(conn: _Conn, spec: Instrument
                       ) -> tuple[list[tuple[str, int, int, int, int]], int, list[tuple[str, str]]]:
    """An instrument's stored ledger image (:func:`exchange.projections.stored.stored_ledger`): its accounts, the
    fees account and the transfers the engine remembers; nothing for an instrument that keeps no balances.
    Both go a chunk at a time (the engine holds every account and remembers every transfer, so all are kept)."""
    symbol = spec.symbol
    balances = await _read_all(conn, _SQL_BALANCES, symbol)
    transfers = await _read_all(conn, _SQL_TRANSFERS, symbol)
    try:
        return stored_ledger(spec, balances, transfers)
    except RowError as exc:
        raise StoreUnavailable(f"the stored balances cannot be loaded: {exc}. The balances table does not match "
                               "the event stream (edited by hand?); run `exchange recover --verify` and repair it "
                               "before restarting.", retriable=False) from exc


async def _read_all(conn: _Conn, sql: str, symbol: str) -> list[asyncpg.Record]:
    """Every row ``sql`` gives for ``symbol``, read through a cursor a chunk at a time."""
    rows: list[asyncpg.Record] = []
    cursor = await conn.cursor(sql, symbol)
    while True:
        chunk = await cursor.fetch(_LOAD_CHUNK)
        rows.extend(chunk)
        if len(chunk) < _LOAD_CHUNK:
            return rows
