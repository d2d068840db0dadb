//! Sinks: ClickHouse batch inserts and PostgreSQL state reduction.

pub mod clickhouse;
pub mod reducer;

pub use crate::clickhouse::{
    ClickHouseSink, ClickHouseSpanLog, LANDINGS_TABLE, SPAN_LOG_TABLE, batch_token, classify,
    connect, dedup_token, landing_view,
};
pub use crate::reducer::{Reducer, ReducerSink, classify_pg, coalesce};
