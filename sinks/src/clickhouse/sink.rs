//! The sink that puts the pieces together: an encoder, the insert under the batch's token,
//! error classification, and the recovery after a crash.

use std::sync::Arc;

use clickhouse::{Client, RowOwned, RowWrite};
use sluice_pipeline::{Batch, Delivery, Sink, SinkError};

use super::client::{classify, unanswered};
use super::cluster::{Cluster, Layout};
use super::encode::{Encoder, InsertRequest, SerdeRows};
use super::token::batch_token;

/// Writes batches into one table, exactly once across retries, crashes and rebalances.
///
/// Every insert carries a deduplication token ([`batch_token`]), and the table's landing view
/// ([`landing_view`](super::landing_view)) records in
/// [`LANDINGS_TABLE`](super::LANDINGS_TABLE) how many rows landed under each token, in the
/// same insert. After a crash, a batch that held several partitions' records comes back
/// whole when one worker got all of them again ([`Delivery::Rebuilt`]): it is inserted under
/// its token once more, so the table and each of its materialised views keep what they hold
/// of it and take what they lack (an insert cut short by a ClickHouse crash can leave a view
/// without a block its table holds). Otherwise its spans come as a [`Delivery::Recovered`]
/// batch, which asks the landings whether that batch landed: spans of a batch that landed
/// are skipped, spans of one that did not are inserted under a token of their own, whatever
/// the rows contain (two records with identical rows are two rows).
///
/// An insert that ends without an answer (the connection dropped: ClickHouse crashed or the
/// network failed mid-request) is retried with the same token and then checked row by row
/// against the table, and what is missing is inserted again: a plain `MergeTree` that is
/// killed during an insert can keep the deduplication record of a block whose part it lost,
/// so the retry alone would skip that block (observed with SIGKILL on ClickHouse 26.9). A
/// recorded span cut again whole after a restart is checked the same way unless its landing
/// shows it whole: the run that first wrote it may have been cut off by such a crash.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// #[derive(clickhouse::Row, serde::Serialize, Default)]
/// struct Order { id: u64, total_cents: u64 }
///
/// let client = sluice_sinks::connect()?.with_url("http://127.0.0.1:8123");
/// let sink = sluice_sinks::ClickHouseSink::<Order>::new(client, "orders");
/// sink.check().await?; // the table deduplicates, takes `Order`, has its landing view
/// # Ok(()) }
/// ```
pub struct ClickHouseSink<T, E = SerdeRows<T>> {
    pub(crate) client: Client,
    pub(crate) table: Arc<str>,
    pub(crate) encoder: Arc<E>,
    /// Column bounding the rows a check compares with (the batch's min..=max of it).
    pub(crate) check_range: Option<Arc<str>>,
    /// The cluster whose `Distributed` table `table` is, if any.
    pub(crate) cluster: Option<Cluster>,
    /// Token of the batch whose last insert ended without an answer.
    unanswered: Option<String>,
    _item: std::marker::PhantomData<fn(T)>,
}

impl<T, E> Clone for ClickHouseSink<T, E> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            table: self.table.clone(),
            encoder: self.encoder.clone(),
            check_range: self.check_range.clone(),
            cluster: self.cluster.clone(),
            unanswered: None,
            _item: std::marker::PhantomData,
        }
    }
}

impl<T: RowOwned + RowWrite + Default + Send + Sync> ClickHouseSink<T> {
    /// A sink of `T` rows into `table` of the client's database. Inserts are synchronous
    /// (`async_insert = 0`), so a successful write is durable.
    pub fn new(client: Client, table: impl Into<Arc<str>>) -> Self {
        Self::with_encoder(client, table, SerdeRows::default())
    }
}

impl<T, E: Encoder<Item = T>> ClickHouseSink<T, E> {
    /// A sink into `table` whose batches `encoder` turns into insert bodies.
    pub fn with_encoder(client: Client, table: impl Into<Arc<str>>, encoder: E) -> Self {
        Self {
            client: client.with_setting("async_insert", "0"),
            table: table.into(),
            encoder: Arc::new(encoder),
            check_range: None,
            cluster: None,
            unanswered: None,
            _item: std::marker::PhantomData,
        }
    }

    /// Bounds the check after an unanswered insert to the table's rows whose `column` lies
    /// within the batch's range (a time column keeps the check small on a large table).
    pub fn check_range(mut self, column: &str) -> Self {
        self.check_range = Some(column.into());
        self
    }

    /// Writes through `table`, a `Distributed` table of `cluster` laid out as `layout`:
    /// inserts wait until every shard holds their rows (`distributed_foreground_insert`), the
    /// check for an earlier owner's insert still running asks every node, and in the
    /// [`Layout::Sharded`] layout the recovery reads and repairs each replica on its own.
    ///
    /// ```no_run
    /// # fn demo(client: clickhouse::Client) {
    /// # #[derive(clickhouse::Row, serde::Serialize, Default)] struct Order { id: u64 }
    /// let sink = sluice_sinks::ClickHouseSink::<Order>::new(client, "orders")
    ///     .cluster("analytics", sluice_sinks::Layout::Sharded);
    /// # drop(sink); }
    /// ```
    pub fn cluster(mut self, cluster: &str, layout: Layout) -> Self {
        self.client = self
            .client
            .with_setting("distributed_foreground_insert", "1");
        self.cluster = Some(Cluster {
            name: cluster.into(),
            layout,
        });
        self
    }

    /// The table written to.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Inserts `items` into `table` (this sink's, or a scratch table) under `token`.
    pub(crate) async fn insert_into(
        &self,
        table: &str,
        items: &[T],
        token: Option<&str>,
    ) -> Result<(), clickhouse::error::Error> {
        let request = InsertRequest::new(&self.client, table, token);
        self.encoder.write(request, items).await
    }
}

impl<T, E> Sink for ClickHouseSink<T, E>
where
    T: Send + Sync + 'static,
    E: Encoder<Item = T>,
{
    type Item = T;

    async fn write(&mut self, batch: &Batch<T>) -> Result<(), SinkError> {
        match batch.delivery() {
            Delivery::Recovered => return self.write_recovered(batch).await,
            Delivery::Rebuilt if !self.may_write_whole(batch).await? => {
                return self.write_recovered(batch).await;
            }
            _ => {}
        }
        let token = batch_token(&self.table, batch);
        if let Err(e) = self
            .insert_into(&self.table, &batch.items, Some(&token))
            .await
        {
            if unanswered(&e) {
                self.unanswered = Some(token);
            }
            return Err(classify(e));
        }
        let interrupted = self.unanswered.as_deref() == Some(token.as_str());
        // A span cut again whole may have been in flight when ClickHouse crashed in an earlier
        // run: unless its landing shows it whole, compare rows.
        let check = interrupted
            || (matches!(batch.delivery(), Delivery::Redelivered | Delivery::Rebuilt)
                && self
                    .landed(std::slice::from_ref(&token))
                    .await?
                    .get(&token)
                    .is_none_or(|l| l.everywhere < batch.len() as u64));
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
