//! FrameWorks event and row types, ClickHouse DDL and PostgreSQL migrations.

pub mod cluster;
pub mod data;
pub mod event;
pub mod rows;
pub mod sample;

pub use data::{Data, Field};
pub use event::{DEFAULT_TENANT, DecodeError, Event, EventType};
pub use rows::TableRow;

/// ClickHouse migrations in order: (version, name, SQL of `;`-separated statements).
pub const CLICKHOUSE_MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "frameworks_tables",
        include_str!("../sql/clickhouse/0001_frameworks_tables.sql"),
    ),
    (
        2,
        "batch_spans",
        include_str!("../sql/clickhouse/0002_batch_spans.sql"),
    ),
    (
        3,
        "span_keys",
        include_str!("../sql/clickhouse/0003_span_keys.sql"),
    ),
    (
        4,
        "span_across",
        include_str!("../sql/clickhouse/0004_span_across.sql"),
    ),
    (
        5,
        "batch_landings",
        include_str!("../sql/clickhouse/0005_batch_landings.sql"),
    ),
];

/// PostgreSQL migrations for sqlx's migrator, in order: (version, name, SQL).
pub const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "stream_analytics",
        include_str!("../sql/postgres/0001_stream_analytics.sql"),
    ),
    (
        2,
        "partition_epochs",
        include_str!("../sql/postgres/0002_partition_epochs.sql"),
    ),
];

/// The statements of a migration: comment lines dropped, split at `;`.
pub fn sql_statements(sql: &str) -> Vec<String> {
    let code: Vec<&str> = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect();
    code.join("\n")
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}
