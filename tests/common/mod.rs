//! Helpers of the process-level tests: run `sluice`, write configs, read ClickHouse back.
#![allow(dead_code)]

pub mod analytics;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The event tables (from the one list of them, `sluice_schemas::with_event_tables!`).
pub use sluice_schemas::EVENT_TABLES as TABLES;

/// `sluice ARGS --config CONFIG` with `env`, quiet logs and no health endpoint.
pub fn sluice(config: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    command(config, env, args, "warn")
        .output()
        .expect("run sluice")
}

/// The `sluice` command line, not started.
pub fn command(config: &Path, env: &[(&str, &str)], args: &[&str], log: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env("LOG_LEVEL", log)
        .env("ENABLE_HEALTH_ENDPOINT", "false");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Asserts that each killed worker (rounds 1.. of `logs`, then `drain_log`, the run after the
/// last kill) found batches the one before it had cut and written past the committed offset,
/// and cut the redelivered records along their recorded spans.
pub fn assert_each_kill_replayed(logs: &[std::path::PathBuf], drain_log: String) {
    let mut after: Vec<String> = logs[1..]
        .iter()
        .map(|l| std::fs::read_to_string(l).expect("log"))
        .collect();
    after.push(drain_log);
    for (round, text) in after.iter().enumerate() {
        assert!(
            text.contains("cutting redelivered records along recorded spans"),
            "round {round}: the killed worker left uncommitted batches; the next one replays them"
        );
    }
}

/// A `sluice run` worker in the background, its output discarded.
pub fn spawn_worker(config: &Path, env: &[(&str, &str)]) -> Child {
    command(config, env, &["run"], "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker")
}

/// Asserts that a process ended well, showing its stderr otherwise.
pub fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A config file for the local broker with fast group joins (a member is dropped
/// `session_ms` after it dies) and `kafka_extra` and `pipeline` settings.
pub fn write_config(path: &Path, session_ms: u32, kafka_extra: &str, pipeline: &str) {
    std::fs::write(
        path,
        format!(
            "[kafka]\nbrokers = \"{}\"\n\"session.timeout.ms\" = {session_ms}\n\"heartbeat.interval.ms\" = {}\n{kafka_extra}\n[pipeline]\n{pipeline}\n",
            sluice_testkit::brokers(),
            session_ms / 6,
        ),
    )
    .expect("write config");
}

/// A temporary config path.
pub fn config_path(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}.toml", sluice_testkit::unique(prefix)))
}

pub fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The cluster of `scripts/services.sh up cluster`: 2 shards x 2 replicas.
pub const CLUSTER: &str = "sluice_cluster";

/// Its nodes' (HTTP, native) ports, shard 1 replicas 1-2 then shard 2 replicas 1-2.
pub const CLUSTER_NODES: [(u16, u16); 4] = [(8201, 9201), (8202, 9202), (8203, 9203), (8204, 9204)];

/// Whether the cluster is up (`SLUICE_CLUSTER=up`); says that the test is skipped otherwise.
pub fn cluster_up() -> bool {
    let up = std::env::var("SLUICE_CLUSTER").is_ok_and(|v| v == "up");
    if !up {
        eprintln!(
            "skipped: the ClickHouse cluster is not up (scripts/services.sh up cluster; SLUICE_CLUSTER=up)"
        );
    }
    up
}

/// The single ClickHouse server's HTTP URL.
pub fn clickhouse_url() -> String {
    std::env::var("CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

/// A ClickHouse client on `db` of the single server.
pub fn clickhouse(db: &str) -> clickhouse::Client {
    clickhouse_at(&clickhouse_url(), db)
}

/// A ClickHouse client on `db` of the server at `url`.
pub fn clickhouse_at(url: &str, db: &str) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(url)
        .with_database(db)
}

/// Every table's row count and a hash of all its rows, order-independent.
pub async fn table_digests(db: &str) -> Vec<(String, u64, u64)> {
    table_digests_at(&clickhouse_url(), db).await
}

/// [`table_digests`] of `db` on the server at `url` (a cluster node: read through the
/// Distributed tables).
pub async fn table_digests_at(url: &str, db: &str) -> Vec<(String, u64, u64)> {
    let client = clickhouse_at(url, db);
    let mut out = Vec::new();
    for table in TABLES {
        let (n, digest): (u64, u64) = client
            .query(&format!(
                "SELECT count(), sum(cityHash64(formatRow('TSV', *))) FROM {table}"
            ))
            .fetch_one()
            .await
            .expect("digest");
        out.push((table.to_string(), n, digest));
    }
    out
}

/// The rows of `table` whose count differs between databases `a` and `b` (at most 40), as
/// (count in a, count in b, the row as TSV): what a failed digest comparison shows. `a_at`:
/// the native address of the server holding `a` when it is not the single server.
pub async fn table_diff(
    a: &str,
    b: &str,
    table: &str,
    a_at: Option<&str>,
) -> Vec<(u64, u64, String)> {
    let side = |from: String| {
        format!(
            "SELECT cityHash64(formatRow('TSV', *)) AS h, count() AS n, any(formatRow('TSV', *)) AS r \
             FROM {from} GROUP BY h"
        )
    };
    let (a, b) = (
        match a_at {
            Some(at) => side(format!("remote('{at}', '{a}', '{table}')")),
            None => side(format!("{a}.{table}")),
        },
        side(format!("{b}.{table}")),
    );
    clickhouse("default")
        .query(&format!(
            "SELECT x.n, y.n, if(x.r != '', x.r, y.r) FROM ({a}) AS x FULL OUTER JOIN ({b}) AS y \
             USING h WHERE x.n != y.n ORDER BY 3 LIMIT 40"
        ))
        .fetch_all()
        .await
        .expect("diff")
}

/// This run's tables against a clean run of the same records (see
/// [`analytics::Setup::compare_with_clean_run`]).
pub struct TableComparison {
    /// How long the clean run took.
    pub clean_run: std::time::Duration,
    /// (table, rows, digest) of this run.
    pub got: Vec<(String, u64, u64)>,
    /// (table, rows, digest) of the clean run.
    pub want: Vec<(String, u64, u64)>,
    /// The clean run's ClickHouse database.
    pub clean_db: String,
}

/// `viewer_metrics_5m` of `db`: rows, and a hash of every row with its averages rounded
/// (merged in another order, a float average can differ in its last bits).
pub async fn five_minute_digest(db: &str) -> (u64, u64) {
    five_minute_digest_at(&clickhouse_url(), db).await
}

/// [`five_minute_digest`] of `db` on the server at `url`.
pub async fn five_minute_digest_at(url: &str, db: &str) -> (u64, u64) {
    clickhouse_at(url, db)
        .query(
            "SELECT count(), sum(cityHash64(timestamp_5m, tenant_id, internal_name, node_id, \
             peak_viewers, round(avg_viewers, 3), unique_countries, unique_cities, \
             round(avg_connection_quality, 3), round(avg_buffer_health, 3))) FROM viewer_metrics_5m",
        )
        .fetch_one()
        .await
        .expect("viewer_metrics_5m")
}

/// Rows in all tables.
pub async fn total_rows(db: &str) -> u64 {
    total_rows_at(&clickhouse_url(), db).await
}

/// [`total_rows`] of `db` on the server at `url`.
pub async fn total_rows_at(url: &str, db: &str) -> u64 {
    table_digests_at(url, db)
        .await
        .iter()
        .map(|(_, n, _)| n)
        .sum()
}

/// Asks process `pid` to stop gracefully (SIGTERM).
pub fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Every partition's end offset, from the `n` records read back (the broker's ListOffsets
/// answer is not reliable here: see `sluice_pipeline::kafka`'s watermarks).
pub fn end_offsets(topic: &str, partitions: i32, n: usize) -> std::collections::BTreeMap<i32, i64> {
    let mut ends: std::collections::BTreeMap<i32, i64> = (0..partitions).map(|p| (p, 0)).collect();
    for r in sluice_testkit::read_all(topic, partitions, n) {
        let end = ends.entry(r.partition).or_default();
        *end = (*end).max(r.offset + 1);
    }
    ends
}

/// `sluice generate` of `events` events with `seed` into `topic` (created with `partitions`),
/// asserting it succeeded.
pub fn generate(
    config: &Path,
    env: &[(&str, &str)],
    topic: &str,
    events: usize,
    partitions: i32,
    seed: u64,
) {
    let (events, partitions, seed) = (events.to_string(), partitions.to_string(), seed.to_string());
    let args = [
        "generate",
        "--events",
        &events,
        "--partitions",
        &partitions,
        "--topic",
        topic,
        "--seed",
        &seed,
    ];
    assert_ok("generate", &sluice(config, env, &args));
}
