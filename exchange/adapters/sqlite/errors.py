"""What a SQLite failure means: every error the store raises is a :class:`StoreUnavailable`, retriable or not.

A commit is refused for good (:func:`_commit_failure`: ``StoreUnavailable(retriable=False)``, with a
message saying what to check) only for what the batch's own content causes: a constraint violated, a
value SQLite cannot hold or bind, a batch that does not continue the stored sequence, stored rows
that do not match the event stream. Anything else during a commit -- a busy or locked file, a full
disk, I/O errors, a file made read-only, a missing table, a damaged file, an error nobody classified
-- is ``StoreUnavailable(retriable=True)``: the writer retries the same batch with backoff and
``/readyz`` names the error, so an operator can put it right without the venue going down.

Opening, migrating and loading keep the stricter rule (:func:`_unavailable`): a busy or locked file, a
full disk and I/O errors are retriable, a missing schema or a damaged, foreign or read-only file stop
the start.

Pure functions and constants; names with a leading underscore are the package's own.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from exchange.ports import StoreUnavailable

_RETRIABLE = {
    "SQLITE_BUSY": "another process holds the database file's lock (a second engine on the same file?)",
    "SQLITE_LOCKED": "the database file is locked",
    "SQLITE_FULL": "the disk is full: free some space, the daemon retries by itself",
}


def _commit_failure(exc: BaseException, doing: str, path: Path) -> StoreUnavailable:
    """Classify what a commit raised: final only if the batch's own content caused it; anything else is
    retriable, with :func:`_unavailable`'s message (what to check)."""
    described = _unavailable(exc, doing, path)
    if described.retriable or _from_content(exc):
        return described
    return StoreUnavailable(f"{described} (retrying)", retriable=True)


def _from_content(exc: BaseException) -> bool:
    """A constraint the batch's rows break, or one of its values that SQLite cannot hold or bind."""
    if isinstance(exc, StoreUnavailable):  # raised by the store's own checks, with its own verdict
        return not exc.retriable
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError):
        return True
    if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError):
        return "binding" in str(exc)  # "Error binding parameter 3: type 'X' is not supported"
    return isinstance(exc, ValueError | TypeError | OverflowError | msgspec.MsgspecError)


def _unavailable(exc: BaseException, doing: str, path: Path) -> StoreUnavailable:
    """Classify an error: transient ones are retriable, the rest say what to check."""
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        detail = f"{type(exc).__name__} [{name}] {exc}"
        if name in _RETRIABLE:
            return StoreUnavailable(f"SQLite unavailable while {doing}: {detail}; {_RETRIABLE[name]}", retriable=True)
        if name.startswith("SQLITE_IOERR"):
            return StoreUnavailable(f"SQLite I/O error while {doing}: {detail}; check the disk holding {path}",
                                    retriable=True)
        text = str(exc)
        if isinstance(exc, sqlite3.IntegrityError):
            if "orders.status" in text:
                advice = ("the batch changes an order that the orders table says is no longer open: the table "
                          "does not match the event stream (edited by hand?). Run `exchange recover --verify`")
            else:
                advice = ("a row already exists or breaks a constraint: check that only one engine writes this "
                          "file and that it resumed from the stored state (engine_progress, input_offsets)")
        elif "no such table" in text or "no such column" in text:
            advice = "the schema is missing or old: run the migrations (`exchange migrate`)"
        elif name in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            advice = f"{path} is not a database or is damaged: restore it from a backup (or start afresh)"
        elif name in ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH"):
            advice = f"check that {path} and its directory exist and are writable by this user"
        else:
            advice = "see the error above"
        return StoreUnavailable(f"SQLite refused {doing}: {detail}; {advice}", retriable=False)
    if isinstance(exc, OSError):
        return StoreUnavailable(f"cannot use {path} while {doing}: {exc}; check the path and its permissions",
                                retriable=False)
    if isinstance(exc, ValueError | TypeError | OverflowError | msgspec.MsgspecError):
        return StoreUnavailable(f"bad data while {doing}: {type(exc).__name__}: {exc}; check the batch's events "
                                "against the instrument limits", retriable=False)
    return StoreUnavailable(f"unexpected error while {doing}: {type(exc).__name__}: {exc}", retriable=False)
