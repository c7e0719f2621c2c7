"""The batch as ``exchange_commit_batch`` takes it: one JSON document of row arrays and where each field is.

:func:`_document` writes it (msgspec: a fraction of a microsecond per row, where asyncpg's array
parameters cost about 2 us per row of Python, an isinstance check for every element). The rows are
arrays; the document's ``fields`` says, per kind of row, at which position each field is, and the
function (migration 010) finds every field by its name there. The rows' shapes are defined in
:mod:`exchange.projections.rows`, and here for the document's own rows (progress, steps, offsets).

Functions and constants only; names with a leading underscore are the package's own.
"""

from __future__ import annotations

from typing import Any

import msgspec

from exchange.adapters.postgres.fencing import _epoch_rows
from exchange.core.instruments import Instrument
from exchange.ports import Batch
from exchange.projections.rows import (
    BALANCE_FIELDS,
    EVENT_COLUMNS,
    ORDER_COLUMNS,
    POSITION_FIELDS,
    TRADE_COLUMNS,
    TRANSFER_COLUMNS,
    UPDATE_FIELDS,
    BatchRows,
)

_encode_json = msgspec.json.Encoder().encode

_PROGRESS_FIELDS = ("instrument", "first_seq", "last_seq", "next_order_id", "next_trade_id", "halted")
# an instrument's steps, from which the server computes the decimal columns: a base amount is lots x lot, a quote
# amount units x tick x lot
_STEP_FIELDS = ("instrument", "tick", "lot", "base_asset")
_OFFSET_FIELDS = ("instrument", "topic", "partition", "last_offset")
_FIELDS = {"progress": _PROGRESS_FIELDS, "steps": _STEP_FIELDS, "events": EVENT_COLUMNS, "trades": TRADE_COLUMNS,
           "orders": ORDER_COLUMNS, "updates": UPDATE_FIELDS, "positions": POSITION_FIELDS, "offsets": _OFFSET_FIELDS,
           "balances": BALANCE_FIELDS, "transfers": TRANSFER_COLUMNS}
_FIELDS_JSON = msgspec.Raw(msgspec.json.encode(
    {kind: {name: i for i, name in enumerate(fields)} for kind, fields in _FIELDS.items()}))


def _step_row(spec: Instrument, tick: Any, lot: Any) -> tuple[str, str, str, str]:
    """An instrument's row of ``steps`` (``tick`` and ``lot`` as Decimals)."""
    return (spec.symbol, format(tick, "f"), format(lot, "f"), spec.base_asset)


def _document(rows: BatchRows, batch: Batch, steps: list[tuple[str, str, str, str]], *, copied: bool) -> str:
    """The batch as ``exchange_commit_batch`` takes it; without the rows the COPY path copies (events, trades, new
    orders, transfers) if ``copied``."""
    return _encode_json({
        "fields": _FIELDS_JSON,
        "progress": [(symbol, rows.first_seq[symbol], p.seq, p.next_order_id, p.next_trade_id, p.halted)
                     for symbol, p in sorted(rows.progress.items())],
        "steps": steps,
        "events": [] if copied else rows.events, "trades": [] if copied else rows.trades,
        "orders": [] if copied else rows.new_orders, "transfers": [] if copied else rows.transfers,
        "updates": rows.order_updates, "positions": rows.position_rows, "balances": rows.balance_rows,
        "offsets": [(*key, offset) for key, offset in sorted(rows.offsets.items())],
        **_epoch_rows(batch),
    }).decode()
