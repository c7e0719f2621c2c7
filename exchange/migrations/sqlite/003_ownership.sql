-- 003_ownership: ownership epochs (see the PostgreSQL migration 008_ownership). SQLite is for one process,
-- which holds the file's lock while it runs; the epochs are kept and checked all the same, so a batch
-- prepared before its instrument was taken again is refused here as it is in PostgreSQL.
CREATE TABLE instrument_owners (
    instrument  TEXT    PRIMARY KEY,
    epoch       INTEGER NOT NULL CHECK (epoch > 0),
    owner       TEXT    NOT NULL,
    taken_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE partition_owners (
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    epoch       INTEGER NOT NULL CHECK (epoch > 0),
    owner       TEXT    NOT NULL,
    taken_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (topic, partition)
);
