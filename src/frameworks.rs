//! The FrameWorks ingest pipeline: Kafka → decode and route (per the event contract) → one
//! batcher and parallel ClickHouse inserts per table, and a dead-letter topic for what cannot be
//! decoded or routed.

use std::time::Duration;

use clickhouse::{RowOwned, RowWrite};
use sluice_operators::{StateEvent, StreamAnalytics, UsageFact, UsageWindows};
use sluice_pipeline::WindowSpec;
use sluice_pipeline::{
    BatchLimits, DeadLetter, DeadLetterSink, Emit, Flow, KafkaRecord, KafkaSource,
    KafkaSourceConfig, Pipeline, RetryPolicy, SinkError, Sourced, Stage, TopicPartition,
};
use sluice_schemas::TableRow;
use sluice_schemas::rows::UsageRow;
use sluice_schemas::rows::{
    ConnectionEventRow, NodeMetricRow, RoutingEventRow, RowBytes, StreamEventRow, StreamHealthRow,
    TrackListRow, ViewerMetricRow,
};
use sluice_sinks::{ClickHouseSink, ClickHouseSpanLog, ReducerSink, SPAN_LOG_TABLE};
use std::sync::Arc;

use crate::config::Config;

/// The tables the pipeline writes, with a sample row for the start-up schema check.
pub async fn check_tables(client: &clickhouse::Client) -> Result<(), SinkError> {
    ClickHouseSink::<StreamEventRow>::new(client.clone(), "stream_events")
        .check_schema(&Default::default())
        .await?;
    ClickHouseSink::<ConnectionEventRow>::new(client.clone(), "connection_events")
        .check_schema(&Default::default())
        .await?;
    ClickHouseSink::<StreamHealthRow>::new(client.clone(), "stream_health_metrics")
        .check_schema(&Default::default())
        .await?;
    ClickHouseSink::<ViewerMetricRow>::new(client.clone(), "viewer_metrics")
        .check_schema(&Default::default())
        .await?;
    ClickHouseSink::<NodeMetricRow>::new(client.clone(), "node_metrics")
        .check_schema(&Default::default())
        .await?;
    ClickHouseSink::<RoutingEventRow>::new(client.clone(), "routing_events")
        .check_schema(&Default::default())
        .await?;
    ClickHouseSink::<TrackListRow>::new(client.clone(), "track_list_events")
        .check_schema(&Default::default())
        .await?;
    ClickHouseSink::<UsageRow>::new(client.clone(), "usage_records")
        .check_schema(&Default::default())
        .await?;
    client
        .query("SELECT count() FROM ? WHERE 0")
        .bind(clickhouse::sql::Identifier(SPAN_LOG_TABLE))
        .fetch_one::<u64>()
        .await
        .map_err(|e| {
            SinkError::permanent(format!(
                "table `{SPAN_LOG_TABLE}` is missing or unreadable (run `sluice migrate`): {e}"
            ))
        })?;
    Ok(())
}

/// A client of the configured ClickHouse server, on its default database: URL, credentials
/// and TLS (`https://` verifies against the system's roots, and `clickhouse.ca_file`'s), with
/// TCP_NODELAY on its connections (see `sluice_sinks::connect`).
pub fn clickhouse_server(
    config: &Config,
) -> Result<clickhouse::Client, crate::config::ConfigError> {
    let compression = match config.clickhouse.compression {
        crate::config::InsertCompression::Lz4 => clickhouse::Compression::Lz4,
        crate::config::InsertCompression::None => clickhouse::Compression::None,
    };
    Ok(
        sluice_sinks::connect(tls(config.clickhouse.ca_file.as_deref())?)
            .with_url(config.clickhouse.url()?)
            .with_user(&config.clickhouse.user)
            .with_password(config.clickhouse.password.expose())
            .with_compression(compression),
    )
}

/// TLS that trusts the system's roots and the CA certificates (PEM) in `ca_file`, if any.
fn tls(
    ca_file: Option<&std::path::Path>,
) -> Result<native_tls::TlsConnector, crate::config::ConfigError> {
    let key = match ca_file {
        Some(_) => "clickhouse.ca_file",
        None => "clickhouse.url",
    };
    let bad = |message: String| crate::config::invalid(key, message);
    let mut tls = native_tls::TlsConnector::builder();
    if let Some(path) = ca_file {
        let pem =
            std::fs::read(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        let certs = native_tls::Certificate::stack_from_pem(&pem)
            .map_err(|e| bad(format!("{} holds no PEM certificate: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(bad(format!("{} holds no PEM certificate", path.display())));
        }
        for cert in certs {
            tls.add_root_certificate(cert);
        }
    }
    tls.build()
        .map_err(|e| bad(format!("cannot set up TLS: {e}")))
}

/// The ClickHouse client of the configuration, on the configured database.
pub fn clickhouse_client(
    config: &Config,
) -> Result<clickhouse::Client, crate::config::ConfigError> {
    Ok(clickhouse_server(config)?
        .with_database(&config.clickhouse.database)
        // Tables are partitioned by month and tenant: one batch may touch many partitions.
        .with_setting("max_partitions_per_insert_block", "1000"))
}

/// The Kafka source settings of the configuration.
pub fn source_config(
    config: &Config,
    drain: bool,
) -> Result<KafkaSourceConfig, crate::config::ConfigError> {
    let mut kafka = KafkaSourceConfig::new(
        &config.kafka.brokers,
        &config.kafka.group_id,
        config.kafka.topics.clone(),
    );
    kafka.client = config.kafka.librdkafka_options()?;
    kafka
        .client
        .entry("client.id".into())
        .or_insert_with(|| config.kafka.client_id.clone());
    kafka.commit_interval = Duration::from_millis(config.kafka.commit_interval_ms.max(10));
    kafka.drain = drain;
    Ok(kafka)
}

/// What one record becomes: table rows, and its effect on `stream_analytics` when reduction
/// is on and its type is reduced.
#[derive(Debug, Default)]
pub struct Processed {
    /// ClickHouse rows.
    pub rows: Vec<TableRow>,
    /// The reducer's view of the event.
    pub state: Option<StateEvent>,
    /// Its usage figures, for `usage_records`.
    pub usage: Vec<UsageFact>,
}

/// Decodes and routes one record (and prepares its reduction when `reduce`), or says why it
/// is a dead letter.
pub fn process(record: KafkaRecord, reduce: bool) -> Result<Processed, Box<DeadLetter>> {
    let dead = |record: KafkaRecord, stage: &'static str, reason: &'static str, error: String| {
        Box::new(DeadLetter {
            record,
            error,
            stage,
            reason,
        })
    };
    let Some(value) = record.value.as_deref() else {
        return Err(dead(
            record,
            "decode",
            "empty",
            "record has no value".into(),
        ));
    };
    let event = match sluice_schemas::Event::decode(
        value,
        record.header("tenant_id").map(|h| h.as_ref()),
    ) {
        Ok(e) => e,
        Err(e) => {
            let reason = match &e {
                sluice_schemas::DecodeError::Empty => "empty",
                sluice_schemas::DecodeError::Json(_) => "invalid_json",
                sluice_schemas::DecodeError::NotObject(_) => "not_an_object",
                sluice_schemas::DecodeError::Missing(_) => "missing_field",
                sluice_schemas::DecodeError::Invalid { .. } => "invalid_field",
                sluice_schemas::DecodeError::UnknownType(_) => "unknown_type",
            };
            return Err(dead(record, "decode", reason, e.to_string()));
        }
    };
    let rows = match sluice_operators::route(&event) {
        Ok(rows) => rows,
        Err(e) => {
            let reason = match &e {
                sluice_operators::RouteError::Missing { .. } => "missing_field",
                sluice_operators::RouteError::NotNumber { .. } => "not_a_number",
                sluice_operators::RouteError::OutOfRange { .. } => "out_of_range",
                sluice_operators::RouteError::Invalid { .. } => "invalid_field",
            };
            return Err(dead(record, "route", reason, e.to_string()));
        }
    };
    let state = if reduce {
        match StateEvent::from_event(&event) {
            Ok(state) => state,
            Err(e) => return Err(dead(record, "reduce", "invalid_field", e.to_string())),
        }
    } else {
        None
    };
    let usage = sluice_operators::usage_facts(&event);
    Ok(Processed { rows, state, usage })
}

/// Checks that PostgreSQL has the reducer's tables (migrated to the current version).
pub async fn check_postgres(pool: &sqlx::PgPool) -> Result<(), SinkError> {
    for (table, probe) in [
        (
            "stream_analytics",
            "SELECT tenant_id, internal_name, status, bitrate_kbps, track_details, node_id, total_bandwidth_gb FROM stream_analytics LIMIT 0",
        ),
        (
            "sluice_applied_offsets",
            "SELECT group_id, topic, partition, next_offset, epoch FROM sluice_applied_offsets LIMIT 0",
        ),
    ] {
        sqlx::query(probe).execute(pool).await.map_err(|e| {
            let e = sluice_sinks::classify_pg(e);
            if e.is_transient() {
                e
            } else {
                SinkError::permanent(format!(
                    "PostgreSQL table `{table}` is missing or outdated (run `sluice migrate`): {e}"
                ))
            }
        })?;
    }
    Ok(())
}

/// Adds the whole FrameWorks graph to `pipeline`.
///
/// With `postgres`, events are also reduced into `stream_analytics` (one writer, batches of up
/// to `batch_max_rows` events, exactly once through `sluice_applied_offsets`).
pub fn build(
    pipeline: &Pipeline,
    config: &Config,
    source: KafkaSourceConfig,
    client: clickhouse::Client,
    postgres: Option<sqlx::PgPool>,
    dlq: DeadLetterSink,
) {
    let p = &config.pipeline;
    let retry = RetryPolicy {
        max_retries: p.max_retries,
        max_backoff: Duration::from_millis(p.max_backoff_ms.max(1)),
        ..RetryPolicy::default()
    };
    let limits = BatchLimits {
        max_rows: p.batch_max_rows,
        max_bytes: p.batch_max_bytes,
        max_linger: Duration::from_millis(p.batch_linger_ms),
    };
    let mut split = pipeline
        .source("kafka", KafkaSource::new(source))
        .split(Stage::new("decode").workers(2))
        // One partition's records stay in order, so each table's batches are cut along
        // consecutive offsets (see `batch_spans`).
        .keyed(|r: &KafkaRecord| r.partition);
    let (stream_events, f_stream_events) = split.output("stream_events");
    let (connection_events, f_connection_events) = split.output("connection_events");
    let (stream_health, f_stream_health) = split.output("stream_health_metrics");
    let (viewer_metrics, f_viewer_metrics) = split.output("viewer_metrics");
    let (node_metrics, f_node_metrics) = split.output("node_metrics");
    let (routing_events, f_routing_events) = split.output("routing_events");
    let (track_lists, f_track_lists) = split.output("track_list_events");
    let (dead_letters, f_dead_letters) = split.output::<DeadLetter>("dead_letters");
    let (usage_facts, f_usage) = split.output::<Sourced<UsageFact>>("usage_records");
    let reduce = postgres.is_some();
    let (states, f_states) = match reduce {
        true => {
            let (port, flow) = split.output::<Sourced<StateEvent>>("stream_analytics");
            (Some(port), Some(flow))
        }
        false => (None, None),
    };
    split.run(move || {
        move |record: KafkaRecord, out: &mut Emit| {
            let (tp, offset) = (
                TopicPartition::new(record.topic.clone(), record.partition),
                record.offset,
            );
            let Processed { rows, state, usage } = match process(record, reduce) {
                Ok(p) => p,
                Err(dead) => {
                    tracing::debug!(stage = dead.stage, error = %dead.error, topic = %dead.record.topic, partition = dead.record.partition, offset = dead.record.offset, "dead letter");
                    out.push(&dead_letters, *dead);
                    return;
                }
            };
            for row in rows {
                match row {
                    TableRow::StreamEvent(r) => out.push(&stream_events, Sourced::new(&tp, offset, r)),
                    TableRow::ConnectionEvent(r) => out.push(&connection_events, Sourced::new(&tp, offset, r)),
                    TableRow::StreamHealth(r) => out.push(&stream_health, Sourced::new(&tp, offset, r)),
                    TableRow::ViewerMetric(r) => out.push(&viewer_metrics, Sourced::new(&tp, offset, r)),
                    TableRow::NodeMetric(r) => out.push(&node_metrics, Sourced::new(&tp, offset, r)),
                    TableRow::RoutingEvent(r) => out.push(&routing_events, Sourced::new(&tp, offset, r)),
                    TableRow::TrackList(r) => out.push(&track_lists, Sourced::new(&tp, offset, r)),
                }
            }
            if let (Some(port), Some(state)) = (&states, state) {
                out.push(port, Sourced::new(&tp, offset, state));
            }
            for fact in usage {
                out.push(&usage_facts, Sourced::new(&tp, offset, fact));
            }
        }
    });

    // Every table's span log is made from this one, so they share their inserts (see
    // `ClickHouseSpanLog::for_table`).
    let group = config.kafka.group_id.as_str();
    let spans = ClickHouseSpanLog::new(client.clone(), group, "stream_events");
    let t = Tables {
        spans,
        client,
        limits,
        concurrency: p.insert_concurrency,
        across: p.batch_across_partitions,
        retry: retry.clone(),
    };
    t.add::<StreamEventRow>(f_stream_events, "stream_events");
    t.add::<ConnectionEventRow>(f_connection_events, "connection_events");
    t.add::<StreamHealthRow>(f_stream_health, "stream_health_metrics");
    t.add::<ViewerMetricRow>(f_viewer_metrics, "viewer_metrics");
    t.add::<NodeMetricRow>(f_node_metrics, "node_metrics");
    t.add::<RoutingEventRow>(f_routing_events, "routing_events");
    t.add::<TrackListRow>(f_track_lists, "track_list_events");
    let spec = WindowSpec {
        length: Duration::from_secs(p.usage_window_secs.max(1)),
        allowed_lateness: Duration::from_secs(p.usage_lateness_secs),
        max_open: Duration::from_secs(p.usage_max_open_secs.max(1)),
    };
    let usage = UsageWindows {
        cluster_id: p.cluster_id.clone(),
        window_secs: p.usage_window_secs,
    };
    let usage_log = t.spans.for_table("usage_records");
    let usage_client = t.client.clone();
    // Gathered windows are replayed by comparing rows; `UsageWindows::stamp` makes every
    // window's rows differ (two windows' sums are often equal, their sources never are).
    let window_stage = Stage::new("usage_records.window").retry(retry.clone());
    let usage_rows = if p.batch_across_partitions {
        f_usage.window_across(window_stage, spec, usage, usage_log, t.limits.clone())
    } else {
        f_usage.window(window_stage, spec, usage, usage_log)
    };
    usage_rows.sink(
        Stage::new("usage_records")
            .workers(p.insert_concurrency)
            .retry(retry.clone()),
        move || {
            ClickHouseSink::<UsageRow>::new(usage_client.clone(), "usage_records")
                .check_range("timestamp")
        },
    );
    let reducer_limits = BatchLimits {
        max_bytes: p.batch_max_bytes,
        ..t.limits.clone()
    };
    if let (Some(pool), Some(f_states)) = (postgres, f_states) {
        let group: Arc<str> = config.kafka.group_id.as_str().into();
        // One writer: a partition's events are applied in offset order. As for the tables,
        // one finished batch waits while it writes.
        f_states
            .batch(
                Stage::new("stream_analytics.batch").capacity(1),
                reducer_limits,
                |s: &Sourced<StateEvent>| s.item.bytes(),
            )
            .sink(
                Stage::new("stream_analytics").retry(retry.clone()),
                move || ReducerSink::new(pool.clone(), Arc::new(StreamAnalytics), group.clone()),
            );
    }
    let dlq_limits = BatchLimits {
        max_rows: 1_000,
        max_bytes: 8 << 20,
        max_linger: Duration::from_millis(100),
    };
    f_dead_letters
        .batch("dead_letters.batch", dlq_limits, |d: &DeadLetter| {
            d.record.byte_size() + d.error.len()
        })
        .sink(Stage::new("dead_letters").retry(retry), move || dlq.clone());
}

/// What every table's batcher and sink share.
struct Tables {
    client: clickhouse::Client,
    limits: BatchLimits,
    concurrency: usize,
    across: bool,
    retry: RetryPolicy,
    /// One span log whose inserts every table's batcher shares.
    spans: ClickHouseSpanLog,
}

impl Tables {
    /// Span batcher (cuts recorded in `sluice_batch_spans`; across partitions or one per
    /// partition) and concurrent inserts for `table`.
    fn add<T>(&self, flow: Flow<Sourced<T>>, table: &str)
    where
        T: RowOwned + RowWrite + RowBytes + Send + Sync,
    {
        let client = self.client.clone();
        let table_name = table.to_owned();
        let log = self.spans.for_table(table);
        // One finished batch waiting while the inserts run is enough to keep them busy; a
        // deeper queue of batches of up to `batch_max_rows` rows would only hold memory.
        let stage = Stage::new(format!("{table}.batch"))
            .capacity(1)
            .retry(self.retry.clone());
        let batches = if self.across {
            flow.batch_spans_across(stage, self.limits.clone(), T::row_bytes, log)
        } else {
            flow.batch_spans(stage, self.limits.clone(), T::row_bytes, log)
        };
        batches.sink(
            Stage::new(table)
                .workers(self.concurrency)
                .retry(self.retry.clone()),
            move || {
                ClickHouseSink::<T>::new(client.clone(), table_name.clone())
                    .check_range("timestamp")
            },
        );
    }
}
