//! [`Enrich`]: a pipeline stage that joins each item with reference data through a
//! [`Lookup`], one batched query per micro-batch for the keys its cache does not hold.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;
use sluice_pipeline::{AsyncOperator, BoxError, Flow, Health, RetryPolicy, Stage, StageContext};

use crate::lookup::{Lookup, LookupError};
use crate::metrics as m;

/// Size and freshness of an [`Enrich`] stage's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Entries kept at most (answers "no value" included); 0 turns the cache off.
    pub capacity: usize,
    /// How long an answer is used before the key is looked up again.
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            ttl: Duration::from_secs(3600),
        }
    }
}

/// What an [`Enrich`] stage does when its lookup fails transiently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// Retry with the stage's backoff ([`Stage::retry`], else the pipeline's), holding the
    /// batch and naming the lookup on `/ready` meanwhile; the stream waits, nothing is lost.
    #[default]
    Retry,
    /// Pass the batch's uncached items on unenriched and count them
    /// (`sluice_enrich_fallbacks_total`): the stream never waits for the lookup.
    PassThrough,
}

/// A cached answer: the value (or its absence) and when it was looked up.
#[derive(Clone)]
struct Entry<V> {
    value: Option<V>,
    at: Instant,
    generation: u64,
}

/// The shared cache of a stage's workers.
type SharedCache<K, V> = Arc<Cache<K, Entry<V>>>;
type KeyFn<T, K> = dyn Fn(&T) -> Option<K> + Send + Sync;
type ApplyFn<T, V> = dyn Fn(&mut T, &V) + Send + Sync;

/// An enrichment: which key an item is looked up by, what its value does to the item, and the
/// cache in front of the lookup. Add it to a flow with [`EnrichFlow::enrich`]; its workers
/// share one cache.
///
/// Items without a key, or whose key has no value, pass unchanged.
///
/// ```
/// use std::collections::HashMap;
/// use sluice_enrich::{CacheConfig, Enrich, EnrichFlow, StaticTable};
/// # fn wire(flow: sluice_pipeline::Flow<(String, Option<String>)>) -> sluice_pipeline::Flow<(String, Option<String>)> {
/// // Items are (country code, country name); the name is filled in from a table.
/// let names = StaticTable::new(HashMap::from([("DE".to_owned(), "Germany".to_owned())]));
/// let enrich = Enrich::new(
///     names,
///     |item: &(String, Option<String>)| Some(item.0.clone()),
///     |item, name: &String| item.1 = Some(name.clone()),
/// )
/// .cache(CacheConfig { capacity: 1_000, ..CacheConfig::default() });
/// flow.enrich("country-names", enrich)
/// # }
/// ```
pub struct Enrich<T, L: Lookup> {
    lookup: Arc<L>,
    cache: Option<SharedCache<L::Key, L::Value>>,
    ttl: Duration,
    on_error: OnError,
    key: Arc<KeyFn<T, L::Key>>,
    apply: Arc<ApplyFn<T, L::Value>>,
}

impl<T, L: Lookup> Clone for Enrich<T, L> {
    fn clone(&self) -> Self {
        Self {
            lookup: self.lookup.clone(),
            cache: self.cache.clone(),
            ttl: self.ttl,
            on_error: self.on_error,
            key: self.key.clone(),
            apply: self.apply.clone(),
        }
    }
}

impl<T: Send + 'static, L: Lookup> Enrich<T, L> {
    /// Looks items up in `lookup` by `key` and applies each found value with `apply`; with the
    /// default cache ([`CacheConfig::default`]) and error policy ([`OnError::Retry`]).
    pub fn new(
        lookup: L,
        key: impl Fn(&T) -> Option<L::Key> + Send + Sync + 'static,
        apply: impl Fn(&mut T, &L::Value) + Send + Sync + 'static,
    ) -> Self {
        Self {
            lookup: Arc::new(lookup),
            cache: None,
            ttl: Duration::ZERO,
            on_error: OnError::default(),
            key: Arc::new(key),
            apply: Arc::new(apply),
        }
        .cache(CacheConfig::default())
    }

    /// Replaces the cache with an empty one of this size and TTL.
    pub fn cache(mut self, config: CacheConfig) -> Self {
        self.cache = (config.capacity > 0 && !config.ttl.is_zero())
            .then(|| Arc::new(Cache::new(config.capacity)));
        self.ttl = config.ttl;
        self
    }

    /// Sets what a transient lookup failure does.
    pub fn on_error(mut self, policy: OnError) -> Self {
        self.on_error = policy;
        self
    }

    /// The lookup (e.g. to read its own figures).
    pub fn lookup(&self) -> &L {
        &self.lookup
    }

    /// Entries in the cache now.
    pub fn cached(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    /// The stage operator for one worker of `ctx`'s stage.
    pub fn operator(&self, ctx: &StageContext) -> EnrichOperator<T, L> {
        let stage = ctx.name().to_string();
        EnrichOperator {
            enrich: self.clone(),
            component: format!("lookup {stage}"),
            health: ctx.health().clone(),
            retry: ctx.retry().clone(),
            hits: metrics::counter!(m::HITS, "stage" => stage.clone()),
            misses: metrics::counter!(m::MISSES, "stage" => stage.clone()),
            fallbacks: metrics::counter!(m::FALLBACKS, "stage" => stage.clone()),
            errors: metrics::counter!(m::ERRORS, "stage" => stage.clone()),
            latency: metrics::histogram!(m::LOOKUP_SECONDS, "stage" => stage.clone()),
            entries: metrics::gauge!(m::ENTRIES, "stage" => stage),
        }
    }
}

/// Adds [`Enrich`] stages to flows.
pub trait EnrichFlow<T> {
    /// Enriches every item with `enrich`; `stage.workers` workers share its cache.
    fn enrich<L: Lookup>(self, stage: impl Into<Stage>, enrich: Enrich<T, L>) -> Flow<T>;
}

impl<T: Send + 'static> EnrichFlow<T> for Flow<T> {
    fn enrich<L: Lookup>(self, stage: impl Into<Stage>, enrich: Enrich<T, L>) -> Flow<T> {
        self.apply_async_with(stage, move |ctx| enrich.operator(ctx))
    }
}

/// One worker of an [`Enrich`] stage (made by [`EnrichFlow::enrich`]).
pub struct EnrichOperator<T, L: Lookup> {
    enrich: Enrich<T, L>,
    component: String,
    health: Health,
    retry: RetryPolicy,
    hits: metrics::Counter,
    misses: metrics::Counter,
    fallbacks: metrics::Counter,
    errors: metrics::Counter,
    latency: metrics::Histogram,
    entries: metrics::Gauge,
}

impl<T: Send + 'static, L: Lookup> EnrichOperator<T, L> {
    /// Looks `keys` up, retrying transient failures as the policy says; `None` when the batch
    /// passes through unenriched instead.
    async fn lookup(&self, keys: &[L::Key]) -> Result<Option<Vec<Option<L::Value>>>, BoxError> {
        let mut retries = 0u32;
        loop {
            let started = Instant::now();
            let result = self.enrich.lookup.lookup(keys).await;
            self.latency.record(started.elapsed().as_secs_f64());
            let err = match result {
                Ok(values) if values.len() == keys.len() => {
                    if retries > 0 {
                        self.health.set_failing(&self.component, false);
                        tracing::info!(stage = %self.component, retries, "lookup succeeded after retries");
                    }
                    return Ok(Some(values));
                }
                Ok(values) => LookupError::permanent(format!(
                    "the lookup answered {} keys with {} values",
                    keys.len(),
                    values.len()
                )),
                Err(e) => e,
            };
            self.errors.increment(1);
            if !err.is_transient() {
                return Err(err.into());
            }
            if self.enrich.on_error == OnError::PassThrough {
                tracing::warn!(stage = %self.component, keys = keys.len(), error = %err, "lookup failed; passing the items on unenriched");
                return Ok(None);
            }
            if !self.retry.allows(retries) {
                return Err(err.into());
            }
            self.health.set_failing(&self.component, true);
            let wait = self.retry.backoff(retries);
            tracing::warn!(stage = %self.component, retry = retries + 1, wait_ms = wait.as_millis() as u64, error = %err, "lookup failed; retrying");
            tokio::time::sleep(wait).await;
            retries += 1;
        }
    }
}

impl<T: Send + 'static, L: Lookup> AsyncOperator for EnrichOperator<T, L> {
    type In = T;
    type Out = T;

    async fn process(&mut self, mut items: Vec<T>) -> Result<Vec<T>, BoxError> {
        let e = &self.enrich;
        let now = Instant::now();
        let generation = e.lookup.generation();
        // Items waiting for a looked-up key: (item, index into `misses`).
        let mut waiting = Vec::new();
        let mut misses: Vec<L::Key> = Vec::new();
        let mut index: HashMap<L::Key, usize> = HashMap::new();
        let (mut hits, mut missed) = (0u64, 0u64);
        for (i, item) in items.iter_mut().enumerate() {
            let Some(key) = (e.key)(item) else { continue };
            let cached = e.cache.as_ref().and_then(|c| c.get(&key)).filter(|entry| {
                entry.generation == generation && now.duration_since(entry.at) < e.ttl
            });
            if let Some(entry) = cached {
                hits += 1;
                if let Some(value) = &entry.value {
                    (e.apply)(item, value);
                }
                continue;
            }
            missed += 1;
            let slot = *index.entry(key.clone()).or_insert_with(|| {
                misses.push(key);
                misses.len() - 1
            });
            waiting.push((i, slot));
        }
        self.hits.increment(hits);
        self.misses.increment(missed);
        if !misses.is_empty() {
            match self.lookup(&misses).await? {
                Some(values) => {
                    for &(i, slot) in &waiting {
                        if let Some(value) = &values[slot] {
                            (e.apply)(&mut items[i], value);
                        }
                    }
                    if let Some(cache) = &e.cache {
                        for (key, value) in misses.into_iter().zip(values) {
                            cache.insert(
                                key,
                                Entry {
                                    value,
                                    at: now,
                                    generation,
                                },
                            );
                        }
                    }
                }
                None => self.fallbacks.increment(waiting.len() as u64),
            }
        }
        self.entries.set(e.cached() as f64);
        Ok(items)
    }
}
