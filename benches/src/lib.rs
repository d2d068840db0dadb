//! What Sluice's benchmarks share: sample FrameWorks events, routed rows per table, a
//! discarding HTTP server, and pipelines for the runtime micro-benchmarks.

use sluice_operators::{EncodedRow, RowEncoders};
use sluice_pipeline::{
    Batch, BatchLimits, BatchSource, Pipeline, PipelineConfig, Sink, SinkError, SourceSpan,
    Sourced, SpanLog, TopicPartition,
};
use sluice_schemas::rows::{
    ConnectionEventRow, NodeMetricRow, RoutingEventRow, StreamEventRow, StreamHealthRow,
    TrackListRow, ViewerMetricRow,
};
use sluice_sinks::{Encoded, Encoder, InsertRequest, RowBinary};
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts the items it is given (a sink that costs next to nothing).
pub struct CountSink<T> {
    /// Items written so far.
    pub count: Arc<AtomicU64>,
    item: PhantomData<fn(T)>,
}

impl<T> Default for CountSink<T> {
    fn default() -> Self {
        Self {
            count: Arc::default(),
            item: PhantomData,
        }
    }
}

impl<T> Clone for CountSink<T> {
    fn clone(&self) -> Self {
        Self {
            count: self.count.clone(),
            item: PhantomData,
        }
    }
}

impl<T: Send + Sync + 'static> Sink for CountSink<T> {
    type Item = T;

    async fn write(&mut self, batch: &Batch<T>) -> Result<(), SinkError> {
        self.count
            .fetch_add(batch.items.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Runs `batches` batches of `per_batch` items through `hops` identity map stages into a
/// counting sink; returns how many items arrived.
pub async fn run_hops(hops: usize, batches: usize, per_batch: usize) -> u64 {
    let pipeline = Pipeline::new(PipelineConfig::default());
    let source = BatchSource::new((0..batches).map(move |b| {
        let start = (b * per_batch) as u64;
        Batch::unacked((start..start + per_batch as u64).collect())
    }));
    let mut flow = pipeline.source("source", source);
    for i in 0..hops {
        flow = flow.map(format!("hop{i}").as_str(), |x: u64| x);
    }
    let sink = CountSink::<u64>::default();
    let count = sink.count.clone();
    flow.sink("count", move || sink.clone());
    // A benchmark input cannot fail: the stages are infallible.
    let _ = pipeline.run().await;
    count.load(Ordering::Relaxed)
}

/// A span log that keeps nothing (the batcher's own cost, without ClickHouse's).
pub struct NoSpanLog;

impl SpanLog for NoSpanLog {
    async fn record(&self, _: &[SourceSpan]) -> Result<(), SinkError> {
        Ok(())
    }

    async fn load(&self, _: &TopicPartition, _: i64) -> Result<Vec<SourceSpan>, SinkError> {
        Ok(Vec::new())
    }
}

/// Runs `batches` batches of `per_batch` sourced items (4 partitions, consecutive offsets,
/// `item_bytes` each) through a span batcher into a counting sink; returns how many arrived.
pub async fn run_span_batcher(batches: usize, per_batch: usize, item_bytes: usize) -> u64 {
    let pipeline = Pipeline::new(PipelineConfig::default());
    let partitions: Vec<TopicPartition> = (0..4).map(|p| TopicPartition::new("bench", p)).collect();
    let source = BatchSource::new((0..batches).map(move |b| {
        let tp = &partitions[b % 4];
        let start = ((b / 4) * per_batch) as i64;
        Batch::unacked(
            (0..per_batch as i64)
                .map(|i| Sourced::new(tp, start + i, start + i))
                .collect(),
        )
    }));
    let sink = CountSink::<i64>::default();
    let count = sink.count.clone();
    pipeline
        .source("source", source)
        .batch_spans(
            "batch",
            BatchLimits::default(),
            move |_| item_bytes,
            NoSpanLog,
        )
        .sink("count", move || sink.clone());
    let _ = pipeline.run().await;
    count.load(Ordering::Relaxed)
}

/// FrameWorks events from the generator (fixed seed and hour, so every run measures the same
/// bytes): (record value, `tenant_id` header).
pub fn sample_events(n: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut generator = sluice_schemas::sample::Generator::new(1, 8, n).until(Some(SAMPLE_UNTIL));
    (0..n)
        .map(|i| {
            let (_, value, tenant) = generator.event(i);
            (value.into_bytes(), tenant.into_bytes())
        })
        .collect()
}

/// The end of the sample's hour (2026-11-01T00:00:00Z): the same bytes in every run. The
/// micro-benchmarks never store these rows, so the tables' retention does not matter.
pub const SAMPLE_UNTIL: i64 = 1_793_491_200;

macro_rules! table_rows {
    ($($variant:ident: $row:ident = $table:literal,)*) => {
        /// Routed rows encoded for their tables, one vector per event table (from the one
        /// list of them), as the worker's per-table sinks receive them.
        #[allow(non_snake_case)]
        #[derive(Default)]
        pub struct TableRows {
            $(
                #[doc = concat!("`", $table, "`.")]
                pub $variant: Vec<Encoded<$row<'static>>>,
            )*
        }

        impl TableRows {
            /// Adds one encoded row to its table's vector.
            pub fn push(&mut self, row: EncodedRow) {
                match row {
                    $(EncodedRow::$variant(r) => self.$variant.push(r),)*
                }
            }

            /// Decodes, routes and encodes sample records (value, `tenant_id` header) as the
            /// worker's decode stage does, with `encoders`; records that fail are left out.
            pub fn decode_route_encode(
                sample: &[(Vec<u8>, Vec<u8>)],
                encoders: &mut RowEncoders,
            ) -> Self {
                let mut rows = Self::default();
                for (value, tenant) in sample {
                    if let Ok(e) = sluice_schemas::Event::decode(value, Some(tenant))
                        && let Ok(routed) = sluice_operators::route(&e)
                    {
                        for row in &routed {
                            if let Ok(encoded) = encoders.encode(row) {
                                rows.push(encoded);
                            }
                        }
                    }
                }
                rows
            }

            /// Rows in all tables.
            pub fn len(&self) -> usize {
                0 $(+ self.$variant.len())*
            }

            /// Whether no table has a row.
            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }

            /// Inserts every table's rows with one INSERT each, as the worker's ClickHouse
            /// sinks do (their bytes copied into the client's buffer, lz4 by default).
            pub async fn insert(
                &self,
                client: &clickhouse::Client,
            ) -> Result<(), clickhouse::error::Error> {
                $(insert(client, $table, &self.$variant).await?;)*
                Ok(())
            }
        }
    };
}

sluice_schemas::with_event_tables!(table_rows);

async fn insert<R>(
    client: &clickhouse::Client,
    table: &str,
    rows: &[Encoded<R>],
) -> Result<(), clickhouse::error::Error>
where
    R: clickhouse::Row + clickhouse::RowWrite + 'static,
    R::Value<'static>: Default,
    for<'r> R::Value<'r>: Send + Sync,
{
    if rows.is_empty() {
        return Ok(());
    }
    RowBinary::<R>::default()
        .write(InsertRequest::new(client, table, None), rows)
        .await
}

/// An HTTP/1.1 server on loopback that reads each request whole (chunked or sized body),
/// throws the body away and answers `200 OK`: the ClickHouse client's encoding and transport
/// cost without a server's. Returns its address; it runs until the runtime stops.
pub async fn discarding_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(discard_requests(stream));
        }
    });
    addr
}

async fn discard_requests(stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let mut stream = BufReader::with_capacity(1 << 16, stream);
    let mut line = String::new();
    loop {
        // Request line and headers.
        let (mut chunked, mut length) = (false, 0usize);
        loop {
            line.clear();
            match stream.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                chunked = true;
            } else if let Some(v) = l.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut sink = tokio::io::sink();
        if chunked {
            loop {
                line.clear();
                if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let size =
                    usize::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
                        .unwrap_or(0);
                // The chunk and its CRLF (the last chunk: just the final CRLF).
                let mut part = (&mut stream).take(size as u64 + 2);
                if tokio::io::copy(&mut part, &mut sink).await.is_err() {
                    return;
                }
                if size == 0 {
                    break;
                }
            }
        } else {
            let mut part = (&mut stream).take(length as u64);
            if tokio::io::copy(&mut part, &mut sink).await.is_err() {
                return;
            }
        }
        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        if stream.get_mut().write_all(reply).await.is_err() {
            return;
        }
    }
}
