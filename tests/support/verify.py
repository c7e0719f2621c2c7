"""``recovery.verify.verify_store`` on a PostgreSQL database given by its DSN (what the tests check with)."""

from __future__ import annotations

from collections.abc import Sequence

from exchange.adapters.postgres import PostgresStore
from exchange.core.instruments import Instrument
from exchange.ports import StoreUnavailable
from recovery.verify import VerifyReport, unreadable, verify_store


async def verify(dsn: str, instruments: Sequence[Instrument]) -> VerifyReport:
    try:
        async with PostgresStore(dsn, instruments, pool_size=2) as store:
            return await verify_store(store, instruments)
    except StoreUnavailable as exc:
        return unreadable(exc)
