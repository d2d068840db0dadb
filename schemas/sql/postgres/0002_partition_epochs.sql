-- Fencing: a worker that takes over a partition raises its epoch; a worker still holding an
-- older epoch (it lost the partition without noticing) can no longer reduce its records.
ALTER TABLE sluice_applied_offsets ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0;
