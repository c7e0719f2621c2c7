-- 008_ownership: one writer per instrument, fenced in the same transaction as its rows.
--
-- Several `exchange run` processes may share one database, one consumer group and the orders topic;
-- Kafka's group assignment gives each orders partition, and so each instrument on it, to one of them.
-- A process that takes an instrument (or an orders partition) bumps its epoch here before it loads
-- anything (exchange/adapters/postgres/store.py, PostgresStore.take), and every batch it commits
-- carries the epochs it was prepared under. exchange_commit_batch locks the batch's ownership rows
-- (FOR SHARE: a take, which updates them, waits for the commit, and the commit for a take under way)
-- and writes nothing if one of them has moved: the process that was frozen, partitioned away or slow
-- to notice its revocation cannot write over the new owner. The orders partition's own row of
-- input_offsets (instrument '': where reading resumes) is fenced by the partition's epoch, because a
-- batch may hold it without any instrument of that partition.
--
-- Answers of exchange_commit_batch (the document is migration 007's plus "epochs" and
-- "partition_epochs"):
--   NULL: written.
--   {"fenced": {"instruments": {instrument: stored epoch}, "partitions": [[topic, partition, stored epoch]]}}:
--     an epoch the batch was prepared under is no longer the stored one (0: never taken); nothing written.
--   {"stored": {instrument: stored seq}}: the batch does not continue the stored sequence (a commit whose
--     acknowledgement was lost, or a writer that did not start from the stored state); nothing written.
--   SQLSTATE EXU01: a stored order the batch changes is missing or no longer open.
--   SQLSTATE EXU03: the batch has rows of an instrument or a partition it carries no epoch for.

CREATE TABLE instrument_owners (
    instrument  text COLLATE "C" PRIMARY KEY,
    epoch       bigint           NOT NULL CHECK (epoch > 0),
    owner       text             NOT NULL,   -- host:pid of the process that took it, for operators
    taken_at    timestamptz      NOT NULL DEFAULT now()
);

CREATE TABLE partition_owners (
    topic       text COLLATE "C" NOT NULL,
    partition   integer          NOT NULL,
    epoch       bigint           NOT NULL CHECK (epoch > 0),
    owner       text             NOT NULL,
    taken_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Lock the ownership rows a batch was prepared under and compare their epochs: NULL when all are current,
-- else the {"fenced": ...} answer. d->'epochs' is [[instrument, epoch], ...], d->'partition_epochs'
-- [[topic, partition, epoch], ...]; both are sorted, so every writer locks in one order.
CREATE FUNCTION exchange_fence(d jsonb) RETURNS json
LANGUAGE plpgsql AS $fn$
DECLARE
    moved_instruments json;
    moved_partitions json;
BEGIN
    PERFORM 1 FROM instrument_owners
    WHERE instrument IN (SELECT e->>0 FROM jsonb_array_elements(d->'epochs') AS e)
    ORDER BY instrument FOR SHARE;
    PERFORM 1 FROM partition_owners AS o
    WHERE (o.topic, o.partition) IN (SELECT e->>0, (e->>1)::integer FROM jsonb_array_elements(d->'partition_epochs') AS e)
    ORDER BY o.topic, o.partition FOR SHARE;

    SELECT json_object_agg(e->>0, coalesce(o.epoch, 0)) INTO moved_instruments
    FROM jsonb_array_elements(d->'epochs') AS e
    LEFT JOIN instrument_owners AS o ON o.instrument = e->>0
    WHERE o.epoch IS DISTINCT FROM (e->>1)::bigint;
    SELECT json_agg(json_build_array(e->>0, (e->>1)::integer, coalesce(o.epoch, 0))) INTO moved_partitions
    FROM jsonb_array_elements(d->'partition_epochs') AS e
    LEFT JOIN partition_owners AS o ON o.topic = e->>0 AND o.partition = (e->>1)::integer
    WHERE o.epoch IS DISTINCT FROM (e->>2)::bigint;

    IF moved_instruments IS NULL AND moved_partitions IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN json_build_object('fenced', json_build_object(
        'instruments', coalesce(moved_instruments, '{}'::json), 'partitions', coalesce(moved_partitions, '[]'::json)));
END
$fn$;

DROP FUNCTION exchange_commit_batch(jsonb);

CREATE FUNCTION exchange_commit_batch(d jsonb) RETURNS json
LANGUAGE plpgsql AS $fn$
DECLARE
    -- per kind of row, the position of each field (d->'fields')
    at_progress record;
    at_step record;
    at_event record;
    at_trade record;
    at_order record;
    at_update record;
    at_position record;
    at_offset record;
    fenced json;
    stored json;
    unowned text;
    expected bigint;
    done bigint;
BEGIN
    SELECT * INTO at_progress FROM jsonb_to_record(d->'fields'->'progress')
        AS x(instrument int, first_seq int, last_seq int, next_order_id int, next_trade_id int, halted int);
    SELECT * INTO at_step FROM jsonb_to_record(d->'fields'->'steps') AS x(instrument int, tick int, lot int);
    SELECT * INTO at_event FROM jsonb_to_record(d->'fields'->'events')
        AS x(instrument int, seq int, ts_ns int, type int, order_id int, client_id int, payload int);
    SELECT * INTO at_trade FROM jsonb_to_record(d->'fields'->'trades')
        AS x(instrument int, trade_id int, seq int, ts_ns int, price_ticks int, qty_lots int, aggressor_side int,
             maker_order_id int, maker_client_id int, maker_client_order_id int, taker_order_id int,
             taker_client_id int, taker_client_order_id int);
    SELECT * INTO at_order FROM jsonb_to_record(d->'fields'->'orders')
        AS x(instrument int, created_seq int, order_id int, client_id int, client_order_id int, side int,
             order_type int, tif int, price_ticks int, qty_lots int, remaining_lots int, filled_lots int,
             status int, priority int, expire_ns int, post_only int, stp int, reject_reason int, reject_text int,
             created_ts_ns int, updated_seq int, updated_ts_ns int);
    SELECT * INTO at_update FROM jsonb_to_record(d->'fields'->'updates')
        AS x(instrument int, order_id int, remaining_lots int, filled_delta int, qty_lots int, price_ticks int,
             priority int, status int, updated_seq int, updated_ts_ns int);
    SELECT * INTO at_position FROM jsonb_to_record(d->'fields'->'positions')
        AS x(client_id int, instrument int, net_lots int, cost int, realized int, updated_seq int);
    SELECT * INTO at_offset FROM jsonb_to_record(d->'fields'->'offsets')
        AS x(instrument int, topic int, partition int, last_offset int);

    -- every instrument and partition the batch writes must be fenced: it carries an epoch for each
    SELECT string_agg(x, ', ') INTO unowned FROM (
        SELECT e->>at_progress.instrument AS x FROM jsonb_array_elements(d->'progress') AS e
        UNION SELECT e->>at_offset.instrument FROM jsonb_array_elements(d->'offsets') AS e
              WHERE e->>at_offset.instrument <> ''
        EXCEPT SELECT e->>0 FROM jsonb_array_elements(d->'epochs') AS e) AS i;
    IF unowned IS NULL THEN
        SELECT string_agg(x, ', ') INTO unowned FROM (
            SELECT (e->>at_offset.topic) || '[' || (e->>at_offset.partition) || ']' AS x
            FROM jsonb_array_elements(d->'offsets') AS e WHERE e->>at_offset.instrument = ''
            EXCEPT SELECT (e->>0) || '[' || (e->>1) || ']' FROM jsonb_array_elements(d->'partition_epochs') AS e) AS p;
    END IF;
    IF unowned IS NOT NULL THEN
        RAISE EXCEPTION 'the batch has rows of % but carries no ownership epoch for them', unowned
            USING ERRCODE = 'EXU03';
    END IF;

    fenced := exchange_fence(d);
    IF fenced IS NOT NULL THEN
        RETURN fenced;
    END IF;

    -- the instruments' progress rows, locked in one order, so two writers cannot interleave
    PERFORM 1 FROM engine_progress
    WHERE instrument IN (SELECT e->>at_progress.instrument FROM jsonb_array_elements(d->'progress') AS e)
    ORDER BY instrument FOR UPDATE;

    IF EXISTS (SELECT 1 FROM jsonb_array_elements(d->'progress') AS e
               LEFT JOIN engine_progress AS p ON p.instrument = e->>at_progress.instrument
               WHERE coalesce(p.seq, 0) <> (e->>at_progress.first_seq)::bigint - 1) THEN
        SELECT coalesce(json_object_agg(p.instrument, p.seq), '{}'::json) INTO stored
        FROM engine_progress AS p
        WHERE p.instrument IN (SELECT e->>at_progress.instrument FROM jsonb_array_elements(d->'progress') AS e);
        RETURN json_build_object('stored', stored);
    END IF;

    INSERT INTO order_events (instrument, seq, ts_ns, type, order_id, client_id, payload)
    SELECT e->>at_event.instrument, (e->>at_event.seq)::bigint, (e->>at_event.ts_ns)::bigint, e->>at_event.type,
           (e->>at_event.order_id)::bigint, e->>at_event.client_id, decode(e->>at_event.payload, 'base64')
    FROM jsonb_array_elements(d->'events') AS e;

    INSERT INTO trades (instrument, trade_id, seq, ts_ns, price_ticks, qty_lots, price, qty, aggressor_side,
                        maker_order_id, maker_client_id, maker_client_order_id, taker_order_id, taker_client_id,
                        taker_client_order_id)
    SELECT e->>at_trade.instrument, (e->>at_trade.trade_id)::bigint, (e->>at_trade.seq)::bigint,
           (e->>at_trade.ts_ns)::bigint, (e->>at_trade.price_ticks)::bigint, (e->>at_trade.qty_lots)::bigint,
           (e->>at_trade.price_ticks)::bigint * s.tick, (e->>at_trade.qty_lots)::bigint * s.lot,
           e->>at_trade.aggressor_side, (e->>at_trade.maker_order_id)::bigint, e->>at_trade.maker_client_id,
           e->>at_trade.maker_client_order_id, (e->>at_trade.taker_order_id)::bigint, e->>at_trade.taker_client_id,
           e->>at_trade.taker_client_order_id
    FROM jsonb_array_elements(d->'trades') AS e
    JOIN (SELECT x->>at_step.instrument AS instrument, (x->>at_step.tick)::numeric AS tick,
                 (x->>at_step.lot)::numeric AS lot
          FROM jsonb_array_elements(d->'steps') AS x) AS s ON s.instrument = e->>at_trade.instrument;

    INSERT INTO orders (instrument, created_seq, order_id, client_id, client_order_id, side, order_type, tif,
                        price_ticks, qty_lots, remaining_lots, filled_lots, status, priority, expire_ns, post_only,
                        stp, reject_reason, reject_text, created_ts_ns, updated_seq, updated_ts_ns, price, qty)
    SELECT e->>at_order.instrument, (e->>at_order.created_seq)::bigint, (e->>at_order.order_id)::bigint,
           e->>at_order.client_id, e->>at_order.client_order_id, e->>at_order.side, e->>at_order.order_type,
           e->>at_order.tif, (e->>at_order.price_ticks)::bigint, (e->>at_order.qty_lots)::bigint,
           (e->>at_order.remaining_lots)::bigint, (e->>at_order.filled_lots)::bigint, e->>at_order.status,
           (e->>at_order.priority)::bigint, (e->>at_order.expire_ns)::bigint, (e->>at_order.post_only)::boolean,
           e->>at_order.stp, e->>at_order.reject_reason, e->>at_order.reject_text,
           (e->>at_order.created_ts_ns)::bigint, (e->>at_order.updated_seq)::bigint,
           (e->>at_order.updated_ts_ns)::bigint,
           nullif((e->>at_order.price_ticks)::bigint, 0) * s.tick, (e->>at_order.qty_lots)::bigint * s.lot
    FROM jsonb_array_elements(d->'orders') AS e
    JOIN (SELECT x->>at_step.instrument AS instrument, (x->>at_step.tick)::numeric AS tick,
                 (x->>at_step.lot)::numeric AS lot
          FROM jsonb_array_elements(d->'steps') AS x) AS s ON s.instrument = e->>at_order.instrument;

    expected := jsonb_array_length(d->'updates');
    IF expected > 0 THEN
        UPDATE orders AS o SET
            remaining_lots = u.remaining_lots,
            filled_lots = o.filled_lots + u.filled_delta,
            qty_lots = coalesce(u.qty_lots, o.qty_lots),
            price_ticks = coalesce(u.price_ticks, o.price_ticks),
            priority = coalesce(u.priority, o.priority),
            -- an order that is no longer open must not change: NULL violates NOT NULL and fails the batch
            status = CASE WHEN o.status IN ('open', 'partially_filled') THEN coalesce(u.status, o.status) END,
            updated_seq = u.updated_seq,
            updated_ts_ns = u.updated_ts_ns,
            price = CASE WHEN u.price_ticks IS NULL THEN o.price ELSE u.price_ticks * s.tick END,
            qty = CASE WHEN u.qty_lots IS NULL THEN o.qty ELSE u.qty_lots * s.lot END
        FROM (
            SELECT e->>at_update.instrument AS instrument, (e->>at_update.order_id)::bigint AS order_id,
                   (e->>at_update.remaining_lots)::bigint AS remaining_lots,
                   (e->>at_update.filled_delta)::bigint AS filled_delta, (e->>at_update.qty_lots)::bigint AS qty_lots,
                   (e->>at_update.price_ticks)::bigint AS price_ticks, (e->>at_update.priority)::bigint AS priority,
                   e->>at_update.status AS status, (e->>at_update.updated_seq)::bigint AS updated_seq,
                   (e->>at_update.updated_ts_ns)::bigint AS updated_ts_ns
            FROM jsonb_array_elements(d->'updates') AS e
        ) AS u
        JOIN (SELECT x->>at_step.instrument AS instrument, (x->>at_step.tick)::numeric AS tick,
                     (x->>at_step.lot)::numeric AS lot
              FROM jsonb_array_elements(d->'steps') AS x) AS s ON s.instrument = u.instrument
        WHERE o.instrument = u.instrument AND o.order_id = u.order_id;
        GET DIAGNOSTICS done = ROW_COUNT;
        IF done <> expected THEN
            RAISE EXCEPTION '% stored orders should change but only % of their rows were found', expected, done
                USING ERRCODE = 'EXU01';
        END IF;
    END IF;

    INSERT INTO positions (client_id, instrument, net_lots, cost, realized, net_qty, realized_pnl, updated_seq)
    SELECT e->>at_position.client_id, e->>at_position.instrument, (e->>at_position.net_lots)::numeric,
           (e->>at_position.cost)::numeric, (e->>at_position.realized)::numeric,
           (e->>at_position.net_lots)::numeric * s.lot, (e->>at_position.realized)::numeric * s.tick * s.lot,
           (e->>at_position.updated_seq)::bigint
    FROM jsonb_array_elements(d->'positions') AS e
    JOIN (SELECT x->>at_step.instrument AS instrument, (x->>at_step.tick)::numeric AS tick,
                 (x->>at_step.lot)::numeric AS lot
          FROM jsonb_array_elements(d->'steps') AS x) AS s ON s.instrument = e->>at_position.instrument
    ON CONFLICT (client_id, instrument) DO UPDATE SET
        net_lots = EXCLUDED.net_lots, cost = EXCLUDED.cost, realized = EXCLUDED.realized,
        net_qty = EXCLUDED.net_qty, realized_pnl = EXCLUDED.realized_pnl, updated_seq = EXCLUDED.updated_seq;

    INSERT INTO engine_progress (instrument, seq, next_order_id, next_trade_id, halted, updated_at)
    SELECT e->>at_progress.instrument, (e->>at_progress.last_seq)::bigint, (e->>at_progress.next_order_id)::bigint,
           (e->>at_progress.next_trade_id)::bigint, (e->>at_progress.halted)::boolean, now()
    FROM jsonb_array_elements(d->'progress') AS e
    ON CONFLICT (instrument) DO UPDATE SET
        seq = EXCLUDED.seq, next_order_id = EXCLUDED.next_order_id, next_trade_id = EXCLUDED.next_trade_id,
        halted = EXCLUDED.halted, updated_at = EXCLUDED.updated_at;

    INSERT INTO input_offsets (instrument, topic, partition, last_offset)
    SELECT e->>at_offset.instrument, e->>at_offset.topic, (e->>at_offset.partition)::integer,
           (e->>at_offset.last_offset)::bigint
    FROM jsonb_array_elements(d->'offsets') AS e
    ON CONFLICT (instrument, topic, partition) DO UPDATE SET last_offset = EXCLUDED.last_offset;

    RETURN NULL;
END
$fn$;
