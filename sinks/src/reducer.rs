//! A generic PostgreSQL state-reducer sink: per batch, every touched key's events are folded in
//! order in memory and the final states are written in one transaction with the applied
//! offsets, so a redelivered record is recognised and skipped, and a partition reassigned to
//! another worker fences the previous owner out.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_pipeline::{Batch, Sink, SinkError, Sourced, TopicPartition};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};

/// How a state type is keyed, folded and stored. The sink does the rest: grouping by key,
/// ordering, transactions, applied offsets and fencing.
///
/// ```
/// use sluice_sinks::{Reducer, Rows};
/// use sqlx::PgConnection;
///
/// /// Orders and cents spent per customer, in `customers (id TEXT PRIMARY KEY, orders BIGINT, cents BIGINT)`.
/// struct Totals;
///
/// impl Reducer for Totals {
///     type Event = (String, i64); // customer, cents of one order
///     type Key = String;
///     type State = (i64, i64);
///
///     fn key(&self, e: &Self::Event) -> String { e.0.clone() }
///     fn fold(&self, s: &mut (i64, i64), e: &Self::Event) { s.0 += 1; s.1 += e.1 }
///
///     async fn load(&self, conn: &mut PgConnection, keys: &[String]) -> Result<Rows<Self>, sqlx::Error> {
///         sqlx::query("INSERT INTO customers (id, orders, cents) SELECT unnest($1::text[]), 0, 0 ON CONFLICT DO NOTHING")
///             .bind(keys).execute(&mut *conn).await?;
///         let rows: Vec<(String, i64, i64)> = sqlx::query_as(
///             "SELECT id, orders, cents FROM customers WHERE id = ANY($1) ORDER BY id FOR UPDATE")
///             .bind(keys).fetch_all(&mut *conn).await?;
///         Ok(rows.into_iter().map(|(id, o, c)| (id, (o, c))).collect())
///     }
///
///     async fn store(&self, conn: &mut PgConnection, states: &[(String, (i64, i64))]) -> Result<(), sqlx::Error> {
///         let (ids, (orders, cents)): (Vec<&str>, (Vec<i64>, Vec<i64>)) =
///             states.iter().map(|(k, s)| (k.as_str(), (s.0, s.1))).unzip();
///         sqlx::query("UPDATE customers c SET orders = v.o, cents = v.c FROM unnest($1::text[], $2::int8[], $3::int8[]) AS v(id, o, c) WHERE c.id = v.id")
///             .bind(ids).bind(orders).bind(cents).execute(&mut *conn).await?;
///         Ok(())
///     }
/// }
/// ```
pub trait Reducer: Send + Sync + 'static {
    /// What is reduced.
    type Event: Send + Sync + 'static;
    /// The row an event reduces into.
    type Key: Clone + Ord + Hash + Send + Sync;
    /// The reduced columns of a row; `Default` is a row that does not exist yet.
    type State: Clone + Default + Send + Sync;

    /// The row `event` reduces into.
    fn key(&self, event: &Self::Event) -> Self::Key;

    /// Applies one event to its row's state.
    fn fold(&self, state: &mut Self::State, event: &Self::Event);

    /// Creates the rows of `keys` that do not exist, locks all of them (in key order, so
    /// concurrent writers cannot deadlock) and returns their current states.
    fn load(
        &self,
        conn: &mut PgConnection,
        keys: &[Self::Key],
    ) -> impl Future<Output = Result<Rows<Self>, sqlx::Error>> + Send;

    /// Writes the final states, in one statement.
    fn store(
        &self,
        conn: &mut PgConnection,
        states: &[(Self::Key, Self::State)],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// The bytes an event takes in memory, which batch limits count (by default its struct
    /// alone; count the strings it owns too for a bound that holds).
    fn event_bytes(&self, _event: &Self::Event) -> usize {
        std::mem::size_of::<Self::Event>()
    }

    /// Checks at start that the tables `load` and `store` use exist with the columns they
    /// name (e.g. `SELECT … LIMIT 0`); by default nothing is checked.
    fn check(
        &self,
        _conn: &mut PgConnection,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send {
        async { Ok(()) }
    }
}

/// Keyed states of a reducer, in key order.
pub type Rows<R> = Vec<(<R as Reducer>::Key, <R as Reducer>::State)>;

/// A reducer whose state is one row per key of a PostgreSQL table, the state's fields being
/// its columns (by their serde names): [`Reducer::load`] and [`Reducer::store`] are written
/// for it, one statement each, through JSON (`jsonb_populate_recordset`, `to_jsonb`).
///
/// The table needs the key as its primary key (or unique), and a `DEFAULT` or NULL allowed on
/// every other column: a key seen for the first time gets a row holding the key alone, so each
/// column starts at its `DEFAULT`, or, left NULL, at `State::default()`'s field. `run` and
/// `validate` check this at start ([`Reducer::check`]).
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// /// A row of `page_totals (url TEXT PRIMARY KEY, views BIGINT NOT NULL DEFAULT 0, bytes BIGINT NOT NULL DEFAULT 0)`.
/// #[derive(Clone, Default, Serialize, Deserialize)]
/// struct PageTotals {
///     views: i64,
///     bytes: i64,
/// }
///
/// struct Pages;
///
/// impl sluice_sinks::TableReducer for Pages {
///     type Event = (String, i64); // url, bytes of one view
///     type Key = String;
///     type State = PageTotals;
///     const TABLE: &'static str = "page_totals";
///     const KEY: &'static str = "url";
///
///     fn key(&self, view: &Self::Event) -> String {
///         view.0.clone()
///     }
///
///     fn fold(&self, t: &mut PageTotals, view: &Self::Event) {
///         t.views += 1;
///         t.bytes += view.1;
///     }
/// }
/// ```
pub trait TableReducer: Send + Sync + 'static {
    /// What is reduced.
    type Event: Send + Sync + 'static;
    /// The key column's value.
    type Key: Serialize + DeserializeOwned + Clone + Ord + Hash + Send + Sync;
    /// The other columns (missing rows start from `Default`; the columns' own defaults apply
    /// to a row until it is first stored).
    type State: Serialize + DeserializeOwned + Clone + Default + Send + Sync;
    /// The table.
    const TABLE: &'static str;
    /// Its key column (a primary key or unique).
    const KEY: &'static str;

    /// The row `event` reduces into.
    fn key(&self, event: &Self::Event) -> Self::Key;

    /// Applies one event to its row's state.
    fn fold(&self, state: &mut Self::State, event: &Self::Event);

    /// As [`Reducer::event_bytes`].
    fn event_bytes(&self, _event: &Self::Event) -> usize {
        std::mem::size_of::<Self::Event>()
    }
}

impl<T: TableReducer> Reducer for T {
    type Event = T::Event;
    type Key = T::Key;
    type State = T::State;

    fn key(&self, event: &T::Event) -> T::Key {
        TableReducer::key(self, event)
    }

    fn fold(&self, state: &mut T::State, event: &T::Event) {
        TableReducer::fold(self, state, event);
    }

    fn event_bytes(&self, event: &T::Event) -> usize {
        TableReducer::event_bytes(self, event)
    }

    /// The table has the key column (unique) and a column for every field of the state, and
    /// every such column takes a new key's row without a value: `load` inserts the key alone.
    async fn check(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let finding = |m: String| sqlx::Error::Configuration(m.into());
        let columns: Vec<(String, bool)> = sqlx::query_as(
            "SELECT column_name::text, is_nullable = 'YES' OR column_default IS NOT NULL \
             FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
        )
        .bind(T::TABLE)
        .fetch_all(&mut *conn)
        .await?;
        if columns.is_empty() {
            return Err(finding(format!(
                "table `{}` does not exist (run `migrate`)",
                T::TABLE
            )));
        }
        let serde_json::Value::Object(state) = encode(&T::State::default())? else {
            return Err(finding("the state is not a struct of columns".into()));
        };
        let mut problems = Vec::new();
        for field in std::iter::once(T::KEY).chain(state.keys().map(String::as_str)) {
            match columns.iter().find(|(c, _)| c == field) {
                None => problems.push(format!("it has no column `{field}`")),
                Some((_, false)) if field != T::KEY => problems.push(format!(
                    "column `{field}` is NOT NULL without a DEFAULT, but a new key's row is \
                     inserted with its key alone"
                )),
                Some(_) => {}
            }
        }
        let unique: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a \
             ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
             WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnatts = 1 AND a.attname = $2)",
        )
        .bind(ident(T::TABLE))
        .bind(T::KEY)
        .fetch_one(&mut *conn)
        .await?;
        if !unique {
            problems.push(format!(
                "`{}` is not its primary key or unique on its own",
                T::KEY
            ));
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(finding(format!("`{}`: {}", T::TABLE, problems.join("; ")))),
        }
    }

    async fn load(
        &self,
        conn: &mut PgConnection,
        keys: &[T::Key],
    ) -> Result<Rows<Self>, sqlx::Error> {
        let (table, key) = (ident(T::TABLE), ident(T::KEY));
        let keys = Json(
            keys.iter()
                .map(|k| Ok(serde_json::json!({ T::KEY: encode(k)? })))
                .collect::<Result<Vec<_>, sqlx::Error>>()?,
        );
        sqlx::query(&format!(
            "INSERT INTO {table} ({key}) SELECT r.{key} FROM jsonb_populate_recordset(NULL::{table}, $1) r \
             ORDER BY 1 ON CONFLICT ({key}) DO NOTHING"
        ))
        .bind(&keys)
        .execute(&mut *conn)
        .await?;
        let rows: Vec<Json<serde_json::Value>> = sqlx::query_scalar(&format!(
            "SELECT to_jsonb(t) FROM {table} t WHERE t.{key} IN \
             (SELECT r.{key} FROM jsonb_populate_recordset(NULL::{table}, $1) r) ORDER BY t.{key} FOR UPDATE OF t"
        ))
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?;
        // A column left NULL (a new row's, without a DEFAULT) starts from the state's default.
        let serde_json::Value::Object(defaults) = encode(&T::State::default())? else {
            return Err(sqlx::Error::Decode(
                "the state is not a struct of columns".into(),
            ));
        };
        rows.into_iter()
            .map(|Json(mut row)| {
                let k = decode(row.get(T::KEY).cloned().unwrap_or_default())?;
                if let serde_json::Value::Object(columns) = &mut row {
                    for (name, value) in &defaults {
                        if columns.get(name).is_none_or(serde_json::Value::is_null) {
                            columns.insert(name.clone(), value.clone());
                        }
                    }
                }
                Ok((k, decode(row)?))
            })
            .collect()
    }

    async fn store(
        &self,
        conn: &mut PgConnection,
        states: &[(T::Key, T::State)],
    ) -> Result<(), sqlx::Error> {
        let (table, key) = (ident(T::TABLE), ident(T::KEY));
        let serde_json::Value::Object(columns) = encode(&T::State::default())? else {
            return Err(sqlx::Error::Encode(
                format!("the state of `{}` is not a struct of columns", T::TABLE).into(),
            ));
        };
        let set: Vec<String> = columns
            .keys()
            .map(|c| format!("{0} = r.{0}", ident(c)))
            .collect();
        let rows = states
            .iter()
            .map(|(k, s)| {
                let mut row = encode(s)?;
                if let serde_json::Value::Object(o) = &mut row {
                    o.insert(T::KEY.to_owned(), encode(k)?);
                }
                Ok(row)
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        sqlx::query(&format!(
            "UPDATE {table} t SET {} FROM jsonb_populate_recordset(NULL::{table}, $1) r WHERE t.{key} = r.{key}",
            set.join(", ")
        ))
        .bind(Json(rows))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// A PostgreSQL identifier, double-quoted.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn encode(value: &impl Serialize) -> Result<serde_json::Value, sqlx::Error> {
    serde_json::to_value(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

fn decode<V: DeserializeOwned>(value: serde_json::Value) -> Result<V, sqlx::Error> {
    serde_json::from_value(value).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Folds `events` in order onto `states` (rows that are missing start from `Default`):
/// the same result as applying them one at a time.
pub fn coalesce<'a, R: Reducer>(
    reducer: &R,
    states: &mut BTreeMap<R::Key, R::State>,
    events: impl IntoIterator<Item = &'a R::Event>,
) {
    for event in events {
        reducer.fold(states.entry(reducer.key(event)).or_default(), event);
    }
}

/// Sorts a `sqlx` error into retryable (connection, server going away, serialization or
/// deadlock, resource shortage) or not.
pub fn classify_pg(err: sqlx::Error) -> SinkError {
    use sqlx::Error as E;
    let transient = match &err {
        E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::WorkerCrashed => true,
        E::Database(db) => db.code().is_some_and(|c| {
            ["08", "40", "53", "57P", "58"]
                .iter()
                .any(|class| c.starts_with(class))
        }),
        _ => false,
    };
    if transient {
        SinkError::transient(err)
    } else {
        SinkError::permanent(err)
    }
}

/// The applied-offsets table the migrations create.
pub const APPLIED_OFFSETS_TABLE: &str = "sluice_applied_offsets";

/// Writes batches of `Sourced<R::Event>` through `R`, exactly once per record.
///
/// Needs each partition's events in offset order and one writer (`workers(1)`): records
/// below a partition's applied offset are skipped.
pub struct ReducerSink<R> {
    pool: PgPool,
    reducer: Arc<R>,
    group: Arc<str>,
    /// Per partition: the assignment it was claimed for and the claim's epoch.
    claims: HashMap<TopicPartition, (u64, i64)>,
}

impl<R: Reducer> ReducerSink<R> {
    /// A sink for consumer group `group`'s records.
    pub fn new(pool: PgPool, reducer: Arc<R>, group: impl Into<Arc<str>>) -> Self {
        Self {
            pool,
            reducer,
            group: group.into(),
            claims: HashMap::new(),
        }
    }

    /// Takes over a partition: a new epoch in `sluice_applied_offsets`. A worker still holding
    /// an older epoch (it lost the partition without noticing) is refused from then on.
    async fn claim(&mut self, tp: &TopicPartition, assignment: u64) -> Result<(), SinkError> {
        if self.claims.get(tp).is_some_and(|c| c.0 == assignment) {
            return Ok(());
        }
        let epoch: i64 = sqlx::query_scalar(
            "INSERT INTO sluice_applied_offsets (group_id, topic, partition, next_offset, epoch) \
             VALUES ($1, $2, $3, 0, 1) \
             ON CONFLICT (group_id, topic, partition) \
             DO UPDATE SET epoch = sluice_applied_offsets.epoch + 1, updated_at = NOW() \
             RETURNING epoch",
        )
        .bind(&*self.group)
        .bind(&*tp.topic)
        .bind(tp.partition)
        .fetch_one(&self.pool)
        .await
        .map_err(classify_pg)?;
        tracing::info!(group = %self.group, partition = %tp, epoch, "claimed partition for state reduction");
        self.claims.insert(tp.clone(), (assignment, epoch));
        Ok(())
    }
}

impl<R: Reducer> Sink for ReducerSink<R> {
    type Item = Sourced<R::Event>;

    async fn write(&mut self, batch: &Batch<Sourced<R::Event>>) -> Result<(), SinkError> {
        for h in batch.acks().handles() {
            self.claim(h.topic_partition(), h.assignment()).await?;
        }
        let mut tps: Vec<TopicPartition> = batch.items.iter().map(|s| s.tp.clone()).collect();
        tps.sort_unstable();
        tps.dedup();
        for tp in &tps {
            if !self.claims.contains_key(tp) {
                // Items no acknowledgement covers (tests, generated data).
                self.claim(tp, 0).await?;
            }
        }

        let mut tx = self.pool.begin().await.map_err(classify_pg)?;
        let (topics, partitions): (Vec<&str>, Vec<i32>) =
            tps.iter().map(|tp| (&*tp.topic, tp.partition)).unzip();
        // Locks the partitions' rows: one writer per partition at a time.
        let rows: Vec<(String, i32, i64, i64)> = sqlx::query_as(
            "SELECT o.topic, o.partition, o.next_offset, o.epoch FROM sluice_applied_offsets o \
             JOIN UNNEST($2::text[], $3::int4[]) AS p(topic, partition) \
               ON o.topic = p.topic AND o.partition = p.partition \
             WHERE o.group_id = $1 ORDER BY o.topic, o.partition FOR UPDATE OF o",
        )
        .bind(&*self.group)
        .bind(&topics)
        .bind(&partitions)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify_pg)?;
        let mut applied: HashMap<(&str, i32), i64> = HashMap::new();
        for (topic, partition, next, epoch) in &rows {
            let tp = tps
                .iter()
                .find(|tp| &*tp.topic == topic && tp.partition == *partition)
                .expect("selected from these partitions");
            if self.claims.get(tp).map(|c| c.1) == Some(*epoch) {
                applied.insert((&*tp.topic, tp.partition), *next);
            } else {
                tracing::warn!(group = %self.group, partition = %tp, "partition claimed by another worker; its records are left to it");
            }
        }

        let mut next: HashMap<(&str, i32), i64> = applied.clone();
        let fresh = batch.items.iter().filter(|s| {
            let Some(&from) = applied.get(&(&*s.tp.topic, s.tp.partition)) else {
                return false;
            };
            let n = next
                .get_mut(&(&*s.tp.topic, s.tp.partition))
                .expect("same keys");
            *n = (*n).max(s.offset + 1);
            s.offset >= from
        });
        let events: Vec<&R::Event> = fresh.map(|s| &s.item).collect();
        if !events.is_empty() {
            let mut keys: Vec<R::Key> = events.iter().map(|e| self.reducer.key(e)).collect();
            keys.sort_unstable();
            keys.dedup();
            let mut states: BTreeMap<R::Key, R::State> = self
                .reducer
                .load(&mut tx, &keys)
                .await
                .map_err(classify_pg)?
                .into_iter()
                .collect();
            coalesce(&*self.reducer, &mut states, events.iter().copied());
            let states: Vec<(R::Key, R::State)> = states.into_iter().collect();
            self.reducer
                .store(&mut tx, &states)
                .await
                .map_err(classify_pg)?;
        }
        let (topics, (partitions, offsets)): (Vec<&str>, (Vec<i32>, Vec<i64>)) = next
            .iter()
            .filter(|(k, n)| applied.get(k) != Some(n))
            .map(|(&(t, p), &n)| (t, (p, n)))
            .unzip();
        if !topics.is_empty() {
            sqlx::query(
                "UPDATE sluice_applied_offsets o SET next_offset = v.next_offset, updated_at = NOW() \
                 FROM UNNEST($2::text[], $3::int4[], $4::int8[]) AS v(topic, partition, next_offset) \
                 WHERE o.group_id = $1 AND o.topic = v.topic AND o.partition = v.partition",
            )
            .bind(&*self.group)
            .bind(&topics)
            .bind(&partitions)
            .bind(&offsets)
            .execute(&mut *tx)
            .await
            .map_err(classify_pg)?;
        }
        tx.commit().await.map_err(classify_pg)
    }
}
