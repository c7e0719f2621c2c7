"""What the daemon should have stored: the same input through the in-process replay path."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec

from exchange.core.events import Event
from exchange.core.instruments import Instrument
from exchange.core.matching import Exchange
from exchange.wire.codec import WireError, decode_command


def replay_messages(messages: Sequence[dict[str, Any] | bytes],
                    instruments: Sequence[Instrument]) -> tuple[Exchange, dict[str, list[Event]]]:
    """Apply wire messages as ``exchange replay`` does; events per instrument (sequenced ones only)."""
    exchange = Exchange(instruments)
    specs = {spec.symbol: spec for spec in instruments}
    out: dict[str, list[Event]] = {spec.symbol: [] for spec in instruments}
    for msg in messages:
        if isinstance(msg, bytes):
            continue
        try:
            command = decode_command(msg, specs, ts_ns=msg["ts_ns"])
        except WireError:
            continue
        for event in exchange.apply(command):
            if event.seq:
                out[event.instrument].append(event)
    return exchange, out


async def stored_progress(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT instrument, seq FROM engine_progress")
    except asyncpg.UndefinedTableError:
        return {}
    finally:
        await conn.close()
    return {r["instrument"]: r["seq"] for r in rows}


def wait_for_seq(dsn: str, expected: dict[str, int], timeout: float, check: Any = None) -> None:
    """Poll engine_progress until every instrument reached its expected seq."""
    import time

    deadline = time.monotonic() + timeout
    progress: dict[str, int] = {}
    while time.monotonic() < deadline:
        if check is not None:
            check()
        progress = asyncio.run(stored_progress(dsn))
        if all(progress.get(sym, 0) >= seq for sym, seq in expected.items()):
            return
        time.sleep(0.1)
    raise AssertionError(f"stored progress {progress} did not reach {expected} within {timeout}s")


async def stored_state(dsn: str) -> dict[str, Any]:
    """Everything comparable between two databases: events, trades, orders, positions, balances, transfers."""
    conn = await asyncpg.connect(dsn)
    try:
        events = await conn.fetch("SELECT instrument, seq, payload FROM order_events ORDER BY instrument, seq")
        trades = await conn.fetch("SELECT * FROM trades ORDER BY instrument, trade_id")
        orders = await conn.fetch("SELECT * FROM orders ORDER BY instrument, created_seq")
        positions = await conn.fetch("SELECT * FROM positions ORDER BY client_id, instrument")
        balances = await conn.fetch("SELECT * FROM balances ORDER BY instrument, client_id, asset")
        transfers = await conn.fetch("SELECT * FROM transfers ORDER BY instrument, transfer_id")
        progress = await conn.fetch("SELECT instrument, seq, next_order_id, next_trade_id FROM engine_progress "
                                    "ORDER BY instrument")
    finally:
        await conn.close()
    return {
        "events": [(r["instrument"], r["seq"], bytes(r["payload"])) for r in events],
        "trades": [dict(r) for r in trades],
        "orders": [dict(r) for r in orders],
        "positions": [dict(r) for r in positions],
        "balances": [dict(r) for r in balances],
        "transfers": [dict(r) for r in transfers],
        "progress": [tuple(r) for r in progress],
    }


def encoded(events: dict[str, list[Event]]) -> list[tuple[str, int, bytes]]:
    return [(sym, e.seq, msgspec.json.encode(e)) for sym in sorted(events) for e in events[sym]]
