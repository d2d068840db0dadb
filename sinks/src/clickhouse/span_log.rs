//! The span log in ClickHouse: each cut's partition, offsets and batch, recorded before the
//! batch is inserted, next to the rows they describe.

use std::sync::Arc;

use clickhouse::Client;
use sluice_pipeline::{BatchRef, SinkError, SourceSpan, SpanLog, TopicPartition};
use tokio::sync::oneshot;

use super::client::classify;

/// The span log table the framework's migrations create.
pub const SPAN_LOG_TABLE: &str = "sluice_batch_spans";

/// The guarded value, also after a panic elsewhere (the queue stays consistent: pushes and takes).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(clickhouse::Row, serde::Serialize)]
struct SpanRecord {
    consumer_group: String,
    target_table: String,
    topic: String,
    partition: i32,
    first_offset: i64,
    last_offset: i64,
    items: u64,
    span_key: i64,
    across: bool,
    /// [`BatchRef::id`], 0 for a span that left alone.
    batch_id: u128,
    batch_items: u64,
}

/// A [`SpanLog`] in the ClickHouse table `sluice_batch_spans`, for one consumer group and one
/// target table: the spans live next to the rows they describe.
///
/// The logs made from one [`ClickHouseSpanLog::new`] by [`ClickHouseSpanLog::for_table`] share
/// their inserts: while one is in flight the others' records queue, and the next insert takes
/// them all (one insert per round trip instead of one per table and cut).
#[derive(Clone)]
pub struct ClickHouseSpanLog {
    client: Client,
    group: Arc<str>,
    table: Arc<str>,
    writer: Arc<SpanWriter>,
}

/// The records waiting for an insert, each with whom to tell how it went.
type Queued = Vec<(Vec<SpanRecord>, oneshot::Sender<Result<(), (bool, String)>>)>;

/// What the logs of one [`ClickHouseSpanLog::new`] share.
#[derive(Default)]
struct SpanWriter {
    queue: std::sync::Mutex<Queued>,
    /// Held by the one recorder whose insert is in flight.
    writing: tokio::sync::Mutex<()>,
}

impl ClickHouseSpanLog {
    /// The log of `group`'s batches into `table`.
    pub fn new(client: Client, group: impl Into<Arc<str>>, table: impl Into<Arc<str>>) -> Self {
        Self {
            client: client.with_setting("async_insert", "0"),
            group: group.into(),
            table: table.into(),
            writer: Arc::default(),
        }
    }

    /// The log of the same group's batches into `table`, sharing this log's inserts.
    pub fn for_table(&self, table: impl Into<Arc<str>>) -> Self {
        Self {
            table: table.into(),
            ..self.clone()
        }
    }

    async fn insert(&self, queued: &Queued) -> Result<(), SinkError> {
        let mut insert = self
            .client
            .insert::<SpanRecord>(SPAN_LOG_TABLE)
            .await
            .map_err(classify)?;
        for row in queued.iter().flat_map(|(rows, _)| rows) {
            insert.write(row).await.map_err(classify)?;
        }
        insert.end().await.map_err(classify)
    }
}

impl SpanLog for ClickHouseSpanLog {
    async fn record(&self, spans: &[SourceSpan]) -> Result<(), SinkError> {
        let rows = spans
            .iter()
            .map(|s| SpanRecord {
                consumer_group: self.group.to_string(),
                target_table: self.table.to_string(),
                topic: s.tp.topic.to_string(),
                partition: s.tp.partition,
                first_offset: s.first,
                last_offset: s.last,
                items: s.items,
                span_key: s.window_key(),
                across: s.across,
                batch_id: s.batch.map_or(0, |b| b.id),
                batch_items: s.batch.map_or(0, |b| b.items),
            })
            .collect();
        let (tx, mut done) = oneshot::channel();
        lock(&self.writer.queue).push((rows, tx));
        loop {
            tokio::select! {
                biased;
                outcome = &mut done => {
                    return match outcome {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err((true, e))) => Err(SinkError::transient(e)),
                        Ok(Err((false, e))) => Err(SinkError::permanent(e)),
                        // The recorder that took them was cancelled mid-insert.
                        Err(_) => Err(SinkError::transient("the span log insert was abandoned")),
                    };
                }
                _writing = self.writer.writing.lock() => {
                    let queued = std::mem::take(&mut *lock(&self.writer.queue));
                    if queued.is_empty() {
                        continue;
                    }
                    let outcome = self
                        .insert(&queued)
                        .await
                        .map_err(|e| (e.is_transient(), e.source.to_string()));
                    for (_, tx) in queued {
                        let _ = tx.send(outcome.clone());
                    }
                }
            }
        }
    }

    async fn load(&self, tp: &TopicPartition, from: i64) -> Result<Vec<SourceSpan>, SinkError> {
        type Recorded = (i64, i64, u64, i64, bool, u128, u64);
        let rows: Vec<Recorded> = self
            .client
            .query(
                "SELECT first_offset, last_offset, items, span_key, across, batch_id, batch_items FROM ? \
                 WHERE consumer_group = ? AND target_table = ? AND topic = ? AND partition = ? \
                 AND last_offset >= ? ORDER BY recorded_at, first_offset",
            )
            .bind(clickhouse::sql::Identifier(SPAN_LOG_TABLE))
            .bind(&*self.group)
            .bind(&*self.table)
            .bind(&*tp.topic)
            .bind(tp.partition)
            .bind(from)
            .fetch_all()
            .await
            .map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(
                |(first, last, items, key, across, id, batch_items)| SourceSpan {
                    tp: tp.clone(),
                    first,
                    last,
                    items,
                    window: (key != 0).then_some(key),
                    across,
                    batch: (id != 0).then_some(BatchRef {
                        id,
                        items: batch_items,
                    }),
                },
            )
            .collect())
    }
}
