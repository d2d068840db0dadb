//! What a pipeline's `build` function is given: its settings, the Kafka records, and builders
//! that wire exactly-once targets in one call each ([`Wiring::into_clickhouse`],
//! [`Wiring::window_into_clickhouse`], [`Wiring::reduce_into_postgres`]). The builders own
//! what exactly once needs (partition order, spans recorded before inserts, deduplication
//! tokens, start-up checks of the target tables), so a pipeline cannot wire it wrongly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use clickhouse::{Row, RowOwned, RowWrite};
use sluice_pipeline::{
    BatchLimits, DeadLetter, DeadLetterSink, Decode, Flow, KafkaRecord, Pipeline, RetryPolicy,
    SinkError, Sourced, Stage, WindowAggregate, WindowSpec,
};
use sluice_sinks::{
    ClickHouseSink, ClickHouseSpanLog, Encoded, Encoder, Native, Reducer, ReducerSink, SerdeRows,
};

use crate::config::{Config, ConfigError, Settings};
use crate::services;

/// One run of a start-up check.
pub(crate) type CheckFuture = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send>>;

/// A start-up check: the service it waits for, what it checks, and the check.
pub(crate) struct StartCheck {
    pub(crate) service: &'static str,
    pub(crate) what: String,
    pub(crate) check: Box<dyn FnMut() -> CheckFuture + Send>,
}

impl StartCheck {
    fn new<F, Fut>(service: &'static str, what: String, mut check: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), SinkError>> + Send + 'static,
    {
        Self {
            service,
            what,
            check: Box::new(move || Box::pin(check())),
        }
    }
}

/// Whether the graph is wired to run, or only to learn what it writes (`migrate`, `bench`,
/// `validate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Run,
    Plan,
}

/// A mistake in a pipeline's wiring, found when it is built.
#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    /// The Kafka records were taken twice.
    #[error("the Kafka records were already taken (call `records` or `decode` once)")]
    RecordsTaken,
    /// A reducer needs PostgreSQL, which is not configured.
    #[error("`{0}` reduces into PostgreSQL, but postgres.url (DATABASE_URL) is not set")]
    NoPostgres(String),
    /// Two targets write one table.
    #[error("table `{0}` is wired twice")]
    TableTwice(String),
    /// A configuration value the wiring needs is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A table a pipeline writes, as `migrate` (its landing view), `bench` (its rows) and the
/// start-up checks see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablePlan {
    /// The table.
    pub name: String,
    /// The columns the pipeline's inserts name.
    pub columns: Vec<String>,
    /// Fed by a window stage (its rows wait for their windows to close).
    pub windowed: bool,
}

/// What a pipeline writes.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Its ClickHouse tables.
    pub tables: Vec<TablePlan>,
    /// Its PostgreSQL reducers (by name).
    pub reducers: Vec<String>,
    /// Whether it sends dead letters.
    pub dead_letters: bool,
}

/// A ClickHouse table as [`Wiring::into_clickhouse`] writes it: its name, how its rows are
/// encoded ([`SerdeRows`] by default), how many bytes a row counts for in the batch limits
/// (its struct by default), and the column that bounds a row check after a ClickHouse crash.
///
/// ```
/// # #[derive(clickhouse::Row, serde::Serialize, Default)]
/// # struct Order { placed_at: u32, cents: u64, note: String }
/// use sluice_worker::Table;
///
/// let orders = Table::<Order>::new("orders")
///     .size_of(|o| std::mem::size_of::<Order>() + o.note.len())
///     .check_range("placed_at");
/// # let _ = orders;
/// ```
pub struct Table<T, E = SerdeRows<T>> {
    name: String,
    encoder: E,
    size_of: fn(&T) -> usize,
    check_range: Option<String>,
}

impl<T: RowOwned + RowWrite + Default + Send + Sync> Table<T> {
    /// `name`, with rows of `T` as the `clickhouse` crate writes them.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            encoder: SerdeRows::default(),
            size_of: |_| std::mem::size_of::<T>(),
            check_range: None,
        }
    }
}

impl<R> Table<Encoded<R>, Native<R>>
where
    R: Row + RowWrite + 'static,
    R::Value<'static>: Default,
{
    /// `name`, with rows a [`RowEncoder`](sluice_sinks::RowEncoder) encoded as the records
    /// were decoded, counted in the batch limits by their encoded bytes, and inserted as one
    /// [`Native`] block per batch (`.encoder(RowBinary::default())` sends them as they are).
    ///
    /// ```
    /// # #[derive(clickhouse::Row, serde::Serialize, Default)]
    /// # struct Order<'a> { placed_at: u32, note: std::borrow::Cow<'a, str> }
    /// use sluice_worker::Table;
    ///
    /// let orders = Table::<sluice_sinks::Encoded<Order<'static>>, _>::encoded("orders")
    ///     .check_range("placed_at");
    /// # let _ = orders;
    /// ```
    pub fn encoded(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            encoder: Native::default(),
            size_of: Encoded::size,
            check_range: None,
        }
    }
}

impl<T: RowOwned + RowWrite + Default + Send + Sync> From<&str> for Table<T> {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl<T, E> Table<T, E> {
    /// Rows encoded by `encoder` instead.
    pub fn encoder<F: Encoder<Item = T>>(self, encoder: F) -> Table<T, F> {
        Table {
            name: self.name,
            encoder,
            size_of: self.size_of,
            check_range: self.check_range,
        }
    }

    /// How many bytes a row counts for in `pipeline.batch_max_bytes`.
    pub fn size_of(mut self, size_of: fn(&T) -> usize) -> Self {
        self.size_of = size_of;
        self
    }

    /// The column (a time, say) that bounds the row check after a ClickHouse crash to the
    /// batch's range of it.
    pub fn check_range(mut self, column: impl Into<String>) -> Self {
        self.check_range = Some(column.into());
        self
    }
}

/// What a pipeline's `build` function wires its graph with.
pub struct Wiring<'a, S> {
    config: &'a Config<S>,
    pipeline: &'a Pipeline,
    mode: Mode,
    records: Option<Flow<KafkaRecord>>,
    clickhouse: Option<clickhouse::Client>,
    /// The first table's span log, which every other table's shares its inserts with.
    span_log: Option<ClickHouseSpanLog>,
    postgres: Option<sqlx::PgPool>,
    dead_letters: Vec<Flow<DeadLetter>>,
    pub(crate) plan: Plan,
    pub(crate) checks: Vec<StartCheck>,
}

impl<'a, S: Settings> Wiring<'a, S> {
    pub(crate) fn new(
        config: &'a Config<S>,
        pipeline: &'a Pipeline,
        records: Flow<KafkaRecord>,
        mode: Mode,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            config,
            pipeline,
            mode,
            records: Some(records),
            clickhouse: None,
            span_log: None,
            postgres: services::postgres_pool(config)?,
            dead_letters: Vec::new(),
            plan: Plan::default(),
            checks: Vec::new(),
        })
    }

    /// The pipeline's own settings (its section of the configuration).
    pub fn settings(&self) -> &S {
        &self.config.settings
    }

    /// The whole configuration.
    pub fn config(&self) -> &Config<S> {
        self.config
    }

    /// The pipeline, for stages and sinks of its own.
    pub fn pipeline(&self) -> &Pipeline {
        self.pipeline
    }

    /// Whether PostgreSQL is configured (`postgres.url`, `DATABASE_URL`).
    pub fn postgres_enabled(&self) -> bool {
        self.postgres.is_some()
    }

    /// The GeoIP database `enrich.geoip_database` (`GEOIP_DATABASE`) names, opened; `None`
    /// when it is unset. Give it to an [`Enrich`](sluice_enrich::Enrich) with
    /// `config().enrich.cache()`.
    pub fn geoip(&self) -> Result<Option<sluice_enrich::MaxMind>, WiringError> {
        let Some(path) = &self.config.enrich.geoip_database else {
            return Ok(None);
        };
        sluice_enrich::MaxMind::open(path).map(Some).map_err(|e| {
            WiringError::Config(crate::config::invalid(
                "enrich.geoip_database (GEOIP_DATABASE)",
                format!("not a readable MaxMind database: {e}"),
            ))
        })
    }

    /// The Kafka records of the configured topics, each partition in offset order (once).
    pub fn records(&mut self) -> Result<Flow<KafkaRecord>, WiringError> {
        self.records.take().ok_or(WiringError::RecordsTaken)
    }

    /// The records through a decode stage ([`Flow::decode`]): add its outputs, then run it.
    /// Its dead letters go to the dead-letter topic (`kafka.dlq_topic`).
    pub fn decode(&mut self, stage: impl Into<Stage>) -> Result<Decode, WiringError> {
        let (decode, dead_letters) = self.records()?.decode(stage);
        self.dead_letters(dead_letters);
        Ok(decode)
    }

    /// Sends `flow` to the dead-letter topic too.
    pub fn dead_letters(&mut self, flow: Flow<DeadLetter>) {
        self.plan.dead_letters = true;
        self.dead_letters.push(flow);
    }

    /// Writes `flow`'s rows into the ClickHouse table `table`, exactly once: batches cut per
    /// `[pipeline]` (across partitions or per partition), each batch's spans recorded in
    /// `sluice_batch_spans` before its insert, inserts deduplicated by a token derived from
    /// them, `insert_concurrency` inserts at a time. At start the table is checked (it takes
    /// the rows, drops repeated inserts, its views' tables too, no column is left to a default
    /// that changes per insert, its landing view exists); `migrate` creates the landing view.
    ///
    /// ```no_run
    /// # #[derive(clickhouse::Row, serde::Serialize, Default)]
    /// # struct Order { id: u64, cents: u64 }
    /// fn build(w: &mut sluice_worker::Wiring<sluice_worker::NoSettings>) -> Result<(), sluice_worker::BoxError> {
    ///     let mut decode = w.decode("decode")?;
    ///     let (orders, order_rows) = decode.output::<Order>("orders");
    ///     decode.run(move || move |record, out: &mut sluice_pipeline::Decoded| {
    ///         match record.value.as_deref().map(|v| v.len() as u64) {
    ///             Some(n) => out.push(&orders, Order { id: record.offset as u64, cents: n }),
    ///             None => out.dead_letter(record, "decode", "empty", "no value"),
    ///         }
    ///     });
    ///     w.into_clickhouse(order_rows, "orders")?;
    ///     Ok(())
    /// }
    /// ```
    pub fn into_clickhouse<T, E>(
        &mut self,
        flow: Flow<Sourced<T>>,
        table: impl Into<Table<T, E>>,
    ) -> Result<(), WiringError>
    where
        T: Send + Sync + 'static,
        E: Encoder<Item = T>,
    {
        let table = table.into();
        self.plan_table(&table, false)?;
        let (client, log) = self.clickhouse(&table.name)?;
        let name = table.name.clone();
        let size_of = table.size_of;
        let sink = self.checked_sink(table, client);
        if self.mode == Mode::Plan {
            return Ok(());
        }
        let p = &self.config.pipeline;
        // One finished batch waiting while the inserts run keeps them busy; a deeper queue
        // of large batches would only hold memory.
        let stage = Stage::new(format!("{name}.batch"))
            .capacity(1)
            .retry(self.retry());
        let batches = if p.batch_across_partitions {
            flow.batch_spans_across(stage, self.limits(), move |r: &T| size_of(r), log)
        } else {
            flow.batch_spans(stage, self.limits(), move |r: &T| size_of(r), log)
        };
        self.sink_into(batches, &name, sink);
        Ok(())
    }

    /// Aggregates `flow` into event-time windows (`spec`, `aggregate`) and writes each
    /// window's rows into `table`, exactly once: each window's span is recorded before its
    /// rows leave (gathered over partitions per `[pipeline] batch_across_partitions`), so a
    /// replay cuts the same windows. Checked at start as [`Wiring::into_clickhouse`].
    ///
    /// ```no_run
    /// use sluice_worker::{BoxError, Decoded, NoSettings, WindowAggregate, WindowSpec, Wiring};
    ///
    /// /// Bytes per minute, from each record's (timestamp, size).
    /// struct PerMinute;
    ///
    /// #[derive(clickhouse::Row, serde::Serialize, Default)]
    /// struct Minute { start: u32, bytes: u64 }
    ///
    /// impl WindowAggregate for PerMinute {
    ///     type In = (i64, u64);
    ///     type Key = ();
    ///     type Acc = u64;
    ///     type Out = Minute;
    ///     fn event_time(&self, item: &(i64, u64)) -> i64 { item.0 }
    ///     fn key(&self, _: &(i64, u64)) {}
    ///     fn add(&self, acc: &mut u64, item: &(i64, u64)) { *acc += item.1 }
    ///     fn finish(&self, start: i64, _: (), bytes: u64) -> Minute {
    ///         Minute { start: start as u32, bytes }
    ///     }
    /// }
    ///
    /// fn build(w: &mut Wiring<NoSettings>) -> Result<(), BoxError> {
    ///     let mut decode = w.decode("decode")?;
    ///     let (sizes, flow) = decode.output::<(i64, u64)>("sizes");
    ///     decode.run(move || move |r, out: &mut Decoded| {
    ///         let at = r.timestamp_ms.unwrap_or_default() / 1000;
    ///         out.push(&sizes, (at, r.byte_size() as u64));
    ///     });
    ///     w.window_into_clickhouse(flow, "bytes_per_minute", WindowSpec::default(), PerMinute)?;
    ///     Ok(())
    /// }
    /// ```
    pub fn window_into_clickhouse<A, E>(
        &mut self,
        flow: Flow<Sourced<A::In>>,
        table: impl Into<Table<A::Out, E>>,
        spec: WindowSpec,
        aggregate: A,
    ) -> Result<(), WiringError>
    where
        A: WindowAggregate,
        A::Out: Sync,
        E: Encoder<Item = A::Out>,
    {
        let table = table.into();
        self.plan_table(&table, true)?;
        let (client, log) = self.clickhouse(&table.name)?;
        let name = table.name.clone();
        let sink = self.checked_sink(table, client);
        if self.mode == Mode::Plan {
            return Ok(());
        }
        let stage = Stage::new(format!("{name}.window")).retry(self.retry());
        let rows = if self.config.pipeline.batch_across_partitions {
            flow.window_across(stage, spec, aggregate, log, self.limits())
        } else {
            flow.window(stage, spec, aggregate, log)
        };
        self.sink_into(rows, &name, sink);
        Ok(())
    }

    /// Folds `flow`'s events into PostgreSQL state through `reducer` (see
    /// [`Reducer`]), exactly once: one writer, batches of up to `[pipeline]` limits, each
    /// applied in one transaction with the partitions' applied offsets in
    /// `sluice_applied_offsets`. `name` names its stages. Needs `postgres.url`.
    ///
    /// ```no_run
    /// use sluice_worker::{BoxError, Decoded, NoSettings, TableReducer, Wiring};
    ///
    /// /// A row of `clicks_per_user (user_id TEXT PRIMARY KEY, clicks BIGINT NOT NULL DEFAULT 0)`.
    /// #[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
    /// struct Clicks { clicks: i64 }
    ///
    /// struct PerUser;
    ///
    /// impl TableReducer for PerUser {
    ///     type Event = String;
    ///     type Key = String;
    ///     type State = Clicks;
    ///     const TABLE: &'static str = "clicks_per_user";
    ///     const KEY: &'static str = "user_id";
    ///     fn key(&self, user: &String) -> String { user.clone() }
    ///     fn fold(&self, c: &mut Clicks, _: &String) { c.clicks += 1 }
    /// }
    ///
    /// fn build(w: &mut Wiring<NoSettings>) -> Result<(), BoxError> {
    ///     let mut decode = w.decode("decode")?;
    ///     let (users, flow) = decode.output::<String>("users");
    ///     decode.run(move || move |r, out: &mut Decoded| match r.key.as_deref() {
    ///         Some(k) => out.push(&users, String::from_utf8_lossy(k).into_owned()),
    ///         None => out.dead_letter(r, "decode", "no_key", "a click without a user"),
    ///     });
    ///     w.reduce_into_postgres(flow, "clicks_per_user", PerUser)?;
    ///     Ok(())
    /// }
    /// ```
    pub fn reduce_into_postgres<R: Reducer>(
        &mut self,
        flow: Flow<Sourced<R::Event>>,
        name: &str,
        reducer: R,
    ) -> Result<(), WiringError> {
        let Some(pool) = self.postgres.clone() else {
            return Err(WiringError::NoPostgres(name.into()));
        };
        self.plan.reducers.push(name.into());
        let reducer = Arc::new(reducer);
        let (checked, table) = (reducer.clone(), name.to_owned());
        let check_pool = pool.clone();
        self.checks.push(StartCheck::new(
            "postgres",
            format!("reducer {name}"),
            move || {
                let (pool, reducer, name) = (check_pool.clone(), checked.clone(), table.clone());
                async move { check_postgres(&pool, &*reducer, &name).await }
            },
        ));
        if self.mode == Mode::Plan {
            return Ok(());
        }
        let group: Arc<str> = self.config.kafka.group_id.as_str().into();
        let limits = BatchLimits {
            max_bytes: self.config.pipeline.batch_max_bytes,
            ..self.limits()
        };
        let sized = reducer.clone();
        let writer = reducer;
        let sink_pool = pool;
        // One writer: a partition's events are applied in offset order. As for the tables,
        // one finished batch waits while it writes.
        flow.batch(
            Stage::new(format!("{name}.batch")).capacity(1),
            limits,
            move |s: &Sourced<R::Event>| sized.event_bytes(&s.item),
        )
        .sink(Stage::new(name).retry(self.retry()), move || {
            ReducerSink::new(sink_pool.clone(), writer.clone(), group.clone())
        });
        Ok(())
    }

    /// Registers `table` in the plan, once.
    fn plan_table<T, E: Encoder<Item = T>>(
        &mut self,
        table: &Table<T, E>,
        windowed: bool,
    ) -> Result<(), WiringError> {
        if self.plan.tables.iter().any(|t| t.name == table.name) {
            return Err(WiringError::TableTwice(table.name.clone()));
        }
        self.plan.tables.push(TablePlan {
            name: table.name.clone(),
            columns: table
                .encoder
                .columns()
                .iter()
                .map(|c| c.to_string())
                .collect(),
            windowed,
        });
        Ok(())
    }

    /// `table`'s ClickHouse sink, its check registered for the start.
    fn checked_sink<T, E>(
        &mut self,
        table: Table<T, E>,
        client: clickhouse::Client,
    ) -> ClickHouseSink<T, E>
    where
        T: Send + Sync + 'static,
        E: Encoder<Item = T>,
    {
        let mut sink = ClickHouseSink::with_encoder(client, table.name.as_str(), table.encoder);
        if let Some(column) = &table.check_range {
            sink = sink.check_range(column);
        }
        if let Some(cluster) = &self.config.clickhouse.cluster {
            sink = sink.cluster(cluster, self.config.clickhouse.layout);
        }
        let checked = sink.clone();
        self.checks.push(StartCheck::new(
            "clickhouse",
            format!("table {}", table.name),
            move || {
                let sink = checked.clone();
                async move { sink.check().await }
            },
        ));
        sink
    }

    /// Ends `batches` in `sink`, `insert_concurrency` writers.
    fn sink_into<T, E>(&mut self, batches: Flow<T>, name: &str, sink: ClickHouseSink<T, E>)
    where
        T: Send + Sync + 'static,
        E: Encoder<Item = T>,
    {
        let p = &self.config.pipeline;
        batches.sink(
            Stage::new(name)
                .workers(p.insert_concurrency)
                .retry(self.retry()),
            move || sink.clone(),
        );
    }

    /// The ClickHouse client (made once; the span log's table is checked at start) and
    /// `table`'s span log, which shares its inserts with every other table's.
    fn clickhouse(
        &mut self,
        table: &str,
    ) -> Result<(clickhouse::Client, ClickHouseSpanLog), ConfigError> {
        let client = match &self.clickhouse {
            Some(client) => client.clone(),
            None => {
                let client = services::clickhouse_client(&self.config.clickhouse)?;
                let probe = client.clone();
                self.checks.push(StartCheck::new(
                    "clickhouse",
                    sluice_sinks::SPAN_LOG_TABLE.to_owned(),
                    move || {
                        let client = probe.clone();
                        async move { check_span_log(&client).await }
                    },
                ));
                self.clickhouse = Some(client.clone());
                client
            }
        };
        let log = match &self.span_log {
            Some(first) => first.for_table(table),
            None => {
                let log = ClickHouseSpanLog::new(
                    client.clone(),
                    self.config.kafka.group_id.as_str(),
                    table,
                );
                self.span_log = Some(log.clone());
                log
            }
        };
        Ok((client, log))
    }

    fn limits(&self) -> BatchLimits {
        let p = &self.config.pipeline;
        BatchLimits {
            max_rows: p.batch_max_rows,
            max_bytes: p.batch_max_bytes,
            max_linger: Duration::from_millis(p.batch_linger_ms),
        }
    }

    fn retry(&self) -> RetryPolicy {
        let p = &self.config.pipeline;
        RetryPolicy {
            max_retries: p.max_retries,
            max_backoff: Duration::from_millis(p.max_backoff_ms.max(1)),
            ..RetryPolicy::default()
        }
    }

    /// Ends the wiring: every dead-letter flow into one batcher and the dead-letter topic.
    pub(crate) fn finish(mut self) -> Result<(Plan, Vec<StartCheck>), crate::Error> {
        let flows = std::mem::take(&mut self.dead_letters);
        if self.mode == Mode::Run && !flows.is_empty() {
            let kafka = &self.config.kafka;
            let dlq = DeadLetterSink::new(
                &kafka.brokers,
                kafka.dlq_topic(),
                &kafka.librdkafka_options()?,
            )
            .map_err(|e| crate::Error::Service {
                service: "kafka".into(),
                message: format!("cannot create the dead-letter producer: {e}"),
            })?;
            let limits = BatchLimits {
                max_rows: 1_000,
                max_bytes: 8 << 20,
                max_linger: Duration::from_millis(100),
            };
            let merged = Flow::merge("dead_letters.merge", flows).expect("at least one flow");
            merged
                .batch("dead_letters.batch", limits, |d: &DeadLetter| {
                    d.record.byte_size() + d.error.len()
                })
                .sink(Stage::new("dead_letters").retry(self.retry()), move || {
                    dlq.clone()
                });
        }
        Ok((self.plan, self.checks))
    }
}

/// Checks that the span log's table exists.
async fn check_span_log(client: &clickhouse::Client) -> Result<(), SinkError> {
    client
        .query("SELECT count() FROM ? WHERE 0")
        .bind(clickhouse::sql::Identifier(sluice_sinks::SPAN_LOG_TABLE))
        .fetch_one::<u64>()
        .await
        .map(|_| ())
        .map_err(|e| {
            let e = sluice_sinks::classify(e);
            if e.is_transient() {
                e
            } else {
                SinkError::permanent(format!(
                    "table `{}` is missing or unreadable (run `migrate`): {e}",
                    sluice_sinks::SPAN_LOG_TABLE
                ))
            }
        })
}

/// Checks that PostgreSQL has the applied-offsets ledger and the reducer's tables.
async fn check_postgres<R: Reducer>(
    pool: &sqlx::PgPool,
    reducer: &R,
    name: &str,
) -> Result<(), SinkError> {
    let outdated = |what: &str, e: sqlx::Error| {
        let e = sluice_sinks::classify_pg(e);
        if e.is_transient() {
            e
        } else {
            SinkError::permanent(format!(
                "PostgreSQL {what} is missing or outdated (run `migrate`): {e}"
            ))
        }
    };
    let mut conn = pool.acquire().await.map_err(sluice_sinks::classify_pg)?;
    sqlx::query(
        "SELECT group_id, topic, partition, next_offset, epoch FROM sluice_applied_offsets LIMIT 0",
    )
    .execute(&mut *conn)
    .await
    .map_err(|e| outdated("table `sluice_applied_offsets`", e))?;
    reducer.check(&mut conn).await.map_err(|e| match e {
        // A check's own finding, said in full.
        sqlx::Error::Configuration(finding) => {
            SinkError::permanent(format!("PostgreSQL table of reducer `{name}`: {finding}"))
        }
        e => outdated(&format!("schema of reducer `{name}`"), e),
    })
}
