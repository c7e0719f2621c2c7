"""Opening the PostgreSQL store: the failures an operator puts right say what to do (exchange.adapters.postgres)."""

from __future__ import annotations

import asyncpg

from exchange.adapters.postgres.errors import _connect_failure, _dsn_parts
from exchange.ports import StoreCannotOpen, cannot_start


def test_the_dsn_parts_follow_libpq_defaults_and_never_include_the_password() -> None:
    assert _dsn_parts("postgresql://ops:s3cret@db.example:6432/venue", env={}) == ("db.example", "6432", "ops",
                                                                                   "venue")
    env = {"PGHOST": "pg", "PGPORT": "5433", "PGUSER": "alice", "PGDATABASE": "books"}
    assert _dsn_parts("postgresql://", env=env) == ("pg", "5433", "alice", "books")
    assert _dsn_parts("postgresql:///x", env={"PGUSER": "bob"}) == ("localhost", "5432", "bob", "x")


def test_a_refused_password_names_the_user_and_where_to_fix_it_without_the_secret() -> None:
    error = asyncpg.InvalidPasswordError('password authentication failed for user "ops"')
    refused = _connect_failure(error, "postgresql://ops:s3cret@db.example:5432/venue")
    assert isinstance(refused, StoreCannotOpen)
    assert not refused.retriable
    assert "PostgreSQL at db.example:5432 refused user 'ops' for database 'venue'" in str(refused)
    assert "EXCHANGE_POSTGRES_PASSWORD" in str(refused)
    assert "s3cret" not in str(refused)


def test_a_missing_database_is_retriable_at_start_up_and_says_how_to_create_it() -> None:
    refused = _connect_failure(asyncpg.InvalidCatalogNameError('database "venue" does not exist'),
                               "postgresql://ops@db:5432/venue")
    assert refused.retriable  # being restored, say: `exchange run` retries it for a minute before it stops
    assert "createdb -h db -p 5432 -O ops venue" in str(refused)


def test_other_errors_keep_their_classification_and_are_no_start_up_advice() -> None:
    refused = _connect_failure(asyncpg.InsufficientPrivilegeError("permission denied"), "postgresql://db/venue")
    assert not isinstance(refused, StoreCannotOpen)
    assert cannot_start(refused) is None
    assert cannot_start(ExceptionGroup("tasks", [ValueError(), _connect_failure(ConnectionRefusedError(), "")])) \
        is not None
