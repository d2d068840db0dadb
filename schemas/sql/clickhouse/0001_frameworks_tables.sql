-- FrameWorks time-series tables, as the FrameWorks query service reads them.
-- Statements run in the configured database (CLICKHOUSE_DB, default `frameworks`). Columns no
-- event fills carry an explicit DEFAULT, so the worker's inserts can leave them out.
-- Every table keeps the hashes of its last 10,000 insert blocks, so that an insert retried or
-- replayed with the same insert_deduplication_token (derived from the source offsets) lands once.

CREATE TABLE IF NOT EXISTS stream_events (
    event_id      UUID,
    timestamp     DateTime,
    tenant_id     UUID,
    internal_name String,
    event_type    LowCardinality(String),
    status        LowCardinality(String),
    node_id       LowCardinality(String),
    ingest_type   Nullable(String),
    protocol      Nullable(String),
    target        Nullable(String),
    file_size     Nullable(UInt64),
    duration      Nullable(UInt32),
    event_data    String
) ENGINE = MergeTree
PARTITION BY (toYYYYMM(timestamp), tenant_id)
ORDER BY (timestamp, internal_name)
TTL timestamp + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS routing_events (
    timestamp        DateTime,
    tenant_id        UUID,
    stream_name      String,
    selected_node    LowCardinality(String),
    status           LowCardinality(String),
    details          String,
    score            Int64,
    client_ip        String,
    client_country   FixedString(2),
    client_region    LowCardinality(String),
    client_city      LowCardinality(String),
    client_latitude  Float64,
    client_longitude Float64,
    node_scores      String,
    routing_metadata String
) ENGINE = MergeTree
PARTITION BY (toYYYYMM(timestamp), tenant_id)
ORDER BY (timestamp, stream_name)
TTL timestamp + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS viewer_metrics (
    timestamp          DateTime,
    tenant_id          UUID,
    internal_name      String,
    viewer_count       UInt32,
    connection_type    LowCardinality(String),
    node_id            LowCardinality(String),
    country_code       FixedString(2),
    city               LowCardinality(String),
    latitude           Float64,
    longitude          Float64,
    connection_quality Float32,
    buffer_health      Float32
) ENGINE = MergeTree
PARTITION BY (toYYYYMM(timestamp), tenant_id)
ORDER BY (timestamp, internal_name)
TTL timestamp + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS connection_events (
    event_id          UUID,
    timestamp         DateTime,
    tenant_id         UUID,
    internal_name     String,
    user_id           String,
    session_id        String,
    connection_addr   String,
    user_agent        String,
    connector         LowCardinality(String),
    node_id           LowCardinality(String),
    country_code      FixedString(2),
    city              LowCardinality(String),
    latitude          Float64,
    longitude         Float64,
    event_type        LowCardinality(String),
    session_duration  UInt32,
    bytes_transferred UInt64
) ENGINE = MergeTree
PARTITION BY (toYYYYMM(timestamp), tenant_id)
ORDER BY (timestamp, internal_name)
TTL timestamp + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS node_metrics (
    timestamp           DateTime,
    tenant_id           UUID,
    node_id             LowCardinality(String),
    cpu_usage           Float32,
    memory_usage        Float32 DEFAULT 0,
    disk_usage          Float32 DEFAULT 0,
    ram_max             UInt64,
    ram_current         UInt64,
    bandwidth_in        UInt64 DEFAULT 0,
    bandwidth_out       UInt64 DEFAULT 0,
    up_speed            UInt64,
    down_speed          UInt64,
    connections_current UInt32 DEFAULT 0,
    stream_count        UInt32,
    health_score        Float32 DEFAULT 0,
    is_healthy          UInt8,
    latitude            Float64 DEFAULT 0,
    longitude           Float64 DEFAULT 0,
    tags                Array(String) DEFAULT [],
    metadata            JSON DEFAULT '{}'
) ENGINE = MergeTree
PARTITION BY (toYYYYMM(timestamp), tenant_id)
ORDER BY (timestamp, node_id)
TTL timestamp + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS stream_health_metrics (
    timestamp             DateTime,
    tenant_id             UUID,
    internal_name         String,
    node_id               LowCardinality(String),
    bitrate               UInt32,
    fps                   Float32,
    gop_size              UInt16 DEFAULT 0,
    width                 UInt16 DEFAULT 0,
    height                UInt16 DEFAULT 0,
    buffer_size           UInt32 DEFAULT 0,
    buffer_used           UInt32 DEFAULT 0,
    buffer_health         Float32,
    packets_sent          UInt64,
    packets_lost          UInt64,
    packets_retransmitted UInt64,
    bandwidth_in          UInt64,
    bandwidth_out         UInt64,
    codec                 LowCardinality(String) DEFAULT '',
    profile               LowCardinality(String) DEFAULT '',
    track_metadata        JSON DEFAULT '{}'
) ENGINE = MergeTree
PARTITION BY (toYYYYMM(timestamp), tenant_id)
ORDER BY (timestamp, internal_name)
TTL timestamp + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS track_list_events (
    timestamp     DateTime,
    event_id      UUID,
    tenant_id     UUID DEFAULT toUUID('00000000-0000-0000-0000-000000000001'),
    internal_name String,
    node_id       LowCardinality(String),
    track_list    String,
    track_count   UInt16
) ENGINE = MergeTree
PARTITION BY (toYYYYMM(timestamp), tenant_id)
ORDER BY (timestamp, internal_name)
TTL timestamp + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS usage_records (
    timestamp     DateTime,
    tenant_id     UUID,
    cluster_id    String,
    usage_type    LowCardinality(String),
    usage_value   Float64,
    billing_month Date,
    usage_details String
) ENGINE = MergeTree
PARTITION BY (toYYYYMM(timestamp), tenant_id)
ORDER BY (timestamp, tenant_id, cluster_id)
TTL timestamp + INTERVAL 365 DAY
SETTINGS non_replicated_deduplication_window = 10000;

-- Five-minute viewer aggregates. The seed aggregated into a plain MergeTree, which gives wrong
-- figures once two insert blocks fall into the same five minutes. Partial aggregation states
-- merge correctly whatever the batching; the view finishes them, so
-- `SELECT timestamp_5m, …, peak_viewers, avg_viewers, … FROM viewer_metrics_5m` still returns
-- one finished row per key.
CREATE TABLE IF NOT EXISTS viewer_metrics_5m_states (
    timestamp_5m             DateTime,
    tenant_id                UUID,
    internal_name            String,
    node_id                  LowCardinality(String),
    peak_viewers_state       AggregateFunction(max, UInt32),
    avg_viewers_state        AggregateFunction(avg, UInt32),
    unique_countries_state   AggregateFunction(uniq, FixedString(2)),
    unique_cities_state      AggregateFunction(uniq, String),
    avg_quality_state        AggregateFunction(avg, Float32),
    avg_buffer_health_state  AggregateFunction(avg, Float32)
) ENGINE = AggregatingMergeTree
PARTITION BY (toYYYYMM(timestamp_5m), tenant_id)
ORDER BY (timestamp_5m, tenant_id, internal_name, node_id)
TTL timestamp_5m + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS viewer_metrics_5m_mv TO viewer_metrics_5m_states AS
SELECT
    toStartOfInterval(timestamp, INTERVAL 5 MINUTE) AS timestamp_5m,
    tenant_id,
    internal_name,
    node_id,
    maxState(viewer_count)                AS peak_viewers_state,
    avgState(viewer_count)                AS avg_viewers_state,
    uniqState(country_code)               AS unique_countries_state,
    uniqState(toString(city))             AS unique_cities_state,
    avgState(connection_quality)          AS avg_quality_state,
    avgState(buffer_health)               AS avg_buffer_health_state
FROM viewer_metrics
GROUP BY timestamp_5m, tenant_id, internal_name, node_id;

CREATE VIEW IF NOT EXISTS viewer_metrics_5m AS
SELECT
    timestamp_5m,
    tenant_id,
    internal_name,
    node_id,
    maxMerge(peak_viewers_state)                    AS peak_viewers,
    toFloat32(avgMerge(avg_viewers_state))          AS avg_viewers,
    toUInt32(uniqMerge(unique_countries_state))     AS unique_countries,
    toUInt32(uniqMerge(unique_cities_state))        AS unique_cities,
    toFloat32(avgMerge(avg_quality_state))          AS avg_connection_quality,
    toFloat32(avgMerge(avg_buffer_health_state))    AS avg_buffer_health
FROM viewer_metrics_5m_states
GROUP BY timestamp_5m, tenant_id, internal_name, node_id;
