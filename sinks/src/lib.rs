//! Sinks: ClickHouse batch inserts and PostgreSQL state reduction.

pub mod clickhouse;

pub use crate::clickhouse::{ClickHouseSink, classify, dedup_token};
