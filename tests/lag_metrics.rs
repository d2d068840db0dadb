//! `/metrics` of a live worker on a quiet topic: every assigned partition has its committed
//! offset and consumer lag from the assignment on, before the first commit (open usage windows
//! hold the commit back), and the records those windows hold back are shown per partition.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{
    as_refs, assert_ok, command, config_path, end_offsets, generate, sluice, total_rows,
    write_config,
};
use sluice_testkit::{committed_offsets, create_topic, http_get, unique};

/// The value of every sample of `name` per partition label.
fn gauge(metrics: &str, name: &str) -> BTreeMap<i32, f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| {
            let partition = l
                .split("partition=\"")
                .nth(1)?
                .split('"')
                .next()?
                .parse()
                .ok()?;
            let value = l.rsplit(' ').next()?.parse().ok()?;
            Some((partition, value))
        })
        .collect()
}

#[tokio::test]
async fn lag_and_committed_offsets_show_from_assignment_on_while_windows_hold_the_commit() {
    let partitions = 4;
    let topic = unique("lag");
    create_topic(&topic, partitions).await;
    let (group, db) = (unique("lag_group"), unique("lag_db"));
    let port = sluice_testkit::net::free_addr().port();
    let env = vec![
        ("KAFKA_TOPICS".to_owned(), topic.clone()),
        ("KAFKA_GROUP_ID".to_owned(), group.clone()),
        ("CLICKHOUSE_DB".to_owned(), db.clone()),
    ];
    let config = config_path("sluice_lag");
    // Usage windows stay open (the default 150 s wall-clock bound): nothing is committed
    // while the test looks.
    write_config(&config, 6000, "", "batch_linger_ms = 100");
    assert_ok("migrate", &sluice(&config, &as_refs(&env), &["migrate"]));
    generate(&config, &as_refs(&env), &topic, 1900, partitions, 9);
    let mut worker = command(&config, &as_refs(&env), &["run"], "warn")
        .env("ENABLE_HEALTH_ENDPOINT", "true")
        .env("HEALTH_PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("worker");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // Every event-table row visible: the stream is processed, and quiet from here on.
    let deadline = Instant::now() + Duration::from_secs(90);
    let reference = 1900;
    let mut last = 0;
    loop {
        let rows = total_rows(&db).await;
        if rows >= reference && rows == last {
            break;
        }
        last = rows;
        assert!(Instant::now() < deadline, "the worker writes ({rows} rows)");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The gauges are set on the commit tick (every second): wait for one with every
    // partition (a single read right after the rows showed up once found none yet).
    let every = (0..partitions).collect::<Vec<_>>();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (metrics, lag, committed) = loop {
        let (status, metrics) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        let lag = gauge(&metrics, "sluice_consumer_lag");
        let committed = gauge(&metrics, "sluice_committed_offset");
        let all = |g: &BTreeMap<i32, f64>| g.keys().copied().collect::<Vec<_>>() == every;
        if (all(&lag) && all(&committed)) || Instant::now() > deadline {
            break (metrics, lag, committed);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let held = gauge(&metrics, "sluice_window_held_records");
    worker.kill().expect("stop");
    worker.wait().expect("reap");

    let group_committed = committed_offsets(&group, &topic, partitions);
    let ends = end_offsets(&topic, partitions, 1900);
    assert_eq!(ends.values().sum::<i64>(), 1900);
    assert_eq!(
        lag.keys().copied().collect::<Vec<_>>(),
        (0..partitions).collect::<Vec<_>>(),
        "lag for every partition: {metrics}"
    );
    assert_eq!(
        committed.keys().copied().collect::<Vec<_>>(),
        (0..partitions).collect::<Vec<_>>(),
        "a committed offset for every partition: {metrics}"
    );
    for p in 0..partitions {
        // Where the group stands: its commit, or the start of the partition before any.
        let at = group_committed
            .get(&p)
            .copied()
            .filter(|&o| o >= 0)
            .unwrap_or(0);
        assert_eq!(committed[&p], at as f64, "partition {p}: committed offset");
        assert_eq!(lag[&p], (ends[&p] - at) as f64, "partition {p}: lag");
        assert!(
            held.get(&p).is_some_and(|&h| h > 0.0 && h <= lag[&p]),
            "partition {p}: records held back by open windows ({:?}) explain the lag {}",
            held.get(&p),
            lag[&p]
        );
    }
    let _ = std::fs::remove_file(&config);
}
