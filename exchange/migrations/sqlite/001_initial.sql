-- 001_initial (SQLite): the durable state of the matching engine, for the embedded store.
--
-- The same tables and meaning as the PostgreSQL schema (../001_initial.sql); what differs is
-- SQLite's types. Integers (ticks, lots, ns, seq) are the truth and are INTEGER (64-bit). The
-- decimal price/qty columns are TEXT holding the exact decimal string in the instrument's units,
-- for operators and reports only (SQLite has no exact decimal type; REAL would round). Position
-- cost and realized P&L (ticks * lots) can outgrow 64 bits and are TEXT holding the integer.
-- Every row is written by the journal's group commit (exchange/adapters/sqlite.py). Only the small
-- tables are WITHOUT ROWID: SQLite advises against it for rows as wide as events and orders.

CREATE TABLE order_events (
    instrument  TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    ts_ns       INTEGER NOT NULL,
    type        TEXT    NOT NULL,
    order_id    INTEGER,              -- the order the event is about; the taker's for "filled"
    client_id   TEXT    NOT NULL,     -- its owner; the taker's for "filled"
    payload     BLOB    NOT NULL,     -- the msgspec JSON of the event, byte for byte
    PRIMARY KEY (instrument, seq)
);

CREATE TABLE orders (
    instrument       TEXT    NOT NULL,
    created_seq      INTEGER NOT NULL,
    order_id         INTEGER,             -- NULL for a rejected place command
    client_id        TEXT    NOT NULL,
    client_order_id  TEXT,
    side             TEXT CHECK (side IN ('buy', 'sell')),
    order_type       TEXT CHECK (order_type IN ('limit', 'market')),
    tif              TEXT CHECK (tif IN ('GTC', 'IOC', 'FOK', 'GTD')),
    price_ticks      INTEGER,
    qty_lots         INTEGER,
    remaining_lots   INTEGER NOT NULL DEFAULT 0,
    filled_lots      INTEGER NOT NULL DEFAULT 0,
    status           TEXT    NOT NULL CHECK (status IN
                         ('open', 'partially_filled', 'filled', 'canceled', 'rejected', 'expired')),
    priority         INTEGER,
    expire_ns        INTEGER NOT NULL DEFAULT 0,
    post_only        INTEGER NOT NULL DEFAULT 0,
    stp              TEXT,
    reject_reason    TEXT,
    reject_text      TEXT,
    created_ts_ns    INTEGER NOT NULL,
    updated_seq      INTEGER NOT NULL,
    updated_ts_ns    INTEGER NOT NULL,
    price            TEXT,
    qty              TEXT,
    PRIMARY KEY (instrument, created_seq),
    UNIQUE (instrument, order_id)
);

CREATE INDEX orders_client_order_idx ON orders (client_id, client_order_id);
-- recovery: an instrument's open orders in priority order
CREATE INDEX orders_open_idx ON orders (instrument, side, price_ticks, priority)
    WHERE status IN ('open', 'partially_filled');
-- recovery: an instrument's most recently finished orders (the dedupe window)
CREATE INDEX orders_finished_idx ON orders (instrument, updated_seq, priority)
    WHERE status IN ('filled', 'canceled', 'expired');

CREATE TABLE trades (
    instrument             TEXT    NOT NULL,
    trade_id               INTEGER NOT NULL,
    seq                    INTEGER NOT NULL,
    ts_ns                  INTEGER NOT NULL,
    price_ticks            INTEGER NOT NULL,
    qty_lots               INTEGER NOT NULL,
    price                  TEXT    NOT NULL,
    qty                    TEXT    NOT NULL,
    aggressor_side         TEXT    NOT NULL CHECK (aggressor_side IN ('buy', 'sell')),
    maker_order_id         INTEGER NOT NULL,
    maker_client_id        TEXT    NOT NULL,
    maker_client_order_id  TEXT    NOT NULL,
    taker_order_id         INTEGER NOT NULL,
    taker_client_id        TEXT    NOT NULL,
    taker_client_order_id  TEXT    NOT NULL,
    PRIMARY KEY (instrument, trade_id)
);

CREATE INDEX trades_time_idx ON trades (instrument, ts_ns);

CREATE TABLE positions (
    client_id     TEXT    NOT NULL,
    instrument    TEXT    NOT NULL,
    net_lots      TEXT    NOT NULL,   -- integers as text: they may outgrow 64 bits
    cost          TEXT    NOT NULL,
    realized      TEXT    NOT NULL,
    net_qty       TEXT    NOT NULL,   -- net_lots in quantity units
    realized_pnl  TEXT    NOT NULL,   -- realized in quote-currency units
    updated_seq   INTEGER NOT NULL,
    PRIMARY KEY (client_id, instrument)
) WITHOUT ROWID;

CREATE INDEX positions_instrument_idx ON positions (instrument);

CREATE TABLE engine_progress (
    instrument     TEXT    PRIMARY KEY,
    seq            INTEGER NOT NULL,
    next_order_id  INTEGER NOT NULL,
    next_trade_id  INTEGER NOT NULL,
    halted         INTEGER NOT NULL DEFAULT 0,   -- an operator halted trading (events halted/resumed)
    updated_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;

-- The last input offset applied, per instrument and source partition (for the generator source:
-- topic "generator", partition 0, offset = the generator's message index).
CREATE TABLE input_offsets (
    instrument   TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    last_offset  INTEGER NOT NULL,
    PRIMARY KEY (instrument, topic, partition)
) WITHOUT ROWID;

CREATE TABLE snapshots (
    instrument   TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    taken_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    state_hash   TEXT    NOT NULL,
    order_count  INTEGER NOT NULL,
    state        BLOB    NOT NULL,
    PRIMARY KEY (instrument, seq)
);
