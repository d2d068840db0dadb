//! Enrichment for Sluice pipelines: join a stream with reference data (a GeoIP database, a
//! PostgreSQL table, a static mapping) in a stage that looks up each micro-batch's keys at
//! once, through a bounded cache with a TTL, and retries or passes through when the lookup
//! fails.
//!
//! A [`Lookup`] answers a batch of keys; an [`Enrich`] says which key an item has and what a
//! value does to it; [`EnrichFlow::enrich`] adds the stage to a flow:
//!
//! ```no_run
//! use sluice_enrich::{CacheConfig, Enrich, EnrichFlow, MaxMind, OnError};
//! use sluice_pipeline::{Flow, Stage};
//!
//! struct Visit { addr: String, country: String }
//!
//! fn wire(visits: Flow<Visit>) -> Result<Flow<Visit>, sluice_enrich::LookupError> {
//!     let geoip = Enrich::new(
//!         MaxMind::open("GeoLite2-City.mmdb")?,
//!         |v: &Visit| v.addr.parse().ok(),
//!         |v, geo| v.country = geo.country_code.to_string(),
//!     )
//!     .cache(CacheConfig::default())
//!     .on_error(OnError::Retry);
//!     Ok(visits.enrich(Stage::new("geoip").workers(2), geoip))
//! }
//! ```
//!
//! Metrics (label `stage`): `sluice_enrich_hits_total`, `sluice_enrich_misses_total`,
//! `sluice_enrich_fallbacks_total`, `sluice_enrich_errors_total`,
//! `sluice_enrich_lookup_seconds`, `sluice_enrich_cache_entries`. A lookup being retried is
//! named on `/ready` as `lookup STAGE failing`.

mod enrich;
mod lookup;
mod maxmind;
mod metrics;
mod postgres;
mod table;

pub use enrich::{CacheConfig, Enrich, EnrichFlow, EnrichOperator, OnError};
pub use lookup::{Lookup, LookupError};
pub use maxmind::{Geo, MaxMind, is_public};
pub use postgres::PgLookup;
pub use table::{Record, StaticTable};
