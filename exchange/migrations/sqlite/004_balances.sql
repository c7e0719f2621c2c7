-- 004_balances: balances kept per instrument, and the transfers the engine remembers (see the PostgreSQL
-- migration 009_balances for the whole story). The integers (lots, or quote units of tick x lot) can outgrow
-- 64 bits and are TEXT holding the integer, as the positions' are; the *_amount columns and transfers.amount
-- are TEXT holding the exact decimal in the asset's units, for people reading the table. The fees account is
-- client ''. orders.rate: what each open lot of an order holds (0 without balances).
ALTER TABLE orders ADD COLUMN rate INTEGER NOT NULL DEFAULT 0;

CREATE TABLE balances (
    instrument        TEXT    NOT NULL,
    client_id         TEXT    NOT NULL,   -- '' is the venue's fees account
    asset             TEXT    NOT NULL,
    available         TEXT    NOT NULL,   -- integers as text: they may outgrow 64 bits
    reserved          TEXT    NOT NULL,
    available_amount  TEXT    NOT NULL,   -- available in the asset's units
    reserved_amount   TEXT    NOT NULL,
    updated_seq       INTEGER NOT NULL,   -- seq of the last event that changed it
    PRIMARY KEY (instrument, client_id, asset)
) WITHOUT ROWID;

CREATE TABLE transfers (
    instrument    TEXT    NOT NULL,
    transfer_id   TEXT    NOT NULL,
    client_id     TEXT    NOT NULL,
    asset         TEXT,                -- NULL for a refused withdrawal (its rejection does not say)
    kind          TEXT    NOT NULL CHECK (kind IN ('deposit', 'withdraw')),
    amount_units  TEXT,                -- the integer, as text (NULL: refused)
    amount        TEXT,                -- the same in the asset's units
    status        TEXT    NOT NULL CHECK (status IN ('applied', 'refused')),
    outcome       TEXT    NOT NULL,    -- what a repeat of the transfer id is told, as the engine remembers it
    seq           INTEGER NOT NULL,
    ts_ns         INTEGER NOT NULL,
    PRIMARY KEY (instrument, transfer_id)
);

CREATE INDEX transfers_client_idx ON transfers (client_id, instrument);
