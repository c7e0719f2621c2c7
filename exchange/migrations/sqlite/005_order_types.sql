-- 005_order_types: stop, stop-limit and iceberg orders in the orders table (see the PostgreSQL migration
-- 010_order_types for what each new column means). SQLite cannot change a CHECK constraint in place, and
-- order_type's must admit 'stop' and 'stop_limit': the table is rebuilt with the new columns, every row copied
-- (the new columns 0: what they are for an order that is neither a stop nor an iceberg), and its indexes made
-- again. funds is TEXT holding the integer (a budget may outgrow 64 bits), as the balances' integers are.
CREATE TABLE orders_new (
    instrument        TEXT    NOT NULL,
    created_seq       INTEGER NOT NULL,
    order_id          INTEGER,             -- NULL for a rejected place command
    client_id         TEXT    NOT NULL,
    client_order_id   TEXT,
    side              TEXT CHECK (side IN ('buy', 'sell')),
    order_type        TEXT CHECK (order_type IN ('limit', 'market', 'stop', 'stop_limit')),
    tif               TEXT CHECK (tif IN ('GTC', 'IOC', 'FOK', 'GTD')),
    price_ticks       INTEGER,
    qty_lots          INTEGER,
    remaining_lots    INTEGER NOT NULL DEFAULT 0,   -- an iceberg's: the slice it shows
    filled_lots       INTEGER NOT NULL DEFAULT 0,
    status            TEXT    NOT NULL CHECK (status IN
                          ('open', 'partially_filled', 'filled', 'canceled', 'rejected', 'expired')),
    priority          INTEGER,
    expire_ns         INTEGER NOT NULL DEFAULT 0,
    post_only         INTEGER NOT NULL DEFAULT 0,
    stp               TEXT,
    reject_reason     TEXT,
    reject_text       TEXT,
    created_ts_ns     INTEGER NOT NULL,
    updated_seq       INTEGER NOT NULL,
    updated_ts_ns     INTEGER NOT NULL,
    price             TEXT,
    qty               TEXT,
    rate              INTEGER NOT NULL DEFAULT 0,
    stop_price_ticks  INTEGER NOT NULL DEFAULT 0,   -- a stop or stop-limit order's stop price (0: not a stop)
    triggered_seq     INTEGER NOT NULL DEFAULT 0,   -- seq of its "triggered" event (0: it waits, or not a stop)
    display_lots      INTEGER NOT NULL DEFAULT 0,   -- an iceberg's slice size (0: not an iceberg)
    hidden_lots       INTEGER NOT NULL DEFAULT 0,   -- an iceberg's open quantity that does not show
    funds             TEXT    NOT NULL DEFAULT '0', -- a buy's budget as accepted, in quote units (the integer)
    PRIMARY KEY (instrument, created_seq),
    UNIQUE (instrument, order_id)
);

INSERT INTO orders_new (instrument, created_seq, order_id, client_id, client_order_id, side, order_type, tif,
                        price_ticks, qty_lots, remaining_lots, filled_lots, status, priority, expire_ns, post_only,
                        stp, reject_reason, reject_text, created_ts_ns, updated_seq, updated_ts_ns, price, qty, rate)
SELECT instrument, created_seq, order_id, client_id, client_order_id, side, order_type, tif, price_ticks, qty_lots,
       remaining_lots, filled_lots, status, priority, expire_ns, post_only, stp, reject_reason, reject_text,
       created_ts_ns, updated_seq, updated_ts_ns, price, qty, rate
FROM orders;

DROP TABLE orders;

ALTER TABLE orders_new RENAME TO orders;

CREATE INDEX orders_client_order_idx ON orders (client_id, client_order_id);
-- recovery: an instrument's open orders in priority order (and its waiting stops)
CREATE INDEX orders_open_idx ON orders (instrument, side, price_ticks, priority)
    WHERE status IN ('open', 'partially_filled');
-- recovery: an instrument's most recently finished orders (the dedupe window)
CREATE INDEX orders_finished_idx ON orders (instrument, updated_seq, priority)
    WHERE status IN ('filled', 'canceled', 'expired');
