//! FrameWorks event and row types, ClickHouse DDL and PostgreSQL migrations.
