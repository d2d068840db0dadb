-- The worker's record of the batches it cut: one row per batch (consumer group, target
-- table, source partition and the offsets of its first and last record), written before the
-- batch is inserted. After a crash, records past the committed offset are cut again along
-- these spans, so each insert repeats its insert_deduplication_token and lands once.
-- Only spans past the committed offset matter; the TTL keeps the table small.
CREATE TABLE IF NOT EXISTS sluice_batch_spans
(
    consumer_group  String,
    target_table    LowCardinality(String),
    topic           String,
    partition       Int32,
    first_offset    Int64,
    last_offset     Int64,
    items           UInt64,
    recorded_at     DateTime64(3) DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY (consumer_group, topic, partition, target_table, last_offset)
TTL toDateTime(recorded_at) + INTERVAL 30 DAY;
