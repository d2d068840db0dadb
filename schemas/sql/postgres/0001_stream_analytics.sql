-- Current stream state, one row per (tenant_id, internal_name), columns as in the FrameWorks
-- control-plane schema (without the reference to `tenants`, which the worker must not need).
CREATE TABLE IF NOT EXISTS stream_analytics (
    id                     UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id              UUID NOT NULL,
    internal_name          VARCHAR(255) NOT NULL,
    session_start_time     TIMESTAMP,
    session_end_time       TIMESTAMP,
    total_session_duration INTEGER DEFAULT 0,
    current_viewers        INTEGER DEFAULT 0,
    peak_viewers           INTEGER DEFAULT 0,
    total_connections      INTEGER DEFAULT 0,
    bandwidth_in           BIGINT DEFAULT 0,
    bandwidth_out          BIGINT DEFAULT 0,
    total_bandwidth_gb     DECIMAL(15,6) DEFAULT 0,
    bitrate_kbps           INTEGER,
    resolution             VARCHAR(50),
    packets_sent           BIGINT DEFAULT 0,
    packets_lost           BIGINT DEFAULT 0,
    packets_retrans        BIGINT DEFAULT 0,
    upbytes                BIGINT DEFAULT 0,
    downbytes              BIGINT DEFAULT 0,
    first_ms               BIGINT,
    last_ms                BIGINT,
    track_count            INTEGER DEFAULT 0,
    inputs                 INTEGER DEFAULT 0,
    outputs                INTEGER DEFAULT 0,
    track_details          JSONB,
    health_data            JSONB,
    node_id                VARCHAR(100),
    node_name              VARCHAR(255),
    latitude               DECIMAL(10,8),
    longitude              DECIMAL(11,8),
    location               VARCHAR(255),
    status                 VARCHAR(50) DEFAULT 'offline',
    last_updated           TIMESTAMP,
    created_at             TIMESTAMP DEFAULT NOW(),
    UNIQUE (tenant_id, internal_name)
);

-- The worker's bookkeeping: per consumer group and partition, the next offset whose effects
-- are not yet in the state tables. Written in the same transaction as the state, so a
-- redelivered record below it is recognised and skipped.
CREATE TABLE IF NOT EXISTS sluice_applied_offsets (
    group_id    TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset BIGINT  NOT NULL,
    updated_at  TIMESTAMP NOT NULL DEFAULT NOW(),
    PRIMARY KEY (group_id, topic, partition)
);
