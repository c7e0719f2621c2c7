"""``exchange replay``: commands as JSON lines in, one JSON line of events out per line.

For every input line exactly one output line is written:

- ``{"events": [...]}`` — the events the command caused (possibly none);
- ``{"snapshot": {...}}`` — the answer to the control line ``{"op": "snapshot"}``:
  every book's levels in priority order with their orders in FIFO order (an iceberg with its
  ``display`` and ``hidden`` quantities: this is the operator's view, not market data), the
  waiting stops when there are any and, on an instrument that keeps balances, every client's
  balances and the fees the venue has taken;
- ``{"error": {...}}`` — the line could not be understood (``reason`` says why, as the daemon's
  dead-letter reason would); the tool goes on. Nothing on a line makes the tool stop: the edge it
  shares with the daemon (:mod:`exchange.pipeline.router`) turns whatever goes wrong into an answer.

Operator actions are the operator's own input here and are applied unsigned, unless
``--verify-signatures``: then they are checked as the daemon checks them (:mod:`exchange.wire.auth`),
so a topic dumped to a file replays to the daemon's own events.

Output is flushed after every line unless the input is a regular file, so
another program can drive the tool interactively through pipes.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

from exchange.core.events import OrderRejected
from exchange.core.instruments import Instrument
from exchange.core.matching import Exchange, MatchingEngine
from exchange.core.types import RejectReason
from exchange.pipeline.router import DEFAULT_MAX_MESSAGE_BYTES, Refusal, Route, Router, SnapshotRequested
from exchange.wire.auth import Verifier
from exchange.wire.codec import WireError, encode, event_to_wire, message_ts_ns, parse_json

__all__ = ["book_snapshot", "bounded_lines", "replay"]


def book_snapshot(engine: MatchingEngine) -> dict[str, Any]:
    """One book as wire data: levels best first (``qty``: what shows), orders FIFO, quantities as decimals (an
    iceberg's ``remaining`` is its shown slice, with its ``display`` size and ``hidden`` rest); ``stops``, the
    waiting stops in order_id order, when there are any; with balances, every client's ``balances`` (both
    assets, decimals) and the ``fees`` account (quote asset)."""
    spec = engine.spec

    def order(o: Any) -> dict[str, Any]:
        out = {"order_id": o.order_id, "client_id": o.client_id, "client_order_id": o.client_order_id,
               "remaining": spec.lots_to_qty(o.remaining)}
        if o.display:
            out["display"], out["hidden"] = spec.lots_to_qty(o.display), spec.lots_to_qty(o.hidden)
        return out

    def side(levels: Iterable[Any]) -> list[dict[str, Any]]:
        return [
            {
                "price": spec.ticks_to_price(level.price),
                "qty": spec.lots_to_qty(level.total_lots),
                "orders": [order(o) for o in level.live_orders()],
            }
            for level in levels
        ]

    out = {
        "seq": engine.seq,
        "state_hash": engine.state_hash(),
        "bids": side(engine.book.bids.values()),
        "asks": side(engine.book.asks.values()),
    }
    stops = engine.export_state(window=False).stops
    if stops:
        out["stops"] = [
            {"order_id": o.order_id, "client_id": o.client_id, "client_order_id": o.client_order_id, "side": o.side,
             "type": o.order_type, "stop_price": spec.ticks_to_price(o.stop_price_ticks),
             "price": spec.ticks_to_price(o.price_ticks) if o.price_ticks else None,
             "qty": spec.lots_to_qty(o.qty_lots), "tif": o.tif}
            for o in stops]
    ledger = engine.ledger
    if ledger is not None:
        accounts, fees, _ = ledger.image()
        out["balances"] = [
            {"client_id": client, "asset": asset, "available": spec.units_to_amount(asset, available),
             "reserved": spec.units_to_amount(asset, reserved)}
            for client, base_available, base_reserved, quote_available, quote_reserved in accounts
            for asset, available, reserved in ((ledger.base, base_available, base_reserved),
                                               (ledger.quote, quote_available, quote_reserved))]
        out["fees"] = {"asset": ledger.quote, "amount": spec.units_to_amount(ledger.quote, fees)}
    return out


def replay(lines: Iterable[bytes], out: IO[bytes], instruments: Iterable[Instrument], *,
           flush_each: bool = True, verifier: Verifier | None = None,
           max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Exchange:
    """Apply every line to a fresh :class:`Exchange`, writing one answer line per input line.

    Operator actions are applied as they are (trusted input) unless ``verifier`` is given: then they
    are checked exactly as the daemon checks them, against each line's ``ts_ns``.
    """
    exchange = Exchange(instruments)
    specs = {symbol: engine.spec for symbol, engine in exchange.engines.items()}
    router = Router(specs, verifier=verifier, max_message_bytes=max_message_bytes, fan_out=True)
    last_ts = [0]  # a line without ts_ns takes the last one seen, so time never runs backwards
    for number, raw in enumerate(lines, 1):
        answer = _answer(raw, number, exchange, specs, router, last_ts)
        out.write(encode(answer) + b"\n")
        if flush_each:
            out.flush()
    out.flush()
    return exchange


def _answer(raw: bytes, number: int, exchange: Exchange, specs: Mapping[str, Instrument], router: Router,
            last_ts: list[int]) -> dict[str, Any]:
    """The answer to one line. The edge (parse, decode, validate, route) never raises: whatever goes
    wrong there is an ``error`` line (``internal_error`` for a bug); only the engine itself may raise."""
    line = raw.strip()
    if not line:
        return _error(Refusal(RejectReason.MALFORMED, "empty line"), number)
    route: Route
    ts_ns = last_ts[0]
    if len(line) > router.max_message_bytes:
        route = router.route(line, 0)  # the size refusal, before anything is parsed
    else:
        try:
            msg = parse_json(line)
            ts_ns = message_ts_ns(msg, last_ts[0]) if "ts_ns" in msg else last_ts[0]
        except WireError as exc:
            return _error(Refusal(exc.reason, exc.text, exc.client_id, exc.client_order_id, exc.instrument), number)
        except Exception as exc:  # the guard covers this tool's own parsing too
            return _error(Refusal(RejectReason.INTERNAL_ERROR, f"could not process this line ({type(exc).__name__})"),
                          number)
        last_ts[0] = max(last_ts[0], ts_ns)
        route = router.route_message(msg, ts_ns)
    if isinstance(route, SnapshotRequested):
        return {"snapshot": {symbol: book_snapshot(engine) for symbol, engine in sorted(exchange.engines.items())
                             if route.instrument is None or symbol == route.instrument}}
    if isinstance(route, Refusal):
        if route.reason is RejectReason.UNKNOWN_INSTRUMENT:  # as the library answers it: a rejection with seq 0
            event = OrderRejected(route.instrument or "", 0, ts_ns, route.client_id or "",
                                  route.client_order_id, None, route.command, route.reason, route.text)
            return {"events": [event_to_wire(event, None)]}
        return _error(route, number)
    events = exchange.apply(route)
    return {"events": [event_to_wire(e, specs.get(e.instrument)) for e in events]}


def _error(refusal: Refusal, number: int) -> dict[str, Any]:
    return {"error": {"reason": refusal.reason.value, "text": refusal.text, "line": number,
                      "client_id": refusal.client_id, "client_order_id": refusal.client_order_id,
                      "instrument": refusal.instrument}}


def run(path: str | None, instruments: Iterable[Instrument], *, verifier: Verifier | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> int:
    """Entry point for the CLI: replay a file (or stdin when ``path`` is None or "-")."""
    out = sys.stdout.buffer
    if path is None or path == "-":
        flush_each = not stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode)
        replay(bounded_lines(sys.stdin.buffer, max_message_bytes), out, instruments, flush_each=flush_each,
               verifier=verifier, max_message_bytes=max_message_bytes)
        return 0
    with open(path, "rb") as f:
        replay(bounded_lines(f, max_message_bytes), out, instruments, flush_each=False, verifier=verifier,
               max_message_bytes=max_message_bytes)
    return 0


def bounded_lines(stream: IO[bytes], limit: int) -> Iterator[bytes]:
    """The lines of ``stream``; one longer than ``limit`` bytes comes as its first ``limit + 1`` bytes (enough
    for the size refusal) and the rest is skipped unread into memory: no line can take more than that."""
    while True:
        line = stream.readline(limit + 2)
        if not line:
            return
        if len(line) > limit + 1 and not line.endswith(b"\n"):
            while True:  # skip to the end of this line
                rest = stream.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            line = line[: limit + 1]
        yield line
