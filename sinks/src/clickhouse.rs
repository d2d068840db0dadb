//! A generic ClickHouse batch sink: one RowBinary insert per batch through the `clickhouse`
//! crate, with an `insert_deduplication_token` derived from the batch's source offsets, so that
//! a retried (or replayed) insert of the same batch lands once; and [`ClickHouseSpanLog`], the
//! record of span batches that makes replays after a crash cut the same batches.

use std::marker::PhantomData;
use std::sync::Arc;

use clickhouse::{Client, RowOwned, RowWrite};
use std::collections::HashMap;

use sluice_pipeline::{
    AckSet, Batch, BatchRef, Delivery, Sink, SinkError, SourceSpan, SpanLog, TopicPartition,
};
use tokio::sync::oneshot;

/// ClickHouse error codes a retry may fix: overload, timeouts, network, too many parts,
/// memory pressure, a replica or keeper being away.
const TRANSIENT_CODES: &[u32] = &[
    159, // TIMEOUT_EXCEEDED
    164, // READONLY (replica temporarily read-only)
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    241, // MEMORY_LIMIT_EXCEEDED
    252, // TOO_MANY_PARTS
    285, // TOO_FEW_LIVE_REPLICAS
    319, // UNKNOWN_STATUS_OF_INSERT
    425, // SYSTEM_ERROR
    999, // KEEPER_EXCEPTION
];

/// A ClickHouse client over HTTP(S) with TCP_NODELAY set. The `clickhouse` crate's own client
/// leaves Nagle's algorithm on: the small last write of a chunked insert body then waits for
/// the server's delayed ACK (up to 40 ms on Linux) before ClickHouse sees the end of the body.
/// `tls` verifies `https://` URLs; plain `http://` works too.
pub fn connect(tls: native_tls::TlsConnector) -> Client {
    use hyper_util::client::legacy::{self, connect::HttpConnector};
    let mut http = HttpConnector::new();
    // As the crate's own client: TCP keepalive, short idle pool (ClickHouse closes idle
    // connections after 3 s).
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_tls::HttpsConnector::from((http, tls.into()));
    Client::with_http_client(
        legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(2))
            .build(https),
    )
}

/// The ClickHouse error code in a server response (`Code: 252. DB::Exception: …`).
pub fn error_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Sorts a `clickhouse` error into retryable or not.
pub fn classify(err: clickhouse::error::Error) -> SinkError {
    use clickhouse::error::Error as E;
    match &err {
        E::Network(_) | E::TimedOut => SinkError::transient(err),
        E::BadResponse(msg) => match error_code(msg) {
            Some(code) if TRANSIENT_CODES.contains(&code) => SinkError::transient(err),
            Some(_) => SinkError::permanent(err),
            // No code: an HTTP-level failure (proxy, 5xx without a ClickHouse body).
            None => SinkError::transient(err),
        },
        _ => SinkError::permanent(err),
    }
}

/// The deduplication token of a batch for `table`: the batch it was cut as when it held
/// several spans ([`SourceSpan::batch`]); its one span when a span batcher cut it from one
/// partition (the same in every run, replays after a crash included); else every source
/// range it derives from (the same for retries within one run).
pub fn batch_token<T>(table: &str, batch: &Batch<T>) -> String {
    match batch.spans() {
        [] => dedup_token(table, batch.acks()),
        [s, ..] if s.batch.is_some() && batch.delivery() != Delivery::Recovered => {
            group_token(table, s.batch.as_ref().expect("checked"))
        }
        [s] => span_token(table, s),
        spans => token_of(
            table,
            spans
                .iter()
                .map(|s| format!("{}:{}:{}-{}", s.tp.topic, s.tp.partition, s.first, s.last))
                .collect(),
        ),
    }
}

/// The token of the batch `batch` names.
fn group_token(table: &str, batch: &BatchRef) -> String {
    format!("{table}|batch:{:032x}", batch.id)
}

/// The token of one span's rows.
fn span_token(table: &str, s: &SourceSpan) -> String {
    match s.window_key() {
        0 => format!(
            "{table}|{}:{}:{}-{}",
            s.tp.topic, s.tp.partition, s.first, s.last
        ),
        key => format!(
            "{table}|{}:{}:{key}:{}-{}",
            s.tp.topic, s.tp.partition, s.first, s.last
        ),
    }
}

/// The token under which a span of a batch that did not land is written alone.
fn recovery_token(table: &str, batch: &BatchRef, s: &SourceSpan) -> String {
    format!(
        "{}|{}:{}:{}:{}-{}",
        group_token(table, batch),
        s.tp.topic,
        s.tp.partition,
        s.window_key(),
        s.first,
        s.last
    )
}

/// The deduplication token of a batch for `table` from its source ranges: the table and every
/// range, sorted, so the same records in the same batch boundaries give the same token.
pub fn dedup_token(table: &str, acks: &AckSet) -> String {
    token_of(
        table,
        acks.ranges()
            .map(|(tp, a, b)| format!("{}:{}:{a}-{b}", tp.topic, tp.partition))
            .collect(),
    )
}

/// `table` and the sorted `ranges`, hashed when long.
fn token_of(table: &str, mut ranges: Vec<String>) -> String {
    ranges.sort_unstable();
    let token = format!("{table}|{}", ranges.join(","));
    if token.len() <= 256 {
        return token;
    }
    // Long lists (many small source batches) are hashed to keep the request small.
    let digest = twox_hash::XxHash3_128::oneshot(token.as_bytes());
    format!("{table}|{}|xxh3:{digest:032x}", ranges.len())
}

/// Writes batches of `T` into one table.
///
/// Every insert carries a deduplication token, and the table's landing view
/// ([`landing_view`]) records in [`LANDINGS_TABLE`] how many rows landed under each token, in
/// the same insert. After a crash, a [`Delivery::Recovered`] batch (redelivered records whose
/// earlier batch also held other partitions' records) asks it whether that batch landed:
/// spans of a batch that landed are skipped, spans of one that did not are inserted under a
/// token of their own, whatever the rows contain (two records with identical rows are two
/// rows).
///
/// An insert that ends without an answer (the connection dropped: ClickHouse crashed or the
/// network failed mid-request) is retried with the same token and then checked row by row
/// against the table, and what is missing is inserted again: a plain `MergeTree` that is
/// killed during an insert can keep the deduplication record of a block whose part it lost,
/// so the retry alone would skip that block (observed with SIGKILL on ClickHouse 26.9). A
/// recorded span cut again whole after a restart is checked the same way unless its landing
/// shows it whole: the run that first wrote it may have been cut off by such a crash.
pub struct ClickHouseSink<T> {
    client: Client,
    table: Arc<str>,
    /// Column bounding the rows a check compares with (the batch's min..=max of it).
    check_range: Option<Arc<str>>,
    /// Token of the batch whose last insert ended without an answer.
    unanswered: Option<String>,
    _row: PhantomData<fn(T)>,
}

impl<T> Clone for ClickHouseSink<T> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            table: self.table.clone(),
            check_range: self.check_range.clone(),
            unanswered: None,
            _row: PhantomData,
        }
    }
}

/// Whether a failed insert may have been applied in part: the request got no answer.
fn unanswered(err: &clickhouse::error::Error) -> bool {
    use clickhouse::error::Error as E;
    match err {
        E::Network(_) | E::TimedOut => true,
        E::BadResponse(msg) => error_code(msg).is_none(),
        _ => false,
    }
}

impl<T: RowOwned + RowWrite> ClickHouseSink<T> {
    /// A sink into `table` of the client's database. Inserts are synchronous
    /// (`async_insert = 0`), so a successful write is durable.
    pub fn new(client: Client, table: impl Into<Arc<str>>) -> Self {
        Self {
            client: client.with_setting("async_insert", "0"),
            table: table.into(),
            check_range: None,
            unanswered: None,
            _row: PhantomData,
        }
    }

    /// Bounds the check after an unanswered insert to the table's rows whose `column` lies
    /// within the batch's range (a time column keeps the check small on a large table).
    pub fn check_range(mut self, column: &str) -> Self {
        self.check_range = Some(column.into());
        self
    }

    /// The table written to.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Checks that the table exists, that every field of `T` has a column of a compatible
    /// type, that every column without a default has a field, and that the table has its
    /// landing view; the error names the mismatch. `sample` is serialised against the
    /// table's schema but never inserted.
    pub async fn check_schema(&self, sample: &T) -> Result<(), SinkError> {
        let mismatch = |e| match e {
            clickhouse::error::Error::SchemaMismatch(m) => SinkError::permanent(format!(
                "table `{}` does not match the row type: {m}",
                self.table
            )),
            // UNKNOWN_TABLE, UNKNOWN_DATABASE: nothing created them yet.
            clickhouse::error::Error::BadResponse(m) if matches!(error_code(&m), Some(60 | 81)) => {
                SinkError::permanent(format!(
                    "table `{}` or its database does not exist (run `sluice migrate`): {m}",
                    self.table
                ))
            }
            other => classify(other),
        };
        let mut insert = self
            .client
            .insert::<T>(&self.table)
            .await
            .map_err(mismatch)?;
        insert.write(sample).await.map_err(mismatch)?;
        // Dropped without `end()`: the insert is aborted and nothing is written.
        drop(insert);
        self.check_landing_view().await
    }
}

impl<T> Sink for ClickHouseSink<T>
where
    T: RowOwned + RowWrite + Send + Sync,
{
    type Item = T;

    async fn write(&mut self, batch: &Batch<T>) -> Result<(), SinkError> {
        if batch.delivery() == Delivery::Recovered {
            return self.write_recovered(batch).await;
        }
        let token = batch_token(&self.table, batch);
        if let Err(e) = self.insert(&batch.items, &token).await {
            if unanswered(&e) {
                self.unanswered = Some(token);
            }
            return Err(classify(e));
        }
        let interrupted = self.unanswered.as_deref() == Some(token.as_str());
        // A span cut again whole may have been in flight when ClickHouse crashed in an earlier
        // run: unless its landing shows it whole, compare rows.
        let check = interrupted
            || (batch.delivery() == Delivery::Redelivered
                && self
                    .landed(std::slice::from_ref(&token))
                    .await?
                    .get(&token)
                    .is_none_or(|&n| n < batch.len() as u64));
        if check {
            let restored = self.restore_missing(&batch.items, &token).await?;
            self.unanswered = None;
            if restored > 0 {
                tracing::warn!(table = %self.table, rows = restored, token = %token, "rows of an interrupted insert were missing after its retry (ClickHouse kept the deduplication record of a lost block); inserted them again");
            }
        }
        Ok(())
    }
}

/// What became of a recovered batch's rows.
#[derive(Default)]
struct Recovery {
    /// Rows of batches that had landed: not written again.
    landed: u64,
    /// Rows of batches that had not landed: inserted.
    inserted: u64,
    /// Rows compared with the table (a batch that landed in part, or a span recorded without
    /// its batch): how many of them were missing and inserted.
    checked: u64,
    restored: u64,
}

impl<T: RowOwned + RowWrite> ClickHouseSink<T> {
    async fn insert(&self, rows: &[T], token: &str) -> Result<(), clickhouse::error::Error> {
        let insert = self
            .client
            .insert::<T>(&self.table)
            .await?
            .with_setting("insert_deduplication_token", token);
        write_rows(insert, rows).await
    }

    /// How many rows landed in the table under each of `tokens` (absent: none), from the
    /// table's landing view.
    async fn landed(&self, tokens: &[String]) -> Result<HashMap<String, u64>, SinkError> {
        if tokens.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(String, u64)> = self
            .client
            .query("SELECT token, sum(rows) FROM ? WHERE target_table = ? AND token IN ? GROUP BY token")
            .bind(clickhouse::sql::Identifier(LANDINGS_TABLE))
            .bind(&*self.table)
            .bind(tokens)
            .fetch_all()
            .await
            .map_err(classify)?;
        Ok(rows.into_iter().collect())
    }

    /// How many inserts under any of `tokens` the server is running now.
    async fn running(&self, tokens: &[String]) -> Result<u64, SinkError> {
        if tokens.is_empty() {
            return Ok(0);
        }
        self.client
            .query("SELECT count() FROM system.processes WHERE Settings['insert_deduplication_token'] IN ?")
            .bind(tokens)
            .fetch_one()
            .await
            .map_err(classify)
    }

    /// Writes the spans of a [`Delivery::Recovered`] batch whose batch did not land (see the
    /// type's documentation).
    async fn write_recovered(&self, batch: &Batch<T>) -> Result<(), SinkError> {
        let mut done = Recovery::default();
        let Some(parts) = batch.span_items() else {
            // Not cut along its spans (no span batcher made it): compare every row.
            let token = batch_token(&self.table, batch);
            done.checked = batch.len() as u64;
            done.restored = self.restore_missing(&batch.items, &token).await?;
            self.report(&done);
            return Ok(());
        };
        let tokens: Vec<String> = parts
            .iter()
            .filter_map(|(s, _)| Some((s, s.batch.as_ref()?)))
            .flat_map(|(s, b)| {
                [
                    group_token(&self.table, b),
                    recovery_token(&self.table, b, s),
                ]
            })
            .collect();
        let landed = self.landed(&tokens).await?;
        let landed = |token: &str| landed.get(token).copied().unwrap_or(0);
        // An earlier owner's insert may still be running (it was killed after sending the
        // whole body, and ClickHouse is slow): wait for it rather than take its batch for lost.
        let running = self.running(&tokens).await?;
        if running > 0 {
            return Err(SinkError::transient(format!(
                "{running} insert(s) of an earlier owner into `{}` still running; waiting for them before replaying their batches",
                self.table
            )));
        }
        for (span, rows) in parts {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len() as u64;
            let Some(b) = &span.batch else {
                // Recorded by an older version, without its batch: compare rows.
                done.checked += n;
                done.restored += self
                    .restore_missing(rows, &span_token(&self.table, span))
                    .await?;
                continue;
            };
            let token = recovery_token(&self.table, b, span);
            let (whole, again) = (landed(&group_token(&self.table, b)), landed(&token));
            if whole >= b.items || again >= n {
                done.landed += n;
            } else if whole == 0 && again == 0 {
                self.insert(rows, &token).await.map_err(classify)?;
                done.inserted += n;
            } else {
                // Landed in part: only a ClickHouse crash during its insert does that.
                done.checked += n;
                done.restored += self.restore_missing(rows, &token).await?;
            }
        }
        self.report(&done);
        Ok(())
    }

    fn report(&self, done: &Recovery) {
        tracing::info!(table = %self.table, landed = done.landed, inserted = done.inserted, checked = done.checked, restored = done.restored, "redelivered records of batches cut across partitions: wrote the rows of batches that had not landed");
    }

    /// Checks that the table's landing view exists, naming it if not.
    async fn check_landing_view(&self) -> Result<(), SinkError> {
        let view = landing_view(&self.table);
        let found: u64 = self
            .client
            .query(
                "SELECT count() FROM system.tables WHERE database = currentDatabase() \
                 AND name = ? AND engine = 'MaterializedView'",
            )
            .bind(&view)
            .fetch_one()
            .await
            .map_err(classify)?;
        if found == 0 {
            return Err(SinkError::permanent(format!(
                "table `{}` has no landing view `{view}` into `{LANDINGS_TABLE}` (run `sluice migrate`): \
                 without it a replay after a crash cannot tell whether a batch was written",
                self.table
            )));
        }
        Ok(())
    }

    /// Compares `rows` with the table's (as multisets, within the check range) and inserts
    /// the ones that are missing; returns how many were. Repeating it is harmless: a second
    /// run finds nothing missing. Limit: a missing row that equals another row of the table
    /// in every column is taken as present, so it is the fallback for what a landing cannot
    /// tell (an insert that ClickHouse crashed during).
    pub async fn restore_missing(&self, rows: &[T], token: &str) -> Result<u64, SinkError> {
        use clickhouse::sql::Identifier;
        // One scratch table per batch, so concurrent writers never share one.
        let digest = twox_hash::XxHash3_128::oneshot(token.as_bytes());
        let scratch = format!("sluice_check_{digest:032x}");
        let drop_scratch = || {
            self.client
                .query("DROP TABLE IF EXISTS ?")
                .bind(Identifier(&scratch))
                .execute()
        };
        drop_scratch().await.map_err(classify)?;
        self.client
            .query("CREATE TABLE ? AS ? ENGINE = Memory")
            .bind(Identifier(&scratch))
            .bind(Identifier(&self.table))
            .execute()
            .await
            .map_err(classify)?;
        let result = self.insert_missing(rows, &scratch).await;
        let dropped = drop_scratch().await;
        let missing = result.map_err(classify)?;
        if let Err(e) = dropped {
            tracing::warn!(table = %scratch, error = %e, "cannot drop a scratch table");
        }
        Ok(missing)
    }

    async fn insert_missing(
        &self,
        rows: &[T],
        scratch: &str,
    ) -> Result<u64, clickhouse::error::Error> {
        use clickhouse::sql::Identifier;
        write_rows(self.client.insert::<T>(scratch).await?, rows).await?;
        let missing_rows = match &self.check_range {
            Some(_) => {
                "SELECT * FROM ? EXCEPT ALL SELECT * FROM ? \
                 WHERE ? BETWEEN (SELECT min(?) FROM ?) AND (SELECT max(?) FROM ?)"
            }
            None => "SELECT * FROM ? EXCEPT ALL SELECT * FROM ?",
        };
        // `INSERT INTO ?` (the table) comes first when `insert`; then the comparison's names.
        let query = |prefix: &str, suffix: &str, insert: bool| {
            let mut q = self
                .client
                .query(&format!("{prefix}{missing_rows}{suffix}"));
            if insert {
                q = q.bind(Identifier(&self.table));
            }
            q = q.bind(Identifier(scratch)).bind(Identifier(&self.table));
            if let Some(c) = &self.check_range {
                q = q
                    .bind(Identifier(c))
                    .bind(Identifier(c))
                    .bind(Identifier(scratch))
                    .bind(Identifier(c))
                    .bind(Identifier(scratch));
            }
            q
        };
        let missing: u64 = query("SELECT count() FROM (", ")", false)
            .fetch_one()
            .await?;
        if missing > 0 {
            // Not deduplicated: these rows are known to be absent.
            query("INSERT INTO ? SETTINGS insert_deduplicate = 0 ", "", true)
                .execute()
                .await?;
        }
        Ok(missing)
    }
}

/// The guarded value, also after a panic elsewhere (the queue stays consistent: pushes and takes).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes every row into `insert` and ends it.
async fn write_rows<T: RowOwned + RowWrite>(
    mut insert: clickhouse::insert::Insert<T>,
    rows: &[T],
) -> Result<(), clickhouse::error::Error> {
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

/// The span log table the migrations create.
pub const SPAN_LOG_TABLE: &str = "sluice_batch_spans";

/// The table where each target table's landing view records, per insert, its
/// deduplication token and how many rows it stored.
pub const LANDINGS_TABLE: &str = "sluice_batch_landings";

/// The name of `table`'s landing view: a materialised view on `table` into
/// [`LANDINGS_TABLE`], `SELECT '<table>' AS target_table,
/// getSetting('insert_deduplication_token') AS token, count() AS rows FROM <table> GROUP BY
/// token HAVING token != ''`. A block that the table drops as a repeat is dropped by the
/// landings table too (both deduplicate), so a token's rows are what landed under it.
pub fn landing_view(table: &str) -> String {
    format!("sluice_landed_{table}")
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
                        .map_err(|e| (e.is_transient(), e.to_string()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_pipeline::TopicPartition;
    use sluice_pipeline::testing::PartitionLedger;

    #[test]
    fn error_codes_sort_into_transient_and_permanent() {
        assert_eq!(
            error_code("Code: 252. DB::Exception: Too many parts"),
            Some(252)
        );
        assert!(
            classify(clickhouse::error::Error::BadResponse(
                "Code: 252. DB::Exception: Too many parts (300)".into()
            ))
            .is_transient()
        );
        assert!(
            !classify(clickhouse::error::Error::BadResponse(
                "Code: 60. DB::Exception: Unknown table".into()
            ))
            .is_transient()
        );
        assert!(
            classify(clickhouse::error::Error::BadResponse(
                "502 Bad Gateway".into()
            ))
            .is_transient()
        );
        assert!(classify(clickhouse::error::Error::TimedOut).is_transient());
        assert!(!classify(clickhouse::error::Error::SchemaMismatch("x".into())).is_transient());
    }

    #[test]
    fn token_depends_on_ranges_not_their_order() {
        let a = PartitionLedger::new(TopicPartition::new("events", 0));
        let b = PartitionLedger::new(TopicPartition::new("events", 1));
        let (a1, b1) = (a.issue(0, 99).unwrap(), b.issue(5, 9).unwrap());
        let mut one = AckSet::new();
        one.push(a1.share());
        one.push(b1.share());
        let mut reversed = AckSet::new();
        reversed.push(b1.share());
        reversed.push(a1.share());
        assert_eq!(dedup_token("t", &one), "t|events:0:0-99,events:1:5-9");
        assert_eq!(dedup_token("t", &one), dedup_token("t", &reversed));
        assert_ne!(dedup_token("t", &one), dedup_token("u", &one));
        let mut many = AckSet::new();
        for i in 0..50 {
            many.push(a.issue(1000 + i * 10, 1009 + i * 10).unwrap());
        }
        let long = dedup_token("t", &many);
        assert!(long.len() < 100 && long.starts_with("t|50|xxh3:"), "{long}");
        for set in [one, reversed, many] {
            set.release();
        }
        a1.release();
        b1.release();
    }
}
