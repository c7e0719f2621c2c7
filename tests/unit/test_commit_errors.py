"""How the stores classify what a commit raised: only the batch's own content is final.

The exceptions here are the drivers' own classes, built as the drivers build them (asyncpg from the
server's error fields); which of them a real terminated session produces is in
``tests/integration/test_db_terminate.py``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import struct
from pathlib import Path

import asyncpg
import msgspec
import pytest

from exchange.adapters.postgres import errors as postgres
from exchange.adapters.sqlite import errors as sqlite
from exchange.ports import StoreUnavailable
from exchange.projections.rows import RowError

LAST = {"BTC-USD": 42}


def server_error(sqlstate: str, message: str = "refused") -> asyncpg.PostgresError:
    return asyncpg.PostgresError.new({"C": sqlstate, "M": message, "S": "ERROR"})


# the database going away, or not answering as it should: whatever the driver raises for it, retried
TRANSIENT = {
    "a statement on a connection the server ended": asyncpg.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"),
    "a release racing the end of the session": asyncpg.InternalClientError(
        "PoolConnectionHolder.release() called on a free connection holder"),
    "a lost connection": asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of "
                                                                        "operation"),
    "a closed connection": asyncpg.InterfaceError("cannot call Transaction.__aexit__(): the underlying connection "
                                                  "is closed"),
    "a connection still busy": asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    "the session ended by the operator": server_error("57P01", "terminating connection due to administrator command"),
    "a serialization failure": server_error("40001"),
    "a revoked privilege": server_error("42501", "permission denied for table orders"),
    "a dropped table": server_error("42P01", 'relation "orders" does not exist'),
    "an internal server error": server_error("XX000"),
    "a reset socket": ConnectionResetError(104, "Connection reset by peer"),
    "a timeout": TimeoutError(),
    "anything else": RuntimeError("something nobody classified"),
}

# the batch's own content: retrying the same batch can only fail the same way
FINAL = {
    "a unique violation": server_error("23505", "duplicate key value violates unique constraint"),
    "a value out of range": server_error("22003", "numeric field overflow"),
    "stored orders missing (EXU01)": server_error("EXU01", "3 stored orders should change but only 2 were found"),
    "a parameter that cannot be encoded": asyncpg.DataError("invalid input for query argument $1"),
    "a COPY value the codec refuses": OverflowError("int too big to convert"),
    "a NUMERIC too large for the wire": struct.error("'h' format requires -32768 <= number <= 32767"),
    "text that cannot be encoded": UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed"),
    "a JSON document that cannot be written": msgspec.EncodeError("Integer value out of range"),
    "rows that cannot be derived": RowError("unknown instrument ZZZ"),
}


@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_postgres_commit_failures_that_are_not_the_batchs_fault_are_retried(name: str) -> None:
    verdict = postgres._commit_failure(TRANSIENT[name], LAST)
    assert verdict.retriable, verdict
    assert "42" in str(verdict)  # says which batch


@pytest.mark.parametrize("name", sorted(FINAL))
def test_postgres_commit_failures_the_batch_causes_are_final(name: str) -> None:
    verdict = postgres._commit_failure(FINAL[name], LAST)
    assert not verdict.retriable, verdict


def test_the_store_keeps_its_own_verdicts() -> None:
    for retriable in (True, False):
        own = StoreUnavailable("the batch before this one did not commit", retriable=retriable)
        assert postgres._commit_failure(own, LAST) is own


def test_start_up_keeps_the_stricter_classification() -> None:
    """Outside commits a missing schema, bad credentials and confused drivers still stop a start loudly."""
    assert not postgres._unavailable(server_error("42P01"), "loading the stored state").retriable
    assert not postgres._unavailable(server_error("28P01"), "connecting to PostgreSQL").retriable
    assert postgres._unavailable(server_error("3D000"), "connecting to PostgreSQL").retriable  # being restored
    assert postgres._unavailable(ConnectionRefusedError(111, "refused"), "connecting to PostgreSQL").retriable


# ---------------------------------------------------------------------------------------------- SQLite

PATH = Path("/var/lib/exchange/x.sqlite")


def sqlite_error(cls: type[sqlite3.Error], message: str, name: str) -> sqlite3.Error:
    exc = cls(message)
    exc.sqlite_errorname = name  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize("exc", [
    sqlite_error(sqlite3.OperationalError, "database is locked", "SQLITE_BUSY"),
    sqlite_error(sqlite3.OperationalError, "disk I/O error", "SQLITE_IOERR_WRITE"),
    sqlite_error(sqlite3.OperationalError, "attempt to write a readonly database", "SQLITE_READONLY"),
    sqlite_error(sqlite3.OperationalError, "unable to open database file", "SQLITE_CANTOPEN"),
    sqlite_error(sqlite3.OperationalError, "no such table: orders", "SQLITE_ERROR"),
    sqlite_error(sqlite3.DatabaseError, "database disk image is malformed", "SQLITE_CORRUPT"),
    sqlite3.ProgrammingError("Cannot operate on a closed database."),
    PermissionError(13, "Permission denied"),
    RuntimeError("something nobody classified"),
], ids=lambda exc: f"{type(exc).__name__}: {exc}"[:50])
def test_sqlite_commit_failures_that_are_not_the_batchs_fault_are_retried(exc: BaseException) -> None:
    verdict = sqlite._commit_failure(exc, "committing a batch (last seq {'X': 1})", PATH)
    assert verdict.retriable, verdict


@pytest.mark.parametrize("exc", [
    sqlite_error(sqlite3.IntegrityError, "UNIQUE constraint failed: order_events.instrument, order_events.seq",
                 "SQLITE_CONSTRAINT_PRIMARYKEY"),
    sqlite_error(sqlite3.DataError, "string or blob too big", "SQLITE_TOOBIG"),
    sqlite3.ProgrammingError("Error binding parameter 3: type 'object' is not supported"),
    OverflowError("Python int too large to convert to SQLite INTEGER"),
    UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed"),
    StoreUnavailable("3 stored orders should change but only 2 of their rows were found", retriable=False),
], ids=lambda exc: f"{type(exc).__name__}: {exc}"[:50])
def test_sqlite_commit_failures_the_batch_causes_are_final(exc: BaseException) -> None:
    verdict = sqlite._commit_failure(exc, "committing a batch (last seq {'X': 1})", PATH)
    assert not verdict.retriable, verdict


def test_sqlite_start_up_keeps_the_stricter_classification() -> None:
    corrupt = sqlite_error(sqlite3.DatabaseError, "file is not a database", "SQLITE_NOTADB")
    assert not sqlite._unavailable(corrupt, "migrating the schema", PATH).retriable


def test_only_a_cancellation_of_the_current_task_counts_as_one() -> None:
    """The store tells a cancellation of its own task from a CancelledError some future inside the driver
    raised (which it retries)."""

    async def scenario() -> tuple[bool, bool]:
        seen: list[bool] = []

        async def cancelled() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                seen.append(postgres._cancelling())
                raise

        task = asyncio.create_task(cancelled())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        inner: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        inner.cancel()
        try:
            await inner
        except asyncio.CancelledError:
            seen.append(postgres._cancelling())
        return seen[0], seen[1]

    own, foreign = asyncio.run(scenario())
    assert own
    assert not foreign
