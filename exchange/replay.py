"""``exchange replay``: commands as JSON lines in, one JSON line of events out per line.

For every input line exactly one output line is written:

- ``{"events": [...]}`` — the events the command caused (possibly none);
- ``{"snapshot": {...}}`` — the answer to the control line ``{"op": "snapshot"}``:
  every book's levels in priority order with their orders in FIFO order;
- ``{"error": {...}}`` — the line could not be understood; the tool goes on.

Output is flushed after every line unless the input is a regular file, so
another program can drive the tool interactively through pipes.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable, Mapping
from typing import IO, Any

from exchange.codec import WireError, decode_command, encode, event_to_wire, parse_json
from exchange.instruments import Instrument
from exchange.matching import Exchange, MatchingEngine

__all__ = ["book_snapshot", "replay"]


def book_snapshot(engine: MatchingEngine) -> dict[str, Any]:
    """One book as wire data: levels best first, orders FIFO, quantities as decimals."""
    spec = engine.spec

    def side(levels: Iterable[Any]) -> list[dict[str, Any]]:
        return [
            {
                "price": spec.ticks_to_price(level.price),
                "qty": spec.lots_to_qty(level.total_lots),
                "orders": [
                    {"order_id": o.order_id, "client_id": o.client_id, "client_order_id": o.client_order_id,
                     "remaining": spec.lots_to_qty(o.remaining)}
                    for o in level.live_orders()
                ],
            }
            for level in levels
        ]

    return {
        "seq": engine.seq,
        "state_hash": engine.state_hash(),
        "bids": side(engine.book.bids.values()),
        "asks": side(engine.book.asks.values()),
    }


def _answer(msg: dict[str, Any], exchange: Exchange, specs: Mapping[str, Instrument], ts_ns: int) -> dict[str, Any]:
    if msg.get("op") == "snapshot":
        wanted = msg.get("instrument")
        return {"snapshot": {symbol: book_snapshot(engine) for symbol, engine in sorted(exchange.engines.items())
                             if wanted is None or symbol == wanted}}
    events = exchange.apply(decode_command(msg, specs, None if "ts_ns" in msg else ts_ns))
    return {"events": [event_to_wire(e, specs.get(e.instrument)) for e in events]}


def replay(lines: Iterable[bytes], out: IO[bytes], instruments: Iterable[Instrument], *,
           flush_each: bool = True) -> Exchange:
    """Apply every line to a fresh :class:`Exchange`, writing one answer line per input line."""
    exchange = Exchange(instruments)
    specs = {symbol: engine.spec for symbol, engine in exchange.engines.items()}
    ts_ns = 0  # a line without ts_ns takes the last one seen, so time never runs backwards
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        try:
            if not line:
                raise WireError("empty line")
            msg = parse_json(line)
            if isinstance(msg.get("ts_ns"), int) and not isinstance(msg["ts_ns"], bool):
                ts_ns = max(ts_ns, msg["ts_ns"])
            answer = _answer(msg, exchange, specs, ts_ns)
        except WireError as exc:
            answer = {"error": {**exc.to_wire(), "line": number}}
        out.write(encode(answer) + b"\n")
        if flush_each:
            out.flush()
    out.flush()
    return exchange


def run(path: str | None, instruments: Iterable[Instrument]) -> int:
    """Entry point for the CLI: replay a file (or stdin when ``path`` is None or "-")."""
    out = sys.stdout.buffer
    if path is None or path == "-":
        flush_each = not stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode)
        replay(sys.stdin.buffer, out, instruments, flush_each=flush_each)
        return 0
    with open(path, "rb") as f:
        replay(f, out, instruments, flush_each=False)
    return 0
