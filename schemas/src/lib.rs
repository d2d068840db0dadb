//! FrameWorks event and row types, ClickHouse DDL and PostgreSQL migrations.

pub mod data;
pub mod event;
pub mod rows;
pub mod sample;

pub use data::{Data, Field};
pub use event::{DEFAULT_TENANT, DecodeError, Event, EventType};
pub use rows::{EVENT_TABLES, TableRow};

/// FrameWorks' ClickHouse migrations in order: (version, name, SQL of `;`-separated
/// statements). The worker shell applies the framework's own tables (span log, landings)
/// and a landing view per table before and after them. Versions 2–5 were the framework's
/// tables before the framework had migrations of its own: the next FrameWorks migration is 6.
pub const CLICKHOUSE_MIGRATIONS: &[(u32, &str, &str)] = &[(
    1,
    "frameworks_tables",
    include_str!("../sql/clickhouse/0001_frameworks_tables.sql"),
)];

/// FrameWorks' PostgreSQL migrations, in order: (version, name, SQL). The framework's
/// applied-offsets ledger is the shell's own migration.
pub const POSTGRES_MIGRATIONS: &[(u32, &str, &str)] = &[(
    1,
    "stream_analytics",
    include_str!("../sql/postgres/0001_stream_analytics.sql"),
)];
