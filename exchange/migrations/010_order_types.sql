-- 010_order_types: stop, stop-limit and iceberg orders in the orders table (exchange/core/matching.py).
--
-- A stop or stop-limit order is a row like any other ('open' while it waits), with its order_type, tif and
-- price (0 for a stop: triggered, it is a market order) and:
--   stop_price_ticks  its stop price, after amends (0: not a stop order);
--   triggered_seq     the seq of its "triggered" event: 0 while it waits. An open row with a stop price and
--                     triggered_seq 0 is a waiting stop (recovery rebuilds EngineState.stops from those, in
--                     order_id order); once triggered its priority is that seq, and a stop-limit that rests
--                     is an open order of the book like any other;
--   funds             a buy's budget in quote units as accepted (a stop buy on an instrument with balances
--                     holds it while it waits; market buys name one too); numeric(38,0): up to 10^24.
-- An iceberg keeps its slice size in display_lots; remaining_lots is the slice it shows and hidden_lots the
-- rest of its open quantity (recovery rebuilds its RestingOrder from the three). Every other order has 0 in
-- these columns, so its row is what it was. The last trade price recovery needs (stops trigger on it) is the
-- price of the instrument's last trade, read from the trades table: no column of its own.
--
-- exchange_commit_batch is migration 009's with these rows: "orders" with the five new fields, "updates" with
-- hidden_lots, stop_price_ticks and triggered_seq (NULL keeps the stored value, as for the others); an update's
-- price_ticks 0 (an amended stop's, which has no limit price) leaves price NULL, as the insert does. Its answers
-- are 009's.

ALTER TABLE orders
    ADD COLUMN stop_price_ticks bigint         NOT NULL DEFAULT 0,
    ADD COLUMN triggered_seq    bigint         NOT NULL DEFAULT 0,
    ADD COLUMN display_lots     bigint         NOT NULL DEFAULT 0,
    ADD COLUMN hidden_lots      bigint         NOT NULL DEFAULT 0,
    ADD COLUMN funds            numeric(38, 0) NOT NULL DEFAULT 0,
    DROP CONSTRAINT orders_order_type_check,
    ADD CONSTRAINT orders_order_type_check CHECK (order_type IN ('limit', 'market', 'stop', 'stop_limit'));

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
    at_balance record;
    at_transfer record;
    fenced json;
    stored json;
    unowned text;
    expected bigint;
    done bigint;
BEGIN
    SELECT * INTO at_progress FROM jsonb_to_record(d->'fields'->'progress')
        AS x(instrument int, first_seq int, last_seq int, next_order_id int, next_trade_id int, halted int);
    SELECT * INTO at_step FROM jsonb_to_record(d->'fields'->'steps')
        AS x(instrument int, tick int, lot int, base_asset int);
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
             created_ts_ns int, updated_seq int, updated_ts_ns int, rate int, stop_price_ticks int,
             triggered_seq int, display_lots int, hidden_lots int, funds int);
    SELECT * INTO at_update FROM jsonb_to_record(d->'fields'->'updates')
        AS x(instrument int, order_id int, remaining_lots int, filled_delta int, qty_lots int, price_ticks int,
             priority int, status int, updated_seq int, updated_ts_ns int, rate int, hidden_lots int,
             stop_price_ticks int, triggered_seq int);
    SELECT * INTO at_position FROM jsonb_to_record(d->'fields'->'positions')
        AS x(client_id int, instrument int, net_lots int, cost int, realized int, updated_seq int);
    SELECT * INTO at_offset FROM jsonb_to_record(d->'fields'->'offsets')
        AS x(instrument int, topic int, partition int, last_offset int);
    SELECT * INTO at_balance FROM jsonb_to_record(d->'fields'->'balances')
        AS x(instrument int, client_id int, asset int, available int, reserved int, updated_seq int);
    SELECT * INTO at_transfer FROM jsonb_to_record(d->'fields'->'transfers')
        AS x(instrument int, transfer_id int, client_id int, asset int, kind int, amount_units int, status int,
             outcome int, seq int, ts_ns int);

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
                        stp, reject_reason, reject_text, created_ts_ns, updated_seq, updated_ts_ns, price, qty, rate,
                        stop_price_ticks, triggered_seq, display_lots, hidden_lots, funds)
    SELECT e->>at_order.instrument, (e->>at_order.created_seq)::bigint, (e->>at_order.order_id)::bigint,
           e->>at_order.client_id, e->>at_order.client_order_id, e->>at_order.side, e->>at_order.order_type,
           e->>at_order.tif, (e->>at_order.price_ticks)::bigint, (e->>at_order.qty_lots)::bigint,
           (e->>at_order.remaining_lots)::bigint, (e->>at_order.filled_lots)::bigint, e->>at_order.status,
           (e->>at_order.priority)::bigint, (e->>at_order.expire_ns)::bigint, (e->>at_order.post_only)::boolean,
           e->>at_order.stp, e->>at_order.reject_reason, e->>at_order.reject_text,
           (e->>at_order.created_ts_ns)::bigint, (e->>at_order.updated_seq)::bigint,
           (e->>at_order.updated_ts_ns)::bigint,
           nullif((e->>at_order.price_ticks)::bigint, 0) * s.tick, (e->>at_order.qty_lots)::bigint * s.lot,
           (e->>at_order.rate)::bigint, (e->>at_order.stop_price_ticks)::bigint,
           (e->>at_order.triggered_seq)::bigint, (e->>at_order.display_lots)::bigint,
           (e->>at_order.hidden_lots)::bigint, (e->>at_order.funds)::numeric
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
            rate = coalesce(u.rate, o.rate),
            hidden_lots = coalesce(u.hidden_lots, o.hidden_lots),
            stop_price_ticks = coalesce(u.stop_price_ticks, o.stop_price_ticks),
            triggered_seq = coalesce(u.triggered_seq, o.triggered_seq),
            -- an order that is no longer open must not change: NULL violates NOT NULL and fails the batch
            status = CASE WHEN o.status IN ('open', 'partially_filled') THEN coalesce(u.status, o.status) END,
            updated_seq = u.updated_seq,
            updated_ts_ns = u.updated_ts_ns,
            -- (a stop's price is 0: NULL in price, as a market order's)
            price = CASE WHEN u.price_ticks IS NULL THEN o.price ELSE nullif(u.price_ticks, 0) * s.tick END,
            qty = CASE WHEN u.qty_lots IS NULL THEN o.qty ELSE u.qty_lots * s.lot END
        FROM (
            SELECT e->>at_update.instrument AS instrument, (e->>at_update.order_id)::bigint AS order_id,
                   (e->>at_update.remaining_lots)::bigint AS remaining_lots,
                   (e->>at_update.filled_delta)::bigint AS filled_delta, (e->>at_update.qty_lots)::bigint AS qty_lots,
                   (e->>at_update.price_ticks)::bigint AS price_ticks, (e->>at_update.priority)::bigint AS priority,
                   e->>at_update.status AS status, (e->>at_update.updated_seq)::bigint AS updated_seq,
                   (e->>at_update.updated_ts_ns)::bigint AS updated_ts_ns, (e->>at_update.rate)::bigint AS rate,
                   (e->>at_update.hidden_lots)::bigint AS hidden_lots,
                   (e->>at_update.stop_price_ticks)::bigint AS stop_price_ticks,
                   (e->>at_update.triggered_seq)::bigint AS triggered_seq
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

    INSERT INTO balances (instrument, client_id, asset, available, reserved, available_amount, reserved_amount,
                          updated_seq)
    SELECT e->>at_balance.instrument, e->>at_balance.client_id, e->>at_balance.asset,
           (e->>at_balance.available)::numeric, (e->>at_balance.reserved)::numeric,
           (e->>at_balance.available)::numeric * s.unit, (e->>at_balance.reserved)::numeric * s.unit,
           (e->>at_balance.updated_seq)::bigint
    FROM jsonb_array_elements(d->'balances') AS e
    JOIN (SELECT x->>at_step.instrument AS instrument, x->>at_step.base_asset AS base_asset,
                 (x->>at_step.lot)::numeric AS lot, (x->>at_step.tick)::numeric * (x->>at_step.lot)::numeric AS quote
          FROM jsonb_array_elements(d->'steps') AS x) AS t ON t.instrument = e->>at_balance.instrument
    -- one unit of the asset in its decimal units
    CROSS JOIN LATERAL (SELECT CASE WHEN e->>at_balance.asset = t.base_asset THEN t.lot ELSE t.quote END AS unit) AS s
    ON CONFLICT (instrument, client_id, asset) DO UPDATE SET
        available = EXCLUDED.available, reserved = EXCLUDED.reserved, available_amount = EXCLUDED.available_amount,
        reserved_amount = EXCLUDED.reserved_amount, updated_seq = EXCLUDED.updated_seq;

    INSERT INTO transfers (instrument, transfer_id, client_id, asset, kind, amount_units, amount, status, outcome,
                           seq, ts_ns)
    SELECT e->>at_transfer.instrument, e->>at_transfer.transfer_id, e->>at_transfer.client_id, e->>at_transfer.asset,
           e->>at_transfer.kind, (e->>at_transfer.amount_units)::numeric,
           (e->>at_transfer.amount_units)::numeric
               * CASE WHEN e->>at_transfer.asset = t.base_asset THEN t.lot ELSE t.tick * t.lot END,
           e->>at_transfer.status, e->>at_transfer.outcome, (e->>at_transfer.seq)::bigint,
           (e->>at_transfer.ts_ns)::bigint
    FROM jsonb_array_elements(d->'transfers') AS e
    JOIN (SELECT x->>at_step.instrument AS instrument, x->>at_step.base_asset AS base_asset,
                 (x->>at_step.tick)::numeric AS tick, (x->>at_step.lot)::numeric AS lot
          FROM jsonb_array_elements(d->'steps') AS x) AS t ON t.instrument = e->>at_transfer.instrument;

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
