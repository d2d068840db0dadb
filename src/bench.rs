//! `sluice bench`: the end-to-end throughput benchmark. It fills a fresh topic from the
//! generator, then measures on that same data, each phase a child process whose CPU time and
//! peak RSS come from the OS (`wait4`):
//!
//! - ceiling A: a plain consumer with the worker's client settings, reading and discarding;
//! - ceiling B: the worker's rows, pre-encoded as RowBinary, inserted with the worker's batch
//!   size and concurrency;
//! - the worker with `--drain` into ClickHouse, then with the PostgreSQL reducer too;
//! - end-to-end latency: a live worker fed at half the measured rate, timestamped probes
//!   polled in ClickHouse.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clickhouse::Row;
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use serde::{Deserialize, Serialize};
use sluice_schemas::rows::{
    ConnectionEventRow, NodeMetricRow, RoutingEventRow, StreamEventRow, StreamHealthRow,
    TrackListRow, UsageRow, ViewerMetricRow,
};
use sluice_schemas::sample::Generator;
use sluice_schemas::{Event, TableRow};

use crate::config::Config;

/// The tables the worker writes, with the columns its inserts name.
const TABLES: &[(&str, &[&str])] = &[
    ("stream_events", StreamEventRow::COLUMN_NAMES),
    ("connection_events", ConnectionEventRow::COLUMN_NAMES),
    ("stream_health_metrics", StreamHealthRow::COLUMN_NAMES),
    ("viewer_metrics", ViewerMetricRow::COLUMN_NAMES),
    ("node_metrics", NodeMetricRow::COLUMN_NAMES),
    ("routing_events", RoutingEventRow::COLUMN_NAMES),
    ("track_list_events", TrackListRow::COLUMN_NAMES),
    ("usage_records", UsageRow::COLUMN_NAMES),
];

/// What to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Events in the topic.
    pub events: u64,
    /// Partitions of the topic.
    pub partitions: i32,
    /// How long the latency probe feeds the live worker, seconds (0: no latency phase).
    pub probe_secs: u64,
    /// Events per second the latency probe feeds (0: half the worker's measured rate).
    pub probe_rate: u64,
    /// Skip the phase with the PostgreSQL reducer.
    pub skip_postgres: bool,
    /// Where JSON results and phase logs go.
    pub out_dir: PathBuf,
    /// The Markdown report to regenerate (none: do not write one).
    pub markdown: Option<PathBuf>,
    /// The configuration file the worker phases use, if any.
    pub config_path: Option<PathBuf>,
}

/// One measured phase.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Phase {
    /// What ran.
    pub name: String,
    /// Events processed (for ceiling B: the events whose rows were inserted).
    pub events: u64,
    /// Bytes moved: record keys and values read, or RowBinary bytes inserted.
    pub bytes: u64,
    /// Rows in ClickHouse afterwards (or inserted).
    pub rows: u64,
    /// Wall time of the measured work, seconds.
    pub secs: f64,
    /// User + system CPU of the process, seconds.
    pub cpu_secs: f64,
    /// Peak resident set of the process, bytes.
    pub peak_rss: u64,
}

impl Phase {
    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }

    /// Megabytes (10^6) per second.
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs.max(1e-9)
    }

    /// CPU seconds per million events.
    pub fn cpu_per_million(&self) -> f64 {
        self.cpu_secs * 1e6 / self.events.max(1) as f64
    }
}

/// The latency probe's outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Events per second fed to the live worker.
    pub rate: u64,
    /// Probed events seen in ClickHouse.
    pub samples: usize,
    /// Probed events not seen within 30 s of the end of the feed.
    pub unseen: usize,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Slowest, milliseconds.
    pub max_ms: f64,
    /// The live worker's peak RSS, bytes.
    pub peak_rss: u64,
}

/// Where the run happened.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPU model (`/proc/cpuinfo`).
    pub cpu: String,
    /// Logical cores.
    pub cores: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
}

/// Everything one `sluice bench` run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// When (UTC, RFC 3339).
    pub date: String,
    /// `git describe` of the source, or `unknown`.
    pub commit: String,
    /// The command line.
    pub command: String,
    /// Where.
    pub machine: Machine,
    /// Events in the topic.
    pub events: u64,
    /// Partitions.
    pub partitions: i32,
    /// Pipeline settings in force: batch rows, linger ms, insert concurrency, queue capacity.
    pub settings: Settings,
    /// Time to fill the topic, seconds.
    pub fill_secs: f64,
    /// Measured phases, in order.
    pub phases: Vec<Phase>,
    /// The latency probe, if it ran.
    pub latency: Option<Latency>,
}

/// The settings that move the figures.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// `pipeline.batch_max_rows`.
    pub batch_max_rows: usize,
    /// `pipeline.batch_linger_ms`.
    pub batch_linger_ms: u64,
    /// `pipeline.insert_concurrency`.
    pub insert_concurrency: usize,
    /// `pipeline.queue_capacity`.
    pub queue_capacity: usize,
}

impl Report {
    fn phase(&self, prefix: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name.starts_with(prefix))
    }

    /// Worker throughput over min(ceiling A, ceiling B).
    pub fn ratio(&self, worker: &str) -> Option<f64> {
        let a = self.phase("ceiling A")?.rate();
        let b = self.phase("ceiling B")?.rate();
        Some(self.phase(worker)?.rate() / a.min(b))
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "{:<34} {:>11} {:>8} {:>8} {:>13} {:>9}",
            "phase", "events/s", "MB/s", "secs", "CPU s/M ev", "peak RSS"
        );
        for p in &self.phases {
            let _ = writeln!(
                t,
                "{:<34} {:>11.0} {:>8.1} {:>8.1} {:>13.2} {:>6.0} MB",
                p.name,
                p.rate(),
                p.mb_per_sec(),
                p.secs,
                p.cpu_per_million(),
                p.peak_rss as f64 / 1_048_576.0
            );
        }
        for worker in ["worker → ClickHouse", "worker → ClickHouse + PostgreSQL"] {
            if let Some(r) = self.ratio(worker) {
                let _ = writeln!(t, "{worker} / min(A, B): {:.0}%", r * 100.0);
            }
        }
        if let Some(l) = &self.latency {
            let _ = writeln!(
                t,
                "latency at {} events/s (live worker, linger {} ms): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} probes ({} unseen)",
                l.rate,
                self.settings.batch_linger_ms,
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                l.samples,
                l.unseen
            );
        }
        t
    }

    /// `BENCHMARKS.md`.
    pub fn markdown(&self) -> String {
        let mut m = String::from("# Sluice end-to-end benchmark\n\n");
        let _ = writeln!(
            m,
            "Generated by `sluice bench` (do not edit by hand). Reproduce with `scripts/services.sh up`, then\n\n```sh\ncargo run --release --locked -- {}\n```\n",
            self.command
                .strip_prefix("sluice ")
                .unwrap_or(&self.command)
        );
        let _ = writeln!(
            m,
            "- date: {}\n- commit: `{}`\n- machine: {} cores, {:.1} GiB, {}; the broker (Tansu), ClickHouse and PostgreSQL run on the same machine\n- data: {} generator events on {} partitions (filled in {:.1} s)\n- settings: batch_max_rows {}, batch_linger_ms {}, insert_concurrency {}, queue_capacity {}\n",
            self.date,
            self.commit,
            self.machine.cores,
            self.machine.memory_gib,
            self.machine.cpu,
            self.events,
            self.partitions,
            self.fill_secs,
            self.settings.batch_max_rows,
            self.settings.batch_linger_ms,
            self.settings.insert_concurrency,
            self.settings.queue_capacity,
        );
        m.push_str("| phase | events/s | MB/s | seconds | rows | CPU s per M events | peak RSS |\n|---|---:|---:|---:|---:|---:|---:|\n");
        for p in &self.phases {
            let _ = writeln!(
                m,
                "| {} | {:.0} | {:.1} | {:.1} | {} | {:.2} | {:.0} MB |",
                p.name,
                p.rate(),
                p.mb_per_sec(),
                p.secs,
                if p.rows == 0 {
                    "—".to_owned()
                } else {
                    p.rows.to_string()
                },
                p.cpu_per_million(),
                p.peak_rss as f64 / 1_048_576.0
            );
        }
        m.push_str("\n## Targets\n\n| target | measured |\n|---|---|\n");
        for (worker, label) in [
            (
                "worker → ClickHouse",
                "worker → ClickHouse ≥ 80% of min(A, B)",
            ),
            (
                "worker → ClickHouse + PostgreSQL",
                "worker → ClickHouse + PostgreSQL, against min(A, B)",
            ),
        ] {
            if let Some(r) = self.ratio(worker) {
                let _ = writeln!(m, "| {label} | {:.0}% |", r * 100.0);
            }
        }
        let peak = self
            .phases
            .iter()
            .filter(|p| p.name.starts_with("worker"))
            .map(|p| p.peak_rss)
            .chain(self.latency.iter().map(|l| l.peak_rss))
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            m,
            "| worker peak RSS ≤ 256 MB | {:.0} MB |",
            peak as f64 / 1_048_576.0
        );
        if let Some(l) = &self.latency {
            let _ = writeln!(
                m,
                "| p99 latency ≤ linger + 500 ms = {} ms at half the measured rate ({} events/s) | p99 {:.0} ms (p50 {:.0} ms, max {:.0} ms, {} probes, {} unseen) |",
                self.settings.batch_linger_ms + 500,
                l.rate,
                l.p99_ms,
                l.p50_ms,
                l.max_ms,
                l.samples,
                l.unseen
            );
        }
        m.push_str(
            "\nCeiling A reads the topic with a plain rdkafka consumer using the worker's client \
             settings and discards it. Ceiling B inserts the rows the worker wrote, fetched back \
             as RowBinary before the clock starts, with the worker's batch size and insert \
             concurrency per table. Worker phases run `sluice run --drain` on a fresh consumer \
             group and database; their time includes start-up and the group join. CPU and peak \
             RSS are the process's own (`wait4`). Latency is from handing a probe event to the \
             producer to the first poll (every 20 ms) that finds its row in ClickHouse.\n",
        );
        m
    }
}

/// The phase logs and results directory, created.
fn out_dir(opts: &Options) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("cannot create {}", opts.out_dir.display()))?;
    Ok(opts.out_dir.clone())
}

/// Runs the whole benchmark; prints the table and writes the JSON and Markdown reports.
pub async fn run(config: &Config, opts: &Options) -> anyhow::Result<Report> {
    let dir = out_dir(opts)?;
    let bench_config = write_bench_config(opts, &dir)?;
    let id = time::OffsetDateTime::now_utc().unix_timestamp();
    let topic = format!("sluice_bench_{id}");
    let mut phases = Vec::new();

    eprintln!("bench: filling {topic} with {} events", opts.events);
    let started = Instant::now();
    crate::generate::run(
        config,
        &crate::generate::Options {
            events: opts.events,
            rate: 0,
            seed: 1,
            partitions: opts.partitions,
            topic: Some(topic.clone()),
            tenants: 8,
            progress: false,
            key_by_stream: false,
            until: None,
            republish_permille: 0,
        },
    )
    .await?;
    let fill_secs = started.elapsed().as_secs_f64();
    let events = opts.events;
    let expect_rows = tokio::task::spawn_blocking(move || expected_rows(events)).await?;

    eprintln!("bench: ceiling A (plain consumer)");
    let result = dir.join("ceiling-a.json");
    let group = format!("sluice-bench-{id}-a");
    let count = events.to_string();
    let mut cmd = sluice_command(
        &bench_config,
        &[
            "bench-consume",
            "--topic",
            &topic,
            "--group",
            &group,
            "--events",
            &count,
        ],
    );
    cmd.arg("--result").arg(&result);
    let os = measure(cmd, &dir.join("ceiling-a.log")).await?;
    let a: Phase = read_result(&result)?;
    phases.push(Phase {
        name: "ceiling A: plain consumer".into(),
        cpu_secs: os.cpu_secs,
        peak_rss: os.peak_rss,
        ..a.clone()
    });

    eprintln!("bench: worker → ClickHouse");
    let filled = Filled {
        topic: &topic,
        events,
        bytes: a.bytes,
        expect_rows,
    };
    let w1 = worker_phase(config, &bench_config, &dir, &filled, id, "w1", None).await?;
    let w1_db = w1.1.clone();
    phases.push(Phase {
        name: "worker → ClickHouse".into(),
        ..w1.0
    });

    eprintln!("bench: ceiling B (pre-encoded inserts)");
    let b_db = "sluice_bench_b";
    fresh_clickhouse(config, b_db).await?;
    let result = dir.join("ceiling-b.json");
    let mut cmd = sluice_command(
        &bench_config,
        &["bench-insert", "--from", &w1_db, "--to", b_db],
    );
    cmd.arg("--result").arg(&result);
    let os = measure(cmd, &dir.join("ceiling-b.log")).await?;
    let b: Phase = read_result(&result)?;
    phases.push(Phase {
        name: "ceiling B: pre-encoded inserts".into(),
        events: opts.events,
        cpu_secs: os.cpu_secs,
        peak_rss: os.peak_rss,
        ..b
    });

    if !opts.skip_postgres {
        eprintln!("bench: worker → ClickHouse + PostgreSQL");
        let url = config
            .postgres
            .url
            .as_ref()
            .map(|u| u.expose().to_owned())
            .unwrap_or_else(|| "postgres://sluice:sluice@127.0.0.1:5432/sluice".into());
        let pg = fresh_postgres(&url, &format!("sluice_bench_{id}")).await?;
        let w2 = worker_phase(config, &bench_config, &dir, &filled, id, "w2", Some(&pg)).await;
        drop_postgres(&url, &format!("sluice_bench_{id}")).await;
        phases.push(Phase {
            name: "worker → ClickHouse + PostgreSQL".into(),
            ..w2?.0
        });
    }

    let latency = if opts.probe_secs > 0 {
        let rate = match opts.probe_rate {
            0 => (phases[1].rate() / 2.0).max(1.0) as u64,
            r => r,
        };
        eprintln!(
            "bench: latency at {rate} events/s for {} s (live worker)",
            opts.probe_secs
        );
        Some(latency(config, &bench_config, &dir, opts, id, rate).await?)
    } else {
        None
    };
    delete_topics(config, &[topic.clone(), format!("{topic}_live")]).await;

    let report = Report {
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        commit: commit(),
        command: std::iter::once("sluice".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        machine: machine(),
        events: opts.events,
        partitions: opts.partitions,
        settings: Settings {
            batch_max_rows: config.pipeline.batch_max_rows,
            batch_linger_ms: config.pipeline.batch_linger_ms,
            insert_concurrency: config.pipeline.insert_concurrency,
            queue_capacity: config.pipeline.queue_capacity,
        },
        fill_secs,
        phases,
        latency,
    };
    let json = serde_json::to_string_pretty(&report)?;
    for name in [format!("bench-{id}.json"), "latest.json".into()] {
        std::fs::write(dir.join(&name), &json)
            .with_context(|| format!("cannot write {}", dir.join(&name).display()))?;
    }
    if let Some(md) = &opts.markdown {
        std::fs::write(md, report.markdown())
            .with_context(|| format!("cannot write {}", md.display()))?;
    }
    Ok(report)
}

/// The bench's worker configuration: the given file (if any) with a short Kafka session, so
/// that each phase's group forms in seconds (the broker waits session/2 for members).
fn write_bench_config(opts: &Options, dir: &Path) -> anyhow::Result<PathBuf> {
    let mut doc: toml::Table = match &opts.config_path {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .parse()
            .with_context(|| format!("{} is not TOML", p.display()))?,
        None => toml::Table::new(),
    };
    let kafka = doc
        .entry("kafka")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(k) = kafka {
        k.entry("session.timeout.ms")
            .or_insert(toml::Value::Integer(6000));
        k.entry("heartbeat.interval.ms")
            .or_insert(toml::Value::Integer(1000));
    }
    let path = dir.join("bench.toml");
    std::fs::write(&path, toml::to_string(&doc)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// `sluice ARGS --config CONFIG`, quiet, without the health endpoint or the reducer unless
/// a phase sets them.
fn sluice_command(config: &Path, args: &[&str]) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("sluice"));
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env_remove("DATABASE_URL")
        .env("LOG_LEVEL", "warn")
        .env("ENABLE_HEALTH_ENDPOINT", "false");
    cmd
}

/// What the OS says about a finished child.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    wall_secs: f64,
    cpu_secs: f64,
    peak_rss: u64,
}

/// Runs `cmd` to its end with its output in `log`; fails (with the log's tail) unless it
/// exits 0.
async fn measure(cmd: Command, log: &Path) -> anyhow::Result<Usage> {
    let child = spawn_logged(cmd, log)?;
    let usage = wait_usage(child.id()).await?;
    check_exit(usage.1, log)?;
    Ok(usage.0)
}

fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<std::process::Child> {
    let file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    cmd.stdout(file.try_clone()?).stderr(file);
    cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))
}

/// Waits for child `pid` and reads its resource usage (`wait4`: CPU and peak RSS of that
/// child alone).
async fn wait_usage(pid: u32) -> anyhow::Result<(Usage, i32)> {
    let started = Instant::now();
    tokio::task::spawn_blocking(move || {
        let mut status = 0;
        // SAFETY: plain syscall on our own child; `rusage` is a C struct of integers.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru) };
        if r < 0 {
            bail!("wait4: {}", std::io::Error::last_os_error());
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok((
            Usage {
                wall_secs: started.elapsed().as_secs_f64(),
                cpu_secs: secs(ru.ru_utime) + secs(ru.ru_stime),
                // Linux reports kilobytes.
                peak_rss: ru.ru_maxrss as u64 * 1024,
            },
            status,
        ))
    })
    .await?
}

fn check_exit(status: i32, log: &Path) -> anyhow::Result<()> {
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    bail!(
        "phase failed (wait status {status}); {}:\n{}",
        log.display(),
        tail.join("\n")
    )
}

fn read_result(path: &Path) -> anyhow::Result<Phase> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("no result in {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("bad result in {}", path.display()))
}

/// Drops and re-creates ClickHouse database `db` with the worker's tables.
async fn fresh_clickhouse(config: &Config, db: &str) -> anyhow::Result<()> {
    let server = crate::frameworks::clickhouse_server(config)?;
    server
        .query("DROP DATABASE IF EXISTS ?")
        .bind(clickhouse::sql::Identifier(db))
        .execute()
        .await
        .with_context(|| format!("cannot drop {db}"))?;
    let mut c = config.clone();
    c.clickhouse.database = db.to_owned();
    crate::migrate::clickhouse(&c, None).await?;
    Ok(())
}

async fn fresh_postgres(url: &str, db: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("cannot connect to {}", crate::config::redact_url(url)))?;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .with_context(|| format!("cannot create PostgreSQL database {db}"))?;
    let Some((base, _)) = url.split('?').next().and_then(|u| u.rsplit_once('/')) else {
        bail!("DATABASE_URL names no database");
    };
    Ok(format!("{base}/{db}"))
}

async fn drop_postgres(url: &str, db: &str) {
    use sqlx::Connection;
    if let Ok(mut admin) = sqlx::PgConnection::connect(url).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}

/// Rows in the worker's tables of `db`: (all, all but `usage_records`). Usage rows depend on
/// how late usage events arrive; the other tables hold exactly the events' rows.
async fn count_rows(config: &Config, db: &str) -> anyhow::Result<(u64, u64)> {
    let client = crate::frameworks::clickhouse_server(config)?.with_database(db);
    let (mut all, mut events) = (0, 0);
    for (table, _) in TABLES {
        let n = client
            .query("SELECT count() FROM ?")
            .bind(clickhouse::sql::Identifier(table))
            .fetch_one::<u64>()
            .await
            .with_context(|| format!("cannot count {db}.{table}"))?;
        all += n;
        if *table != "usage_records" {
            events += n;
        }
    }
    Ok((all, events))
}

/// Rows the generator's first `events` events (seed 1, 8 tenants, as the bench fills) make in
/// the event tables.
fn expected_rows(events: u64) -> u64 {
    let mut generator = Generator::new(1, 8, events);
    (0..events)
        .map(|i| {
            let (_, value, tenant) = generator.event(i);
            Event::decode(value.as_bytes(), Some(tenant.as_bytes()))
                .ok()
                .and_then(|e| sluice_operators::route(&e).ok())
                .map_or(0, |rows| rows.len() as u64)
        })
        .sum()
}

/// The filled topic, as the worker phases measure it.
struct Filled<'a> {
    topic: &'a str,
    events: u64,
    /// Key and value bytes, as ceiling A read them.
    bytes: u64,
    /// Rows the events make in the event tables (all but `usage_records`).
    expect_rows: u64,
}

/// `sluice run --drain` on a fresh group and database; returns the phase and the database.
async fn worker_phase(
    config: &Config,
    bench_config: &Path,
    dir: &Path,
    filled: &Filled<'_>,
    id: i64,
    tag: &str,
    postgres: Option<&str>,
) -> anyhow::Result<(Phase, String)> {
    let Filled {
        topic,
        events,
        bytes,
        expect_rows,
    } = *filled;
    let db = format!("sluice_bench_{tag}");
    fresh_clickhouse(config, &db).await?;
    let mut cmd = sluice_command(bench_config, &["run", "--drain"]);
    if let Some(url) = postgres {
        let mut c = config.clone();
        c.postgres.url = Some(crate::config::Secret::new(url));
        crate::migrate::postgres(&c).await?;
        cmd.env("DATABASE_URL", url);
    }
    cmd.env("KAFKA_TOPICS", topic)
        .env("KAFKA_GROUP_ID", format!("sluice-bench-{id}-{tag}"))
        .env("CLICKHOUSE_DB", &db);
    let os = measure(cmd, &dir.join(format!("worker-{tag}.log"))).await?;
    let (rows, event_rows) = count_rows(config, &db).await?;
    if event_rows != expect_rows {
        bail!(
            "the worker wrote {event_rows} rows into the event tables of {db}; the {events} events make {expect_rows}"
        );
    }
    Ok((
        Phase {
            name: String::new(),
            events,
            bytes,
            rows,
            secs: os.wall_secs,
            cpu_secs: os.cpu_secs,
            peak_rss: os.peak_rss,
        },
        db,
    ))
}

/// Ceiling A, in its own process: reads the `total` records of the topic in a consumer group
/// with the worker's client settings, discarding them; writes a [`Phase`] to `result`.
pub fn consume(
    config: &Config,
    topic: &str,
    group: &str,
    total: u64,
    result: &Path,
) -> anyhow::Result<()> {
    let mut kafka = crate::frameworks::source_config(config, true)?;
    kafka.group_id = group.to_owned();
    let consumer: BaseConsumer = kafka
        .client_config()
        .create()
        .context("cannot create the consumer")?;
    // The count the bench produced, not the watermarks: right after producing, the broker's
    // end offsets may not show every record yet.
    consumer.subscribe(&[topic])?;
    let started = Instant::now();
    let (mut records, mut bytes) = (0u64, 0u64);
    while records < total {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                use rdkafka::Message;
                records += 1;
                bytes += (m.payload_len() + m.key().map_or(0, <[u8]>::len)) as u64;
            }
            Some(Err(e)) => tracing::warn!("consumer: {e}"),
            None if started.elapsed() > Duration::from_secs(900) => {
                bail!("read {records} of {total} records in 15 minutes")
            }
            None => {}
        }
    }
    let phase = Phase {
        events: records,
        bytes,
        secs: started.elapsed().as_secs_f64(),
        ..Phase::default()
    };
    std::fs::write(result, serde_json::to_string(&phase)?)?;
    Ok(())
}

/// Ceiling B, in its own process: fetches every table's rows from `from` as RowBinary bodies
/// of `batch_max_rows` rows (untimed), then inserts them into `to` with `insert_concurrency`
/// inserts per table, all tables at once; writes a [`Phase`] to `result`.
pub async fn insert(config: &Config, from: &str, to: &str, result: &Path) -> anyhow::Result<()> {
    let source = crate::frameworks::clickhouse_client(config)?.with_database(from);
    let target = crate::frameworks::clickhouse_client(config)?.with_database(to);
    let batch = config.pipeline.batch_max_rows.max(1) as u64;
    let mut bodies: Vec<Vec<(String, bytes::Bytes)>> = Vec::new();
    let (mut rows, mut bytes) = (0u64, 0u64);
    for (table, columns) in TABLES {
        let cols = columns.join(", ");
        let n: u64 = source
            .query(&format!("SELECT count() FROM {table}"))
            .fetch_one()
            .await?;
        let parts = n.div_ceil(batch).max(1);
        let mut list = Vec::new();
        for part in 0..parts {
            let body = source
                .query(&format!(
                    "SELECT {cols} FROM {table} WHERE cityHash64(formatRow('TSV', *)) % {parts} = {part}"
                ))
                .fetch_bytes("RowBinary")?
                .collect()
                .await
                .with_context(|| format!("cannot fetch {from}.{table}"))?;
            bytes += body.len() as u64;
            list.push((
                format!("INSERT INTO {table} ({cols}) FORMAT RowBinary"),
                body,
            ));
        }
        rows += n;
        bodies.push(list);
    }
    let concurrency = config.pipeline.insert_concurrency.max(1);
    let started = Instant::now();
    let tables = bodies.into_iter().map(|list| {
        let target = target.clone();
        async move {
            futures::stream::iter(list)
                .map(|(sql, body)| {
                    let target = target.clone();
                    async move {
                        let mut insert = target.insert_formatted_with(sql);
                        insert.send(body).await?;
                        insert.end().await
                    }
                })
                .buffer_unordered(concurrency)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
        }
    });
    futures::future::try_join_all(tables)
        .await
        .context("insert failed")?;
    let secs = started.elapsed().as_secs_f64();
    let (landed, _) = count_rows(config, to).await?;
    if landed != rows {
        bail!("ceiling B inserted {rows} rows but {to} holds {landed}");
    }
    let phase = Phase {
        rows,
        bytes,
        secs,
        ..Phase::default()
    };
    std::fs::write(result, serde_json::to_string(&phase)?)?;
    Ok(())
}

/// The latency phase: a live worker on a fresh topic, fed generator events at `rate`; up to
/// 50 probes a second (events with an `event_id` row) are timed from the producer call to the
/// first poll that finds the row.
async fn latency(
    config: &Config,
    bench_config: &Path,
    dir: &Path,
    opts: &Options,
    id: i64,
    rate: u64,
) -> anyhow::Result<Latency> {
    let topic = format!("sluice_bench_{id}_live");
    crate::ensure_topic(config, &topic, opts.partitions).await?;
    let db = "sluice_bench_live";
    fresh_clickhouse(config, db).await?;
    let port = free_port()?;
    let mut cmd = sluice_command(bench_config, &["run"]);
    cmd.env("KAFKA_TOPICS", &topic)
        .env("KAFKA_GROUP_ID", format!("sluice-bench-{id}-live"))
        .env("CLICKHOUSE_DB", db)
        .env("ENABLE_HEALTH_ENDPOINT", "true")
        .env("HEALTH_PORT", port.to_string());
    let log = dir.join("worker-live.log");
    let child = spawn_logged(cmd, &log)?;
    let pid = child.id();
    let outcome = probe(config, &topic, db, port, rate, opts.probe_secs).await;
    // The live worker's metrics (flush latency, queue fill, lag) explain its latency.
    if let Ok(metrics) = http_get(port, "/metrics").await {
        let _ = std::fs::write(dir.join("worker-live.metrics"), metrics);
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let (usage, status) = wait_usage(pid).await?;
    let mut latency = outcome?;
    check_exit(status, &log)?;
    latency.peak_rss = usage.peak_rss;
    Ok(latency)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The whole answer (status line, headers, body) to `GET path` on the worker's health port.
async fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    Ok(answer)
}

async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if http_get(port, "/ready")
            .await
            .is_ok_and(|a| a.starts_with("HTTP/1.1 200"))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the live worker was not ready within 90 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn probe(
    config: &Config,
    topic: &str,
    db: &str,
    port: u16,
    rate: u64,
    secs: u64,
) -> anyhow::Result<Latency> {
    wait_ready(port).await?;
    let mut client = config.kafka.producer_client()?;
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = client
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()
        .context("cannot create the probe producer")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(uuid::Uuid, Instant)>();
    let topic = topic.to_owned();
    let feed = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let total = rate * secs;
        let mut generator = Generator::new(2, 8, total.max(1)).live(secs);
        let started = Instant::now();
        let mut probes_this_sec = (0u64, 0u32);
        for i in 0..total {
            let (key, value, tenant) = generator.event(i);
            let sec = started.elapsed().as_secs();
            if probes_this_sec.0 != sec {
                probes_this_sec = (sec, 0);
            }
            let probe = (probes_this_sec.1 < 50)
                .then(|| probe_id(&value, &tenant))
                .flatten();
            let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "tenant_id",
                value: Some(tenant.as_bytes()),
            });
            let record = BaseRecord::to(&topic)
                .key(&key)
                .payload(&value)
                .headers(headers);
            sluice_pipeline::send_waiting(&producer, record)?;
            if let Some(id) = probe {
                probes_this_sec.1 += 1;
                let _ = tx.send((id, Instant::now()));
            }
            let due = Duration::from_secs_f64((i + 1) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        producer.flush(Duration::from_secs(30))?;
        Ok(())
    });
    let client = crate::frameworks::clickhouse_server(config)?.with_database(db);
    let mut pending: HashMap<uuid::Uuid, Instant> = HashMap::new();
    let mut seen_ms: Vec<f64> = Vec::new();
    let mut fed_at: Option<Instant> = None;
    loop {
        while let Ok((id, at)) = rx.try_recv() {
            pending.insert(id, at);
        }
        if fed_at.is_none() && feed.is_finished() {
            fed_at = Some(Instant::now());
        }
        if !pending.is_empty() {
            let ids: Vec<String> = pending.keys().map(|u| format!("'{u}'")).collect();
            let list = ids.join(",");
            let found: Vec<String> = client
                .query(&format!(
                    "SELECT toString(event_id) FROM stream_events WHERE event_id IN ({list}) \
                     UNION ALL SELECT toString(event_id) FROM connection_events WHERE event_id IN ({list})"
                ))
                .fetch_all()
                .await
                .context("cannot poll ClickHouse")?;
            let now = Instant::now();
            for id in found {
                if let Some(sent) = id.parse().ok().and_then(|u| pending.remove(&u)) {
                    seen_ms.push((now - sent).as_secs_f64() * 1e3);
                }
            }
        }
        match fed_at {
            Some(at) if pending.is_empty() || at.elapsed() > Duration::from_secs(30) => break,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    feed.await??;
    seen_ms.sort_by(f64::total_cmp);
    Ok(Latency {
        rate,
        samples: seen_ms.len(),
        unseen: pending.len(),
        p50_ms: percentile(&seen_ms, 0.5),
        p99_ms: percentile(&seen_ms, 0.99),
        max_ms: seen_ms.last().copied().unwrap_or(f64::NAN),
        peak_rss: 0,
    })
}

/// The nearest-rank percentile `q` (0..=1) of sorted values; NaN when there are none.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = (sorted.len() as f64 * q).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1))
        .copied()
        .unwrap_or(f64::NAN)
}

/// The `event_id` the event's row carries in `stream_events` or `connection_events`, if any.
fn probe_id(value: &str, tenant: &str) -> Option<uuid::Uuid> {
    let event = Event::decode(value.as_bytes(), Some(tenant.as_bytes())).ok()?;
    sluice_operators::route(&event)
        .ok()?
        .into_iter()
        .find_map(|row| match row {
            TableRow::StreamEvent(r) => Some(r.event_id),
            TableRow::ConnectionEvent(r) => Some(r.event_id),
            _ => None,
        })
}

async fn delete_topics(config: &Config, topics: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin = config
        .kafka
        .producer_client()
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(c.create::<AdminClient<rdkafka::client::DefaultClientContext>>()?));
    let admin = match admin {
        Ok(admin) => admin,
        Err(e) => {
            tracing::warn!("cannot delete the bench topics: {e}");
            return;
        }
    };
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    if let Err(e) = admin.delete_topics(&names, &AdminOptions::new()).await {
        tracing::warn!("cannot delete the bench topics: {e}");
    }
}

fn commit() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: kib / 1_048_576.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 100.0);
        assert_eq!(percentile(&v, 0.99), 198.0);
        assert_eq!(percentile(&v, 1.0), 200.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    fn phase(name: &str, events: u64, secs: f64) -> Phase {
        Phase {
            name: name.into(),
            events,
            secs,
            cpu_secs: 2.0,
            ..Phase::default()
        }
    }

    #[test]
    fn the_worker_is_compared_with_the_slower_ceiling() {
        let report = Report {
            date: String::new(),
            commit: "abc".into(),
            command: "sluice bench".into(),
            machine: machine(),
            events: 1000,
            partitions: 1,
            settings: Settings {
                batch_max_rows: 1,
                batch_linger_ms: 500,
                insert_concurrency: 1,
                queue_capacity: 1,
            },
            fill_secs: 1.0,
            phases: vec![
                phase("ceiling A: plain consumer", 1000, 1.0),
                phase("worker → ClickHouse", 1000, 4.0),
                phase("ceiling B: pre-encoded inserts", 1000, 2.0),
            ],
            latency: None,
        };
        // min(A, B) = 500 events/s; the worker did 250.
        assert_eq!(report.ratio("worker → ClickHouse"), Some(0.5));
        assert_eq!(report.ratio("worker → ClickHouse + PostgreSQL"), None);
        assert_eq!(report.phases[1].cpu_per_million(), 2000.0);
        assert!(
            report
                .table()
                .contains("worker → ClickHouse / min(A, B): 50%")
        );
        assert!(
            report
                .markdown()
                .contains("| worker → ClickHouse ≥ 80% of min(A, B) | 50% |")
        );
    }
}
