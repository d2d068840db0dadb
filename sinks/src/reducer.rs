//! A generic PostgreSQL state-reducer sink: per batch, every touched key's events are folded in
//! order in memory and the final states are written in one transaction with the applied
//! offsets, so a redelivered record is recognised and skipped, and a partition reassigned to
//! another worker fences the previous owner out.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

use sluice_pipeline::{Batch, Sink, SinkError, Sourced, TopicPartition};
use sqlx::{PgConnection, PgPool};

/// How a state type is keyed, folded and stored. The sink does the rest: grouping by key,
/// ordering, transactions, applied offsets and fencing.
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
}

/// Keyed states of a reducer, in key order.
pub type Rows<R> = Vec<(<R as Reducer>::Key, <R as Reducer>::State)>;

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
