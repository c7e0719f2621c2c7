-- 011_queries: the tables as an operator queries them in psql -- events as JSON, times as timestamps, a
-- client's trades and the trades of a time range found through an index.
--
-- Events as JSON: a view, order_events_json, not a jsonb column. order_events.payload stays the bytea the
-- engine wrote, because three readers need those exact bytes: the commit path recognises a batch whose
-- acknowledgement was lost by comparing its events with the stored ones byte for byte
-- (exchange/projections/stored.py, same_as_stored), and recovery and `exchange recover --verify` read the
-- payload back and decode it. jsonb reorders keys, drops duplicate ones and normalises numbers, so storing
-- it would break that equality; it would also make the server parse every event's JSON inside the commit.
-- The view parses only the rows a query reads; it costs the commit path nothing. Its payload is jsonb
-- (payload->>'reason', payload @> '{"type": "canceled"}' work); the table's payload is the exact event.
--
-- Times: timestamptz columns generated from the stored nanoseconds, as trades.traded_at is (to the
-- microsecond, truncated): order_events.event_at from ts_ns, orders.created_at and updated_at from
-- created_ts_ns and updated_ts_ns. The server computes them on every insert and update, so no writer (the
-- commit function, the COPY path) changes. Adding a stored generated column rewrites the table: on a large
-- database this migration holds order_events and orders locked while it copies them, once.
--
-- Indexes (each one more btree to keep up on every trade the commit path writes; measured with
-- bench/commit.py, see the README's Storage section):
--   trades_maker_client_idx, trades_taker_client_idx: a client's trades in a time range (a client is the
--     maker of some and the taker of others: the planner ORs the two index scans);
--   trades_traded_at_idx: every instrument's trades in a time range (trades_time_idx leads with instrument).
-- No index on event_at or on the orders' times: an instrument's events are found through the primary key
-- (instrument, seq), a client's orders through orders_client_order_idx; another index on order_events
-- would cost the commit path on every event.

ALTER TABLE order_events
    ADD COLUMN event_at timestamptz NOT NULL
        GENERATED ALWAYS AS (to_timestamp(((ts_ns / 1000)::double precision) / 1e6)) STORED;

ALTER TABLE orders
    ADD COLUMN created_at timestamptz NOT NULL
        GENERATED ALWAYS AS (to_timestamp(((created_ts_ns / 1000)::double precision) / 1e6)) STORED,
    ADD COLUMN updated_at timestamptz NOT NULL
        GENERATED ALWAYS AS (to_timestamp(((updated_ts_ns / 1000)::double precision) / 1e6)) STORED;

CREATE INDEX trades_maker_client_idx ON trades (maker_client_id, traded_at);
CREATE INDEX trades_taker_client_idx ON trades (taker_client_id, traded_at);
CREATE INDEX trades_traded_at_idx ON trades (traded_at);

CREATE VIEW order_events_json AS
SELECT instrument, seq, ts_ns, event_at, type, order_id, client_id,
       convert_from(payload, 'UTF8')::jsonb AS payload
FROM order_events;
