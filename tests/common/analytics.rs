//! A generated FrameWorks stream keyed by stream, ClickHouse and PostgreSQL databases for it,
//! and an independent reference of `stream_analytics` computed from the records themselves by
//! the contract's rules.

use std::collections::BTreeMap;

use serde_json::Value;
use sluice_testkit::{
    committed_offsets, create_pg_database, create_topic, drop_pg_database, read_all, unique,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{as_refs, assert_ok, command, config_path, sluice, write_config};

/// One `stream_analytics` row by the contract's rules (the Go consumer's columns).
#[derive(Clone, Debug, PartialEq)]
struct Row {
    status: Option<String>,
    session_start_time: Option<i64>,
    session_end_time: Option<i64>,
    total_session_duration: i64,
    current_viewers: i64,
    peak_viewers: i64,
    total_connections: i64,
    bandwidth_in: i64,
    bandwidth_out: i64,
    upbytes: i64,
    downbytes: i64,
    last_updated: Option<i64>,
}

impl Default for Row {
    fn default() -> Self {
        Row {
            status: Some("offline".into()),
            session_start_time: None,
            session_end_time: None,
            total_session_duration: 0,
            current_viewers: 0,
            peak_viewers: 0,
            total_connections: 0,
            bandwidth_in: 0,
            bandwidth_out: 0,
            upbytes: 0,
            downbytes: 0,
            last_updated: None,
        }
    }
}

type Key = (String, String);

fn num(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
        _ => 0,
    }
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The reference: every record of every partition, in offset order, by the contract's rules.
/// Usage per (tenant, usage type): what `usage_records` must sum to.
type Usage = BTreeMap<(String, String), f64>;

fn reference(topic: &str, partitions: i32, events: usize) -> (BTreeMap<Key, Row>, Usage) {
    let mut rows: BTreeMap<Key, Row> = BTreeMap::new();
    let mut usage = Usage::new();
    let mut records = read_all(topic, partitions, events);
    records.sort_by_key(|r| (r.partition, r.offset));
    for r in records {
        let v: Value = serde_json::from_slice(&r.value).expect("generated JSON");
        let data = &v["data"];
        let kind = v["type"].as_str().unwrap_or_default();
        let tenant = r
            .headers
            .iter()
            .find(|(k, _)| k == "tenant_id")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .or_else(|| v["tenant_id"].as_str().map(str::to_owned))
            .expect("tenant");
        if kind == "user-connection" {
            let mut add = |t: &str, n: i64| {
                *usage.entry((tenant.clone(), t.to_owned())).or_default() += n as f64;
            };
            match data["action"].as_str() {
                Some("connect") => add("connections", 1),
                Some("disconnect") => {
                    add("viewer_seconds", num(data.get("seconds_connected")));
                    add("egress_bytes", num(data.get("down_bytes")));
                    add("ingress_bytes", num(data.get("up_bytes")));
                }
                _ => {}
            }
        }
        let Some(name) = data["internal_name"].as_str() else {
            continue;
        };
        if !["stream-lifecycle", "user-connection", "stream-end"].contains(&kind) {
            continue;
        }
        let at = OffsetDateTime::parse(v["timestamp"].as_str().expect("ts"), &Rfc3339)
            .expect("RFC 3339");
        let at = (at.unix_timestamp_nanos() / 1_000) as i64;
        let row = rows.entry((tenant, name.to_owned())).or_default();
        match kind {
            "stream-lifecycle" => {
                let status = text(data.get("status"));
                if row.session_start_time.is_none()
                    && status
                        .as_deref()
                        .is_some_and(|s| ["start", "started", "ingest_start", "live"].contains(&s))
                {
                    row.session_start_time = Some(at);
                }
                row.status = status;
            }
            "user-connection" => match data["action"].as_str() {
                Some("connect") => {
                    row.current_viewers += 1;
                    row.peak_viewers = row.peak_viewers.max(row.current_viewers);
                    row.total_connections += 1;
                }
                Some("disconnect") => {
                    row.current_viewers = (row.current_viewers - 1).max(0);
                    row.total_session_duration += num(data.get("seconds_connected"));
                    let (up, down) = (num(data.get("up_bytes")), num(data.get("down_bytes")));
                    row.upbytes += up;
                    row.bandwidth_in += up;
                    row.downbytes += down;
                    row.bandwidth_out += down;
                }
                _ => {}
            },
            _ => {
                row.status = text(data.get("status"));
                row.session_end_time = Some(at);
            }
        }
        row.last_updated = Some(at);
    }
    usage.retain(|_, v| *v > 0.0);
    (rows, usage)
}

/// `stream_analytics` as stored, in the reference's terms: the rows some event of the
/// contract's rules touched (each sets `last_updated`; rows only the added rules created have
/// none).
async fn stored(url: &str) -> BTreeMap<Key, Row> {
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    type Record = (
        uuid::Uuid,
        String,
        Option<String>,
        Option<time::PrimitiveDateTime>,
        Option<time::PrimitiveDateTime>,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        Option<i32>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<time::PrimitiveDateTime>,
    );
    let rows: Vec<Record> = sqlx::query_as(
        "SELECT tenant_id, internal_name, status, session_start_time, session_end_time, \
                total_session_duration, current_viewers, peak_viewers, total_connections, \
                bandwidth_in, bandwidth_out, upbytes, downbytes, last_updated \
         FROM stream_analytics WHERE last_updated IS NOT NULL",
    )
    .fetch_all(&pool)
    .await
    .expect("select");
    pool.close().await;
    let us = |t: Option<time::PrimitiveDateTime>| {
        t.map(|t| (t.assume_utc().unix_timestamp_nanos() / 1_000) as i64)
    };
    rows.into_iter()
        .map(|r| {
            (
                (r.0.to_string(), r.1),
                Row {
                    status: r.2,
                    session_start_time: us(r.3),
                    session_end_time: us(r.4),
                    total_session_duration: r.5.unwrap_or(0).into(),
                    current_viewers: r.6.unwrap_or(0).into(),
                    peak_viewers: r.7.unwrap_or(0).into(),
                    total_connections: r.8.unwrap_or(0).into(),
                    bandwidth_in: r.9.unwrap_or(0),
                    bandwidth_out: r.10.unwrap_or(0),
                    upbytes: r.11.unwrap_or(0),
                    downbytes: r.12.unwrap_or(0),
                    last_updated: us(r.13),
                },
            )
        })
        .collect()
}

/// A topic of `events` generated events keyed by stream, ClickHouse and PostgreSQL databases
/// migrated, and the environment of a worker on them.
pub struct Setup {
    pub topic: String,
    pub partitions: i32,
    pub events: usize,
    pub group: String,
    pub pg_url: String,
    pub env: Vec<(String, String)>,
    pub config: std::path::PathBuf,
    /// The HTTP URL the tables are read through (a cluster node, or the single server).
    pub clickhouse_url: String,
    /// On the cluster: the native address of that node (for `remote()` from the single
    /// server).
    pub remote: Option<String>,
}

/// The environment variables that put a worker on the cluster (dropped for a clean run).
const CLUSTER_KEYS: [&str; 4] = [
    "CLICKHOUSE_HOST",
    "CLICKHOUSE_CLUSTER",
    "CLICKHOUSE_LAYOUT",
    "CLICKHOUSE_NODES",
];

impl Setup {
    /// Generates the events first, or at `rate` per second in the background (`rate` > 0:
    /// the returned child produces them).
    pub async fn new(
        events: usize,
        partitions: i32,
        session_ms: u32,
        pipeline: &str,
        rate: u64,
    ) -> (Setup, Option<std::process::Child>) {
        Self::republishing(events, partitions, session_ms, pipeline, rate, 0).await
    }

    /// As [`Setup::new`], with about `permille` in a thousand events published a second time
    /// later in the stream (`generate --republish-permille`): `events` counts every record.
    pub async fn republishing(
        events: usize,
        partitions: i32,
        session_ms: u32,
        pipeline: &str,
        rate: u64,
        permille: u32,
    ) -> (Setup, Option<std::process::Child>) {
        Self::build(
            events, partitions, session_ms, pipeline, rate, permille, false,
        )
        .await
    }

    /// As [`Setup::republishing`], the ClickHouse tables on the four-node cluster of
    /// `scripts/services.sh up cluster` in the sharded layout, written and read through
    /// node 1.
    pub async fn on_cluster(
        events: usize,
        partitions: i32,
        session_ms: u32,
        pipeline: &str,
        rate: u64,
        permille: u32,
    ) -> (Setup, Option<std::process::Child>) {
        Self::build(
            events, partitions, session_ms, pipeline, rate, permille, true,
        )
        .await
    }

    async fn build(
        events: usize,
        partitions: i32,
        session_ms: u32,
        pipeline: &str,
        rate: u64,
        permille: u32,
        cluster: bool,
    ) -> (Setup, Option<std::process::Child>) {
        let topic = unique("sa_run");
        create_topic(&topic, partitions).await;
        let pg_url = create_pg_database("sluice_sa").await;
        let group = unique("sa_group");
        let env = vec![
            ("KAFKA_TOPICS".to_owned(), topic.clone()),
            ("KAFKA_GROUP_ID".to_owned(), group.clone()),
            ("CLICKHOUSE_DB".to_owned(), unique("sa_db")),
            ("DATABASE_URL".to_owned(), pg_url.clone()),
        ];
        let mut env = env;
        let (clickhouse_url, remote) = if cluster {
            let nodes = super::CLUSTER_NODES.map(|(http, _)| format!("http://127.0.0.1:{http}"));
            for (k, v) in CLUSTER_KEYS.iter().zip([
                nodes[0].clone(),
                super::CLUSTER.to_owned(),
                "sharded".to_owned(),
                nodes.join(","),
            ]) {
                env.push(((*k).to_owned(), v));
            }
            (
                nodes[0].clone(),
                Some(format!("127.0.0.1:{}", super::CLUSTER_NODES[0].1)),
            )
        } else {
            (super::clickhouse_url(), None)
        };
        let config = config_path("sluice_sa");
        // Live runs end with their last usage windows open: close them after 5 s of quiet
        // rather than the default 150 s, so the tail is committed soon.
        let pipeline = format!("{pipeline}\n[frameworks]\nusage_max_open_secs = 5");
        write_config(&config, session_ms, "", &pipeline);
        assert_ok("migrate", &sluice(&config, &as_refs(&env), &["migrate"]));
        let (events_s, partitions_s, rate_s, permille_s) = (
            events.to_string(),
            partitions.to_string(),
            rate.to_string(),
            permille.to_string(),
        );
        let args = [
            "generate",
            "--events",
            &events_s,
            "--partitions",
            &partitions_s,
            "--topic",
            &topic,
            "--key-by-stream",
            "--seed",
            "5",
            "--rate",
            &rate_s,
            "--republish-permille",
            &permille_s,
        ];
        let producer = if rate == 0 {
            assert_ok("generate", &sluice(&config, &as_refs(&env), &args));
            None
        } else {
            let child = command(&config, &as_refs(&env), &args, "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("generate");
            Some(child)
        };
        let copies = sluice_schemas::sample::republished(5, events as u64, permille).len();
        let setup = Setup {
            topic,
            partitions,
            events: events + copies,
            group,
            pg_url,
            env,
            config,
            clickhouse_url,
            remote,
        };
        (setup, producer)
    }

    pub fn drain(&self) {
        let out = sluice(&self.config, &as_refs(&self.env), &["run", "--drain"]);
        assert_ok("run --drain", &out);
    }

    pub fn db(&self) -> &str {
        &self.env[2].1
    }

    /// A client of this run's ClickHouse database (through a cluster node when on one).
    pub fn clickhouse(&self) -> clickhouse::Client {
        super::clickhouse_at(&self.clickhouse_url, self.db())
    }

    /// Rows in all this run's tables.
    pub async fn rows(&self) -> u64 {
        super::total_rows_at(&self.clickhouse_url, self.db()).await
    }

    pub async fn assert_exact(&self) {
        let (want, want_usage) = reference(&self.topic, self.partitions, self.events);
        let got = stored(&self.pg_url).await;
        assert_eq!(got.len(), want.len(), "streams");
        for (k, w) in &want {
            assert_eq!(got.get(k), Some(w), "stream {k:?}");
        }
        let usage: Vec<(String, String, f64)> = self
            .clickhouse()
            .query(
                "SELECT toString(tenant_id), usage_type, sum(usage_value) FROM usage_records \
                 GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .fetch_all()
            .await
            .expect("usage");
        let got_usage: Usage = usage.into_iter().map(|(t, u, v)| ((t, u), v)).collect();
        assert_eq!(got_usage, want_usage, "usage_records sums");
        let odd: u64 = self
            .clickhouse()
            .query(
                "SELECT count() FROM usage_records WHERE billing_month != toStartOfMonth(timestamp) \
                 OR cluster_id != 'default' OR toSecond(timestamp) != 0",
            )
            .fetch_one()
            .await
            .expect("usage columns");
        assert_eq!(odd, 0, "billing_month, cluster_id and minute windows");
        let committed: i64 = committed_offsets(&self.group, &self.topic, self.partitions)
            .values()
            .sum();
        assert_eq!(committed, self.events as i64, "committed to the end");
    }

    /// Waits (up to 3 minutes) until the group has committed every event, calling `each`
    /// between looks (to sample the worker meanwhile).
    pub async fn wait_committed(&self, mut each: impl FnMut()) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            let committed: i64 = committed_offsets(&self.group, &self.topic, self.partitions)
                .values()
                .sum();
            if committed == self.events as i64 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "committed {committed} of {}",
                self.events
            );
            each();
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// Drains the same records with one fresh worker into fresh databases (the clean run);
    /// prints the rows of every table that differs from this run's, and returns how long the
    /// clean run took and both runs' (table, rows, digest).
    pub async fn compare_with_clean_run(&self) -> super::TableComparison {
        let reference_pg = create_pg_database("sluice_ref").await;
        // The clean run is on the single server.
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| !CLUSTER_KEYS.contains(&k.as_str()))
            .cloned()
            .collect();
        env[1].1 = unique("ref_group");
        env[2].1 = unique("ref_db");
        env[3].1 = reference_pg.clone();
        assert_ok(
            "migrate",
            &sluice(&self.config, &as_refs(&env), &["migrate"]),
        );
        let t = std::time::Instant::now();
        assert_ok(
            "clean run",
            &sluice(&self.config, &as_refs(&env), &["run", "--drain"]),
        );
        let clean_run = t.elapsed();
        let got = super::table_digests_at(&self.clickhouse_url, self.db()).await;
        let want = super::table_digests(&env[2].1).await;
        for ((table, _, a), (_, _, b)) in got.iter().zip(&want) {
            if a != b {
                eprintln!("{table}: rows counted differently (here, in the clean run):");
                for (n, m, row) in
                    super::table_diff(self.db(), &env[2].1, table, self.remote.as_deref()).await
                {
                    eprintln!("  {n} {m} {row}");
                }
            }
        }
        drop_pg_database(&reference_pg).await;
        super::TableComparison {
            clean_run,
            got,
            want,
            clean_db: env[2].1.clone(),
        }
    }

    pub async fn finish(self) {
        drop_pg_database(&self.pg_url).await;
        if self.remote.is_some() {
            for (http, _) in super::CLUSTER_NODES {
                let _ = super::clickhouse_at(&format!("http://127.0.0.1:{http}"), "default")
                    .query(&format!("DROP DATABASE IF EXISTS `{}` SYNC", self.db()))
                    .execute()
                    .await;
            }
        }
        let _ = std::fs::remove_file(&self.config);
    }
}
