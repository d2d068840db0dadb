//! Scale-out by consumer group, with the real services (ignored by default: run it through
//! `scripts/scale-test.sh`, which builds in release mode). Three workers in one group drain a
//! 12-partition topic of `SCALE_EVENTS` events (default 2,000,000); one is SIGKILLed a third of
//! the way through and a fourth joins. At the end every ClickHouse table equals a clean
//! single-worker run of the same records, `stream_analytics` and the usage sums are exact, and
//! the group's offsets are committed to the end. Prints each worker's and the total throughput
//! and the pauses (no worker fetching a record for a second or more) it observed.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::analytics::Setup;
use common::{as_refs, command, sigterm};
use sluice_testkit::{committed_offsets, try_http_get, unique};

const PARTITIONS: i32 = 12;

struct Worker {
    name: String,
    child: Child,
    health: SocketAddr,
    started: Instant,
    /// Records fetched, as last read from `/metrics`.
    fetched: u64,
    /// When the worker ended (killed or stopped).
    ended: Option<Instant>,
}

impl Worker {
    fn start(s: &Setup, name: &str, log_dir: &std::path::Path) -> Self {
        let health = sluice_testkit::net::free_addr();
        let port = health.port().to_string();
        let mut env = as_refs(&s.env);
        env.push(("HEALTH_PORT", &port));
        let log = std::fs::File::create(log_dir.join(format!("{name}.log"))).expect("log");
        let child = command(&s.config, &env, &["run"], "info")
            .env("ENABLE_HEALTH_ENDPOINT", "true")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("worker");
        Worker {
            name: name.into(),
            child,
            health,
            started: Instant::now(),
            fetched: 0,
            ended: None,
        }
    }

    /// Reads the records fetched so far; false once the worker cannot be reached.
    async fn poll(&mut self) -> bool {
        let Some((200, metrics)) = try_http_get(self.health, "/metrics").await else {
            return false;
        };
        self.fetched = metrics
            .lines()
            .filter(|l| l.starts_with("sluice_source_records_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
        true
    }

    fn rate(&self) -> f64 {
        let end = self.ended.unwrap_or_else(Instant::now);
        self.fetched as f64 / end.duration_since(self.started).as_secs_f64()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run by scripts/scale-test.sh"]
async fn workers_scale_out_by_consumer_group_and_survive_a_kill() {
    let events: usize = std::env::var("SCALE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let t = Instant::now();
    let (s, _) = Setup::new(events, PARTITIONS, 6000, "batch_linger_ms = 500", 0).await;
    eprintln!(
        "scale: {events} events in {PARTITIONS} partitions generated in {:.0?}",
        t.elapsed()
    );
    let logs = std::env::temp_dir().join(unique("scale_logs"));
    std::fs::create_dir_all(&logs).expect("log dir");

    let begun = Instant::now();
    let mut workers: Vec<Worker> = (1..=3)
        .map(|i| Worker::start(&s, &format!("worker-{i}"), &logs))
        .collect();
    let (mut killed, mut joined) = (false, false);
    let mut last_progress = Instant::now();
    let mut last_total = 0u64;
    let mut pauses: Vec<(Duration, Duration)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        assert!(Instant::now() < deadline, "the group drained the topic");
        let committed: i64 = committed_offsets(&s.group, &s.topic, PARTITIONS)
            .values()
            .sum();
        if committed == events as i64 {
            break;
        }
        let mut total = 0;
        for w in workers.iter_mut().filter(|w| w.ended.is_none()) {
            w.poll().await;
            total += w.fetched;
        }
        total += workers
            .iter()
            .filter(|w| w.ended.is_some())
            .map(|w| w.fetched)
            .sum::<u64>();
        if total > last_total {
            let idle = last_progress.elapsed();
            if idle >= Duration::from_secs(1) {
                pauses.push((last_progress.duration_since(begun), idle));
            }
            last_total = total;
            last_progress = Instant::now();
        }
        // A third of the way: SIGKILL one worker, then a fourth joins.
        if !killed && committed * 3 >= events as i64 {
            let w = &mut workers[1];
            w.child.kill().expect("SIGKILL");
            w.child.wait().expect("reap");
            w.ended = Some(Instant::now());
            eprintln!(
                "scale: {} SIGKILLed at {:.1?} ({committed} committed)",
                w.name,
                begun.elapsed()
            );
            killed = true;
        }
        if killed && !joined {
            workers.push(Worker::start(&s, "worker-4", &logs));
            eprintln!("scale: worker-4 joined at {:.1?}", begun.elapsed());
            joined = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained = begun.elapsed();
    for w in workers.iter_mut().filter(|w| w.ended.is_none()) {
        w.poll().await;
        w.ended = Some(Instant::now());
        sigterm(w.child.id());
    }
    for w in workers.iter_mut() {
        let status = sluice_testkit::exit_within(&mut w.child, Duration::from_secs(120), &w.name);
        if w.name != "worker-2" {
            assert!(status.success(), "{} stopped cleanly", w.name);
        }
    }
    for w in &workers {
        eprintln!(
            "scale: {:<9} fetched {:>9} records in {:>6.1?}: {:>8.0} records/s",
            w.name,
            w.fetched,
            w.ended.expect("ended").duration_since(w.started),
            w.rate()
        );
    }
    eprintln!(
        "scale: total {events} events committed in {drained:.1?}: {:.0} events/s",
        events as f64 / drained.as_secs_f64()
    );
    for (at, idle) in &pauses {
        eprintln!("scale: no worker fetched a record for {idle:.1?} from {at:.1?}");
    }

    // Exactness: stream_analytics and usage against the independent reference, and every
    // ClickHouse table against a clean single-worker run of the same records.
    s.assert_exact().await;
    let cmp = s.compare_with_clean_run().await;
    eprintln!(
        "scale: one worker alone drained the same records in {:.1?}",
        cmp.clean_run
    );
    for ((table, n, _), (_, m, _)) in cmp.got.iter().zip(&cmp.want) {
        eprintln!("scale: {table:<22} {n:>9} rows (clean run {m})");
    }
    let (got, want) = (cmp.got, cmp.want);
    assert_eq!(
        got, want,
        "every table holds each event once, as a clean run does"
    );
    s.finish().await;
}
