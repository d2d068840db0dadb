-- The reducer sinks' exactly-once ledger: per consumer group and partition, the offset after
-- the last record applied, written in the same transaction as the states; and the epoch of
-- the partition's current owner: a worker that takes over a partition raises it, and a worker
-- still holding an older epoch (it lost the partition without noticing) can no longer reduce
-- its records.
CREATE TABLE IF NOT EXISTS sluice_applied_offsets (
    group_id    TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset BIGINT  NOT NULL,
    updated_at  TIMESTAMP NOT NULL DEFAULT NOW(),
    epoch       BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (group_id, topic, partition)
);
-- A ledger created by a version without fencing.
ALTER TABLE sluice_applied_offsets ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0;
