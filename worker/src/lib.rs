//! The Sluice worker shell: everything a pipeline binary needs besides its own stages.
//!
//! A pipeline is a `build` function that wires its graph with a [`Wiring`], and a `main` that
//! hands it to a [`Worker`]. The shell gives every pipeline binary:
//!
//! - a TOML configuration with environment overrides and errors that name the key, for the
//!   framework's sections (`[kafka]`, `[clickhouse]`, `[postgres]`, `[pipeline]`, `[health]`,
//!   `[log]`) and the pipeline's own ([`Settings`]);
//! - logging (text or JSON), `/health`, `/ready` and `/metrics`, signals and the drain
//!   deadline; the wait for the services at start with `/ready` naming each one; the
//!   dead-letter topic; malloc tuning;
//! - exactly-once targets in one call each: [`Wiring::into_clickhouse`],
//!   [`Wiring::window_into_clickhouse`], [`Wiring::reduce_into_postgres`], each checked at
//!   start (a table that would take duplicates stops the worker, named);
//! - the commands `run [--drain] [--progress]`, `migrate [--dry-run] [--cluster] [--layout]`,
//!   `validate`, `bench`, `produce` and `dead-letters`, and any of the pipeline's own.
//!
//! ```no_run
//! use std::process::ExitCode;
//! use sluice_worker::{BoxError, Decoded, NoSettings, Wiring, Worker};
//!
//! /// A row of `page_views`.
//! #[derive(clickhouse::Row, serde::Serialize, Default)]
//! struct PageView {
//!     url: String,
//!     bytes: u64,
//! }
//!
//! fn build(w: &mut Wiring<NoSettings>) -> Result<(), BoxError> {
//!     let mut decode = w.decode("decode")?;
//!     let (views, rows) = decode.output::<PageView>("page_views");
//!     decode.run(move || move |record, out: &mut Decoded| {
//!         match record.value.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()) {
//!             Some(url) => out.push(&views, PageView { bytes: url.len() as u64, url }),
//!             None => out.dead_letter(record, "decode", "empty", "record has no value"),
//!         }
//!     });
//!     w.into_clickhouse(rows, "page_views")?;
//!     Ok(())
//! }
//!
//! fn main() -> ExitCode {
//!     Worker::<NoSettings>::new("page_views")
//!         .topics(["page_views"])
//!         .clickhouse_migrations(&[(
//!             1,
//!             "page_views",
//!             "CREATE TABLE IF NOT EXISTS page_views (url String, bytes UInt64) \
//!              ENGINE = MergeTree ORDER BY url SETTINGS non_replicated_deduplication_window = 10000",
//!         )])
//!         .run(build)
//! }
//! ```

pub mod bench;
mod config;
mod dead_letters;
mod logging;
pub mod migrate;
mod progress;
mod services;
mod wiring;
mod worker;

pub use bench::{Record, Workload, produce};
pub use config::{
    ClickHouseConfig, Config, ConfigError, EnrichConfig, HealthConfig, Identity, InsertCompression,
    KafkaConfig, LogConfig, LogFormat, NoSettings, PipelineSettings, PostgresConfig, Secret,
    Settings, invalid, redact_url,
};
pub use migrate::Migration;
pub use services::{clickhouse_client, clickhouse_server, ensure_topic};
/// Enrich stages and their lookups (GeoIP, PostgreSQL, static tables).
pub use sluice_enrich as enrich;
pub use sluice_enrich::{Enrich, EnrichFlow};
/// The runtime (stages, operators, the Kafka source), for what a pipeline adds of its own.
pub use sluice_pipeline as pipeline;
pub use sluice_pipeline::BoxError;
pub use sluice_pipeline::{
    Decoded, Flow, KafkaRecord, Operator, Sourced, Stage, WindowAggregate, WindowSpec,
};
/// The sinks (ClickHouse, PostgreSQL reducers), for what a pipeline adds of its own.
pub use sluice_sinks as sinks;
pub use sluice_sinks::{Encoded, Reducer, RowEncoder, TableReducer};
pub use wiring::{Plan, Table, TablePlan, Wiring, WiringError};
pub use worker::{Build, NoCommands, Worker};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid (the message names the key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A service cannot be used (the message names it).
    #[error("{service} is not usable: {message}")]
    Service {
        /// `kafka`, `clickhouse` or `postgres`.
        service: String,
        /// Why.
        message: String,
    },
    /// The pipeline's `build` function failed.
    #[error("cannot build the pipeline: {0}")]
    Build(BoxError),
    /// The pipeline stopped on an error.
    #[error(transparent)]
    Pipeline(#[from] sluice_pipeline::PipelineError),
    /// A migration failed.
    #[error("{0}")]
    Migrate(String),
    /// One of the pipeline's own commands failed.
    #[error("{0}")]
    Command(BoxError),
    /// Anything else, said in full.
    #[error("{0}")]
    Other(String),
}

impl From<WiringError> for Error {
    fn from(e: WiringError) -> Self {
        Error::Build(Box::new(e))
    }
}
