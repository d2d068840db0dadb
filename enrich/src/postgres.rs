//! [`PgLookup`]: keys → values from a PostgreSQL query, one `= ANY($1)` query per batch of
//! misses.

use std::hash::Hash;
use std::marker::PhantomData;

use sqlx::postgres::{PgHasArrayType, PgPool, PgRow};
use sqlx::{Encode, Postgres, Type};

use crate::lookup::{Lookup, LookupError};

/// A lookup by a PostgreSQL query that takes the batch's keys as an array (`$1`) and returns
/// a row per key it knows; `row` turns a row into its key and value. Keys it returns no row
/// for have no value. Connection failures and the server going away are transient (retried,
/// or passed through, as the stage says); other errors stop the pipeline.
///
/// ```no_run
/// # async fn wire() -> Result<(), Box<dyn std::error::Error>> {
/// use sqlx::Row;
/// use sluice_enrich::{Enrich, PgLookup};
///
/// let pool = sqlx::PgPool::connect("postgres://localhost/shop").await?;
/// let names = PgLookup::new(
///     pool,
///     "SELECT id, name FROM customers WHERE id = ANY($1)",
///     |row| Ok((row.try_get::<i64, _>("id")?, row.try_get::<String, _>("name")?)),
/// );
/// struct Order { customer_id: i64, customer: String }
/// let enrich = Enrich::new(
///     names,
///     |o: &Order| Some(o.customer_id),
///     |o, name: &String| o.customer = name.clone(),
/// );
/// # Ok(()) }
/// ```
pub struct PgLookup<K, V, F> {
    pool: PgPool,
    sql: String,
    row: F,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V, F> PgLookup<K, V, F>
where
    F: Fn(&PgRow) -> Result<(K, V), sqlx::Error>,
{
    /// Looks keys up with `sql` (its `$1` is the array of keys) on `pool`.
    pub fn new(pool: PgPool, sql: impl Into<String>, row: F) -> Self {
        Self {
            pool,
            sql: sql.into(),
            row,
            _types: PhantomData,
        }
    }
}

impl<K, V, F> Lookup for PgLookup<K, V, F>
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    K: for<'q> Encode<'q, Postgres> + Type<Postgres> + PgHasArrayType,
    V: Clone + Send + Sync + 'static,
    F: Fn(&PgRow) -> Result<(K, V), sqlx::Error> + Send + Sync + 'static,
{
    type Key = K;
    type Value = V;

    async fn lookup(&self, keys: &[K]) -> Result<Vec<Option<V>>, LookupError> {
        let classify = |e: sqlx::Error| {
            let e = sluice_sinks::classify_pg(e);
            if e.is_transient() {
                LookupError::Transient(e.source)
            } else {
                LookupError::Permanent(e.source)
            }
        };
        let rows = sqlx::query(&self.sql)
            .bind(keys)
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let (k, v) = (self.row)(row).map_err(classify)?;
            found.insert(k, v);
        }
        Ok(keys.iter().map(|k| found.remove(k)).collect())
    }
}
