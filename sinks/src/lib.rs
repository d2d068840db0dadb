//! Sinks: ClickHouse batch inserts and PostgreSQL state reduction.

pub mod clickhouse;

pub use crate::clickhouse::{
    ClickHouseSink, ClickHouseSpanLog, SPAN_LOG_TABLE, batch_token, classify, dedup_token,
};
