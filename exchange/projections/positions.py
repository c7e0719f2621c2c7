"""Client positions from fills: average-cost method, integers only, no I/O.

A :class:`~exchange.ports.Position` holds ``net_lots`` (signed: long > 0),
``cost`` (signed cost of the open quantity in tick*lot units: ``price_ticks *
lots`` summed, negative for a short) and ``realized`` (realized P&L in the same
units). Rules of :func:`apply_fill`:

- a fill that adds to the position (or opens one) adds ``price * lots`` to the
  signed cost;
- a fill that reduces it closes ``closed = min(lots, abs(net))`` lots; the cost
  removed is ``cost * closed // abs(net)`` (floor division, so the result is
  deterministic and a full close removes exactly all of the cost) and the
  realized P&L grows by the closing value minus that cost;
- a fill that crosses through zero closes the whole position and opens the rest
  at the fill price.

Every fill updates two positions, the maker's (opposite the aggressor side)
and the taker's (the aggressor side); a self-trade updates one client twice.
:func:`apply_fills` folds a stream of events into positions that way: it is
what the journal's commits do to the ``positions`` table, and what
``exchange recover --verify`` checks that table against.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping

from exchange.core.events import Event, OrderFilled
from exchange.core.types import Side
from exchange.ports import Position

__all__ = ["apply_fill", "apply_fills"]

_BUY = Side.BUY
_SELL = Side.SELL
_FLAT = Position(0, 0, 0)


def apply_fill(position: Position, side: Side, price_ticks: int, lots: int) -> Position:
    """The position after the client bought (``side`` buy) or sold ``lots`` at ``price_ticks``."""
    signed = lots if side is _BUY or side == "buy" else -lots
    net = position.net_lots
    if net == 0 or (net > 0) is (signed > 0):
        return Position(net + signed, position.cost + price_ticks * signed, position.realized)
    size = net if net > 0 else -net
    cost = position.cost
    closed = lots if lots < size else size
    removed = cost * closed // size
    # closing value: a long sells ``closed`` lots at ``price``, a short buys them back
    value = price_ticks * closed if net > 0 else -price_ticks * closed
    realized = position.realized + value - removed
    if lots <= size:
        return Position(net + signed, cost - removed, realized)
    rest = signed + (size if signed < 0 else -size)  # the part that opens the other way
    return Position(rest, price_ticks * rest, realized)


def apply_fills(positions: MutableMapping[str, Position], events: Iterable[Event]) -> None:
    """Fold the fills among ``events`` into ``positions`` (client -> position): the maker first, then the taker."""
    for ev in events:
        if type(ev) is OrderFilled:
            taker_side = ev.aggressor_side
            maker_side = _SELL if taker_side is _BUY or taker_side == "buy" else _BUY
            price, lots = ev.price_ticks, ev.qty_lots
            maker, taker = ev.maker_client_id, ev.taker_client_id
            positions[maker] = apply_fill(positions.get(maker, _FLAT), maker_side, price, lots)
            positions[taker] = apply_fill(positions.get(taker, _FLAT), taker_side, price, lots)
