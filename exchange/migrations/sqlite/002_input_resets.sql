-- 002_input_resets: an operator's acceptance of an orders partition whose log lost data (see the
-- PostgreSQL migration 006_input_resets for the whole story). input_offsets also holds each
-- partition's own row (instrument ''), written with the batches.
CREATE TABLE input_resets (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    topic         TEXT    NOT NULL,
    partition     INTEGER NOT NULL,
    to_offset     INTEGER NOT NULL CHECK (to_offset >= 0),
    operator      TEXT    NOT NULL,
    reason        TEXT    NOT NULL,
    status        TEXT    NOT NULL DEFAULT 'requested' CHECK (status IN ('requested', 'applied', 'refused')),
    note          TEXT    NOT NULL DEFAULT '',
    requested_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    decided_at    TEXT
);
