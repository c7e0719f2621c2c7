"""Loading at start-up: each instrument's durable state read from the SQLite file, as functions over a connection.

:func:`_load_states` reads, in one read transaction (one snapshot for every instrument; in WAL mode
the writer is not blocked), each instrument's counters, its open orders in book order (price-time
priority, each with its ``rate``; an iceberg with its slice and hidden quantity), its waiting stops and
its last trade price (see :mod:`exchange.projections.stored`), its dedupe window (:func:`_read_window`),
its input offsets, its positions (:func:`_read_positions`, which a commit also uses for an instrument it
has not loaded) and its balances and remembered transfers (:func:`.ledger._read_ledger`), and gives
them as :class:`~exchange.ports.Recovered`. The store warms its caches from the result. Reads go a
chunk at a time, so memory stays within what is kept; a long read logs its progress once a second
(on the recovery logger: loading is part of recovery).

Functions and constants only (the connection belongs to the store, and these run on its thread);
names with a leading underscore are the package's own.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

import structlog

from exchange.adapters.sqlite.ledger import _read_ledger
from exchange.core.dedupe import NewestFirstWindow
from exchange.core.instruments import Instrument
from exchange.core.state import EngineState, RestingOrder
from exchange.core.types import Side, StpMode
from exchange.ports import Position, Recovered
from exchange.projections.rows import Progress
from exchange.projections.stored import OPEN_ORDER_COLUMNS, STOP_COLUMNS, waiting_stop

_recovery_log = structlog.get_logger("exchange.recovery")

_SIDES = {s.value: s for s in Side}
_STPS = {s.value: s for s in StpMode}
_LOAD_CHUNK = 50_000
_LOG_EVERY_S = 1.0

# the open orders in the book (not the waiting stops), in book order
_SQL_OPEN_ORDERS = f"""
SELECT {', '.join(OPEN_ORDER_COLUMNS)}
FROM orders
WHERE instrument = ? AND status IN ('open', 'partially_filled') AND (stop_price_ticks = 0 OR triggered_seq <> 0)
ORDER BY side, CASE WHEN side = 'buy' THEN -price_ticks ELSE price_ticks END, priority"""
# the stop and stop-limit orders waiting for their stop price, in order_id order
_SQL_STOPS = f"""
SELECT {', '.join(STOP_COLUMNS)}
FROM orders
WHERE instrument = ? AND status IN ('open', 'partially_filled') AND stop_price_ticks > 0 AND triggered_seq = 0
ORDER BY order_id"""
# the last trade's price (none: 0)
_SQL_LAST_PRICE = "SELECT price_ticks FROM trades WHERE instrument = ? ORDER BY trade_id DESC LIMIT 1"

# the dedupe window: finished orders newest first, walking orders_finished_idx backwards (see _read_window)
_SQL_DONE = """
SELECT client_id, client_order_id, order_id FROM orders
WHERE instrument = ? AND status IN ('filled', 'canceled', 'expired')
ORDER BY updated_seq DESC, priority DESC"""


def _load_states(conn: sqlite3.Connection, instruments: Sequence[Instrument]) -> dict[str, Recovered]:
    """The durable state of each instrument (fresh when nothing is stored), in one read transaction."""
    out: dict[str, Recovered] = {}
    conn.execute("BEGIN")  # one read snapshot for every instrument (WAL: the writer is not blocked)
    try:
        for spec in instruments:
            out[spec.symbol] = _load_one(conn, spec)
    finally:
        conn.rollback()
    return out


def _load_one(conn: sqlite3.Connection, spec: Instrument) -> Recovered:
    symbol = spec.symbol
    started = logged = time.monotonic()
    row = conn.execute("SELECT seq, next_order_id, next_trade_id, halted FROM engine_progress "
                       "WHERE instrument = ?", (symbol,)).fetchone()
    progress = Progress(row[0], row[1], row[2], bool(row[3])) if row else Progress()
    orders: list[RestingOrder] = []
    sides, stps = _SIDES, _STPS
    cursor = conn.execute(_SQL_OPEN_ORDERS, (symbol,))
    while chunk := cursor.fetchmany(_LOAD_CHUNK):
        orders.extend(RestingOrder(r[0], r[1], r[2], sides[r[3]], r[4], r[5], r[6], r[7], r[8], bool(r[9]),
                                   stps[r[10]], r[11], r[12], r[13]) for r in chunk)
        now = time.monotonic()
        if now - logged >= _LOG_EVERY_S:
            logged = now
            _recovery_log.info("loading open orders", instrument=symbol, orders_loaded=len(orders),
                               elapsed_s=round(now - started, 3))
    done: list[tuple[str, str, int]] = []
    if spec.dedupe_window:
        done = _read_window(conn, spec)
    offsets = {(r[0], r[1]): r[2] for r in conn.execute(
        "SELECT topic, partition, last_offset FROM input_offsets WHERE instrument = ?", (symbol,))}
    positions = _read_positions(conn, symbol)
    accounts, fees, transfers = _read_ledger(conn, spec)
    stops = [waiting_stop(r) for r in conn.execute(_SQL_STOPS, (symbol,))]
    last = conn.execute(_SQL_LAST_PRICE, (symbol,)).fetchone()
    state = EngineState(symbol, progress.seq, progress.next_order_id, progress.next_trade_id, orders, done,
                        progress.halted, accounts=accounts, fees=fees, transfers=transfers, stops=stops,
                        last_price_ticks=last[0] if last else 0)
    return Recovered(state, offsets, positions)


def _read_window(conn: sqlite3.Connection, spec: Instrument) -> list[tuple[str, str, int]]:
    """An instrument's dedupe window from its finished orders, read newest first (:class:`NewestFirstWindow`).

    The cursor steps through ``orders_finished_idx`` backwards, a chunk at a time, and is closed once the
    window is full, which may take more than ``dedupe_window`` rows, up to every finished order of the
    instrument, when a few clients finished most of them: their rows beyond their ``dedupe_per_client``
    newest are read and skipped. Memory stays within the window and a chunk. A long read logs its progress
    once a second.
    """
    window = NewestFirstWindow(spec.dedupe_window, spec.dedupe_per_client)
    started = logged = time.monotonic()
    cursor = conn.execute(_SQL_DONE, (spec.symbol,))
    try:
        while rows := cursor.fetchmany(_LOAD_CHUNK):
            full = False
            for r in rows:
                if not window.add(r[0], r[1], r[2]):
                    full = True
                    break
            if full:
                break
            now = time.monotonic()
            if now - logged >= _LOG_EVERY_S:
                logged = now
                _recovery_log.info("loading the dedupe window", instrument=spec.symbol, rows_read=window.rows,
                                   remembered=len(window), elapsed_s=round(now - started, 3))
    finally:
        cursor.close()
    if window.rows >= _LOAD_CHUNK:
        _recovery_log.info("dedupe window loaded", instrument=spec.symbol, rows_read=window.rows,
                           remembered=len(window), elapsed_s=round(time.monotonic() - started, 3))
    return window.entries()


def _read_positions(conn: sqlite3.Connection, symbol: str) -> dict[str, Position]:
    return {r[0]: Position(int(r[1]), int(r[2]), int(r[3])) for r in conn.execute(
        "SELECT client_id, net_lots, cost, realized FROM positions WHERE instrument = ?", (symbol,))}
