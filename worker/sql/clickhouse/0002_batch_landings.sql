-- Whether a batch landed. A batch cut across partitions cannot be cut again after a crash (its
-- partitions may go to other workers), so each of its spans is recorded with the batch's
-- identity, and each target table's landing view (created by `migrate` for every table a
-- pipeline writes) records, in the same insert, the insert's deduplication token and how many
-- rows it stored. A replayed span of a batch that landed is skipped; one of a batch that did
-- not is inserted: exact whatever the rows contain. A block the target table drops as a repeat
-- reaches the view all the same (ClickHouse deduplicates blocks in dependent views by their
-- own table): this table deduplicates too.
CREATE TABLE IF NOT EXISTS sluice_batch_landings
(
    target_table    LowCardinality(String),
    token           String,
    rows            UInt64,
    landed_at       DateTime DEFAULT now()
)
ENGINE = MergeTree
ORDER BY (target_table, token)
TTL landed_at + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 100000;
