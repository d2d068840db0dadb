//! FrameWorks on the four-node ClickHouse cluster of `scripts/services.sh up cluster` (2 shards
//! x 2 replicas) in the sharded layout (`migrate --cluster sluice_cluster --layout sharded`),
//! written and read through node 1's Distributed tables:
//!
//! - the contract run equals a single-server run of the same records, table by table, and
//!   `viewer_metrics_5m` merges states from both shards;
//! - five SIGKILLs under steady production, each on a worker that owns partitions and writes,
//!   leave the tables exact;
//! - one replica (node 4) stopped for 30 s mid-run: the worker retries with `/ready` naming
//!   ClickHouse, a worker SIGKILLed during the outage is replaced, and afterwards the tables
//!   are exact with nothing doubled on the replica that stayed up.
//!
//! Every run also checks that both replicas of each shard hold the same rows. Runs only when
//! `SLUICE_CLUSTER=up`; its tests run one at a time (they share the cluster, and one stops a
//! node).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::analytics::Setup;
use common::{
    CLUSTER_NODES, TABLES, as_refs, assert_each_kill_replayed, assert_ok, clickhouse_at,
    cluster_up, command, five_minute_digest, five_minute_digest_at, sigterm, sluice,
};
use sluice_testkit::{kill_while_writing, owned_partitions, services, try_http_get};

/// One test at a time: they share the cluster, and the outage test stops a node.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn node_url(i: usize) -> String {
    format!("http://127.0.0.1:{}", CLUSTER_NODES[i].0)
}

/// Asserts that both replicas of each shard hold the same rows in every table (what a replay
/// replica by replica must leave: nothing doubled on one, nothing missing on the other), and
/// the same merged five-minute states (their parts merge at different times on each replica,
/// so the states are compared merged).
async fn assert_replicas_agree(db: &str) {
    let merged_states = "SELECT count(), sum(cityHash64(timestamp_5m, tenant_id, internal_name, node_id, \
         p, round(a, 3), c, t, round(q, 3), round(b, 3))) FROM (SELECT timestamp_5m, tenant_id, \
         internal_name, node_id, maxMerge(peak_viewers_state) AS p, avgMerge(avg_viewers_state) AS a, \
         uniqMerge(unique_countries_state) AS c, uniqMerge(unique_cities_state) AS t, \
         avgMerge(avg_quality_state) AS q, avgMerge(avg_buffer_health_state) AS b \
         FROM viewer_metrics_5m_states_local GROUP BY ALL)"
        .to_owned();
    let queries = TABLES
        .iter()
        .map(|t| {
            (
                t.to_string(),
                format!("SELECT count(), sum(cityHash64(formatRow('TSV', *))) FROM {t}_local"),
            )
        })
        .chain([("viewer_metrics_5m_states".to_owned(), merged_states)]);
    for (table, query) in queries {
        let mut digests = Vec::new();
        for i in 0..CLUSTER_NODES.len() {
            let d: (u64, u64) = clickhouse_at(&node_url(i), db)
                .query(&query)
                .fetch_one()
                .await
                .expect("replica digest");
            digests.push(d);
        }
        assert_eq!(digests[0], digests[1], "{table}: shard 1's replicas agree");
        assert_eq!(digests[2], digests[3], "{table}: shard 2's replicas agree");
    }
}

/// The tables equal a single-server run of the same records, `stream_analytics` and usage
/// are exact, `viewer_metrics_5m` equals the single server's, and the replicas agree.
async fn assert_exact_on_cluster(s: &Setup) {
    s.assert_exact().await;
    let tables = s.compare_with_clean_run().await;
    assert_eq!(
        tables.got, tables.want,
        "every table, read through Distributed, equals a single-server run"
    );
    assert_eq!(
        five_minute_digest_at(&s.clickhouse_url, s.db()).await,
        five_minute_digest(&tables.clean_db).await,
        "viewer_metrics_5m"
    );
    assert_replicas_agree(s.db()).await;
}

#[tokio::test]
async fn the_contract_run_on_the_cluster_equals_a_single_server_run() {
    if !cluster_up() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let (s, _) = Setup::on_cluster(30_000, 4, 3000, "batch_linger_ms = 200", 0, 20).await;
    s.drain();
    assert_exact_on_cluster(&s).await;

    // The 5-minute states of many keys are split across the shards, and the view merges them.
    let split: u64 = s
        .clickhouse()
        .query(
            "SELECT count() FROM (SELECT timestamp_5m, tenant_id, internal_name, node_id \
             FROM viewer_metrics_5m_states GROUP BY ALL HAVING uniqExact(_shard_num) = 2)",
        )
        .fetch_one()
        .await
        .expect("states per shard");
    assert!(
        split > 10,
        "{split} five-minute keys have states on both shards"
    );

    // `migrate` again applies nothing, on every node.
    let again = sluice(&s.config, &as_refs(&s.env), &["migrate"]);
    assert_ok("migrate again", &again);
    let report = String::from_utf8_lossy(&again.stdout);
    for (http, native) in CLUSTER_NODES {
        let of_node: Vec<&str> = report
            .lines()
            .filter(|l| l.contains(&format!("127.0.0.1:{native}")))
            .filter(|l| l.contains(&format!(":{http}")))
            .collect();
        assert!(
            of_node.len() >= 3 && of_node.iter().any(|l| l.contains("already applied")),
            "node {http}: {report}"
        );
        assert!(
            !of_node.iter().any(|l| l.contains(" applied (")),
            "nothing applied again on node {http}: {report}"
        );
    }

    // A node list that leaves a replica out is refused, naming the key and the replica.
    let mut env = s.env.clone();
    for (k, v) in env.iter_mut() {
        if k == "CLICKHOUSE_NODES" {
            *v = (0..3).map(node_url).collect::<Vec<_>>().join(",");
        }
    }
    let refused = sluice(&s.config, &as_refs(&env), &["migrate"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("clickhouse.nodes (CLICKHOUSE_NODES)")
            && err.contains("shard 2 replica 2 (127.0.0.1:9204)"),
        "{err}"
    );
    s.finish().await;
}

#[tokio::test]
async fn five_sigkills_under_production_leave_the_cluster_exact() {
    if !cluster_up() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let (s, producer) = Setup::on_cluster(
        20_000,
        4,
        3000,
        "batch_linger_ms = 100\nbatch_max_rows = 2000",
        400,
        10,
    )
    .await;
    let mut producer = producer.expect("background producer");
    let env = as_refs(&s.env);
    let mut seed = 0x2545_f491_u64;
    let mut logs = Vec::new();
    for round in 0..5 {
        let worker = command(&s.config, &env, &["run"], "info");
        logs.push(
            kill_while_writing(
                worker,
                round,
                &mut seed,
                Duration::from_millis(1500),
                || s.rows(),
            )
            .await,
        );
    }
    assert!(producer.wait().expect("generate").success());
    let out = command(&s.config, &env, &["run", "--drain"], "info")
        .output()
        .expect("drain");
    let drain_log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "drain: {drain_log}");
    assert_each_kill_replayed(&logs, drain_log);
    assert_exact_on_cluster(&s).await;
    for l in logs {
        let _ = std::fs::remove_file(l);
    }
    s.finish().await;
}

/// Starts every node again even when the test fails half-way.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        services(&["up", "cluster"]);
    }
}

/// A worker with its health endpoint on a free port and its log (info) in a file.
fn spawn_with_health(s: &Setup) -> (std::process::Child, SocketAddr, std::path::PathBuf) {
    let port = sluice_testkit::net::free_addr().port();
    let log = std::env::temp_dir().join(format!("{}.log", sluice_testkit::unique("cluster_w")));
    let mut env = as_refs(&s.env);
    let port_s = port.to_string();
    env.push(("HEALTH_PORT", &port_s));
    let child = command(&s.config, &env, &["run"], "info")
        .env("ENABLE_HEALTH_ENDPOINT", "true")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("worker");
    (child, SocketAddr::from(([127, 0, 0, 1], port)), log)
}

/// The sum of the Prometheus counter `name` over its series whose labels include `label`.
fn counted(metrics: &str, name: &str, label: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn log_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A replica stopped while it writes an insert can keep the table's part without its views'
/// (`viewer_metrics_5m`, the landing); the replacement worker rebuilds the batches the killed
/// one had in flight and inserts them whole again, which fills those views
/// (`clickhouse_frameworks::a_rebuilt_batch_fills_the_views_one_replica_missed` makes that
/// state on purpose; here it happens when the timing falls so).
#[tokio::test]
async fn a_replica_down_for_30_s_leaves_the_cluster_exact() {
    if !cluster_up() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let _restart = Restart;
    let (s, producer) = Setup::on_cluster(
        16_000,
        4,
        3000,
        "batch_linger_ms = 100\nbatch_max_rows = 2000\nmax_backoff_ms = 1000",
        400,
        10,
    )
    .await;
    let mut producer = producer.expect("background producer");

    // The first worker owns partitions and writes.
    let (mut first, health, first_log) = spawn_with_health(&s);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !owned_partitions(&log_of(&first_log)) || s.rows().await == 0 {
        assert!(Instant::now() < deadline, "the first worker writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Node 4 (shard 2, replica 2) stops.
    services(&["down", "cluster-4"]);
    let down = Instant::now();
    let mut named = None;
    while down.elapsed() < Duration::from_secs(12) {
        if let Some((status, body)) = try_http_get(health, "/ready").await
            && status != 200
            && body.contains("clickhouse")
            && body.contains("9204")
        {
            named.get_or_insert(body);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let named = named.expect("/ready named ClickHouse and the node that is down");
    eprintln!("/ready while node 4 was down: {named}");

    // 12 s into the outage the worker, retrying, is SIGKILLed, and another one starts.
    let text = log_of(&first_log);
    assert!(
        owned_partitions(&text),
        "the killed worker owned partitions"
    );
    assert!(
        text.contains("failed; retrying"),
        "the worker retried the refused writes: {text}"
    );
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    let (mut second, health, second_log) = spawn_with_health(&s);
    let until_up = Duration::from_secs(30).saturating_sub(down.elapsed());
    tokio::time::sleep(until_up).await;
    services(&["up", "cluster-4"]);
    let up = Instant::now();
    while !matches!(try_http_get(health, "/ready").await, Some((200, _))) {
        assert!(
            up.elapsed() < Duration::from_secs(60),
            "ready again after node 4 came back: {}",
            log_of(&second_log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("ready {:?} after node 4 came back", up.elapsed());
    assert!(producer.wait().expect("generate").success());
    s.wait_committed(|| {}).await;
    let (_, metrics) = try_http_get(health, "/metrics")
        .await
        .expect("the second worker's metrics");
    sigterm(second.id());
    let status = sluice_testkit::exit_within(&mut second, Duration::from_secs(120), "the worker");
    assert!(status.success(), "{}", log_of(&second_log));
    let second_text = log_of(&second_log);
    let rebuilt = second_text
        .matches("rebuilt a batch cut across partitions")
        .count();
    assert_eq!(
        counted(
            &metrics,
            "sluice_batches_rebuilt_total",
            "result=\"rebuilt\""
        ),
        rebuilt as u64,
        "/metrics counts the batches the log says were rebuilt"
    );
    if second_text.contains("cutting redelivered records along recorded spans") {
        eprintln!(
            "the second worker replayed batches the killed one had recorded: {rebuilt} rebuilt, {} written span by span",
            second_text
                .matches("wrote the rows of batches that had not landed")
                .count(),
        );
    }
    let out = command(&s.config, &as_refs(&s.env), &["run", "--drain"], "warn")
        .output()
        .expect("drain");
    assert_ok("drain", &out);
    assert_exact_on_cluster(&s).await;
    let _ = std::fs::remove_file(first_log);
    let _ = std::fs::remove_file(second_log);
    s.finish().await;
}
