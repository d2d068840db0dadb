//! PostgreSQL stopped for 30 s under a running worker (its own test binary, so no other test
//! uses PostgreSQL meanwhile): the worker retries with `/ready` false, holds its memory
//! bounded (backpressure stops fetching), catches up once the server is back, and ends with
//! `stream_analytics` exactly equal to the reference.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::analytics::Setup;
use common::{as_refs, command, sigterm, total_rows};
use sluice_testkit::{http_get, rss_of};

fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("services.sh");
    assert!(
        out.status.success(),
        "services.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts PostgreSQL again even when the test fails half-way.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        services(&["up", "postgres"]);
    }
}

#[tokio::test]
async fn postgres_down_for_30_s_then_exact() {
    // 1,000 events/s for 60 s; PostgreSQL goes away for 30 s in the middle.
    let (s, producer) = Setup::new(
        60_000,
        4,
        6000,
        "batch_linger_ms = 200\nmax_backoff_ms = 2000",
        1_000,
    )
    .await;
    let mut producer = producer.expect("background producer");
    let port = 20_000 + (std::process::id() % 10_000) as u16;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut env = as_refs(&s.env);
    let port_s = port.to_string();
    env.push(("HEALTH_PORT", &port_s));
    let mut worker = command(&s.config, &env, &["run"], "warn")
        .env("ENABLE_HEALTH_ENDPOINT", "true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("worker");
    let pid = worker.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while total_rows(s.db()).await == 0 {
        assert!(Instant::now() < deadline, "the worker writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let baseline_rss = rss_of(&pid);

    let restart = Restart;
    services(&["down", "postgres"]);
    let stopped = Instant::now();
    let (mut not_ready, mut peak_rss) = (false, 0u64);
    while stopped.elapsed() < Duration::from_secs(30) {
        let (status, body) = http_get(addr, "/ready").await;
        if status != 200 {
            not_ready = true;
            assert!(
                body.contains("stream_analytics"),
                "names the failing sink: {body}"
            );
        }
        peak_rss = peak_rss.max(rss_of(&pid));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(restart);
    assert!(not_ready, "/ready turned false while PostgreSQL was down");
    assert!(
        worker.try_wait().expect("status").is_none(),
        "the worker rode the outage out"
    );

    assert!(producer.wait().expect("generate").success());
    s.wait_committed(|| peak_rss = peak_rss.max(rss_of(&pid)))
        .await;
    let (status, _) = http_get(addr, "/ready").await;
    assert_eq!(status, 200, "ready again");
    sigterm(worker.id());
    assert!(worker.wait().expect("reap").success());
    eprintln!(
        "RSS: {} MiB before the outage, peak {} MiB",
        baseline_rss >> 20,
        peak_rss >> 20
    );
    assert!(peak_rss < 256 << 20, "RSS stayed under 256 MiB: {peak_rss}");
    s.assert_exact().await;
    s.finish().await;
}
