//! Backpressure against the real broker: with a slow sink and a million records waiting, the
//! queues never exceed their capacity, the process RSS stays bounded, and the consumer keeps
//! its partitions although the sink is slower than `max.poll.interval.ms` would allow a
//! non-polling consumer. Its own test binary, so that nothing else shares the process RSS.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sluice_pipeline::{
    BatchLimits, KafkaRecord, KafkaSource, KafkaSourceConfig, Pipeline, PipelineConfig,
};
use sluice_testkit::{CollectSink, Origin, committed_offsets, create_topic, produce, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sink_keeps_queues_and_memory_bounded() {
    const N: usize = 1_000_000;
    const P: i32 = 4;
    const CAPACITY: usize = 4;
    let topic = unique("rt_slow");
    let group = unique("rt_slow_group");
    create_topic(&topic, P).await;
    let pad = "x".repeat(90);
    produce(&topic, P, N, |i| format!("{i:08}{pad}").into_bytes());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let prometheus = sluice_pipeline::http::install_prometheus().expect("recorder");
    let baseline = sluice_testkit::rss_bytes();

    let sink = CollectSink::slow(Duration::from_millis(250));
    let pipeline = Pipeline::new(PipelineConfig {
        queue_capacity: CAPACITY,
        ..Default::default()
    });
    let handle = pipeline.handle();
    let mut cfg = KafkaSourceConfig::new(sluice_testkit::brokers(), &group, vec![topic.clone()]);
    // Shorter than the test runs: a consumer that stopped polling would lose its partitions.
    cfg.client
        .insert("max.poll.interval.ms".into(), "8000".into());
    cfg.client
        .insert("session.timeout.ms".into(), "8000".into());
    let s = sink.clone();
    pipeline
        .source("kafka", KafkaSource::new(cfg))
        .map("origin", |r: KafkaRecord| Origin {
            partition: r.partition,
            offset: r.offset,
        })
        .batch(
            "batch",
            BatchLimits {
                max_rows: 5_000,
                max_bytes: 1 << 20,
                max_linger: Duration::from_millis(100),
            },
            |_| 16,
        )
        .sink("slow-sink", move || s.clone());
    let (http_addr, server) = sluice_pipeline::http::serve(
        "127.0.0.1:0".parse().expect("addr"),
        handle.health(),
        Some(prometheus),
    )
    .await
    .expect("serve");
    let run = tokio::spawn(pipeline.run());

    let started = Instant::now();
    let (mut max_depth, mut max_rss) = (0usize, 0u64);
    while started.elapsed() < Duration::from_secs(15) {
        for (stage, depth, cap) in handle.queue_depths() {
            assert!(
                depth <= cap,
                "queue before {stage} holds {depth} > capacity {cap}"
            );
            assert_eq!(cap, CAPACITY);
            max_depth = max_depth.max(depth);
        }
        max_rss = max_rss.max(sluice_testkit::rss_bytes());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "slow sink: RSS baseline {} MiB, peak {} MiB",
        baseline >> 20,
        max_rss >> 20
    );
    assert!(
        handle.health().is_ready(),
        "still a group member with partitions after 15 s: {:?}",
        handle.health().not_ready_reasons()
    );
    let (_, metrics) = sluice_testkit::http_get(http_addr, "/metrics").await;
    let written_while_running = sink.len();
    handle.shutdown();
    run.await.expect("join").expect("pipeline ok");
    for line in [
        "sluice_queue_depth{stage=\"origin\"} ",
        "sluice_queue_capacity{stage=\"batch\"} 4",
        "sluice_source_paused ",
        "sluice_stage_items_in_total{stage=\"slow-sink\"}",
        "sluice_stage_items_out_total{stage=\"batch\"}",
        "sluice_flush_seconds_bucket{stage=\"slow-sink\",le=\"0.5\"}",
        "sluice_batch_size_count{stage=\"slow-sink\"}",
        "sluice_committed_offset{topic=",
        "sluice_consumer_lag{topic=",
        "sluice_source_records_total{topic=",
    ] {
        assert!(
            metrics.contains(line),
            "/metrics lacks {line:?}:\n{metrics}"
        );
    }
    // Gauges are sampled once a second, so their values vary; none may exceed the capacity.
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("sluice_queue_depth{"))
    {
        let depth: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("gauge value");
        assert!(depth <= CAPACITY as f64, "{line}");
    }
    server.abort();

    let written = sink.len();
    // The sink takes at most 5,000 records per 250 ms: 300,000 in 15 s (plus the batch in
    // hand); the graceful stop then writes what was queued, and still far from everything.
    assert!(
        written_while_running <= 305_000 && written < N / 2,
        "backpressure held the consumer back ({written_while_running} written while running, {written} of {N} in all)"
    );
    assert_eq!(
        max_depth, CAPACITY,
        "the queues filled up to, and not beyond, their capacity"
    );
    let grown = max_rss.saturating_sub(baseline);
    eprintln!(
        "slow sink: {written} records written in 15 s, RSS baseline {} MiB, peak {} MiB (+{} MiB)",
        baseline >> 20,
        max_rss >> 20,
        grown >> 20
    );
    assert!(
        grown < 128 << 20,
        "RSS grew by {} MiB, above the 128 MiB bound",
        grown >> 20
    );

    let committed = committed_offsets(&group, &topic, P);
    let mut items: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for o in sink.items() {
        items.entry(o.partition).or_default().push(o.offset);
    }
    items.values_mut().for_each(|v| v.sort_unstable());
    for p in 0..P {
        let c = committed.get(&p).copied().unwrap_or(0);
        assert_eq!(
            items.get(&p).cloned().unwrap_or_default(),
            (0..c).collect::<Vec<_>>(),
            "partition {p}"
        );
    }
}
