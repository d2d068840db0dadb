//! `sluice`: the command-line entry point of the Sluice pipeline worker.

mod bench;
mod config;
mod frameworks;
mod generate;
mod logging;
mod migrate;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use config::Config;

/// Sluice: typed, backpressured Kafka stream pipelines into ClickHouse and PostgreSQL.
///
/// Configuration comes from a TOML file (`--config`), overridden by the environment variables
/// the FrameWorks Go worker used: KAFKA_BROKERS, KAFKA_GROUP_ID, KAFKA_TOPICS, KAFKA_CLIENT_ID,
/// CLICKHOUSE_HOST, CLICKHOUSE_DB, CLICKHOUSE_USER, CLICKHOUSE_PASSWORD, DATABASE_URL, LOG_LEVEL,
/// ENABLE_HEALTH_ENDPOINT, HEALTH_PORT.
#[derive(Parser, Debug)]
#[command(name = "sluice", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the FrameWorks ingest worker: Kafka → ClickHouse (and the dead-letter topic), with
    /// /health, /ready and /metrics on HEALTH_PORT. SIGINT/SIGTERM stop it gracefully.
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
        /// Print a progress line (rows written) every second on stderr.
        #[arg(long)]
        progress: bool,
    },
    /// Create the ClickHouse database and tables, and the PostgreSQL tables when DATABASE_URL
    /// is set (idempotent, versioned), and say what was done.
    Migrate {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Create the ClickHouse tables on this cluster (of the servers' `remote_servers`):
        /// `Replicated…MergeTree` tables `<name>_local` behind `Distributed` tables `<name>`,
        /// every statement `ON CLUSTER`.
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        /// Print the ClickHouse statements instead of running them (connects to nothing).
        #[arg(long)]
        dry_run: bool,
    },
    /// End-to-end throughput benchmark: fills a fresh topic, measures a plain consumer
    /// (ceiling A), pre-encoded inserts (ceiling B), the worker into ClickHouse and into
    /// ClickHouse + PostgreSQL, and the live latency; prints a table, writes JSON under
    /// `--out` and regenerates BENCHMARKS.md.
    Bench {
        /// TOML configuration file (the worker phases use it too).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Events in the topic.
        #[arg(long, default_value_t = 2_000_000)]
        events: u64,
        /// Partitions of the topic.
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        /// Seconds the latency probe feeds a live worker (0: skip the latency phase).
        #[arg(long, default_value_t = 20)]
        probe_secs: u64,
        /// Events per second during the latency phase (0: half the worker's measured rate).
        #[arg(long, default_value_t = 0)]
        probe_rate: u64,
        /// Skip the phase with the PostgreSQL reducer.
        #[arg(long)]
        skip_postgres: bool,
        /// Directory for the JSON results and the phases' logs.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Markdown report to regenerate.
        #[arg(long, default_value = "BENCHMARKS.md")]
        markdown: PathBuf,
        /// Do not write the Markdown report.
        #[arg(long)]
        no_markdown: bool,
    },
    /// `sluice bench`'s ceiling A, as its own process.
    #[command(hide = true)]
    BenchConsume {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        group: String,
        #[arg(long)]
        events: u64,
        #[arg(long)]
        result: PathBuf,
    },
    /// `sluice bench`'s ceiling B, as its own process.
    #[command(hide = true)]
    BenchInsert {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        result: PathBuf,
    },
    /// Produce a realistic FrameWorks event stream into the configured topic.
    Generate {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Number of events.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// Events per second (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Random seed: the same seed gives the same events.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Partitions of the topic, if it has to be created.
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        /// Number of tenants.
        #[arg(long, default_value_t = 8)]
        tenants: usize,
        /// Topic (default: the first of KAFKA_TOPICS).
        #[arg(long)]
        topic: Option<String>,
        /// Key records by tenant and stream instead of by event id, so each stream's events
        /// keep one order (FrameWorks' producers key by event id).
        #[arg(long)]
        key_by_stream: bool,
        /// End of the hour the events span, as seconds since the Unix epoch (default: now);
        /// with the same seed, the same value gives byte-identical events.
        #[arg(long)]
        until: Option<i64>,
        /// Publish about this many events in a thousand a second time, 1 to 400 events later
        /// (same key, value and headers at a new offset), as a producer's retry does.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
        republish_permille: u32,
    },
    /// Check the configuration and reach every service; print the effective settings with
    /// secrets redacted. Exits non-zero if anything is wrong.
    Validate {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
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
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { config } => validate(config).await,
        Command::Bench {
            config,
            events,
            partitions,
            probe_secs,
            probe_rate,
            skip_postgres,
            out,
            markdown,
            no_markdown,
        } => {
            let opts = bench::Options {
                events,
                partitions,
                probe_secs,
                probe_rate,
                skip_postgres,
                out_dir: out,
                markdown: (!no_markdown).then_some(markdown),
                config_path: config.clone(),
            };
            let config = load(config)?;
            let report = bench::run(&config, &opts).await?;
            print!("{}", report.table());
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchConsume {
            config,
            topic,
            group,
            events,
            result,
        } => {
            let config = load(config)?;
            tokio::task::spawn_blocking(move || {
                bench::consume(&config, &topic, &group, events, &result)
            })
            .await??;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchInsert {
            config,
            from,
            to,
            result,
        } => {
            bench::insert(&load(config)?, &from, &to, &result).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate {
            config,
            cluster,
            dry_run,
        } => {
            let config = load(config)?;
            if dry_run {
                use std::fmt::Write as _;
                let db = &config.clickhouse.database;
                let mut text = String::from("-- database and migration ledger\n");
                for stmt in migrate::setup_ddl(db, cluster.as_deref()) {
                    let _ = writeln!(text, "{stmt};\n");
                }
                for (version, name, statements) in migrate::clickhouse_ddl(db, cluster.as_deref())?
                {
                    let _ = writeln!(text, "-- migration {version:04} {name}");
                    for stmt in statements {
                        let _ = writeln!(text, "{stmt};\n");
                    }
                }
                // Written at once, so that a closed pipe (`| head`) ends it without a panic.
                std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
                    .context("cannot write the statements")?;
                return Ok(ExitCode::SUCCESS);
            }
            for line in migrate::clickhouse(&config, cluster.as_deref()).await? {
                println!("{line}");
            }
            for line in migrate::postgres(&config).await? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            config,
            events,
            rate,
            seed,
            partitions,
            tenants,
            topic,
            key_by_stream,
            until,
            republish_permille,
        } => {
            let config = load(config)?;
            let opts = generate::Options {
                events,
                rate,
                seed,
                partitions,
                topic,
                tenants,
                progress: true,
                key_by_stream,
                until,
                republish_permille,
            };
            generate::run(&config, &opts).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            drain,
            drain_timeout,
            progress,
        } => {
            let drain = drain.then(|| drain_timeout.map(Duration::from_secs));
            run(config, drain, progress).await
        }
    }
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let config = Config::load(path.as_deref(), |k| std::env::var(k).ok())?;
    logging::init(&config.log);
    Ok(config)
}

async fn validate(path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    println!(
        "# effective configuration (secrets redacted)\n{}",
        config.redacted()
    );
    let mut ok = true;
    for (service, result) in [
        ("kafka", check_kafka(&config).await),
        ("clickhouse", check_clickhouse(&config).await),
        ("postgres", check_postgres(&config).await),
    ] {
        match result {
            Ok(detail) => println!("{service:<10} ok    {detail}"),
            Err(e) => {
                ok = false;
                println!("{service:<10} FAIL  {e:#}");
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn check_kafka(config: &Config) -> anyhow::Result<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut client = rdkafka::ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("client.id", &config.kafka.client_id);
    for (k, v) in config.kafka.librdkafka_options()? {
        client.set(k, v);
    }
    let consumer: BaseConsumer = client
        .create()
        .context("invalid librdkafka configuration")?;
    let topics = config.kafka.topics.clone();
    tokio::task::spawn_blocking(move || {
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .context("cannot fetch metadata from the brokers")?;
        let missing: Vec<_> = topics
            .iter()
            .filter(|t| !md.topics().iter().any(|m| m.name() == t.as_str()))
            .cloned()
            .collect();
        let found = topics.len() - missing.len();
        Ok(format!(
            "{} broker(s); {found}/{} topic(s) exist{}",
            md.brokers().len(),
            topics.len(),
            if missing.is_empty() {
                String::new()
            } else {
                format!(" (missing: {})", missing.join(", "))
            }
        ))
    })
    .await?
}

async fn check_clickhouse(config: &Config) -> anyhow::Result<String> {
    let client = frameworks::clickhouse_server(config)?;
    let version: String = client
        .query("SELECT version()")
        .fetch_one()
        .await
        .context("SELECT version() failed")?;
    Ok(format!("ClickHouse {version}"))
}

async fn check_postgres(config: &Config) -> anyhow::Result<String> {
    let Some(url) = &config.postgres.url else {
        return Ok("DATABASE_URL not set: state reduction off".into());
    };
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url.expose())
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to {}: {e}",
                config::redact_url(url.expose())
            )
        })?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await?;
    Ok(format!("PostgreSQL {version}"))
}

/// `drain`: drain mode, with its timeout if any.
async fn run(
    path: Option<PathBuf>,
    drain: Option<Option<Duration>>,
    progress: bool,
) -> anyhow::Result<ExitCode> {
    use sluice_pipeline::{DeadLetterSink, Pipeline, PipelineConfig, RetryPolicy};
    let config = load(path)?;
    let prometheus = match sluice_pipeline::http::install_prometheus() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
            None
        }
    };
    let p = &config.pipeline;
    let pipeline = Pipeline::new(PipelineConfig {
        queue_capacity: p.queue_capacity,
        drain_deadline: Duration::from_secs(p.drain_deadline_secs),
        retry: RetryPolicy {
            max_retries: p.max_retries,
            max_backoff: Duration::from_millis(p.max_backoff_ms.max(1)),
            ..Default::default()
        },
    });
    let handle = pipeline.handle();
    sluice_pipeline::shutdown_on_signals(handle.shutdown_signal());
    let server = if config.health.enabled {
        let addr = std::net::SocketAddr::from(([0, 0, 0, 0], config.health.port));
        let (_, task) = sluice_pipeline::http::serve(addr, handle.health(), prometheus)
            .await
            .with_context(|| format!("cannot listen on HEALTH_PORT {}", config.health.port))?;
        Some(task)
    } else {
        None
    };

    // ClickHouse and PostgreSQL may not be up yet: retry (not ready meanwhile) until they
    // answer; a table of the wrong shape stops the worker at once.
    let client = frameworks::clickhouse_client(&config)?;
    wait_usable(&handle, "clickhouse", || frameworks::check_tables(&client)).await?;
    let postgres = match &config.postgres.url {
        Some(url) => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(10))
                .connect_lazy(url.expose())
                .with_context(|| {
                    format!("invalid DATABASE_URL {}", config::redact_url(url.expose()))
                })?;
            wait_usable(&handle, "postgres", || frameworks::check_postgres(&pool)).await?;
            Some(pool)
        }
        None => None,
    };

    // The broker may not be up yet either: the dead-letter topic is created once it answers.
    let dlq_topic = config.kafka.dlq_topic();
    wait_usable(&handle, "kafka", || async {
        ensure_topic(&config, &dlq_topic, 3)
            .await
            .map_err(|e| sluice_pipeline::SinkError::transient(format!("{e:#}")))
    })
    .await?;
    let dlq = DeadLetterSink::new(
        &config.kafka.brokers,
        &dlq_topic,
        &config.kafka.librdkafka_options()?,
    )
    .context("cannot create the dead-letter producer")?;
    let mut source = frameworks::source_config(&config, drain.is_some())?;
    source.drain_timeout = drain.flatten();
    frameworks::build(&pipeline, &config, source, client, postgres, dlq);
    tracing::info!(topics = ?config.kafka.topics, group = %config.kafka.group_id, dlq = %dlq_topic, drain = drain.is_some(), "sluice run: starting");

    let started = std::time::Instant::now();
    let reporter = progress.then(|| {
        let handle = handle.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let rows = handle.items_written();
                let secs = started.elapsed().as_secs_f64();
                eprint!(
                    "\rrun: {rows} rows written in {secs:.0} s ({:.0} rows/s)   ",
                    rows as f64 / secs.max(1e-9)
                );
            }
        })
    });
    let result = pipeline.run().await;
    if let Some(r) = reporter {
        r.abort();
        eprintln!();
    }
    if let Some(s) = server {
        s.abort();
    }
    match result {
        Ok(()) => {
            tracing::info!(
                rows = handle.items_written(),
                seconds = started.elapsed().as_secs_f64(),
                "sluice run: stopped cleanly"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            tracing::error!(error = %e, "sluice run: stopped on an error; offsets are committed only up to what was written");
            Err(e.into())
        }
    }
}

/// Runs `check` until it passes: transient failures are retried with backoff while `/ready`
/// reports `service` failing; a permanent one stops the worker with its message.
async fn wait_usable<F, Fut>(
    handle: &sluice_pipeline::PipelineHandle,
    service: &str,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), sluice_pipeline::SinkError>>,
{
    let health = handle.health();
    let mut attempt = 0u32;
    loop {
        match check().await {
            Ok(()) => break,
            Err(e) if e.is_transient() && !handle.shutdown_signal().is_triggered() => {
                health.set_failing(service, true);
                let wait = sluice_pipeline::RetryPolicy::default().backoff(attempt);
                tracing::warn!(service, error = %e, retry_in_ms = wait.as_millis() as u64, "not reachable at start; retrying");
                tokio::time::sleep(wait).await;
                attempt = attempt.saturating_add(1);
            }
            Err(e) => anyhow::bail!("{service} is not usable: {e}"),
        }
    }
    health.set_failing(service, false);
    Ok(())
}

/// Creates `topic` unless it exists (brokers need not auto-create topics).
async fn ensure_topic(config: &Config, topic: &str, partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let client = config.kafka.producer_client()?;
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = client
        .create()
        .context("cannot create Kafka admin client")?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .with_context(|| format!("cannot create topic {topic}"))?;
    for r in results {
        if let Err((t, e)) = r
            && e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
        {
            anyhow::bail!("cannot create topic {t}: {e}");
        }
    }
    Ok(())
}

/// glibc gives each thread that allocates its own arena (up to 8 per core) and batches freed on
/// other threads fragment them: a 1M-event drain peaked at 291 MB with the default, 224 MB with
/// two arenas. And glibc raises its mmap threshold each time a large block is freed, after
/// which batch buffers of several MiB come from the arenas and stay there once freed; a fixed
/// threshold keeps them mapped and returned whole. Must run before the runtime starts its
/// threads.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}
