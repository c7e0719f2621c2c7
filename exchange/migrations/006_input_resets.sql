-- 006_input_resets: an operator's acceptance of an orders partition whose log lost data.
--
-- When a partition's log no longer holds what this exchange applied (a broker restarted without its
-- data, a topic deleted and recreated) or lost messages it had not read, the daemon does not read it:
-- it never skips silently. `exchange admin accept-offset` asks it to continue from a stated offset; the
-- daemon applies the request (every stored offset of the partition becomes offset - 1, in the same
-- transaction as the request's status) once nothing of the partition is in flight, or refuses it.
-- Each row is the journal of one such decision: who asked, why, and what the daemon found.
--
-- input_offsets also holds, per partition, the partition's own row (instrument ''): every message of
-- the partition up to that offset is durable or needed nothing (a dead letter). The journal writes it
-- with the batches; it is where reading starts after a restart.
CREATE TABLE input_resets (
    id            bigserial        PRIMARY KEY,
    topic         text COLLATE "C" NOT NULL,
    partition     integer          NOT NULL,
    to_offset     bigint           NOT NULL CHECK (to_offset >= 0),
    operator      text             NOT NULL,
    reason        text             NOT NULL,
    status        text             NOT NULL DEFAULT 'requested' CHECK (status IN ('requested', 'applied', 'refused')),
    note          text             NOT NULL DEFAULT '',
    requested_at  timestamptz      NOT NULL DEFAULT now(),
    decided_at    timestamptz
);

CREATE INDEX input_resets_pending_idx ON input_resets (topic, partition) WHERE status = 'requested';
