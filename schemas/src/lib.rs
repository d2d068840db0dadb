//! FrameWorks event and row types, ClickHouse DDL and PostgreSQL migrations.

pub mod event;

pub use event::{DEFAULT_TENANT, DecodeError, Event, EventType};
