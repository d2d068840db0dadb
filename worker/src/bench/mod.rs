//! `bench`: the end-to-end throughput benchmark every pipeline gets. It fills a fresh topic
//! from the pipeline's [`Workload`], then measures on that same data, each phase a child
//! process of the pipeline's own binary whose CPU time and peak RSS come from the OS
//! (`wait4`):
//!
//! - ceiling A: a plain consumer with the worker's client settings, reading and discarding;
//! - the worker with `--drain` into ClickHouse (PostgreSQL off);
//! - ceiling B: the rows that worker wrote, fetched back as RowBinary before the clock starts,
//!   inserted with its batch size and insert concurrency per table;
//! - the worker with its PostgreSQL reducers too, if it has any;
//! - end-to-end latency: a live worker fed at half the measured rate; its sinks report how
//!   old each source range's oldest record was when they held it
//!   (`sluice_record_age_seconds`).

mod charts;
mod produce;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::{Deserialize, Serialize};
use sluice_pipeline::KafkaSourceConfig;

pub use produce::{Record, produce};

use crate::Error;
use crate::config::{Config, Settings};
use crate::migrate::{self, ClickHousePlan, Migration};
use crate::services;
use crate::wiring::Plan;

/// What `bench` fills its topics with: the pipeline's own records.
pub trait Workload: Send + Sync + 'static {
    /// `count` records, the same ones for the same `seed`. `live`: for a feed that lasts
    /// that long from now (event times near now, where the records carry any); otherwise of
    /// a fixed past, so that every run measures the same bytes.
    fn records(
        &self,
        seed: u64,
        count: u64,
        live: Option<Duration>,
    ) -> Box<dyn Iterator<Item = Record> + Send>;

    /// How many rows `count` records of `seed` make in the tables not fed by windows, if the
    /// workload knows: each worker phase is then checked against it.
    fn expected_rows(&self, _seed: u64, _count: u64) -> Option<u64> {
        None
    }
}

/// The PostgreSQL the reducer phases use when none is configured: the local services'.
pub(crate) const LOCAL_POSTGRES: &str = "postgres://sluice:sluice@127.0.0.1:5432/sluice";

/// The pipeline's migrations, for the fresh databases of the phases.
pub(crate) struct Migrations<'a> {
    pub(crate) scope: &'a str,
    pub(crate) clickhouse: &'a [Migration],
    pub(crate) postgres: &'a [Migration],
}

/// What to measure.
#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// TOML configuration file (the worker phases use it too).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Records in the topic.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Seconds the latency probe feeds a live worker (0: skip the latency phase; at most 240).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=240))]
    pub probe_secs: u64,
    /// Records per second during the latency phase (0: half the worker's measured rate).
    #[arg(long, default_value_t = 0)]
    pub probe_rate: u64,
    /// Skip the phase with the PostgreSQL reducers.
    #[arg(long)]
    pub skip_postgres: bool,
    /// Directory for the JSON results and the phases' logs.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Markdown report to regenerate.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub markdown: PathBuf,
    /// Do not write the Markdown report.
    #[arg(long)]
    pub no_markdown: bool,
}

/// Ceiling A's options.
#[derive(clap::Args, Clone, Debug)]
pub struct ConsumeOptions {
    /// TOML configuration file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The topic.
    #[arg(long)]
    pub topic: String,
    /// The consumer group.
    #[arg(long)]
    pub group: String,
    /// Records to read.
    #[arg(long)]
    pub events: u64,
    /// Where the result goes (JSON).
    #[arg(long)]
    pub result: PathBuf,
}

/// Ceiling B's options.
#[derive(clap::Args, Clone, Debug)]
pub struct InsertOptions {
    /// TOML configuration file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The database the rows come from.
    #[arg(long)]
    pub from: String,
    /// The database they go to.
    #[arg(long)]
    pub to: String,
    /// Where the result goes (JSON).
    #[arg(long)]
    pub result: PathBuf,
}

/// One measured phase.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Phase {
    /// What ran.
    pub name: String,
    /// Records processed (for ceiling B: the records whose rows were inserted).
    pub events: u64,
    /// Bytes moved: record keys and values read, or RowBinary bytes inserted.
    pub bytes: u64,
    /// Rows in ClickHouse afterwards (or inserted).
    pub rows: u64,
    /// Wall time of the measured work, seconds.
    pub secs: f64,
    /// User + system CPU of the process, seconds.
    pub cpu_secs: f64,
    /// CPU of the whole machine while the phase ran (worker, broker, ClickHouse and the
    /// rest: busy time in `/proc/stat`), seconds; 0 where unknown.
    #[serde(default)]
    pub machine_cpu_secs: f64,
    /// Peak resident set of the process, bytes.
    pub peak_rss: u64,
    /// Seconds of `secs` before the consumer was first given partitions (start-up and the
    /// group join, which the broker takes its time over); 0 where unknown.
    #[serde(default)]
    pub join_secs: f64,
}

impl Phase {
    /// Records per second.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }

    /// Records per second once the consumer had partitions (`None` where the join time is
    /// unknown): the rate the machine sustains, without the fixed cost of joining.
    pub fn rate_after_join(&self) -> Option<f64> {
        (self.join_secs > 0.0 && self.join_secs < self.secs)
            .then(|| self.events as f64 / (self.secs - self.join_secs))
    }

    /// Megabytes (10^6) per second.
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs.max(1e-9)
    }

    /// CPU seconds per million records.
    pub fn cpu_per_million(&self) -> f64 {
        self.cpu_secs * 1e6 / self.events.max(1) as f64
    }

    /// The machine's CPU seconds per million records (all processes).
    pub fn machine_cpu_per_million(&self) -> f64 {
        self.machine_cpu_secs * 1e6 / self.events.max(1) as f64
    }
}

/// The latency phase's outcome: the sink with the highest p99 of
/// `sluice_record_age_seconds` (tables fed by windows left out: their rows wait for the
/// window by design).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Records per second fed to the live worker.
    pub rate: u64,
    /// The sink the figures are of.
    pub sink: String,
    /// Source ranges it timed.
    pub samples: u64,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Slowest, milliseconds.
    pub max_ms: f64,
    /// Every quantile the summary gives: (quantile, milliseconds), ascending.
    pub quantiles: Vec<(f64, f64)>,
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

/// Everything one `bench` run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// When (seconds since the epoch).
    pub unix_time: u64,
    /// `git describe` of the source, or `unknown`.
    pub commit: String,
    /// The command line.
    pub command: String,
    /// Where.
    pub machine: Machine,
    /// Records in the topic.
    pub events: u64,
    /// Partitions.
    pub partitions: i32,
    /// Pipeline settings in force.
    pub settings: BenchSettings,
    /// Time to fill the topic, seconds.
    pub fill_secs: f64,
    /// Measured phases, in order.
    pub phases: Vec<Phase>,
    /// The latency probe, if it ran.
    pub latency: Option<Latency>,
}

/// The settings that move the figures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchSettings {
    /// `pipeline.batch_max_rows`.
    pub batch_max_rows: usize,
    /// `pipeline.batch_linger_ms`.
    pub batch_linger_ms: u64,
    /// `pipeline.insert_concurrency`.
    pub insert_concurrency: usize,
    /// `pipeline.queue_capacity`.
    pub queue_capacity: usize,
    /// `enrich.geoip_database` (`GEOIP_DATABASE`): the GeoIP database the worker phases
    /// enrich with, if any.
    pub geoip_database: Option<String>,
}

/// Where the charts go, relative to the Markdown report's directory.
pub const CHARTS_DIR: &str = "docs/bench";

const WORKER_CH: &str = "worker → ClickHouse";
const WORKER_PG: &str = "worker → ClickHouse + PostgreSQL";

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
            "{:<34} {:>11} {:>8} {:>8} {:>7} {:>12} {:>13} {:>13} {:>9}",
            "phase",
            "records/s",
            "MB/s",
            "secs",
            "join s",
            "after join",
            "CPU s/M rec",
            "all CPU s/M",
            "peak RSS"
        );
        for p in &self.phases {
            let _ = writeln!(
                t,
                "{:<34} {:>11.0} {:>8.1} {:>8.1} {:>7} {:>12} {:>13.2} {:>13.2} {:>6.0} MB",
                p.name,
                p.rate(),
                p.mb_per_sec(),
                p.secs,
                join_cell(p),
                after_join_cell(p),
                p.cpu_per_million(),
                p.machine_cpu_per_million(),
                p.peak_rss as f64 / 1_048_576.0
            );
        }
        for worker in [WORKER_CH, WORKER_PG] {
            if let Some(r) = self.ratio(worker) {
                let _ = writeln!(t, "{worker} / min(A, B): {:.0}%", r * 100.0);
            }
        }
        if let Some(l) = &self.latency {
            let _ = writeln!(
                t,
                "latency at {} records/s (live worker, linger {} ms), slowest sink {}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} source ranges",
                l.rate,
                self.settings.batch_linger_ms,
                l.sink,
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                l.samples
            );
        }
        t
    }

    /// `BENCHMARKS.md`, linking the given charts: (file name under [`CHARTS_DIR`], title).
    pub fn markdown(&self, binary: &str, charts: &[(&str, &str)]) -> String {
        let mut m = String::from("# Sluice end-to-end benchmark\n\n");
        let _ = writeln!(
            m,
            "Generated by `{binary} bench` (do not edit by hand). Reproduce with `scripts/services.sh up`, then\n\n```sh\ncargo run --release --locked --bin {binary} -- {}\n```\n",
            self.command
                .split_once(' ')
                .map_or("bench", |(_, args)| args)
        );
        let _ = writeln!(
            m,
            "- date: {}\n- commit: `{}`\n- machine: {} cores, {:.1} GiB, {}; the broker (Tansu), ClickHouse and PostgreSQL run on the same machine\n- data: {} workload records on {} partitions (filled in {:.1} s)\n- settings: batch_max_rows {}, batch_linger_ms {}, insert_concurrency {}, queue_capacity {}, GeoIP {}\n",
            time::OffsetDateTime::from_unix_timestamp(self.unix_time as i64)
                .ok()
                .and_then(|t| t
                    .format(&time::format_description::well_known::Rfc3339)
                    .ok())
                .unwrap_or_else(|| self.unix_time.to_string()),
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
            self.settings
                .geoip_database
                .as_deref()
                .map_or("off".to_owned(), |p| format!("on (`{p}`)")),
        );
        m.push_str("| phase | records/s | MB/s | seconds | of which start-up and join | records/s after the join | rows | CPU s per M records | machine CPU s per M records | peak RSS |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for p in &self.phases {
            let _ = writeln!(
                m,
                "| {} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {:.2} | {:.2} | {:.0} MB |",
                p.name,
                p.rate(),
                p.mb_per_sec(),
                p.secs,
                join_cell(p),
                after_join_cell(p),
                if p.rows == 0 {
                    "—".to_owned()
                } else {
                    p.rows.to_string()
                },
                p.cpu_per_million(),
                p.machine_cpu_per_million(),
                p.peak_rss as f64 / 1_048_576.0
            );
        }
        for (file, title) in charts {
            let _ = writeln!(m, "\n![{title}]({CHARTS_DIR}/{file})");
        }
        m.push_str("\n## Targets\n\n| target | measured |\n|---|---|\n");
        for (worker, label) in [
            (WORKER_CH, "worker → ClickHouse ≥ 80% of min(A, B)"),
            (
                WORKER_PG,
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
                "| p99 latency ≤ linger + 500 ms = {} ms at half the measured rate ({} records/s) | p99 {:.0} ms (p50 {:.0} ms, max {:.0} ms; slowest sink `{}`, {} source ranges) |",
                self.settings.batch_linger_ms + 500,
                l.rate,
                l.p99_ms,
                l.p50_ms,
                l.max_ms,
                l.sink,
                l.samples
            );
        }
        m.push_str(
            "\nCeiling A reads the topic with a plain rdkafka consumer using the worker's client \
             settings and discards it. Ceiling B inserts the rows the worker wrote, fetched back \
             as RowBinary before the clock starts, with the worker's batch size and insert \
             concurrency per table. Worker phases run `run --drain` on a fresh consumer \
             group and database; their time includes start-up and the group join, which the \
             join column gives (until the worker's log first says `partitions assigned`; for \
             ceiling A, from its subscription to its first assignment, since ceiling A's time \
             starts there), and records/s after the join leaves out. CPU and peak RSS are \
             the process's own (`wait4`). Latency is the live worker's \
             `sluice_record_age_seconds`: per source range (a poll's records of one \
             partition), from its oldest record's Kafka timestamp (set by the producer) to the \
             end of the sink write that holds it; the figures are those of the sink with the \
             highest p99, tables fed by windows left out.\n",
        );
        m
    }
}

/// Maps any error into the bench's, saying what failed.
fn ctx<T, E: std::fmt::Display>(
    r: Result<T, E>,
    what: impl FnOnce() -> String,
) -> Result<T, Error> {
    r.map_err(|e| Error::Other(format!("{}: {e}", what())))
}

/// Runs the whole benchmark; writes the JSON and Markdown reports.
///
/// `config` names a PostgreSQL server; `plan` is what the pipeline writes with its reducers
/// on; `clickhouse_only`: it also runs with them off (FrameWorks does; a pipeline whose
/// reducers are part of it does not, and its worker phase is the one with PostgreSQL).
pub(crate) async fn run<S: Settings>(
    config: &Config<S>,
    opts: &Options,
    plan: &Plan,
    clickhouse_only: bool,
    workload: &dyn Workload,
    migrations: &Migrations<'_>,
) -> Result<Report, Error> {
    if !clickhouse_only && (opts.skip_postgres || plan.reducers.is_empty()) {
        return Err(Error::Other(
            "the pipeline does not run without PostgreSQL: drop --skip-postgres".into(),
        ));
    }
    if plan.tables.is_empty() {
        return Err(Error::Other(
            "the pipeline writes no ClickHouse table: nothing to benchmark".into(),
        ));
    }
    let dir = opts.out.clone();
    ctx(std::fs::create_dir_all(&dir), || {
        format!("cannot create {}", dir.display())
    })?;
    let bench_config = write_bench_config(opts, &dir)?;
    let id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let topic = format!("sluice_bench_{id}");
    let bench = Bench {
        config_path: &bench_config,
        dir: &dir,
        plan,
        migrations,
        id,
    };
    let mut phases = Vec::new();

    eprintln!("bench: filling {topic} with {} records", opts.events);
    let started = Instant::now();
    produce(
        &config.kafka,
        &topic,
        opts.partitions,
        workload.records(1, opts.events, None),
        opts.events,
        0,
        false,
    )
    .await?;
    let fill_secs = started.elapsed().as_secs_f64();
    let events = opts.events;
    let expect_rows = workload.expected_rows(1, events);

    eprintln!("bench: ceiling A (plain consumer)");
    let result = dir.join("ceiling-a.json");
    let group = format!("sluice-bench-{id}-a");
    let mut cmd = bench.command(&["bench-consume", "--topic", &topic, "--group", &group]);
    cmd.arg("--events")
        .arg(events.to_string())
        .arg("--result")
        .arg(&result);
    let os = measure(cmd, &dir.join("ceiling-a.log")).await?;
    let a: Phase = read_result(&result)?;
    phases.push(Phase {
        name: "ceiling A: plain consumer".into(),
        cpu_secs: os.cpu_secs,
        machine_cpu_secs: os.machine_cpu_secs,
        peak_rss: os.peak_rss,
        ..a.clone()
    });

    let filled = Filled {
        topic: &topic,
        events,
        bytes: a.bytes,
        expect_rows,
    };
    let url = config
        .postgres
        .url
        .as_ref()
        .map_or(LOCAL_POSTGRES.to_owned(), |u| u.expose().to_owned());
    let postgres = format!("sluice_bench_{id}");
    // The first worker phase: into ClickHouse alone, or with PostgreSQL if the pipeline
    // needs it; ceiling B inserts what it wrote.
    let first = match clickhouse_only {
        true => {
            eprintln!("bench: {WORKER_CH}");
            let (w1, db) = bench.worker_phase(config, &filled, "w1", None).await?;
            phases.push(Phase {
                name: WORKER_CH.into(),
                ..w1
            });
            db
        }
        false => {
            eprintln!("bench: {WORKER_PG}");
            let pg = fresh_postgres(&url, &postgres).await?;
            let w2 = bench.worker_phase(config, &filled, "w2", Some(&pg)).await;
            drop_postgres(&url, &postgres).await;
            let (w2, db) = w2?;
            phases.push(Phase {
                name: WORKER_PG.into(),
                ..w2
            });
            db
        }
    };

    eprintln!("bench: ceiling B (pre-encoded inserts)");
    let b_db = "sluice_bench_b";
    bench.fresh_clickhouse(config, b_db).await?;
    let result = dir.join("ceiling-b.json");
    let mut cmd = bench.command(&["bench-insert", "--from", &first, "--to", b_db]);
    cmd.arg("--result").arg(&result);
    let os = measure(cmd, &dir.join("ceiling-b.log")).await?;
    let b: Phase = read_result(&result)?;
    phases.push(Phase {
        name: "ceiling B: pre-encoded inserts".into(),
        events,
        cpu_secs: os.cpu_secs,
        machine_cpu_secs: os.machine_cpu_secs,
        peak_rss: os.peak_rss,
        ..b
    });

    if clickhouse_only && !opts.skip_postgres && !plan.reducers.is_empty() {
        eprintln!("bench: {WORKER_PG}");
        let pg = fresh_postgres(&url, &postgres).await?;
        let w2 = bench.worker_phase(config, &filled, "w2", Some(&pg)).await;
        drop_postgres(&url, &postgres).await;
        phases.push(Phase {
            name: WORKER_PG.into(),
            ..w2?.0
        });
    }

    let latency = if opts.probe_secs > 0 {
        let rate = match opts.probe_rate {
            0 => (phases[1].rate() / 2.0).max(1.0) as u64,
            r => r,
        };
        eprintln!(
            "bench: latency at {rate} records/s for {} s (live worker)",
            opts.probe_secs
        );
        let pg = match clickhouse_only {
            true => None,
            false => Some(fresh_postgres(&url, &format!("{postgres}_live")).await?),
        };
        let latency = bench
            .latency(config, workload, opts, rate, pg.as_deref())
            .await;
        if pg.is_some() {
            drop_postgres(&url, &format!("{postgres}_live")).await;
        }
        Some(latency?)
    } else {
        None
    };
    delete_topics(config, &[topic.clone(), format!("{topic}_live")]).await;

    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "sluice".into());
    let report = Report {
        unix_time: id,
        commit: commit(),
        command: std::iter::once(binary.clone())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        machine: machine(),
        events,
        partitions: opts.partitions,
        settings: BenchSettings {
            batch_max_rows: config.pipeline.batch_max_rows,
            batch_linger_ms: config.pipeline.batch_linger_ms,
            insert_concurrency: config.pipeline.insert_concurrency,
            queue_capacity: config.pipeline.queue_capacity,
            geoip_database: config.enrich.geoip_database.as_ref().map(|p| {
                p.file_name()
                    .unwrap_or(p.as_os_str())
                    .to_string_lossy()
                    .into_owned()
            }),
        },
        fill_secs,
        phases,
        latency,
    };
    let json = ctx(serde_json::to_string_pretty(&report), || {
        "cannot encode the report".into()
    })?;
    for name in [format!("bench-{id}.json"), "latest.json".into()] {
        let path = dir.join(&name);
        ctx(std::fs::write(&path, &json), || {
            format!("cannot write {}", path.display())
        })?;
    }
    // Charts beside the JSON, and beside the Markdown report that links them.
    let charts = charts::render(&report).map_err(|e| Error::Other(format!("charts: {e}")))?;
    let markdown_dir = opts
        .markdown
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(CHARTS_DIR);
    let mut dirs = vec![dir.clone()];
    if !opts.no_markdown {
        ctx(std::fs::create_dir_all(&markdown_dir), || {
            format!("cannot create {}", markdown_dir.display())
        })?;
        dirs.push(markdown_dir);
    }
    for (name, _, svg) in &charts {
        for d in &dirs {
            let path = d.join(name);
            ctx(std::fs::write(&path, svg), || {
                format!("cannot write {}", path.display())
            })?;
        }
    }
    if !opts.no_markdown {
        let links: Vec<(&str, &str)> = charts.iter().map(|(n, t, _)| (*n, *t)).collect();
        ctx(
            std::fs::write(&opts.markdown, report.markdown(&binary, &links)),
            || format!("cannot write {}", opts.markdown.display()),
        )?;
    }
    Ok(report)
}

/// The bench's worker configuration: the given file (if any) with a short Kafka session, so
/// that each phase's group forms in seconds (the broker waits session/2 for members).
fn write_bench_config(opts: &Options, dir: &Path) -> Result<PathBuf, Error> {
    let mut doc: toml::Table = match &opts.config {
        Some(p) => {
            let text = ctx(std::fs::read_to_string(p), || {
                format!("cannot read {}", p.display())
            })?;
            ctx(text.parse(), || format!("{} is not TOML", p.display()))?
        }
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
    let text = ctx(toml::to_string(&doc), || "cannot write TOML".into())?;
    ctx(std::fs::write(&path, text), || {
        format!("cannot write {}", path.display())
    })?;
    Ok(path)
}

/// What the phases share.
struct Bench<'a> {
    config_path: &'a Path,
    dir: &'a Path,
    plan: &'a Plan,
    migrations: &'a Migrations<'a>,
    id: u64,
}

/// The filled topic, as the worker phases measure it.
struct Filled<'a> {
    topic: &'a str,
    events: u64,
    /// Key and value bytes, as ceiling A read them.
    bytes: u64,
    /// Rows the records make in the tables not fed by windows, if the workload knows.
    expect_rows: Option<u64>,
}

impl Bench<'_> {
    /// This binary's `ARGS --config CONFIG`, quiet, without the health endpoint or
    /// PostgreSQL unless a phase sets them.
    fn command(&self, args: &[&str]) -> Command {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("sluice"));
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .arg("--config")
            .arg(self.config_path)
            .env("DATABASE_URL", "")
            .env("LOG_LEVEL", "warn")
            .env("ENABLE_HEALTH_ENDPOINT", "false");
        cmd
    }

    /// Drops and re-creates ClickHouse database `db` with the pipeline's tables.
    async fn fresh_clickhouse<S: Settings>(
        &self,
        config: &Config<S>,
        db: &str,
    ) -> Result<(), Error> {
        let server = services::clickhouse_server(&config.clickhouse)?;
        ctx(
            server
                .query("DROP DATABASE IF EXISTS ?")
                .bind(clickhouse::sql::Identifier(db))
                .execute()
                .await,
            || format!("cannot drop {db}"),
        )?;
        let mut c = config.clickhouse.clone();
        c.database = db.to_owned();
        let tables: Vec<String> = self.plan.tables.iter().map(|t| t.name.clone()).collect();
        ClickHousePlan {
            scope: self.migrations.scope,
            migrations: self.migrations.clickhouse,
            tables: &tables,
            cluster: None,
            layout: sluice_sinks::Layout::Replicated,
        }
        .apply(&c)
        .await?;
        Ok(())
    }

    /// `run --drain` on a fresh group and database; returns the phase and the database.
    async fn worker_phase<S: Settings>(
        &self,
        config: &Config<S>,
        filled: &Filled<'_>,
        tag: &str,
        postgres: Option<&str>,
    ) -> Result<(Phase, String), Error> {
        let db = format!("sluice_bench_{tag}");
        self.fresh_clickhouse(config, &db).await?;
        let mut cmd = self.command(&["run", "--drain"]);
        if let Some(url) = postgres {
            migrate::postgres(url, self.migrations.scope, self.migrations.postgres).await?;
            cmd.env("DATABASE_URL", url);
        }
        cmd.env("KAFKA_TOPICS", filled.topic)
            .env("KAFKA_GROUP_ID", format!("sluice-bench-{}-{tag}", self.id))
            .env("CLICKHOUSE_DB", &db)
            // The source's info lines too: the first assignment's time is the join's end.
            .env("LOG_LEVEL", "warn,sluice_pipeline::kafka=info");
        let log = self.dir.join(format!("worker-{tag}.log"));
        let spawned = std::time::SystemTime::now();
        let os = measure(cmd, &log).await?;
        let join_secs = std::fs::read_to_string(&log)
            .ok()
            .and_then(|text| join_secs(&text, spawned))
            .unwrap_or(0.0);
        let (rows, event_rows) = count_rows(&config.clickhouse, self.plan, &db).await?;
        if let Some(expected) = filled.expect_rows
            && event_rows != expected
        {
            return Err(Error::Other(format!(
                "the worker wrote {event_rows} rows into the tables of {db} not fed by windows; the {} records make {expected}",
                filled.events
            )));
        }
        Ok((
            Phase {
                name: String::new(),
                events: filled.events,
                bytes: filled.bytes,
                rows,
                secs: os.wall_secs,
                cpu_secs: os.cpu_secs,
                machine_cpu_secs: os.machine_cpu_secs,
                peak_rss: os.peak_rss,
                join_secs,
            },
            db,
        ))
    }

    /// The latency phase: a live worker on a fresh topic, fed at `rate`; its sinks' record
    /// ages, read from its `/metrics` once the feed is over and the last batches are written.
    async fn latency<S: Settings>(
        &self,
        config: &Config<S>,
        workload: &dyn Workload,
        opts: &Options,
        rate: u64,
        postgres: Option<&str>,
    ) -> Result<Latency, Error> {
        let topic = format!("sluice_bench_{}_live", self.id);
        services::ensure_topic(&config.kafka, &topic, opts.partitions).await?;
        let db = "sluice_bench_live";
        self.fresh_clickhouse(config, db).await?;
        let port = ctx(free_port(), || "no free port".into())?;
        let mut cmd = self.command(&["run"]);
        if let Some(url) = postgres {
            migrate::postgres(url, self.migrations.scope, self.migrations.postgres).await?;
            cmd.env("DATABASE_URL", url);
        }
        cmd.env("KAFKA_TOPICS", &topic)
            .env("KAFKA_GROUP_ID", format!("sluice-bench-{}-live", self.id))
            .env("CLICKHOUSE_DB", db)
            .env("ENABLE_HEALTH_ENDPOINT", "true")
            .env("HEALTH_PORT", port.to_string());
        let log = self.dir.join("worker-live.log");
        let child = spawn_logged(cmd, &log)?;
        let pid = child.id();
        let outcome = async {
            wait_ready(port).await?;
            let total = rate * opts.probe_secs;
            let live = Some(Duration::from_secs(opts.probe_secs));
            produce(
                &config.kafka,
                &topic,
                opts.partitions,
                workload.records(2, total, live),
                total,
                rate,
                false,
            )
            .await?;
            // The last records wait for their linger and their insert.
            let linger = Duration::from_millis(config.pipeline.batch_linger_ms);
            tokio::time::sleep(2 * linger + Duration::from_secs(2)).await;
            let metrics = ctx(http_get(port, "/metrics").await, || {
                "cannot read /metrics".into()
            })?;
            let _ = std::fs::write(self.dir.join("worker-live.metrics"), &metrics);
            record_ages(&metrics, self.plan).ok_or_else(|| {
                Error::Other("the live worker's sinks reported no record ages".into())
            })
        }
        .await;
        // SAFETY: signals our own child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let (usage, status) = wait_usage(pid).await?;
        let mut latency = outcome?;
        check_exit(status, &log)?;
        latency.rate = rate;
        latency.peak_rss = usage.peak_rss;
        Ok(latency)
    }
}

/// The record ages of the sink with the highest p99, from Prometheus text (summaries of
/// `sluice_record_age_seconds` per `stage`): the pipeline's tables not fed by windows.
fn record_ages(metrics: &str, plan: &Plan) -> Option<Latency> {
    let name = "sluice_record_age_seconds";
    let value = |stage: &str, suffix: &str, quantile: Option<&str>| -> Option<f64> {
        let label = match quantile {
            Some(q) => format!("{name}{{stage=\"{stage}\",quantile=\"{q}\"}} "),
            None => format!("{name}{suffix}{{stage=\"{stage}\"}} "),
        };
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&label))
            .and_then(|v| v.trim().parse().ok())
    };
    plan.tables
        .iter()
        .filter(|t| !t.windowed)
        .filter_map(|t| {
            let stage = t.name.as_str();
            let prefix = format!("{name}{{stage=\"{stage}\",quantile=\"");
            let mut quantiles: Vec<(f64, f64)> = metrics
                .lines()
                .filter_map(|l| {
                    let (q, v) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
                    Some((q.parse().ok()?, v.trim().parse::<f64>().ok()? * 1e3))
                })
                .collect();
            quantiles.sort_by(|a, b| a.0.total_cmp(&b.0));
            Some(Latency {
                sink: stage.to_owned(),
                samples: value(stage, "_count", None)? as u64,
                p50_ms: value(stage, "", Some("0.5"))? * 1e3,
                p99_ms: value(stage, "", Some("0.99"))? * 1e3,
                max_ms: value(stage, "", Some("1"))? * 1e3,
                quantiles,
                ..Latency::default()
            })
        })
        .filter(|l| l.samples > 0)
        .max_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms))
}

/// What the OS says about a finished child.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    wall_secs: f64,
    cpu_secs: f64,
    machine_cpu_secs: f64,
    peak_rss: u64,
}

/// A phase's join time in the terminal table, `—` where unknown.
fn join_cell(p: &Phase) -> String {
    if p.join_secs > 0.0 {
        format!("{:.1}", p.join_secs)
    } else {
        "—".into()
    }
}

/// A phase's records/s after its join, `—` where unknown.
fn after_join_cell(p: &Phase) -> String {
    p.rate_after_join()
        .map_or_else(|| "—".into(), |r| format!("{r:.0}"))
}

/// Seconds from `spawned` to the first "partitions assigned" line of a worker's log (its
/// timestamps are RFC 3339, in text or JSON lines).
fn join_secs(log: &str, spawned: std::time::SystemTime) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("partitions assigned"))?;
    let assigned = line_time(line)?;
    Some((assigned - time::OffsetDateTime::from(spawned)).as_seconds_f64())
}

/// The first RFC 3339 timestamp of a log line (a text line's first word, a JSON line's
/// `"timestamp"` value).
fn line_time(line: &str) -> Option<time::OffsetDateTime> {
    line.split(|c: char| c.is_whitespace() || c == '"' || c == ',')
        .find_map(|word| {
            time::OffsetDateTime::parse(word, &time::format_description::well_known::Rfc3339).ok()
        })
}

/// Busy CPU time of the whole machine so far (`/proc/stat`: all but idle and iowait),
/// seconds; `None` off Linux.
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let busy: u64 = fields
        .iter()
        .enumerate()
        // user nice system (idle iowait) irq softirq steal; guest time is in user already.
        .filter(|(i, _)| *i < 8 && *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| busy as f64 / hz as f64)
}

/// Runs `cmd` to its end with its output in `log`; fails (with the log's tail) unless it
/// exits 0.
async fn measure(cmd: Command, log: &Path) -> Result<Usage, Error> {
    let busy = machine_busy_secs();
    let child = spawn_logged(cmd, log)?;
    let (mut usage, status) = wait_usage(child.id()).await?;
    check_exit(status, log)?;
    if let (Some(before), Some(after)) = (busy, machine_busy_secs()) {
        usage.machine_cpu_secs = after - before;
    }
    Ok(usage)
}

fn spawn_logged(mut cmd: Command, log: &Path) -> Result<std::process::Child, Error> {
    let file = ctx(std::fs::File::create(log), || {
        format!("cannot create {}", log.display())
    })?;
    let copy = ctx(file.try_clone(), || {
        format!("cannot open {}", log.display())
    })?;
    cmd.stdout(copy).stderr(file);
    ctx(cmd.spawn(), || format!("cannot start {cmd:?}"))
}

/// Waits for child `pid` and reads its resource usage (`wait4`: CPU and peak RSS of that
/// child alone).
async fn wait_usage(pid: u32) -> Result<(Usage, i32), Error> {
    let started = Instant::now();
    let waited = tokio::task::spawn_blocking(move || {
        let mut status = 0;
        // SAFETY: plain syscall on our own child; `rusage` is a C struct of integers.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru) };
        if r < 0 {
            return Err(Error::Other(format!(
                "wait4: {}",
                std::io::Error::last_os_error()
            )));
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok((
            Usage {
                wall_secs: started.elapsed().as_secs_f64(),
                cpu_secs: secs(ru.ru_utime) + secs(ru.ru_stime),
                machine_cpu_secs: 0.0,
                // Linux reports kilobytes.
                peak_rss: ru.ru_maxrss as u64 * 1024,
            },
            status,
        ))
    })
    .await;
    ctx(waited, || "wait4".into())?
}

fn check_exit(status: i32, log: &Path) -> Result<(), Error> {
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(Error::Other(format!(
        "phase failed (wait status {status}); {}:\n{}",
        log.display(),
        tail.join("\n")
    )))
}

fn read_result(path: &Path) -> Result<Phase, Error> {
    let text = ctx(std::fs::read_to_string(path), || {
        format!("no result in {}", path.display())
    })?;
    ctx(serde_json::from_str(&text), || {
        format!("bad result in {}", path.display())
    })
}

async fn fresh_postgres(url: &str, db: &str) -> Result<String, Error> {
    use sqlx::Connection;
    let mut admin = ctx(sqlx::PgConnection::connect(url).await, || {
        format!("cannot connect to {}", crate::config::redact_url(url))
    })?;
    ctx(
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&mut admin)
            .await,
        || format!("cannot create PostgreSQL database {db}"),
    )?;
    let Some((base, _)) = url.split('?').next().and_then(|u| u.rsplit_once('/')) else {
        return Err(Error::Other("DATABASE_URL names no database".into()));
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

/// Rows in the pipeline's tables of `db`: (all, those not fed by windows, whose rows depend
/// on when windows close).
async fn count_rows(
    clickhouse: &crate::config::ClickHouseConfig,
    plan: &Plan,
    db: &str,
) -> Result<(u64, u64), Error> {
    let client = services::clickhouse_server(clickhouse)?.with_database(db);
    let (mut all, mut events) = (0, 0);
    for table in &plan.tables {
        let n = ctx(
            client
                .query("SELECT count() FROM ?")
                .bind(clickhouse::sql::Identifier(&table.name))
                .fetch_one::<u64>()
                .await,
            || format!("cannot count {db}.{}", table.name),
        )?;
        all += n;
        if !table.windowed {
            events += n;
        }
    }
    Ok((all, events))
}

/// Ceiling A, in its own process: reads the `events` records of the topic in a consumer
/// group with the worker's client settings, discarding them; writes a [`Phase`] to `result`.
pub(crate) fn consume(mut source: KafkaSourceConfig, opts: &ConsumeOptions) -> Result<(), Error> {
    source.group_id = opts.group.clone();
    let consumer: BaseConsumer = ctx(source.client_config().create(), || {
        "cannot create the consumer".into()
    })?;
    // The count the bench produced, not the watermarks: right after producing, the broker's
    // end offsets may not show every record yet.
    ctx(consumer.subscribe(&[&opts.topic]), || {
        format!("cannot subscribe to {}", opts.topic)
    })?;
    let started = Instant::now();
    let (mut records, mut bytes) = (0u64, 0u64);
    let mut join_secs = 0.0;
    while records < opts.events {
        // Until the group has given partitions (a local call, made only until then).
        if join_secs == 0.0 && consumer.assignment().is_ok_and(|a| a.count() > 0) {
            join_secs = started.elapsed().as_secs_f64();
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                use rdkafka::Message;
                records += 1;
                bytes += (m.payload_len() + m.key().map_or(0, <[u8]>::len)) as u64;
            }
            Some(Err(e)) => tracing::warn!("consumer: {e}"),
            None if started.elapsed() > Duration::from_secs(900) => {
                return Err(Error::Other(format!(
                    "read {records} of {} records in 15 minutes",
                    opts.events
                )));
            }
            None => {}
        }
    }
    let phase = Phase {
        events: records,
        bytes,
        secs: started.elapsed().as_secs_f64(),
        join_secs,
        ..Phase::default()
    };
    let json = ctx(serde_json::to_string(&phase), || "cannot encode".into())?;
    ctx(std::fs::write(&opts.result, json), || {
        format!("cannot write {}", opts.result.display())
    })
}

/// Ceiling B, in its own process: fetches every table's rows from `from` as RowBinary bodies
/// of `batch_max_rows` rows (untimed), then inserts them into `to` with `insert_concurrency`
/// inserts per table, all tables at once; writes a [`Phase`] to `result`.
pub(crate) async fn insert<S>(
    config: &Config<S>,
    plan: &Plan,
    opts: &InsertOptions,
) -> Result<(), Error> {
    let (from, to) = (&opts.from, &opts.to);
    let source = services::clickhouse_client(&config.clickhouse)?.with_database(from);
    let target = services::clickhouse_client(&config.clickhouse)?.with_database(to);
    let batch = config.pipeline.batch_max_rows.max(1) as u64;
    let mut bodies: Vec<Vec<(String, bytes::Bytes)>> = Vec::new();
    let (mut rows, mut bytes) = (0u64, 0u64);
    for table in &plan.tables {
        let cols = table.columns.join(", ");
        let name = &table.name;
        let n: u64 = ctx(
            source
                .query(&format!("SELECT count() FROM {name}"))
                .fetch_one()
                .await,
            || format!("cannot count {from}.{name}"),
        )?;
        let parts = n.div_ceil(batch).max(1);
        let mut list = Vec::new();
        for part in 0..parts {
            let mut cursor = ctx(
                source
                    .query(&format!(
                        "SELECT {cols} FROM {name} WHERE cityHash64(formatRow('TSV', *)) % {parts} = {part}"
                    ))
                    .fetch_bytes("RowBinary"),
                || format!("cannot fetch {from}.{name}"),
            )?;
            let body = ctx(cursor.collect().await, || {
                format!("cannot fetch {from}.{name}")
            })?;
            bytes += body.len() as u64;
            list.push((
                format!("INSERT INTO {name} ({cols}) FORMAT RowBinary"),
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
    ctx(futures::future::try_join_all(tables).await, || {
        "insert failed".into()
    })?;
    let secs = started.elapsed().as_secs_f64();
    let (landed, _) = count_rows(&config.clickhouse, plan, to).await?;
    if landed != rows {
        return Err(Error::Other(format!(
            "ceiling B inserted {rows} rows but {to} holds {landed}"
        )));
    }
    let phase = Phase {
        rows,
        bytes,
        secs,
        ..Phase::default()
    };
    let json = ctx(serde_json::to_string(&phase), || "cannot encode".into())?;
    ctx(std::fs::write(&opts.result, json), || {
        format!("cannot write {}", opts.result.display())
    })
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The body of `GET path` on the worker's health port.
async fn http_get(port: u16, path: &str) -> Result<String, String> {
    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client =
        Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = format!("http://127.0.0.1:{port}{path}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let answer = client.get(uri).await.map_err(|e| e.to_string())?;
    let status = answer.status();
    let body = answer
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn wait_ready(port: u16) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(90);
    while http_get(port, "/ready").await.is_err() {
        if Instant::now() > deadline {
            return Err(Error::Other(
                "the live worker was not ready within 90 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn delete_topics<S>(config: &Config<S>, topics: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin = config
        .kafka
        .producer_client()
        .map_err(|e| e.to_string())
        .and_then(|c| {
            c.create::<AdminClient<rdkafka::client::DefaultClientContext>>()
                .map_err(|e| e.to_string())
        });
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
    use crate::wiring::TablePlan;

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
    fn the_join_is_read_from_the_first_assignment_in_text_or_json_logs() {
        let text = "2026-12-07T17:25:08.012851Z  INFO sluice_worker::worker: starting\n\
                    2026-12-07T17:25:11.026604Z  INFO sluice_pipeline::kafka: partitions assigned source=kafka partitions=6\n\
                    2026-12-07T17:25:30.000000Z  INFO sluice_pipeline::kafka: partitions assigned source=kafka partitions=3\n";
        let spawned = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(1_796_664_307.5);
        // 1_796_664_307.5 is 17:25:07.5 UTC.
        let join = join_secs(text, spawned).expect("found");
        assert!((join - 3.526604).abs() < 1e-6, "{join}");
        let json = r#"{"timestamp":"2026-12-07T17:25:09Z","level":"INFO","message":"partitions assigned"}"#;
        assert!((join_secs(json, spawned).expect("found") - 1.5).abs() < 1e-6);
        assert_eq!(join_secs("no assignment here", spawned), None);
        assert_eq!(line_time("partitions assigned at 17:25"), None);
        // Across midnight.
        let late = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_687_999);
        let after = "2026-12-08T00:00:02Z partitions assigned";
        assert!((join_secs(after, late).expect("found") - 3.0).abs() < 1e-6);
    }

    #[test]
    fn the_rate_after_the_join_leaves_the_join_out() {
        let mut p = phase("worker", 1000, 5.0);
        assert_eq!(p.rate_after_join(), None, "unknown join");
        p.join_secs = 3.0;
        assert_eq!(p.rate_after_join(), Some(500.0));
        assert_eq!(join_cell(&p), "3.0");
        assert_eq!(after_join_cell(&p), "500");
        p.join_secs = 6.0;
        assert_eq!(
            p.rate_after_join(),
            None,
            "a join longer than the phase is no figure"
        );
    }

    #[test]
    fn machine_cpu_counts_this_process_spinning() {
        let before = machine_busy_secs().expect("Linux /proc/stat");
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = machine_busy_secs().expect("Linux /proc/stat");
        assert!(after - before >= 0.1, "{before} → {after}");
    }

    #[test]
    fn the_worker_is_compared_with_the_slower_ceiling() {
        let report = Report {
            unix_time: 0,
            commit: "abc".into(),
            command: "sluice bench".into(),
            machine: machine(),
            events: 1000,
            partitions: 1,
            settings: BenchSettings {
                batch_max_rows: 1,
                batch_linger_ms: 500,
                insert_concurrency: 1,
                queue_capacity: 1,
                geoip_database: None,
            },
            fill_secs: 1.0,
            phases: vec![
                phase("ceiling A: plain consumer", 1000, 1.0),
                phase(WORKER_CH, 1000, 4.0),
                phase("ceiling B: pre-encoded inserts", 1000, 2.0),
            ],
            latency: None,
        };
        let mut report = report;
        // Without the latency phase, only the phases' chart: every phase named, each bar as long
        // as its value.
        let charts = charts::render(&report).expect("charts");
        assert_eq!(charts.len(), 1);
        let svg = &charts[0].2;
        for p in &report.phases {
            assert!(svg.contains(&p.name), "{} not in the chart", p.name);
        }
        for label in [" 1000", " 500", " 250", " 2000.00"] {
            assert!(svg.contains(label), "no bar labelled {label}");
        }
        report.latency = Some(Latency {
            rate: 100,
            sink: "a".into(),
            quantiles: vec![(0.5, 400.0), (0.99, 950.0), (1.0, 1200.0)],
            ..Latency::default()
        });
        let charts = charts::render(&report).expect("charts");
        assert_eq!(charts[1].0, "bench-latency.svg");
        for label in ["p50", "p99", "max", "1200", "linger + 500 ms = 1000 ms"] {
            assert!(
                charts[1].2.contains(label),
                "{label} not in the latency chart"
            );
        }
        report.latency = None;
        // min(A, B) = 500 records/s; the worker did 250.
        assert_eq!(report.ratio(WORKER_CH), Some(0.5));
        assert_eq!(report.ratio(WORKER_PG), None);
        assert_eq!(report.phases[1].cpu_per_million(), 2000.0);
        assert!(
            report
                .table()
                .contains("worker → ClickHouse / min(A, B): 50%")
        );
        let md = report.markdown("sluice", &[("bench-phases.svg", "phases")]);
        assert!(
            md.contains("![phases](docs/bench/bench-phases.svg)"),
            "{md}"
        );
        assert!(
            md.contains("| worker → ClickHouse ≥ 80% of min(A, B) | 50% |"),
            "{md}"
        );
        assert!(
            md.contains("cargo run --release --locked --bin sluice -- bench"),
            "{md}"
        );
    }

    #[test]
    fn latency_is_the_slowest_table_sink_and_windows_are_left_out() {
        let plan = Plan {
            tables: ["a", "b", "w"]
                .map(|t| TablePlan {
                    name: t.into(),
                    columns: Vec::new(),
                    windowed: t == "w",
                })
                .to_vec(),
            ..Plan::default()
        };
        let metrics = "\
sluice_record_age_seconds{stage=\"a\",quantile=\"0.5\"} 0.5
sluice_record_age_seconds{stage=\"a\",quantile=\"0.99\"} 0.9
sluice_record_age_seconds{stage=\"a\",quantile=\"1\"} 1.2
sluice_record_age_seconds_count{stage=\"a\"} 300
sluice_record_age_seconds{stage=\"b\",quantile=\"0.5\"} 0.4
sluice_record_age_seconds{stage=\"b\",quantile=\"0.99\"} 0.95
sluice_record_age_seconds{stage=\"b\",quantile=\"1\"} 1
sluice_record_age_seconds_count{stage=\"b\"} 200
sluice_record_age_seconds{stage=\"w\",quantile=\"0.5\"} 60
sluice_record_age_seconds{stage=\"w\",quantile=\"0.99\"} 90
sluice_record_age_seconds{stage=\"w\",quantile=\"1\"} 95
sluice_record_age_seconds_count{stage=\"w\"} 10
";
        let l = record_ages(metrics, &plan).expect("ages");
        assert_eq!(l.sink, "b");
        assert_eq!(
            (l.samples, l.p50_ms, l.p99_ms, l.max_ms),
            (200, 400.0, 950.0, 1000.0)
        );
        assert_eq!(l.quantiles, [(0.5, 400.0), (0.99, 950.0), (1.0, 1000.0)]);
    }
}
