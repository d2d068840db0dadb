-- The worker's record of the batches it cut: one row per span (consumer group, target table,
-- source partition, the offsets of its first and last record, its window, and the batch it
-- left in when it left with other spans), written before the batch is inserted. After a
-- crash, records past the committed offset are cut again along these spans, so each insert
-- repeats its insert_deduplication_token and lands once. Only spans past the committed offset
-- matter; the TTL keeps the table small.
CREATE TABLE IF NOT EXISTS sluice_batch_spans
(
    consumer_group  String,
    target_table    LowCardinality(String),
    topic           String,
    partition       Int32,
    first_offset    Int64,
    last_offset     Int64,
    items           UInt64,
    recorded_at     DateTime64(3) DEFAULT now64(3),
    span_key        Int64 DEFAULT 0,
    across          Bool DEFAULT false,
    batch_id        UInt128 DEFAULT 0,
    batch_items     UInt64 DEFAULT 0
)
ENGINE = MergeTree
ORDER BY (consumer_group, topic, partition, target_table, last_offset)
TTL toDateTime(recorded_at) + INTERVAL 30 DAY;
-- A span log created by a version without windows, gathered batches or batch identities.
ALTER TABLE sluice_batch_spans ADD COLUMN IF NOT EXISTS span_key Int64 DEFAULT 0;
ALTER TABLE sluice_batch_spans ADD COLUMN IF NOT EXISTS across Bool DEFAULT false;
ALTER TABLE sluice_batch_spans ADD COLUMN IF NOT EXISTS batch_id UInt128 DEFAULT 0;
ALTER TABLE sluice_batch_spans ADD COLUMN IF NOT EXISTS batch_items UInt64 DEFAULT 0;
