//! Sinks: ClickHouse batch inserts and PostgreSQL state reduction.

pub mod clickhouse;
pub mod reducer;

pub use crate::clickhouse::{
    ClickHouseSink, ClickHouseSpanLog, SPAN_LOG_TABLE, batch_token, classify, connect, dedup_token,
};
pub use crate::reducer::{Reducer, ReducerSink, classify_pg, coalesce};
