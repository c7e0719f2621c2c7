"""The store's guards against another writer: ownership epochs, and a lost acknowledgement recognised by content.

Migration 008 keeps an epoch per instrument (``instrument_owners``) and per orders partition
(``partition_owners``). :func:`_take` bumps them -- the rows locked in one sorted order, waiting for a
commit under the old epochs to end, at most ``lock_timeout`` -- and :func:`_stored_epochs` reads them
(the ownership lease's check). A batch carries its epochs into ``exchange_fence`` and
``exchange_commit_batch`` as :func:`_epoch_rows` gives them; a ``{"fenced": ...}`` answer becomes the
:class:`~exchange.ports.Fenced` the journal writer handles (:func:`_fenced`).

A batch the sequence check finds stored already (its acknowledgement was lost) is acknowledged only
if its events are the stored ones byte for byte (:func:`_same_as_stored`): another writer's batch for
the same seqs is refused, never taken for this one.

Functions and constants only; names with a leading underscore are the package's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from exchange.adapters.postgres.connection import _Conn
from exchange.ports import Batch, Epochs, Fenced
from exchange.projections.rows import BatchRows
from exchange.projections.stored import same_as_stored

# Taking ownership: a new epoch per instrument and partition. The rows are locked in one (sorted) order; a commit
# under the old epoch holds them FOR SHARE, so a take waits for it to end -- at most lock_timeout here, then the
# take fails retriably (a writer frozen inside a transaction is ended by the server after
# idle_in_transaction_session_timeout, see connection.py).
_SQL_TAKE_INSTRUMENTS = """
INSERT INTO instrument_owners (instrument, epoch, owner) SELECT i, 1, $2 FROM unnest($1::text[]) AS i ORDER BY i
ON CONFLICT (instrument) DO UPDATE SET epoch = instrument_owners.epoch + 1, owner = EXCLUDED.owner, taken_at = now()
RETURNING instrument, epoch"""
_SQL_TAKE_PARTITIONS = """
INSERT INTO partition_owners (topic, partition, epoch, owner)
SELECT t, p, 1, $3 FROM unnest($1::text[], $2::integer[]) AS x(t, p) ORDER BY t, p
ON CONFLICT (topic, partition) DO UPDATE SET epoch = partition_owners.epoch + 1, owner = EXCLUDED.owner,
    taken_at = now()
RETURNING topic, partition, epoch"""
_TAKE_LOCK_TIMEOUT = "2s"
_SQL_STORED_PAYLOADS = """
SELECT payload FROM order_events WHERE instrument = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq"""


async def _take(conn: _Conn, instruments: Sequence[str], partitions: Sequence[tuple[str, int]], owner: str) -> Epochs:
    """Inside the caller's transaction: the new epochs of ``instruments`` and ``partitions``."""
    names = sorted(set(instruments))
    parts = sorted(set(partitions))
    await conn.execute(f"SET LOCAL lock_timeout = '{_TAKE_LOCK_TIMEOUT}'")
    taken = {r["instrument"]: r["epoch"] for r in await conn.fetch(_SQL_TAKE_INSTRUMENTS, names, owner)}
    taken_parts = {(r["topic"], r["partition"]): r["epoch"] for r in await conn.fetch(
        _SQL_TAKE_PARTITIONS, [t for t, _ in parts], [p for _, p in parts], owner)} if parts else {}
    return Epochs(taken, taken_parts)


async def _stored_epochs(conn: _Conn, instruments: Sequence[str], partitions: Sequence[tuple[str, int]],
                         command_timeout: float) -> Epochs:
    """The stored epochs of ``instruments`` and ``partitions`` (0: never taken)."""
    names = sorted(set(instruments))
    parts = sorted(set(partitions))
    rows = await conn.fetch("SELECT instrument, epoch FROM instrument_owners WHERE instrument = ANY($1)", names,
                            timeout=command_timeout)
    part_rows = await conn.fetch(
        "SELECT topic, partition, epoch FROM partition_owners WHERE (topic, partition) IN "
        "(SELECT * FROM unnest($1::text[], $2::integer[]))", [t for t, _ in parts], [p for _, p in parts],
        timeout=command_timeout) if parts else []
    found = {r["instrument"]: r["epoch"] for r in rows}
    found_parts = {(r["topic"], r["partition"]): r["epoch"] for r in part_rows}
    return Epochs({n: found.get(n, 0) for n in names}, {p: found_parts.get(p, 0) for p in parts})


def _epoch_rows(batch: Batch) -> dict[str, list[tuple[Any, ...]]]:
    """The batch's epochs as exchange_fence and exchange_commit_batch take them, sorted (the lock order)."""
    return {"epochs": sorted(batch.epochs.items()),
            "partition_epochs": [(topic, partition, epoch)
                                 for (topic, partition), epoch in sorted(batch.partition_epochs.items())]}


def _fenced(answer: str) -> Fenced:
    """The function's ``{"fenced": ...}`` answer as the exception the writer handles."""
    fenced = msgspec.json.decode(answer, type=dict[str, Any])["fenced"]
    return Fenced(Epochs(dict(fenced["instruments"]),
                         {(topic, partition): epoch for topic, partition, epoch in fenced["partitions"]}))


async def _same_as_stored(conn: _Conn, rows: BatchRows) -> None:
    """A batch found already durable must be the very batch stored
    (:func:`~exchange.projections.stored.same_as_stored`): its stored events are read back for the comparison."""
    same_as_stored(rows, {symbol: [r[0] for r in await conn.fetch(_SQL_STORED_PAYLOADS, symbol, first,
                                                                  rows.progress[symbol].seq)]
                          for symbol, first in rows.first_seq.items()})
