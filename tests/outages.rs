//! Outages during one steady run of 500,000 events (its own test binary: it crashes the shared
//! ClickHouse and PostgreSQL, so no other test may run meanwhile). In turn: ClickHouse killed
//! and restarted after 60 s, PostgreSQL killed and restarted after 30 s, the worker SIGKILLed
//! while a sink is writing and started again, and the path to the broker cut for 30 s (the
//! test runs a private broker that advertises a TCP proxy, and stops the proxy). The worker
//! rides every outage out with `/ready` false, its RSS is sampled throughout, and at the end
//! every ClickHouse table equals a clean reference run, `stream_analytics` and the usage sums
//! are exact and the offsets are committed to the end.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::analytics::Setup;
use common::{as_refs, command, sigterm, total_rows};
use sluice_testkit::net::{PrivateBroker, TcpProxy, free_addr};
use sluice_testkit::{rss_of, services, try_http_get, unique};

const EVENTS: usize = 500_000;
const RATE: u64 = 3_000;
/// The bound the README documents for default settings.
const RSS_BOUND: u64 = 256 << 20;

/// Starts ClickHouse and PostgreSQL again even when the test fails half-way.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        services(&["up", "clickhouse"]);
        services(&["up", "postgres"]);
    }
}

/// The worker under test: restarted after a SIGKILL, its RSS sampled every 200 ms.
struct Worker {
    setup_env: Vec<(String, String)>,
    config: std::path::PathBuf,
    health: SocketAddr,
    log: std::path::PathBuf,
    child: Child,
    pid: Arc<AtomicU32>,
    peak_rss: Arc<AtomicU64>,
}

impl Worker {
    fn start(s: &Setup, health: SocketAddr, log: std::path::PathBuf) -> Self {
        let child = Self::spawn(&s.env, &s.config, health, &log);
        let pid = Arc::new(AtomicU32::new(child.id()));
        let peak_rss = Arc::new(AtomicU64::new(0));
        let (p, peak) = (pid.clone(), peak_rss.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(
                    rss_of(&p.load(Ordering::Relaxed).to_string()),
                    Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Worker {
            setup_env: s.env.clone(),
            config: s.config.clone(),
            health,
            log,
            child,
            pid,
            peak_rss,
        }
    }

    fn spawn(
        env: &[(String, String)],
        config: &std::path::Path,
        health: SocketAddr,
        log: &std::path::Path,
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("worker log");
        let port = health.port().to_string();
        let mut env = as_refs(env);
        env.push(("HEALTH_PORT", &port));
        command(config, &env, &["run"], "info")
            .env("ENABLE_HEALTH_ENDPOINT", "true")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("worker")
    }

    fn assert_alive(&mut self, during: &str) {
        assert!(
            self.child.try_wait().expect("status").is_none(),
            "the worker rode out {during}; its log: {}",
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/ready` every 500 ms for `span`: whether it was ever false with a reason containing
    /// `names`.
    async fn watch_not_ready(&mut self, span: Duration, names: &str) -> bool {
        let (start, mut seen) = (Instant::now(), false);
        while start.elapsed() < span {
            if let Some((status, body)) = try_http_get(self.health, "/ready").await {
                seen |= status != 200 && body.contains(names);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        seen
    }

    async fn wait_ready(&mut self, after: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some((200, _)) = try_http_get(self.health, "/ready").await {
                return;
            }
            self.assert_alive(after);
            assert!(Instant::now() < deadline, "ready again after {after}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// SIGKILLs the worker while one of its sinks is writing (per `/metrics`); returns the
    /// stage that was writing.
    async fn kill_during_flush(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let stage = loop {
            assert!(Instant::now() < deadline, "saw a sink write in flight");
            if let Some((200, metrics)) = try_http_get(self.health, "/metrics").await
                && let Some(line) = metrics
                    .lines()
                    .find(|l| l.starts_with("sluice_sink_writes_in_flight{") && !l.ends_with(" 0"))
            {
                break line.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        };
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
        stage
    }

    fn restart(&mut self) {
        self.child = Self::spawn(&self.setup_env, &self.config, self.health, &self.log);
        self.pid.store(self.child.id(), Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_during_a_steady_run_lose_and_double_nothing() {
    let (broker_addr, proxy_addr, health) = (free_addr(), free_addr(), free_addr());
    let _broker = PrivateBroker::start(broker_addr, proxy_addr);
    let proxy = TcpProxy::start(proxy_addr, broker_addr);
    // SAFETY: set before this test starts any thread that reads the environment; every
    // client of this test (worker, generator, reference reader) goes through the proxy.
    unsafe { std::env::set_var("KAFKA_BROKERS", proxy_addr.to_string()) };

    let (s, producer) = Setup::new(
        EVENTS,
        4,
        6000,
        "batch_linger_ms = 200\nmax_backoff_ms = 2000",
        RATE,
    )
    .await;
    let mut producer = producer.expect("background producer");
    let log = std::env::temp_dir().join(format!("{}.log", unique("outage_worker")));
    let mut w = Worker::start(&s, health, log);
    let begun = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while total_rows(s.db()).await == 0 {
        assert!(Instant::now() < deadline, "the worker writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let baseline_rss = w.peak_rss.load(Ordering::Relaxed);
    let restart = Restart;
    let mut report = Vec::new();

    // 1. ClickHouse crashes; back after 60 s.
    services(&["kill", "clickhouse"]);
    let t = Instant::now();
    let saw = w.watch_not_ready(Duration::from_secs(60), "failing").await;
    services(&["up", "clickhouse"]);
    w.assert_alive("ClickHouse down for 60 s");
    assert!(saw, "/ready false while ClickHouse was down");
    w.wait_ready("ClickHouse came back").await;
    report.push(format!(
        "ClickHouse killed for 60 s: ready again {:.0?} after the kill",
        t.elapsed()
    ));

    // 2. PostgreSQL crashes; back after 30 s.
    services(&["kill", "postgres"]);
    let t = Instant::now();
    let saw = w
        .watch_not_ready(Duration::from_secs(30), "stream_analytics")
        .await;
    services(&["up", "postgres"]);
    w.assert_alive("PostgreSQL down for 30 s");
    assert!(
        saw,
        "/ready false naming stream_analytics while PostgreSQL was down"
    );
    w.wait_ready("PostgreSQL came back").await;
    report.push(format!(
        "PostgreSQL killed for 30 s: ready again {:.0?} after the kill",
        t.elapsed()
    ));
    drop(restart);

    // 3. The worker dies in the middle of a write; a new one takes over.
    let t = Instant::now();
    let stage = w.kill_during_flush().await;
    w.restart();
    w.wait_ready("the SIGKILL").await;
    report.push(format!(
        "worker SIGKILLed during a write ({stage}): new worker ready after {:.0?}",
        t.elapsed()
    ));

    // 4. The network path to the broker breaks for 30 s.
    proxy.cut();
    let t = Instant::now();
    let saw = w
        .watch_not_ready(Duration::from_secs(30), "kafka brokers")
        .await;
    proxy.restore();
    w.assert_alive("the broker path cut for 30 s");
    assert!(
        saw,
        "/ready false naming the brokers while the path was cut"
    );
    w.wait_ready("the broker path came back").await;
    report.push(format!(
        "broker path cut for 30 s: ready again {:.0?} after the cut",
        t.elapsed()
    ));

    let generated = producer.wait().expect("generate");
    assert!(generated.success(), "the generator delivered every event");
    s.wait_committed(|| ()).await;
    w.assert_alive("the run");
    sigterm(w.child.id());
    let status = sluice_testkit::exit_within(&mut w.child, Duration::from_secs(120), "the worker");
    assert!(status.success(), "clean stop");
    let log_text = w.log_text();
    assert!(
        log_text.contains("every Kafka broker is unreachable"),
        "the cut is logged"
    );
    let peak = w.peak_rss.load(Ordering::Relaxed);
    report.push(format!(
        "{EVENTS} events at {RATE}/s, all committed {:.0?} after the first row; RSS {} MiB at the start, peak {} MiB",
        begun.elapsed(),
        baseline_rss >> 20,
        peak >> 20
    ));
    for line in &report {
        eprintln!("outage: {line}");
    }
    assert!(
        peak < RSS_BOUND,
        "RSS stayed under the documented bound: {peak}"
    );

    // Exactness: stream_analytics and usage against the independent reference, and every
    // ClickHouse table against a clean run of the same records.
    s.assert_exact().await;
    let cmp = s.compare_with_clean_run().await;
    let (got, want) = (cmp.got, cmp.want);
    if got != want {
        let spans: Vec<&str> = log_text
            .lines()
            .filter(|l| l.contains("span") || l.contains("partitions"))
            .collect();
        eprintln!("worker log lines on spans:\n{}", spans.join("\n"));
    }
    assert_eq!(
        got, want,
        "every table holds each event once, as a clean run does"
    );
    s.finish().await;
}
