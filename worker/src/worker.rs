//! The command line every pipeline binary gets: `run`, `migrate`, `validate`, `bench` (and the
//! pipeline's own commands), and what each does.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgMatches, Command, FromArgMatches, Subcommand};
use sluice_pipeline::{
    BoxError, KafkaSource, KafkaSourceConfig, Pipeline, PipelineConfig, RetryPolicy,
};

use crate::bench::{self, Workload};
use crate::config::{Config, Identity, Settings};
use crate::migrate::{self, ClickHousePlan, Migration};
use crate::wiring::{Mode, Plan, StartCheck, Wiring};
use crate::{Error, logging, progress, services};

/// A pipeline's `build` function: wires the graph with a [`Wiring`].
pub type Build<S> = fn(&mut Wiring<'_, S>) -> Result<(), BoxError>;

/// A pipeline binary: its name and defaults, migrations and workload, and `main`.
///
/// ```no_run
/// use std::process::ExitCode;
/// use sluice_worker::{BoxError, NoSettings, Wiring, Worker};
///
/// fn build(w: &mut Wiring<NoSettings>) -> Result<(), BoxError> {
///     let records = w.records()?;
///     // … decode, operators, w.into_clickhouse(…) …
///     # drop(records);
///     Ok(())
/// }
///
/// fn main() -> ExitCode {
///     Worker::<NoSettings>::new("clicks")
///         .about("Click events into ClickHouse")
///         .topics(["clicks"])
///         .clickhouse_migrations(&[(1, "clicks", "CREATE TABLE IF NOT EXISTS clicks (…) …")])
///         .run(build)
/// }
/// ```
pub struct Worker<S: Settings> {
    name: &'static str,
    identity: Identity,
    about: String,
    clickhouse_migrations: &'static [Migration],
    postgres_migrations: &'static [Migration],
    workload: Option<Arc<dyn Workload>>,
    _settings: std::marker::PhantomData<fn(S)>,
}

/// The commands every pipeline binary has.
#[derive(Subcommand, Debug)]
enum Builtin {
    /// Run the pipeline: Kafka → the pipeline's stages → its sinks (and the dead-letter
    /// topic), with /health, /ready and /metrics on HEALTH_PORT. SIGINT/SIGTERM stop it
    /// gracefully.
    Run {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Exit 0 once every partition of the topics has the group's committed offset at the
        /// end offset it had at start, whichever member processed it (backfills, demos,
        /// tests); the worker stays in the group until then.
        #[arg(long)]
        drain: bool,
        /// With --drain: exit non-zero after this many seconds if the drain is not done,
        /// naming the partitions left (what is written is committed).
        #[arg(long, value_name = "SECS", requires = "drain")]
        drain_timeout: Option<u64>,
        /// Show progress on stderr: with --drain, records done of those to drain, the rate
        /// and the time left; otherwise records written and the rate.
        #[arg(long)]
        progress: bool,
    },
    /// Create the framework's tables and the pipeline's, in ClickHouse and (when
    /// DATABASE_URL is set) PostgreSQL, and a landing view per table the pipeline writes
    /// (idempotent, versioned), and say what was done.
    Migrate {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Create the ClickHouse tables on this cluster (of the servers' `remote_servers`;
        /// default: `clickhouse.cluster`): tables `<name>_local` behind `Distributed` tables
        /// `<name>`.
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        /// `replicated` (`Replicated…MergeTree`, every statement `ON CLUSTER`) or `sharded`
        /// (plain `…MergeTree` written replica by replica by the `Distributed` tables, the
        /// statements run on each node of `clickhouse.nodes`); default: `clickhouse.layout`.
        #[arg(long, value_name = "LAYOUT")]
        layout: Option<sluice_sinks::Layout>,
        /// Print the ClickHouse statements instead of running them (connects to nothing).
        #[arg(long)]
        dry_run: bool,
    },
    /// Check the configuration, reach every service and check every table the pipeline
    /// writes; print the effective settings with secrets redacted. Exits non-zero if anything
    /// is wrong.
    Validate {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show what the dead-letter topic holds, from its beginning: each record's source, why it
    /// was refused, and the start of its value.
    DeadLetters {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Dead letters to show at most.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Produce each line of standard input as one record (value only) into the topic, for
    /// feeding a few records by hand.
    Produce {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Topic (default: the first configured one).
        #[arg(long)]
        topic: Option<String>,
        /// Partitions, if the topic has to be created.
        #[arg(long, default_value_t = 1)]
        partitions: i32,
    },
    /// End-to-end throughput benchmark on the pipeline's own workload (see `bench` in the
    /// README).
    Bench(bench::Options),
    /// `bench`'s ceiling A, as its own process.
    #[command(hide = true)]
    BenchConsume(bench::ConsumeOptions),
    /// `bench`'s ceiling B, as its own process.
    #[command(hide = true)]
    BenchInsert(bench::InsertOptions),
}

/// A pipeline without commands of its own.
#[derive(Debug)]
pub enum NoCommands {}

impl FromArgMatches for NoCommands {
    fn from_arg_matches(_: &ArgMatches) -> Result<Self, clap::Error> {
        Err(clap::Error::new(clap::error::ErrorKind::InvalidSubcommand))
    }

    fn update_from_arg_matches(&mut self, _: &ArgMatches) -> Result<(), clap::Error> {
        match *self {}
    }
}

impl Subcommand for NoCommands {
    fn augment_subcommands(cmd: Command) -> Command {
        cmd
    }

    fn augment_subcommands_for_update(cmd: Command) -> Command {
        cmd
    }

    fn has_subcommand(_: &str) -> bool {
        false
    }
}

impl<S: Settings> Worker<S> {
    /// The pipeline `name`: the command's name, the scope of its migrations, and its default
    /// consumer group and ClickHouse database.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            identity: Identity {
                name: name.to_owned(),
                ..Identity::default()
            },
            about: format!("The {name} pipeline worker (Sluice)"),
            clickhouse_migrations: &[],
            postgres_migrations: &[],
            workload: None,
            _settings: std::marker::PhantomData,
        }
    }

    /// The name the pipeline's migrations are recorded under (and its default group and
    /// database), when it differs from the binary's.
    pub fn scope(mut self, scope: &str) -> Self {
        self.identity.name = scope.to_owned();
        self
    }

    /// What `--help` says the binary is.
    pub fn about(mut self, about: impl Into<String>) -> Self {
        self.about = about.into();
        self
    }

    /// The consumer group when the configuration names none.
    pub fn group_id(mut self, group: &str) -> Self {
        self.identity.group_id = Some(group.to_owned());
        self
    }

    /// The topics when the configuration names none.
    pub fn topics<'t>(mut self, topics: impl IntoIterator<Item = &'t str>) -> Self {
        self.identity.topics = topics.into_iter().map(str::to_owned).collect();
        self
    }

    /// The ClickHouse database when the configuration names none.
    pub fn database(mut self, database: &str) -> Self {
        self.identity.database = Some(database.to_owned());
        self
    }

    /// The pipeline's ClickHouse migrations (applied after the framework's).
    pub fn clickhouse_migrations(mut self, migrations: &'static [Migration]) -> Self {
        self.clickhouse_migrations = migrations;
        self
    }

    /// The pipeline's PostgreSQL migrations (applied after the framework's).
    pub fn postgres_migrations(mut self, migrations: &'static [Migration]) -> Self {
        self.postgres_migrations = migrations;
        self
    }

    /// What `bench` fills its topic with.
    pub fn workload(mut self, workload: impl Workload) -> Self {
        self.workload = Some(Arc::new(workload));
        self
    }

    /// Parses the command line and runs the command; the exit code of `main`.
    pub fn run(self, build: Build<S>) -> ExitCode {
        self.run_with(
            build,
            |command: NoCommands, _| async move { match command {} },
        )
    }

    /// As [`Worker::run`], with the pipeline's own commands `C` (a clap `Subcommand`),
    /// which `commands` runs with the loaded configuration.
    pub fn run_with<C, F, Fut>(self, build: Build<S>, commands: F) -> ExitCode
    where
        C: Subcommand,
        F: FnOnce(C, Config<S>) -> Fut,
        Fut: Future<Output = Result<(), BoxError>>,
    {
        tune_malloc();
        // The pipeline's own text last: augmenting takes the commands' enum's doc otherwise.
        let cli = C::augment_subcommands(Builtin::augment_subcommands(
            Command::new(self.name)
                .version(env!("CARGO_PKG_VERSION"))
                .subcommand_required(true)
                .arg_required_else_help(true),
        ))
        .about(self.about.clone());
        let matches = cli.get_matches();
        let name = matches.subcommand_name().unwrap_or_default().to_owned();
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let outcome: Result<ExitCode, Error> = runtime.block_on(async {
            if C::has_subcommand(&name) {
                let command = C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
                let config = self.load(config_arg(&matches))?;
                commands(command, config).await.map_err(Error::Command)?;
                Ok(ExitCode::SUCCESS)
            } else {
                let command = Builtin::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
                self.dispatch(command, build).await
            }
        });
        match outcome {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }

    /// Loads the configuration and starts logging.
    fn load(&self, path: Option<PathBuf>) -> Result<Config<S>, Error> {
        let config = Config::load(path.as_deref(), |k| std::env::var(k).ok(), &self.identity)?;
        logging::init(&config.log);
        Ok(config)
    }

    async fn dispatch(self, command: Builtin, build: Build<S>) -> Result<ExitCode, Error> {
        match command {
            Builtin::Run {
                config,
                drain,
                drain_timeout,
                progress,
            } => {
                let config = self.load(config)?;
                let drain = drain.then(|| drain_timeout.map(Duration::from_secs));
                run(&config, build, drain, progress).await
            }
            Builtin::Migrate {
                config,
                cluster,
                layout,
                dry_run,
            } => {
                let config = self.load(config)?;
                let cluster = cluster.or_else(|| config.clickhouse.cluster.clone());
                let layout = layout.unwrap_or(config.clickhouse.layout);
                let plan = plan(&config, build)?;
                let tables: Vec<String> = plan.tables.iter().map(|t| t.name.clone()).collect();
                let ch = ClickHousePlan {
                    scope: &self.identity.name,
                    migrations: self.clickhouse_migrations,
                    tables: &tables,
                    cluster: cluster.as_deref(),
                    layout,
                };
                if dry_run {
                    let text = ch.text(&config.clickhouse.database)?;
                    // Written at once, so that a closed pipe (`| head`) ends it without a panic.
                    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
                        .map_err(|e| Error::Other(format!("cannot write the statements: {e}")))?;
                    return Ok(ExitCode::SUCCESS);
                }
                let mut report = ch.apply(&config.clickhouse).await?;
                match &config.postgres.url {
                    Some(url) => report.extend(
                        migrate::postgres(
                            url.expose(),
                            &self.identity.name,
                            self.postgres_migrations,
                        )
                        .await?,
                    ),
                    None => {
                        report.push("postgres: DATABASE_URL not set: nothing to migrate".into())
                    }
                }
                for line in report {
                    println!("{line}");
                }
                Ok(ExitCode::SUCCESS)
            }
            Builtin::DeadLetters { config, limit } => {
                let config = self.load(config)?;
                crate::dead_letters::show(&config.kafka, limit).await?;
                Ok(ExitCode::SUCCESS)
            }
            Builtin::Produce {
                config,
                topic,
                partitions,
            } => {
                let config = self.load(config)?;
                let Some(topic) = topic.or_else(|| config.kafka.topics.first().cloned()) else {
                    return Err(Error::Other("no topic given or configured".into()));
                };
                let lines: Vec<String> = std::io::stdin()
                    .lines()
                    .collect::<Result<_, _>>()
                    .map_err(|e| Error::Other(format!("cannot read standard input: {e}")))?;
                let records: Vec<bench::Record> = lines
                    .into_iter()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| bench::Record {
                        value: l.into_bytes(),
                        ..Default::default()
                    })
                    .collect();
                let n = records.len() as u64;
                bench::produce(
                    &config.kafka,
                    &topic,
                    partitions,
                    records.into_iter(),
                    n,
                    0,
                    false,
                )
                .await?;
                println!("produced {n} records into {topic}");
                Ok(ExitCode::SUCCESS)
            }
            Builtin::Validate { config } => {
                let config = self.load(config)?;
                validate(&config, build).await
            }
            Builtin::Bench(opts) => {
                let config = self.load(opts.config.clone())?;
                let Some(workload) = self.workload.clone() else {
                    return Err(Error::Other(format!(
                        "the {} pipeline has no workload to benchmark with (Worker::workload)",
                        self.identity.name
                    )));
                };
                // What it writes with its reducers on (the local PostgreSQL unless one is
                // configured), and whether it runs with them off at all.
                let mut with_postgres = config.clone();
                with_postgres
                    .postgres
                    .url
                    .get_or_insert_with(|| crate::Secret::new(bench::LOCAL_POSTGRES));
                let plan = plan(&with_postgres, build)?;
                let mut without = config.clone();
                without.postgres.url = None;
                let clickhouse_only = self::plan(&without, build).is_ok();
                let migrations = bench::Migrations {
                    scope: &self.identity.name,
                    clickhouse: self.clickhouse_migrations,
                    postgres: self.postgres_migrations,
                };
                let report = bench::run(
                    &with_postgres,
                    &opts,
                    &plan,
                    clickhouse_only,
                    &*workload,
                    &migrations,
                )
                .await?;
                print!("{}", report.table());
                Ok(ExitCode::SUCCESS)
            }
            Builtin::BenchConsume(opts) => {
                let config = self.load(opts.config.clone())?;
                let source = source_config(&config, true);
                tokio::task::spawn_blocking(move || bench::consume(source, &opts))
                    .await
                    .map_err(|e| Error::Other(e.to_string()))??;
                Ok(ExitCode::SUCCESS)
            }
            Builtin::BenchInsert(opts) => {
                let mut config = self.load(opts.config.clone())?;
                // The tables are the same with the reducers on; a pipeline may need them.
                config
                    .postgres
                    .url
                    .get_or_insert_with(|| crate::Secret::new(bench::LOCAL_POSTGRES));
                let plan = plan(&config, build)?;
                bench::insert(&config, &plan, &opts).await?;
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// The `--config` of whichever command was given, for the pipeline's own commands.
fn config_arg(matches: &ArgMatches) -> Option<PathBuf> {
    let (_, sub) = matches.subcommand()?;
    sub.try_get_one::<PathBuf>("config").ok().flatten().cloned()
}

/// The Kafka source settings of the configuration.
pub(crate) fn source_config<S>(config: &Config<S>, drain: bool) -> KafkaSourceConfig {
    let mut kafka = KafkaSourceConfig::new(
        &config.kafka.brokers,
        &config.kafka.group_id,
        config.kafka.topics.clone(),
    );
    // Validated with the configuration.
    kafka.client = config.kafka.librdkafka_options().unwrap_or_default();
    kafka
        .client
        .entry("client.id".into())
        .or_insert_with(|| config.kafka.client_id.clone());
    kafka.commit_interval = Duration::from_millis(config.kafka.commit_interval_ms.max(10));
    kafka.drain = drain;
    kafka
}

fn pipeline_config<S>(config: &Config<S>) -> PipelineConfig {
    let p = &config.pipeline;
    PipelineConfig {
        queue_capacity: p.queue_capacity,
        drain_deadline: Duration::from_secs(p.drain_deadline_secs),
        retry: RetryPolicy {
            max_retries: p.max_retries,
            max_backoff: Duration::from_millis(p.max_backoff_ms.max(1)),
            ..Default::default()
        },
    }
}

/// What the pipeline writes, learnt by wiring it without running it.
pub(crate) fn plan<S: Settings>(config: &Config<S>, build: Build<S>) -> Result<Plan, Error> {
    Ok(planned(config, build)?.0)
}

/// What the pipeline writes and the checks `run` makes at start, without running it.
fn planned<S: Settings>(
    config: &Config<S>,
    build: Build<S>,
) -> Result<(Plan, Vec<StartCheck>), Error> {
    let pipeline = Pipeline::new(pipeline_config(config));
    let records = pipeline.source("kafka", KafkaSource::new(source_config(config, false)));
    let mut wiring = Wiring::new(config, &pipeline, records, Mode::Plan)?;
    build(&mut wiring).map_err(Error::Build)?;
    wiring.finish()
}

/// `run`: wires the pipeline, waits for the services and checks its tables, then runs it
/// until a signal (or the end of a drain).
async fn run<S: Settings>(
    config: &Config<S>,
    build: Build<S>,
    drain: Option<Option<Duration>>,
    show_progress: bool,
) -> Result<ExitCode, Error> {
    let prometheus = match sluice_pipeline::http::install_prometheus() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
            None
        }
    };
    let pipeline = Pipeline::new(pipeline_config(config));
    let handle = pipeline.handle();
    sluice_pipeline::shutdown_on_signals(handle.shutdown_signal());
    let server = if config.health.enabled {
        let addr = std::net::SocketAddr::from(([0, 0, 0, 0], config.health.port));
        let (_, task) = sluice_pipeline::http::serve(addr, handle.health(), prometheus)
            .await
            .map_err(|e| {
                Error::Other(format!(
                    "cannot listen on HEALTH_PORT {}: {e}",
                    config.health.port
                ))
            })?;
        Some(task)
    } else {
        None
    };

    let mut source = source_config(config, drain.is_some());
    source.drain_timeout = drain.flatten();
    let source = KafkaSource::new(source);
    let drain_progress = source.drain_progress();
    let records = pipeline.source("kafka", source);
    let mut wiring = Wiring::new(config, &pipeline, records, Mode::Run)?;
    build(&mut wiring).map_err(Error::Build)?;
    let (plan, checks) = wiring.finish()?;

    // The services may not be up yet: retry (not ready meanwhile) until they answer; a table
    // of the wrong shape stops the worker at once.
    for mut c in checks {
        services::wait_usable(&handle, c.service, &mut c.check).await?;
    }
    if plan.dead_letters {
        // The broker may not be up yet either: the dead-letter topic is created once it answers.
        let topic = config.kafka.dlq_topic();
        services::wait_usable(&handle, "kafka", || async {
            services::ensure_topic(&config.kafka, &topic, 3)
                .await
                .map_err(services::transient)
        })
        .await?;
    }
    tracing::info!(topics = ?config.kafka.topics, group = %config.kafka.group_id, tables = plan.tables.len(), reducers = plan.reducers.len(), drain = drain.is_some(), "starting");

    let started = std::time::Instant::now();
    let reporter = show_progress
        .then(|| progress::spawn(handle.clone(), drain.is_some().then_some(drain_progress)));
    let result = pipeline.run().await;
    if let Some(r) = reporter {
        r.finish().await;
    }
    if let Some(s) = server {
        s.abort();
    }
    match result {
        Ok(()) => {
            tracing::info!(
                items = handle.items_written(),
                seconds = started.elapsed().as_secs_f64(),
                "stopped cleanly"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            tracing::error!(error = %e, "stopped on an error; offsets are committed only up to what was written");
            Err(e.into())
        }
    }
}

/// `validate`: the effective configuration, each service reached, each table checked.
async fn validate<S: Settings>(config: &Config<S>, build: Build<S>) -> Result<ExitCode, Error> {
    println!(
        "# effective configuration (secrets redacted)\n{}",
        config.redacted()
    );
    let mut ok = true;
    let mut report = |what: &str, result: Result<String, String>| match result {
        Ok(detail) => println!("{what:<10} ok    {detail}"),
        Err(e) => {
            ok = false;
            println!("{what:<10} FAIL  {e}");
        }
    };
    report("kafka", services::check_kafka(&config.kafka).await);
    let clickhouse = services::check_clickhouse(&config.clickhouse).await;
    let clickhouse_reached = clickhouse.is_ok();
    report("clickhouse", clickhouse);
    let postgres = services::check_postgres(config).await;
    let postgres_reached = postgres.is_ok() && config.postgres.url.is_some();
    report("postgres", postgres);
    match planned(config, build) {
        // Each check `run` makes at start, once (the services answered above).
        Ok((_, checks)) => {
            for mut c in checks {
                let reached = match c.service {
                    "clickhouse" => clickhouse_reached,
                    "postgres" => postgres_reached,
                    _ => true,
                };
                if reached {
                    let result = (c.check)().await.map(|()| "ok to write".into());
                    report(&c.what, result.map_err(|e| e.to_string()));
                }
            }
        }
        Err(e) => report("pipeline", Err(e.to_string())),
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// glibc gives each thread that allocates its own arena (up to 8 per core) and batches freed
/// on other threads fragment them: a 1M-event drain peaked at 291 MB with the default, 224 MB
/// with two arenas. glibc also raises its mmap threshold each time a large block is freed, after
/// which multi-MiB batch buffers come from the arenas and stay there once freed; a fixed
/// threshold keeps them mapped and returned whole. At 256 KiB, though, every fetch response,
/// decompression buffer and Native column was mapped fresh and faulted in page by page (7% of
/// the worker's CPU in page faults); at 2 MiB, with 8 MiB kept at an arena's top before it is
/// trimmed, a 1M-record drain took 3.5–4.4 instead of 4.5–5.3 CPU s and peaked at 143–205
/// instead of 120–147 MB (`d3ffa18` against `155e658`, alternating, 2-core AMD EPYC). Must run before the
/// runtime starts its threads.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}
