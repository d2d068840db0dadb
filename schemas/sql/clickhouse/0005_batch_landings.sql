-- Whether a batch landed. A batch cut across partitions cannot be cut again after a crash (its
-- partitions may go to other workers), so each of its spans is recorded with the batch's
-- identity, and each target table's landing view records, in the same insert, the insert's
-- deduplication token and how many rows it stored. A replayed span of a batch that landed is
-- skipped; one of a batch that did not is inserted: exact whatever the rows contain.
ALTER TABLE sluice_batch_spans ADD COLUMN IF NOT EXISTS batch_id UInt128 DEFAULT 0;
ALTER TABLE sluice_batch_spans ADD COLUMN IF NOT EXISTS batch_items UInt64 DEFAULT 0;
-- A block the target table drops as a repeat reaches the view all the same (ClickHouse
-- deduplicates blocks in dependent views by their own table): this table deduplicates too.
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
CREATE MATERIALIZED VIEW IF NOT EXISTS sluice_landed_stream_events TO sluice_batch_landings AS
SELECT 'stream_events' AS target_table, getSetting('insert_deduplication_token') AS token, count() AS rows
FROM stream_events GROUP BY token HAVING token != '';
CREATE MATERIALIZED VIEW IF NOT EXISTS sluice_landed_routing_events TO sluice_batch_landings AS
SELECT 'routing_events' AS target_table, getSetting('insert_deduplication_token') AS token, count() AS rows
FROM routing_events GROUP BY token HAVING token != '';
CREATE MATERIALIZED VIEW IF NOT EXISTS sluice_landed_viewer_metrics TO sluice_batch_landings AS
SELECT 'viewer_metrics' AS target_table, getSetting('insert_deduplication_token') AS token, count() AS rows
FROM viewer_metrics GROUP BY token HAVING token != '';
CREATE MATERIALIZED VIEW IF NOT EXISTS sluice_landed_connection_events TO sluice_batch_landings AS
SELECT 'connection_events' AS target_table, getSetting('insert_deduplication_token') AS token, count() AS rows
FROM connection_events GROUP BY token HAVING token != '';
CREATE MATERIALIZED VIEW IF NOT EXISTS sluice_landed_node_metrics TO sluice_batch_landings AS
SELECT 'node_metrics' AS target_table, getSetting('insert_deduplication_token') AS token, count() AS rows
FROM node_metrics GROUP BY token HAVING token != '';
CREATE MATERIALIZED VIEW IF NOT EXISTS sluice_landed_stream_health_metrics TO sluice_batch_landings AS
SELECT 'stream_health_metrics' AS target_table, getSetting('insert_deduplication_token') AS token, count() AS rows
FROM stream_health_metrics GROUP BY token HAVING token != '';
CREATE MATERIALIZED VIEW IF NOT EXISTS sluice_landed_track_list_events TO sluice_batch_landings AS
SELECT 'track_list_events' AS target_table, getSetting('insert_deduplication_token') AS token, count() AS rows
FROM track_list_events GROUP BY token HAVING token != '';
CREATE MATERIALIZED VIEW IF NOT EXISTS sluice_landed_usage_records TO sluice_batch_landings AS
SELECT 'usage_records' AS target_table, getSetting('insert_deduplication_token') AS token, count() AS rows
FROM usage_records GROUP BY token HAVING token != '';
