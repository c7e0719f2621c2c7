"""The store's side of the rows, pure: whether a batch continues what is stored, and the image stored rows make.

:func:`acceptable`, :func:`already_durable` and :func:`same_as_stored` decide, inside a commit, whether a batch
(its rows from :func:`exchange.projections.rows.derive_rows`) may be written, is already durable, or must be
refused for good. Loading goes the other way, from the rows of an instrument to its
:class:`~exchange.core.state.EngineState`:

- the open orders in the book are the ``orders`` rows :data:`OPEN_ORDER_COLUMNS` names, in book order, each
  a :class:`~exchange.core.state.RestingOrder` field for field (an iceberg's ``remaining_lots`` is the slice
  it shows, ``hidden_lots`` the rest);
- the waiting stops are the open rows of stop and stop-limit orders not triggered yet
  (``stop_price_ticks`` > 0, ``triggered_seq`` 0), :data:`STOP_COLUMNS` of them in order_id order, each a
  :class:`~exchange.core.state.StopOrder` (:func:`waiting_stop`); a triggered stop-limit that rests is an
  open order like any other;
- the last trade price (``EngineState.last_price_ticks``, which decides whether a stop triggers on arrival)
  is the price of the instrument's last row in ``trades`` (highest ``trade_id``): that is by definition the
  engine's (the price of its last fill), written by the same commit as the fill, so it needs no column of its
  own that could drift from it, and the trades' primary key finds it in one index probe; 0 when there is
  none, as for an engine that never traded;
- the ledger (:func:`stored_ledger`) from the ``balances`` and ``transfers`` rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from exchange.core.balances import FEES_ACCOUNT, refused
from exchange.core.instruments import Instrument
from exchange.core.state import StopOrder
from exchange.core.types import OrderType, RejectReason, Side, StpMode, TimeInForce
from exchange.ports import Batch, StoreUnavailable
from exchange.projections.rows import EVENT_COLUMNS, BatchRows, Progress, RowError, transfer_outcome

__all__ = ["OPEN_ORDER_COLUMNS", "STOP_COLUMNS", "acceptable", "already_durable", "same_as_stored", "stored_ledger",
           "waiting_stop"]

# what loading reads of an open order in the book, in RestingOrder's field order (side and stp as text; post_only
# may be an int), and of a waiting stop, in StopOrder's (funds may be a Decimal or text: NUMERIC)
OPEN_ORDER_COLUMNS = ("order_id", "client_id", "client_order_id", "side", "price_ticks", "qty_lots", "remaining_lots",
                      "priority", "expire_ns", "post_only", "stp", "rate", "display_lots", "hidden_lots")
STOP_COLUMNS = ("order_id", "client_id", "client_order_id", "side", "order_type", "stop_price_ticks", "price_ticks",
                "qty_lots", "priority", "tif", "expire_ns", "stp", "rate", "funds")

_EV_INSTRUMENT, _EV_PAYLOAD = EVENT_COLUMNS.index("instrument"), EVENT_COLUMNS.index("payload")
_INSUFFICIENT_FUNDS = RejectReason.INSUFFICIENT_FUNDS


class _Row(Protocol):
    """A row as a driver gives it (a tuple, an ``asyncpg.Record``): its columns by position."""

    def __getitem__(self, index: int, /) -> Any: ...


def waiting_stop(r: _Row) -> StopOrder:
    """A stored row of :data:`STOP_COLUMNS` as the waiting stop it stands for."""
    return StopOrder(r[0], r[1], r[2], Side(r[3]), OrderType(r[4]), r[5], r[6], r[7], r[8], TimeInForce(r[9]), r[10],
                     StpMode(r[11]), r[12], int(r[13]))


def stored_ledger(spec: Instrument, balances: Iterable[Any], transfers: Iterable[Any]
                  ) -> tuple[list[tuple[str, int, int, int, int]], int, list[tuple[str, str]]]:
    """The ledger image (:class:`~exchange.core.state.EngineState`'s ``accounts``, ``fees``, ``transfers``) that
    stored rows make: ``balances`` rows ``(client_id, asset, available, reserved)`` and ``transfers`` rows
    ``(transfer_id, client_id, asset, kind, amount_units, status, outcome, seq)``.

    Accounts that hold nothing are left out, as the engine leaves them out; the fees account (client ``""``,
    the quote asset) gives ``fees``. A transfer is remembered with its stored outcome; when the row's other
    columns do not say the same (an applied one's client, asset, amount and seq; a refused one's seq), what
    they say is appended to it, so that the image differs from the events' and recovery names the transfer.
    Raises :class:`RowError` for a balance the engine cannot hold (another asset, a reserved fee).
    """
    base, quote = spec.base_asset, spec.quote_asset
    accounts: dict[str, list[int]] = {}
    fees = 0
    for client, asset, available, reserved in balances:
        available, reserved = int(available), int(reserved)
        if client == FEES_ACCOUNT:
            if asset != quote or reserved:
                raise RowError(f"{spec.symbol}: the fees account holds {reserved} {asset} reserved, {available} "
                               f"available; it holds only {quote}, never reserved")
            fees = available
        elif asset in (base, quote):
            account = accounts.setdefault(client, [0, 0, 0, 0])
            i = 0 if asset == base else 2
            account[i], account[i + 1] = available, reserved
        else:
            raise RowError(f"{spec.symbol}: client {client!r} holds {asset!r}, which is neither {base} nor {quote}")
    remembered: list[tuple[str, str]] = []
    for transfer_id, client, asset, kind, units, status, outcome, seq in transfers:
        if status == "applied":
            says = transfer_outcome(spec, kind, asset, int(units), client, seq) if asset and units is not None \
                else f"{kind} without an asset or amount"
            agrees = outcome == says
        else:
            says = refused(seq, _INSUFFICIENT_FUNDS.value, "")[:-1]  # "refused at seq N: insufficient_funds ("
            agrees = outcome.startswith(says) and outcome.endswith(")")
        remembered.append((transfer_id, outcome if agrees else f"{outcome} [the row says: {says}]"))
    image = [(c, a[0], a[1], a[2], a[3]) for c, a in sorted(accounts.items()) if any(a)]
    return image, fees, sorted(remembered)


def already_durable(rows: BatchRows, stored: Mapping[str, Progress]) -> bool:
    """Does the batch continue the stored sequence (False), or is it stored already (True)?

    ``stored`` is each instrument's progress as read inside the committing
    transaction. Every instrument of the batch must either start right after its
    stored seq (the batch is new) or be stored up to the batch's end (an earlier
    attempt committed but its acknowledgement was lost). Anything else -- a gap,
    an overlap, or a batch that is half new and half stored -- means two writers
    or a bad replay: :class:`StoreUnavailable` that must not be retried.
    """
    durable, fresh, bad = [], [], []
    for symbol, first in rows.first_seq.items():
        seq = stored[symbol].seq if symbol in stored else 0
        if seq == first - 1:
            fresh.append(symbol)
        elif seq >= rows.progress[symbol].seq:
            durable.append(symbol)
        else:
            bad.append(f"{symbol}: stored seq {seq}, batch starts at {first}")
    if bad or (durable and fresh):
        detail = "; ".join(bad) if bad else (
            f"{', '.join(durable)} already stored but {', '.join(fresh)} not")
        raise StoreUnavailable(
            f"batch does not continue the stored sequence ({detail}). Another engine may be writing "
            "these instruments, or the loop did not start from the stored state; stop the daemon and "
            "compare engine_progress with the loops' seq (`exchange recover --verify`).", retriable=False)
    return bool(durable)


def acceptable(batch: Batch, specs: Mapping[str, Instrument]) -> None:
    """Refuse for good (:class:`StoreUnavailable`) a batch of an instrument this store does not know, or one that
    would write something without an ownership epoch to fence it by: an instrument (records or snapshots) missing
    from ``batch.epochs``, a partition row missing from ``batch.partition_epochs``."""
    instruments = {item.instrument for item in batch.applied} | {snap.instrument for snap in batch.snapshots}
    unknown = sorted(instruments - specs.keys())
    if unknown:
        raise StoreUnavailable(f"batch refused: instrument {', '.join(map(repr, unknown))} is not configured in this "
                               "store", retriable=False)
    missing = sorted(instruments - batch.epochs.keys())
    missing += [f"{topic}[{partition}]" for topic, partition in sorted(batch.partitions.keys()
                                                                        - batch.partition_epochs.keys())]
    if missing:
        raise StoreUnavailable(f"batch refused: it carries no ownership epoch for {', '.join(missing)}; every batch "
                               "is prepared under the epochs its writer took (Store.take)", retriable=False)


def same_as_stored(rows: BatchRows, stored: Mapping[str, Sequence[bytes]]) -> None:
    """For a batch found already durable: refuse it for good (:class:`StoreUnavailable`) unless the stored events
    in its seq range are its own, byte for byte (``stored``: per instrument, the payloads of those seqs in order).
    A lost acknowledgement is recognised by content, so a different batch for the same seqs -- another writer's,
    or an engine that did not start from the stored state -- is never answered "already durable"."""
    mine: dict[str, list[bytes]] = {}
    for row in rows.events:
        mine.setdefault(row[_EV_INSTRUMENT], []).append(bytes(row[_EV_PAYLOAD]))
    differ = sorted(symbol for symbol, payloads in mine.items()
                    if list(map(bytes, stored.get(symbol, ()))) != payloads)
    if differ:
        raise StoreUnavailable(
            f"batch refused: the seqs it holds of {', '.join(differ)} are stored already, with other events: another "
            "writer committed them, or this engine did not start from the stored state. Stop the daemon and run "
            "`exchange recover --verify`.", retriable=False)
