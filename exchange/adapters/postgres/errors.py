"""What a PostgreSQL failure means: every error the store raises is a :class:`StoreUnavailable`, retriable or not.

Errors of a commit (:func:`_commit_failure`): only what the batch's own content causes is final --
SQLSTATE classes 22 (data exception) and 23 (integrity violation), ``exchange_commit_batch``'s own
checks (EXU01 rows missing, EXU03 rows without an ownership epoch), a batch that does not continue
the stored sequence, and Python-side encoding errors of the batch's values -- and raises
``StoreUnavailable(retriable=False)`` with a message saying what to check. Everything else is the
database going away, and the journal writer retries it with backoff: ``StoreUnavailable(retriable=True)``
for lost connections, whatever exception the driver raises for them (asyncpg's ``InternalClientError``
when the server ended a session under it, interface errors, a cancellation inside its pool),
``OSError``, timeouts, and every other server error (a revoked privilege, a dropped table: an operator
can put those right while the daemon waits).

Opening the store (:func:`_connect_failure`): a database that does not exist, credentials refused and a
server that does not answer become a :class:`StoreCannotOpen` whose message says what to do (create the
database, check the DSN's user and password, start the server), retriable as :func:`_unavailable` says.

Outside commits (start-up, lookups: :func:`_unavailable`) lost connections, ``OSError``, timeouts
and the server's transient classes (08, 40, 53, 57, 58) are retriable and anything else is not.

A ``CancelledError`` is a cancellation only when the current task is being cancelled
(:func:`_cancelling`); one raised by some future inside the driver is a lost connection.

Pure functions and constants; names with a leading underscore are the package's own.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import struct
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

import asyncpg
import msgspec

from exchange.ports import StoreCannotOpen, StoreUnavailable
from exchange.projections.rows import RowError

_RETRIABLE_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
# connection-time refusals an operator clears without touching the daemon: database not accepting
# connections (ALLOW_CONNECTIONS false, shutting down), lock timeouts, a database being restored
_RETRIABLE_SQLSTATES = frozenset({"55000", "55006", "55P03", "3D000"})
_CONTENT_SQLSTATE_CLASSES = frozenset({"22", "23"})  # data exception, integrity constraint violation


def _commit_failure(exc: BaseException, last: Mapping[str, int]) -> StoreUnavailable:
    """Classify what a commit raised: final only if the batch's own content caused it (see the module
    docstring); anything else -- whatever the driver raises when the database goes away -- is retriable.

    ``EXU01`` is exchange_commit_batch finding stored orders missing."""
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, RowError):
        return StoreUnavailable(f"batch refused: {exc}", retriable=False)
    doing = f"committing a batch (last seq {dict(last)})"
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state == "EXU01":
            return _rows_missing(exc.args[0] if exc.args else str(exc))
        if state == "EXU03":  # rows without an ownership epoch: the batch itself is wrong
            return StoreUnavailable(f"batch refused: {exc.args[0] if exc.args else exc}", retriable=False)
        refused = _unavailable(exc, doing)
        if state[:2] in _CONTENT_SQLSTATE_CLASSES or refused.retriable:
            return refused
        return StoreUnavailable(f"{refused} (retrying)", retriable=True)
    if _bad_value(exc):
        return StoreUnavailable(f"bad data while {doing}: {type(exc).__name__}: {exc}; check the batch's events "
                                "against the instrument limits", retriable=False)
    return StoreUnavailable(f"PostgreSQL connection failed while {doing}: {type(exc).__name__}: {exc}; the "
                            "connection is dropped and the batch retried", retriable=True)


def _bad_value(exc: BaseException) -> bool:
    """Did encoding one of the batch's values fail, on this side: the raw error of a COPY row's codec, of our
    NUMERIC or JSON encoders? (A parameter asyncpg cannot encode is its ``DataError``, SQLSTATE 22000.)"""
    if isinstance(exc, asyncpg.InterfaceError):  # the driver's own errors are about the connection
        return False
    return isinstance(exc, ValueError | TypeError | OverflowError | struct.error | msgspec.MsgspecError)


def _moved() -> StoreUnavailable:
    return StoreUnavailable("the stored sequence moved while this transaction held its lock; another writer? "
                            "Stop the daemon and run `exchange recover --verify`.", retriable=False)


def _rows_missing(what: str) -> StoreUnavailable:
    return StoreUnavailable(
        f"{what}: the orders table does not match the event stream (rows deleted, finished or edited by "
        "hand?). Run `exchange recover --verify` and repair before restarting.", retriable=False)


def _cancelling() -> bool:
    """Is the current task being cancelled (as opposed to a CancelledError raised by some future inside)?"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _unavailable(exc: BaseException, doing: str) -> StoreUnavailable:
    """Classify a driver/server error: transient ones are retriable, the rest say what to check."""
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        detail = f"{type(exc).__name__} [{state}] {exc}"
        if state[:2] in _RETRIABLE_SQLSTATE_CLASSES or state in _RETRIABLE_SQLSTATES:
            return StoreUnavailable(f"PostgreSQL unavailable while {doing}: {detail}", retriable=True)
        extra = []
        for name in ("constraint_name", "table_name", "column_name", "detail"):
            value = getattr(exc, name, None)
            if value:
                extra.append(f"{name.split('_')[0]}={value}")
        if extra:
            detail += f" ({', '.join(extra)})"
        if state == "23502" and getattr(exc, "column_name", None) == "status":
            advice = ("the batch changes an order that the orders table says is no longer open: the table does "
                      "not match the event stream (edited by hand?). Run `exchange recover --verify` and repair "
                      "it before restarting")
        elif state.startswith("23"):
            advice = ("a row already exists or breaks a constraint: check that only one engine writes each "
                      "instrument and that it resumed from the stored state (engine_progress, input_offsets)")
        elif state.startswith("22"):
            advice = "a value does not fit its column: check the instrument limits and the event that failed"
        elif state in ("42P01", "42703", "42883"):
            advice = "the schema is missing or old: run the migrations (`exchange migrate`)"
        elif state.startswith("42"):
            advice = "the SQL was refused: check the schema version and the database user's privileges"
        elif state.startswith("28"):
            advice = "authentication failed: check the DSN's user and password"
        else:
            advice = "see the PostgreSQL log for this error"
        return StoreUnavailable(f"PostgreSQL refused {doing}: {detail}; {advice}", retriable=False)
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError | OSError | TimeoutError
                  | ConnectionError):  # (InternalClientError: a connection the server ended under the driver)
        return StoreUnavailable(f"PostgreSQL unreachable while {doing}: {type(exc).__name__}: {exc}",
                                retriable=True)
    if isinstance(exc, ValueError | TypeError | OverflowError | msgspec.MsgspecError):
        return StoreUnavailable(f"bad data while {doing}: {type(exc).__name__}: {exc}; check the batch's events "
                                "against the instrument limits", retriable=False)
    return StoreUnavailable(f"unexpected error while {doing}: {type(exc).__name__}: {exc}", retriable=False)


def _dsn_parts(dsn: str, env: Mapping[str, str] | None = None) -> tuple[str, str, str, str]:
    """Host, port, user and database a DSN connects to, with libpq's defaults (PGHOST, PGPORT, PGUSER,
    PGDATABASE; the user's login name; the database named as the user). Never the password."""
    env = os.environ if env is None else env
    try:
        parts = urlsplit(dsn)
        host, port, user = parts.hostname, parts.port, parts.username
    except ValueError:  # not a URL (a libpq key=value string): the environment's defaults
        host = port = user = None
        parts = urlsplit("")
    host = host or env.get("PGHOST") or "localhost"
    port_text = str(port or env.get("PGPORT") or 5432)
    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = "postgres"
    user = unquote(user) if user else env.get("PGUSER") or login
    database = unquote(parts.path.lstrip("/")) or env.get("PGDATABASE") or user
    return host, port_text, user, database


def _connect_failure(exc: BaseException, dsn: str) -> StoreUnavailable:
    """What opening the store raised, as the one line an operator reads: a missing database, refused
    credentials, a server that does not answer say what to do (:class:`StoreCannotOpen`); anything else as
    :func:`_unavailable` classifies it."""
    classified = _unavailable(exc, "connecting to PostgreSQL")
    host, port, user, database = _dsn_parts(dsn)
    where = f"PostgreSQL at {host}:{port}"
    state = getattr(exc, "sqlstate", None) or ""
    if state == "3D000":  # invalid_catalog_name
        message = (f"{where} has no database {database!r} ({exc}): create it, e.g. `createdb -h {host} -p {port} "
                   f"-O {user} {database}` or `CREATE DATABASE \"{database}\" OWNER \"{user}\";` in psql as a "
                   "superuser, then run `exchange migrate`; or name an existing database in [postgres] dsn "
                   "(EXCHANGE_POSTGRES_DSN)")
    elif state.startswith("28"):  # invalid_authorization_specification, invalid_password
        message = (f"{where} refused user {user!r} for database {database!r}: {type(exc).__name__}: {exc}; check "
                   "the user in [postgres] dsn (EXCHANGE_POSTGRES_DSN; PGUSER when the DSN names none) and the "
                   "password ([postgres] password or EXCHANGE_POSTGRES_PASSWORD, else PGPASSWORD or ~/.pgpass); "
                   f"a missing role is created with `createuser -h {host} -p {port} --login --pwprompt {user}` "
                   "(or CREATE ROLE ... LOGIN PASSWORD ...), and pg_hba.conf must let it in")
    elif isinstance(exc, OSError | TimeoutError) and not isinstance(exc, asyncpg.PostgresError):
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        message = (f"{where} does not answer ({why}): start PostgreSQL there (`make run-local` or "
                   "`bash scripts/services.sh` on this machine, `docker compose up -d postgres` for the compose "
                   "stack, else `pg_ctlcluster <version> main start` or `systemctl start postgresql`), or point "
                   "[postgres] dsn (EXCHANGE_POSTGRES_DSN) at a running server")
    else:
        return classified
    return StoreCannotOpen(message, retriable=classified.retriable)
