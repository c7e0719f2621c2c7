"""The store's PostgreSQL connections: options, session settings, and each connection's life in the pool.

:func:`connect_options` maps ``[postgres]`` authentication and TLS to asyncpg's arguments.
:func:`_create_pool` opens the store's pool: every connection plans for the real table sizes rather
than lagging statistics (no hash/merge joins, no bitmap scans: see ``_SESSION_SETTINGS``), uses the
store's NUMERIC codec (:mod:`.numeric`), and is handed back to the pool without asyncpg's reset round
trip (:func:`_reset_connection`).

Every connection is leased for one block of work (:func:`_lease_connection`): if the block fails, for
whatever reason, the connection is closed -- a statement still running is cancelled first -- before
its pool holder is free again, so a broken or confused connection is never handed out twice.

Functions and constants only (the pool itself belongs to the store); names with a leading underscore
are the package's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import structlog

from exchange.adapters.postgres.errors import _cancelling
from exchange.adapters.postgres.numeric import _decode_numeric, _encode_numeric
from exchange.ports import StoreUnavailable
from exchange.settings import PostgresSettings

__all__ = ["connect_options"]

_log = structlog.get_logger("exchange.store")

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

_Conn: TypeAlias = "asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]"
_Leased: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

# Every statement here reads or writes a few rows through a unique index, walks an index in its order,
# or is a COPY. Statistics lag far behind tables that grow by thousands of rows a second, and then the
# planner picks plans that are fine for the tiny table it believes in and ruinous for the real one: a
# batch's ``UPDATE orders ... FROM (its rows)`` as a hash join over every open order (or a generic
# plan scanning them once per updated row), a chunk of the event journal as a bitmap scan plus an
# on-disk sort of everything after it. Seconds instead of milliseconds, so those plan shapes are off.
#
# A transaction of this store is never idle for long: its statements follow each other at once. One idle for
# seconds belongs to a process that is frozen (SIGSTOP, a VM paused) or cut off, and it holds the row locks
# of its instruments' ownership: the server ends that session after 5 s, so a new owner's take (which waits
# for those locks) goes through, and the frozen writer finds its commit refused when it wakes.
_SESSION_SETTINGS = {"jit": "off", "enable_hashjoin": "off", "enable_mergejoin": "off",
                     "enable_bitmapscan": "off", "idle_in_transaction_session_timeout": "5s"}


def connect_options(postgres: PostgresSettings) -> dict[str, Any]:
    """The asyncpg keyword arguments for authentication and TLS, from ``[postgres]`` settings.

    The password travels as its own argument, never inside the DSN, so no DSN
    the daemon could print holds it. ``sslmode`` has libpq's meaning; a mode
    alone is passed as is (asyncpg then uses the system CAs); with a CA file or
    a client certificate an :class:`ssl.SSLContext` is built: ``verify-full``
    checks the certificate and the host name, ``verify-ca`` the certificate
    only, the weaker modes encrypt without verifying. A DSN may also carry
    ``sslmode=...`` itself; these settings win.
    """
    options: dict[str, Any] = {}
    if postgres.password:
        options["password"] = postgres.password
    mode = postgres.sslmode
    if not mode:
        return options
    if mode == "disable" or not (postgres.sslrootcert or postgres.sslcert):
        options["ssl"] = mode
        return options
    context = ssl.create_default_context(cafile=postgres.sslrootcert or None)
    if mode in ("verify-ca", "verify-full"):
        context.check_hostname = mode == "verify-full"
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if postgres.sslcert:
        context.load_cert_chain(postgres.sslcert, postgres.sslkey or None)
    options["ssl"] = context
    return options


async def _create_pool(dsn: str, *, pool_size: int, command_timeout: float, connect_timeout: float,
                       application_name: str, options: Mapping[str, Any]) -> asyncpg.Pool:
    """The store's pool: its session settings, NUMERIC codec and reset; ``options`` from :func:`connect_options`."""
    return await asyncpg.create_pool(
        dsn, min_size=1, max_size=pool_size, command_timeout=command_timeout, timeout=connect_timeout,
        server_settings=_SESSION_SETTINGS | {"application_name": application_name},
        init=_init_connection, reset=_reset_connection, **options)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("numeric", schema="pg_catalog", encoder=_encode_numeric, decoder=_decode_numeric,
                              format="binary")


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """Make a released connection ready for its next use.

    asyncpg's default (unlock advisory locks, CLOSE ALL, UNLISTEN, RESET ALL)
    costs a round trip per commit and undoes nothing this store leaves behind:
    it keeps no session state but the startup settings, releases its advisory
    lock itself and uses cursors only inside transactions. Only a transaction
    left open (its rollback failed) is closed.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


@contextlib.asynccontextmanager
async def _lease_connection(pool: asyncpg.Pool, connect_timeout: float) -> AsyncIterator[_Leased]:
    """A pooled connection for one block of work; the pool hands it out again only if the block ended well.

    If the block raises anything at all, the connection is closed before its holder is free again:
    asyncpg gives a connection back in whatever state it is in, and after the server ended a session
    under it that may be one no statement can run in (``InternalClientError``: "cannot switch to
    state 12; another operation (2) is in progress"), or a cancellation or timeout may be still under
    way. The close lets a cancellation already requested finish, and cancels a statement still
    running, so that nothing of it goes on in the server once this returns (bounded by
    ``connect_timeout``; after that the socket is simply dropped); a connection the server has ended
    is just cleaned up. The pool opens a fresh one when it is needed.

    A cancellation the driver raises although nobody cancelled this task (a race in its pool) becomes a
    retriable :class:`StoreUnavailable`. A failure to give the connection back after the block ended
    well is logged, not raised: the block's outcome stands, and asyncpg has dropped that connection.
    """
    conn = await pool.acquire(timeout=connect_timeout)
    try:
        yield conn
    except BaseException as exc:
        await _retire(conn, connect_timeout)
        if isinstance(exc, asyncio.CancelledError) and not _cancelling():
            raise StoreUnavailable("a cancellation inside the PostgreSQL driver, nobody asked for it; the "
                                   "connection is dropped", retriable=True) from exc
        raise
    finally:
        await _give_back(pool, conn)


async def _retire(conn: _Leased, connect_timeout: float) -> None:
    """Close ``conn`` for good (see :func:`_lease_connection`); drop it where even that fails. Never raises, but
    a cancellation of this task."""
    try:
        await conn.close(timeout=connect_timeout)
    except asyncio.CancelledError:
        _terminate(conn)
        raise
    except Exception:  # released already (the driver closed it), or the close itself failed
        _terminate(conn)


def _terminate(conn: _Leased) -> None:
    """Drop ``conn``'s socket at once (a no-op on a connection the pool has back already)."""
    with contextlib.suppress(Exception):
        conn.terminate()


async def _give_back(pool: asyncpg.Pool, conn: _Leased) -> None:
    """``pool.release(conn)``, which never fails the block before it: a connection that cannot be reset is
    dropped by asyncpg (and one the server ended meanwhile is no longer checked out: "release() called on
    a free connection holder"). Only a cancellation of this task goes on."""
    try:
        await pool.release(conn)
    except asyncio.CancelledError:
        if _cancelling():
            raise
        _terminate(conn)
        _log.warning("a cancellation inside the PostgreSQL driver while a connection went back to its pool; "
                     "the connection is dropped")
    except Exception as exc:
        _terminate(conn)
        _log.warning("a connection could not go back to its pool; it is dropped", error=f"{type(exc).__name__}: {exc}")
