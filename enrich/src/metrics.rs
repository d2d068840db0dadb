//! Metric names of enrich stages (label `stage`), through the `metrics` facade.

/// Items whose key was answered from the cache.
pub const HITS: &str = "sluice_enrich_hits_total";
/// Items whose key was looked up (counted once per item, though a batch asks for a key once).
pub const MISSES: &str = "sluice_enrich_misses_total";
/// Items passed on unenriched because the lookup failed ([`OnError::PassThrough`](crate::OnError)).
pub const FALLBACKS: &str = "sluice_enrich_fallbacks_total";
/// Failed lookups (each attempt).
pub const ERRORS: &str = "sluice_enrich_errors_total";
/// Seconds each batched lookup took (a summary: quantiles over the last minutes).
pub const LOOKUP_SECONDS: &str = "sluice_enrich_lookup_seconds";
/// Entries in the stage's cache.
pub const ENTRIES: &str = "sluice_enrich_cache_entries";
