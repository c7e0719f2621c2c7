-- 001_initial: the durable state of the matching engine.
--
-- Integers are the truth (ticks, lots, ns, seq); the NUMERIC price/qty columns
-- are the same values in the instrument's decimal units, for operators and
-- reports only. Identifiers (instrument, client ids, client order ids, topic)
-- compare byte-wise (COLLATE "C"): they are codes, not prose, and btree upkeep
-- under a linguistic collation costs several times more. Every row is written
-- by the journal's group commit (exchange/adapters/postgres.py); nothing else
-- writes these tables.

-- Every event of every instrument, as the engine emitted it. ``payload`` is the
-- msgspec JSON of the event (msgspec.json.decode(payload,
-- type=exchange.events.Event)). bytea keeps it byte-identical and costs the
-- server no JSON parsing on the hot path; for ad hoc queries:
--   SELECT convert_from(payload, 'UTF8')::jsonb FROM order_events WHERE ...
CREATE TABLE order_events (
    instrument  text COLLATE "C" NOT NULL,
    seq         bigint           NOT NULL,
    ts_ns       bigint           NOT NULL,
    type        text             NOT NULL,
    order_id    bigint,                      -- the order the event is about; the taker's for "filled"
    client_id   text COLLATE "C" NOT NULL,   -- its owner; the taker's for "filled"
    payload     bytea            NOT NULL,
    PRIMARY KEY (instrument, seq)
);

-- The current state of every order: one row per accepted order, and one per
-- rejected place command (order_id NULL, status 'rejected').
CREATE TABLE orders (
    instrument       text COLLATE "C" NOT NULL,
    created_seq      bigint           NOT NULL,  -- seq of its "accepted" (or "rejected") event
    order_id         bigint,                     -- NULL for a rejected place command
    client_id        text COLLATE "C" NOT NULL,
    client_order_id  text COLLATE "C",
    side             text CHECK (side IN ('buy', 'sell')),
    order_type       text CHECK (order_type IN ('limit', 'market')),
    tif              text CHECK (tif IN ('GTC', 'IOC', 'FOK', 'GTD')),
    price_ticks      bigint,                     -- 0 for market orders
    qty_lots         bigint,                     -- total quantity (filled + open), after amends
    remaining_lots   bigint           NOT NULL DEFAULT 0,
    filled_lots      bigint           NOT NULL DEFAULT 0,
    status           text             NOT NULL CHECK (status IN
                         ('open', 'partially_filled', 'filled', 'canceled', 'rejected', 'expired')),
    priority         bigint,                     -- seq of the event that queued it (accepted or re-queuing amend)
    expire_ns        bigint           NOT NULL DEFAULT 0,
    post_only        boolean          NOT NULL DEFAULT false,
    stp              text,
    reject_reason    text,
    reject_text      text,
    created_ts_ns    bigint           NOT NULL,
    updated_seq      bigint           NOT NULL,  -- seq of the last event that changed the row
    updated_ts_ns    bigint           NOT NULL,
    price            numeric,                    -- price_ticks in price units (NULL for market orders)
    qty              numeric,                    -- qty_lots in quantity units
    PRIMARY KEY (instrument, created_seq),
    UNIQUE (instrument, order_id)                -- an order by its engine id
);

-- an order by its owner's id
CREATE INDEX orders_client_order_idx ON orders (client_id, client_order_id);
-- a client's open orders; recovery reads an instrument's open orders through it too (it holds only
-- the open orders, so scanning it is cheap, and it is one index less to keep up on the hot path)
CREATE INDEX orders_open_idx ON orders (client_id, instrument)
    WHERE status IN ('open', 'partially_filled');
-- recovery: an instrument's most recently finished orders (the dedupe window)
CREATE INDEX orders_finished_idx ON orders (instrument, updated_seq, priority)
    WHERE status IN ('filled', 'canceled', 'expired');

-- One row per "filled" event.
CREATE TABLE trades (
    instrument             text COLLATE "C" NOT NULL,
    trade_id               bigint           NOT NULL,
    seq                    bigint           NOT NULL,
    ts_ns                  bigint           NOT NULL,
    traded_at              timestamptz      NOT NULL
        GENERATED ALWAYS AS (to_timestamp(((ts_ns / 1000)::double precision) / 1e6)) STORED,
    price_ticks            bigint           NOT NULL,
    qty_lots               bigint           NOT NULL,
    price                  numeric          NOT NULL,
    qty                    numeric          NOT NULL,
    aggressor_side         text             NOT NULL CHECK (aggressor_side IN ('buy', 'sell')),
    maker_order_id         bigint           NOT NULL,
    maker_client_id        text COLLATE "C" NOT NULL,
    maker_client_order_id  text COLLATE "C" NOT NULL,
    taker_order_id         bigint           NOT NULL,
    taker_client_id        text COLLATE "C" NOT NULL,
    taker_client_order_id  text COLLATE "C" NOT NULL,
    PRIMARY KEY (instrument, trade_id)
);

-- an instrument's trades in a time range
CREATE INDEX trades_time_idx ON trades (instrument, traded_at);

-- A client's position per instrument (average-cost method, see exchange/positions.py).
-- net_lots, cost (ticks*lots) and realized (ticks*lots) are exact integers; net_qty and
-- realized_pnl are the same in quantity and quote-currency units.
CREATE TABLE positions (
    client_id     text COLLATE "C" NOT NULL,
    instrument    text COLLATE "C" NOT NULL,
    net_lots      numeric(38, 0)   NOT NULL,
    cost          numeric(38, 0)   NOT NULL,
    realized      numeric(38, 0)   NOT NULL,
    net_qty       numeric          NOT NULL,
    realized_pnl  numeric          NOT NULL,
    updated_seq   bigint           NOT NULL,
    PRIMARY KEY (client_id, instrument)
);

CREATE INDEX positions_instrument_idx ON positions (instrument);

-- How far each instrument's engine has got: the seq and id counters after the last committed batch.
CREATE TABLE engine_progress (
    instrument     text COLLATE "C" PRIMARY KEY,
    seq            bigint           NOT NULL,
    next_order_id  bigint           NOT NULL,
    next_trade_id  bigint           NOT NULL,
    updated_at     timestamptz      NOT NULL DEFAULT now()
);

-- The last input offset applied, per instrument and Kafka topic partition.
CREATE TABLE input_offsets (
    instrument   text COLLATE "C" NOT NULL,
    topic        text COLLATE "C" NOT NULL,
    partition    integer          NOT NULL,
    last_offset  bigint           NOT NULL,
    PRIMARY KEY (instrument, topic, partition)
);

-- Engine images (msgspec JSON of exchange.matching.EngineState); the newest few per instrument are kept.
CREATE TABLE snapshots (
    instrument   text COLLATE "C" NOT NULL,
    seq          bigint           NOT NULL,
    taken_at     timestamptz      NOT NULL DEFAULT now(),
    state_hash   text             NOT NULL,
    order_count  integer          NOT NULL,
    state        bytea            NOT NULL,
    PRIMARY KEY (instrument, seq)
);
