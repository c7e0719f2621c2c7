"""Balances and transfers in the SQLite file: what a commit writes of them, and what loading reads back.

:func:`_write_ledger` writes a batch's ``balances`` rows (upserted: the last value per instrument, client and
asset) and ``transfers`` rows (inserted) inside the commit's transaction; :func:`_read_ledger` gives an
instrument's ledger image (accounts, fees, remembered transfers) for its loaded
:class:`~exchange.core.state.EngineState` (:func:`exchange.projections.stored.stored_ledger`). The integers are
TEXT (they may outgrow 64 bits), the decimal columns exact strings (:mod:`.decimals`).

Functions and constants only (the connection belongs to the store, and these run on its thread); names with a
leading underscore are the package's own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from exchange.adapters.sqlite.decimals import _TextScale
from exchange.core.instruments import Instrument
from exchange.ports import StoreUnavailable
from exchange.projections.rows import BALANCE_FIELDS, TRANSFER_COLUMNS, BatchRows, RowError
from exchange.projections.stored import stored_ledger


def _numbered(fields: tuple[str, ...]) -> dict[str, str]:
    return {name: f"?{i}" for i, name in enumerate(fields, 1)}


# a row of BALANCE_FIELDS with the integers as text, then the decimal columns
_B = _numbered((*BALANCE_FIELDS, "available_amount", "reserved_amount"))
_SQL_BALANCE_UPSERT = f"""
INSERT INTO balances (instrument, client_id, asset, available, reserved, available_amount, reserved_amount,
                      updated_seq)
VALUES ({_B["instrument"]}, {_B["client_id"]}, {_B["asset"]}, {_B["available"]}, {_B["reserved"]},
        {_B["available_amount"]}, {_B["reserved_amount"]}, {_B["updated_seq"]})
ON CONFLICT (instrument, client_id, asset) DO UPDATE SET
    available = excluded.available, reserved = excluded.reserved, available_amount = excluded.available_amount,
    reserved_amount = excluded.reserved_amount, updated_seq = excluded.updated_seq"""
_B_INSTRUMENT, _B_ASSET, _B_AVAILABLE, _B_RESERVED = map(BALANCE_FIELDS.index,
                                                         ("instrument", "asset", "available", "reserved"))

_SQL_TRANSFER_INSERT = (f"INSERT INTO transfers ({', '.join(TRANSFER_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(TRANSFER_COLUMNS))})")
_T_UNITS = TRANSFER_COLUMNS.index("amount_units")

_SQL_BALANCES = "SELECT client_id, asset, available, reserved FROM balances WHERE instrument = ?"
_SQL_TRANSFERS = """
SELECT transfer_id, client_id, asset, kind, amount_units, status, outcome, seq FROM transfers WHERE instrument = ?
ORDER BY transfer_id"""


def _write_ledger(conn: sqlite3.Connection, rows: BatchRows, scales: Mapping[str, _TextScale]) -> None:
    """The batch's balances and transfers, inside the open transaction."""
    if rows.balance_rows:
        params = []
        for b in rows.balance_rows:
            scale, asset = scales[b[_B_INSTRUMENT]], b[_B_ASSET]
            row = list(b)
            row[_B_AVAILABLE], row[_B_RESERVED] = str(b[_B_AVAILABLE]), str(b[_B_RESERVED])
            params.append((*row, scale.amount(asset, b[_B_AVAILABLE]), scale.amount(asset, b[_B_RESERVED])))
        conn.executemany(_SQL_BALANCE_UPSERT, params)
    if rows.transfers:
        transfers = []
        for t in rows.transfers:
            row = list(t)
            if t[_T_UNITS] is not None:
                row[_T_UNITS] = str(t[_T_UNITS])
            transfers.append(row)
        conn.executemany(_SQL_TRANSFER_INSERT, transfers)


def _read_ledger(conn: sqlite3.Connection, spec: Instrument
                 ) -> tuple[list[tuple[str, int, int, int, int]], int, list[tuple[str, str]]]:
    """An instrument's stored ledger image, read inside the caller's read transaction (nothing without
    balances: an instrument that keeps none has no rows)."""
    symbol = spec.symbol
    try:
        return stored_ledger(spec, conn.execute(_SQL_BALANCES, (symbol,)), conn.execute(_SQL_TRANSFERS, (symbol,)))
    except RowError as exc:
        raise StoreUnavailable(f"the stored balances cannot be loaded: {exc}. The balances table does not match "
                               "the event stream (edited by hand?); run `exchange recover --verify` and repair it "
                               "before restarting.", retriable=False) from exc
