-- The fan-out's "published through seq" watermark per instrument: every event up to it went out to
-- Kafka and to the market-data sink. Written by the publisher after the outputs took the events
-- (so it lags, never leads); at start-up the events after it are published again.
CREATE TABLE publish_progress (
    instrument  text COLLATE "C" PRIMARY KEY,
    seq         bigint           NOT NULL,
    updated_at  timestamptz      NOT NULL DEFAULT now()
);
