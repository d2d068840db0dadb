//! `sluice run` with PostgreSQL reduction, as processes against the real broker, ClickHouse
//! and PostgreSQL: `stream_analytics` equals a reference computed here, independently, from
//! the records themselves by the contract's rules — after a clean drain, after a run killed
//! (SIGKILL) ten times, and with two workers rebalancing.
//!
//! Records are keyed by stream (`generate --key-by-stream`): the contract's rules depend on
//! event order, which Kafka defines only within a partition.

mod common;

use std::time::{Duration, Instant};

use common::analytics::Setup;
use common::{
    as_refs, assert_each_kill_replayed, command, config_path, five_minute_digest, sigterm,
    total_rows,
};
use sluice_testkit::kill_while_writing;

#[tokio::test]
async fn a_drained_stream_equals_the_reference() {
    let (s, _) = Setup::new(200_000, 4, 6000, "batch_linger_ms = 200", 0).await;
    let started = Instant::now();
    s.drain();
    eprintln!(
        "200,000 events drained in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    s.assert_exact().await;
    s.finish().await;
}

#[tokio::test]
async fn ten_sigkills_with_republished_records_leave_every_table_exact() {
    // Events arrive at 400/s for about 120 s, 9% of them published a second time later in the
    // stream (a producer's retry: same bytes, new offset), while the worker is killed ten
    // times at random moments, each time a few hundred milliseconds after it started writing
    // again. A round (start, group join, first write, up to 1.5 s more) took about 9 s on a
    // slow machine: production must outlast ten of them, or a late round finds nothing left
    // to write. Batches are cut across partitions (the default).
    let (s, producer) = Setup::republishing(
        48_000,
        4,
        3000,
        "batch_linger_ms = 100\nbatch_max_rows = 2000",
        400,
        90,
    )
    .await;
    let mut producer = producer.expect("background producer");
    let env = as_refs(&s.env);
    let mut seed = 0x2545_F491_u64;
    let mut logs = Vec::new();
    for round in 0..10 {
        let worker = command(&s.config, &env, &["run"], "info");
        let log = kill_while_writing(
            worker,
            round,
            &mut seed,
            Duration::from_millis(1500),
            || total_rows(s.db()),
        )
        .await;
        eprintln!(
            "round {round}: killed with {} rows in ClickHouse",
            total_rows(s.db()).await
        );
        logs.push(log);
    }
    assert!(producer.wait().expect("generate").success());
    let out = command(&s.config, &env, &["run", "--drain"], "info")
        .output()
        .expect("drain");
    let drain_log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "drain: {drain_log}");
    assert_each_kill_replayed(&logs, drain_log);
    s.assert_exact().await;
    let tables = s.compare_with_clean_run().await;
    assert_eq!(
        tables.got, tables.want,
        "every table equals a clean run of the same records, copies included"
    );
    assert_eq!(
        five_minute_digest(s.db()).await,
        five_minute_digest(&tables.clean_db).await,
        "viewer_metrics_5m"
    );
    for l in logs {
        let _ = std::fs::remove_file(l);
    }
    s.finish().await;
}

#[tokio::test]
async fn two_workers_rebalancing_leave_the_exact_state() {
    // Events arrive at 2,500/s for 32 s; a second member joins while the first is busy (at
    // 4,000/s the join once came after the last event, on a loaded machine).
    let (s, producer) = Setup::new(
        80_000,
        6,
        6000,
        "batch_linger_ms = 100\nbatch_max_rows = 5000",
        2_500,
    )
    .await;
    let mut producer = producer.expect("background producer");
    let env = as_refs(&s.env);
    let logs: Vec<std::path::PathBuf> = (0..2).map(|_| config_path("sa_worker_log")).collect();
    let start = |log: &std::path::Path| {
        command(&s.config, &env, &["run"], "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("worker")
    };
    let mut first = start(&logs[0]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while total_rows(s.db()).await == 0 {
        assert!(Instant::now() < deadline, "the first worker writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut second = start(&logs[1]);
    let log = |i: usize| std::fs::read_to_string(&logs[i]).unwrap_or_default();
    while !sluice_testkit::owned_partitions(&log(1)) {
        assert!(
            producer.try_wait().expect("producer").is_none(),
            "the second worker was given partitions while events still arrived: {}",
            log(1)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(producer.wait().expect("generate").success());
    s.wait_committed(|| {}).await;
    for w in [&mut first, &mut second] {
        sigterm(w.id());
        let status = sluice_testkit::exit_within(w, Duration::from_secs(120), "the worker");
        assert!(status.success(), "worker stopped cleanly: {status}");
    }
    assert!(
        log(0).contains("partitions revoked"),
        "the first worker gave partitions up"
    );
    assert!(
        log(1).contains("claimed partition for state reduction"),
        "the second worker reduced partitions of its own"
    );
    s.assert_exact().await;
    for l in logs {
        let _ = std::fs::remove_file(l);
    }
    s.finish().await;
}
