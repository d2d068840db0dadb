//! The [`Lookup`] trait: a source of reference data queried a batch of keys at a time.

use std::future::Future;
use std::hash::Hash;

use sluice_pipeline::BoxError;

/// A source of reference data (a GeoIP database, a database table, a static mapping), queried
/// a batch of distinct keys at a time by [`Enrich`](crate::Enrich), which caches the answers.
///
/// ```
/// use sluice_enrich::{Lookup, LookupError};
///
/// /// Upper-cases its keys: a lookup that never fails and knows every key but the empty one.
/// struct Upper;
///
/// impl Lookup for Upper {
///     type Key = String;
///     type Value = String;
///
///     async fn lookup(&self, keys: &[String]) -> Result<Vec<Option<String>>, LookupError> {
///         Ok(keys.iter().map(|k| (!k.is_empty()).then(|| k.to_uppercase())).collect())
///     }
/// }
/// ```
pub trait Lookup: Send + Sync + 'static {
    /// What items are looked up by.
    type Key: Clone + Eq + Hash + Send + Sync + 'static;
    /// What a key maps to (cloned out of the cache for every item: keep it cheap to clone,
    /// e.g. `Arc<str>` rather than `String`).
    type Value: Clone + Send + Sync + 'static;

    /// Looks up `keys` (distinct, at least one): one entry per key, in order, `None` where the
    /// source has no value for it. An error fails the whole batch.
    fn lookup(
        &self,
        keys: &[Self::Key],
    ) -> impl Future<Output = Result<Vec<Option<Self::Value>>, LookupError>> + Send;

    /// Changes when the source's data is replaced (a reloaded database file): the cache then
    /// drops answers of an older generation. A source that never changes keeps the default.
    fn generation(&self) -> u64 {
        0
    }
}

/// A failed lookup.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// It may work when tried again (connection lost, timeout): retried, or passed through
    /// unenriched, as the stage's [`OnError`](crate::OnError) says.
    #[error("lookup failed (transient): {0}")]
    Transient(#[source] BoxError),
    /// It will not work by trying again (bad query, corrupt database): stops the pipeline.
    #[error("lookup failed: {0}")]
    Permanent(#[source] BoxError),
}

impl LookupError {
    /// A failure that may go away.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self::Transient(source.into())
    }

    /// A failure that will not go away by retrying.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self::Permanent(source.into())
    }

    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}
