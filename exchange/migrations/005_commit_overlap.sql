-- 005_commit_overlap: exchange_commit_batch takes jsonb, and a batch may start while the one before it
-- is still committing.
--
-- jsonb: migration 003's function took json and cast it to jsonb, so the server parsed every document
-- twice.
--
-- Order: 003 locked the instruments' progress first and did all its work after it. Here the batch's
-- new rows -- events, trades, new orders: keys no other batch has -- go in first; then the progress rows
-- are locked and the batch must continue each instrument's stored sequence exactly; then the rest
-- (updated orders, positions, counters, offsets). So a batch the journal sends while the commit before
-- it is still in flight (wait_ms above 0) does its inserts meanwhile, on a connection of its own, and
-- then waits -- at most wait_ms -- until the stored sequence reaches the seq it continues: batches
-- still become durable one after the other, in order.
--
-- Answers:
--   NULL: written.
--   The stored seq of each instrument of the batch as a JSON object, nothing written: an instrument
--   is already at or past the batch's first seq (a commit whose acknowledgement was lost, or another
--   writer); the store decides which, as with 003.
--   SQLSTATE EXU02, the stored seqs as a JSON object in the DETAIL: after the inserts the stored
--   sequence is not where the batch starts (a gap, another writer, or the commit before did not end
--   within wait_ms). The statement fails, so its inserts are rolled back.
--   SQLSTATE EXU01: a stored order the batch changes is missing or no longer open (as in 003).
-- The document is 003's.

DROP FUNCTION exchange_commit_batch(json);

CREATE FUNCTION exchange_commit_batch(d jsonb, wait_ms integer DEFAULT 0) RETURNS json
LANGUAGE plpgsql AS $fn$
DECLARE
    stored json;
    expected bigint;
    done bigint;
    give_up timestamptz := clock_timestamp() + make_interval(secs => wait_ms / 1000.0);
BEGIN
    -- already written? The stored seqs only move forward, so this needs no lock.
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(d->'progress') AS e
               JOIN engine_progress AS p ON p.instrument = e->>0
               WHERE p.seq >= (e->>1)::bigint) THEN
        SELECT coalesce(json_object_agg(p.instrument, p.seq), '{}'::json) INTO stored
        FROM engine_progress AS p
        WHERE p.instrument IN (SELECT e->>0 FROM jsonb_array_elements(d->'progress') AS e);
        RETURN stored;
    END IF;

    INSERT INTO order_events (instrument, seq, ts_ns, type, order_id, client_id, payload)
    SELECT e->>0, (e->>1)::bigint, (e->>2)::bigint, e->>3, (e->>4)::bigint, e->>5, decode(e->>6, 'base64')
    FROM jsonb_array_elements(d->'events') AS e;

    INSERT INTO trades (instrument, trade_id, seq, ts_ns, price_ticks, qty_lots, price, qty, aggressor_side,
                        maker_order_id, maker_client_id, maker_client_order_id, taker_order_id, taker_client_id,
                        taker_client_order_id)
    SELECT e->>0, (e->>1)::bigint, (e->>2)::bigint, (e->>3)::bigint, (e->>4)::bigint, (e->>5)::bigint,
           (e->>4)::bigint * s.tick, (e->>5)::bigint * s.lot, e->>8, (e->>9)::bigint, e->>10, e->>11,
           (e->>12)::bigint, e->>13, e->>14
    FROM jsonb_array_elements(d->'trades') AS e
    JOIN (SELECT x->>0 AS instrument, (x->>1)::numeric AS tick, (x->>2)::numeric AS lot
          FROM jsonb_array_elements(d->'steps') AS x) AS s ON s.instrument = e->>0;

    INSERT INTO orders (instrument, created_seq, order_id, client_id, client_order_id, side, order_type, tif,
                        price_ticks, qty_lots, remaining_lots, filled_lots, status, priority, expire_ns, post_only,
                        stp, reject_reason, reject_text, created_ts_ns, updated_seq, updated_ts_ns, price, qty)
    SELECT e->>0, (e->>1)::bigint, (e->>2)::bigint, e->>3, e->>4, e->>5, e->>6, e->>7,
           (e->>8)::bigint, (e->>9)::bigint, (e->>10)::bigint, (e->>11)::bigint, e->>12, (e->>13)::bigint,
           (e->>14)::bigint, (e->>15)::boolean, e->>16, e->>17, e->>18, (e->>19)::bigint, (e->>20)::bigint,
           (e->>21)::bigint, nullif((e->>8)::bigint, 0) * s.tick, (e->>9)::bigint * s.lot
    FROM jsonb_array_elements(d->'orders') AS e
    JOIN (SELECT x->>0 AS instrument, (x->>1)::numeric AS tick, (x->>2)::numeric AS lot
          FROM jsonb_array_elements(d->'steps') AS x) AS s ON s.instrument = e->>0;

    -- the batch's turn: the instruments' progress rows, locked in one order so two writers cannot
    -- interleave, must be exactly where the batch starts. Until the commit before has locked them (it
    -- may still be inserting), this batch can get the lock first and see them behind: it then lets go
    -- (the block's subtransaction ends with the error and takes the lock with it) and tries again.
    LOOP
        BEGIN
            PERFORM 1 FROM engine_progress
            WHERE instrument IN (SELECT e->>0 FROM jsonb_array_elements(d->'progress') AS e)
            ORDER BY instrument FOR UPDATE;
            SELECT json_object_agg(e->>0, coalesce(p.seq, 0)) FILTER (WHERE coalesce(p.seq, 0) <> (e->>1)::bigint - 1)
            INTO stored
            FROM jsonb_array_elements(d->'progress') AS e
            LEFT JOIN engine_progress AS p ON p.instrument = e->>0;
            EXIT WHEN stored IS NULL;
            IF clock_timestamp() < give_up AND NOT EXISTS (
                    SELECT 1 FROM jsonb_array_elements(d->'progress') AS e
                    JOIN engine_progress AS p ON p.instrument = e->>0
                    WHERE p.seq >= (e->>1)::bigint) THEN
                RAISE EXCEPTION 'not yet' USING ERRCODE = 'EXU03';
            END IF;
            RAISE EXCEPTION 'the stored sequence is not where the batch starts' USING ERRCODE = 'EXU02',
                DETAIL = (SELECT coalesce(json_object_agg(p.instrument, p.seq), '{}'::json)::text
                          FROM engine_progress AS p
                          WHERE p.instrument IN (SELECT e->>0 FROM jsonb_array_elements(d->'progress') AS e));
        EXCEPTION WHEN SQLSTATE 'EXU03' THEN
            PERFORM pg_sleep(0.0002);
        END;
    END LOOP;

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
            SELECT e->>0 AS instrument, (e->>1)::bigint AS order_id, (e->>2)::bigint AS remaining_lots,
                   (e->>3)::bigint AS filled_delta, (e->>4)::bigint AS qty_lots, (e->>5)::bigint AS price_ticks,
                   (e->>6)::bigint AS priority, e->>7 AS status, (e->>8)::bigint AS updated_seq,
                   (e->>9)::bigint AS updated_ts_ns
            FROM jsonb_array_elements(d->'updates') AS e
        ) AS u
        JOIN (SELECT x->>0 AS instrument, (x->>1)::numeric AS tick, (x->>2)::numeric AS lot
              FROM jsonb_array_elements(d->'steps') AS x) AS s ON s.instrument = u.instrument
        WHERE o.instrument = u.instrument AND o.order_id = u.order_id;
        GET DIAGNOSTICS done = ROW_COUNT;
        IF done <> expected THEN
            RAISE EXCEPTION '% stored orders should change but only % of their rows were found', expected, done
                USING ERRCODE = 'EXU01';
        END IF;
    END IF;

    INSERT INTO positions (client_id, instrument, net_lots, cost, realized, net_qty, realized_pnl, updated_seq)
    SELECT e->>0, e->>1, (e->>2)::numeric, (e->>3)::numeric, (e->>4)::numeric, (e->>2)::numeric * s.lot,
           (e->>4)::numeric * s.tick * s.lot, (e->>5)::bigint
    FROM jsonb_array_elements(d->'positions') AS e
    JOIN (SELECT x->>0 AS instrument, (x->>1)::numeric AS tick, (x->>2)::numeric AS lot
          FROM jsonb_array_elements(d->'steps') AS x) AS s ON s.instrument = e->>1
    ON CONFLICT (client_id, instrument) DO UPDATE SET
        net_lots = EXCLUDED.net_lots, cost = EXCLUDED.cost, realized = EXCLUDED.realized,
        net_qty = EXCLUDED.net_qty, realized_pnl = EXCLUDED.realized_pnl, updated_seq = EXCLUDED.updated_seq;

    INSERT INTO engine_progress (instrument, seq, next_order_id, next_trade_id, halted, updated_at)
    SELECT e->>0, (e->>2)::bigint, (e->>3)::bigint, (e->>4)::bigint, (e->>5)::boolean, now()
    FROM jsonb_array_elements(d->'progress') AS e
    ON CONFLICT (instrument) DO UPDATE SET
        seq = EXCLUDED.seq, next_order_id = EXCLUDED.next_order_id, next_trade_id = EXCLUDED.next_trade_id,
        halted = EXCLUDED.halted, updated_at = EXCLUDED.updated_at;

    INSERT INTO input_offsets (instrument, topic, partition, last_offset)
    SELECT e->>0, e->>1, (e->>2)::integer, (e->>3)::bigint
    FROM jsonb_array_elements(d->'offsets') AS e
    ON CONFLICT (instrument, topic, partition) DO UPDATE SET last_offset = EXCLUDED.last_offset;

    RETURN NULL;
END
$fn$;
