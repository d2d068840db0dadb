//! Sinks: ClickHouse batch inserts and PostgreSQL state reduction.
