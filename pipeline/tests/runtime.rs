//! The runtime against the real broker: exactly-once delivery to sinks through a multi-stage
//! graph, restart at committed offsets, and two group members splitting, joining and leaving.
//! (Bounded memory behind a slow sink is in `memory.rs`, a binary of its own so that no other
//! test shares its process RSS.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sluice_pipeline::{
    BatchLimits, BoxError, KafkaRecord, KafkaSource, KafkaSourceConfig, Operator, Pipeline,
    PipelineConfig, Stage,
};
use sluice_testkit::{
    CollectSink, Origin, committed_offsets, create_topic, produce, unique, wait_until,
};

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn source(group: &str, topic: &str, drain: bool) -> KafkaSource {
    let mut cfg = KafkaSourceConfig::new(sluice_testkit::brokers(), group, vec![topic.to_owned()]);
    cfg.drain = drain;
    // Tansu lets a group form after half the session timeout; keep joins short in tests.
    cfg.client
        .insert("session.timeout.ms".into(), "6000".into());
    cfg.client
        .insert("heartbeat.interval.ms".into(), "1000".into());
    cfg.commit_interval = Duration::from_millis(200);
    KafkaSource::new(cfg)
}

fn origin(r: &KafkaRecord) -> Origin {
    Origin {
        partition: r.partition,
        offset: r.offset,
    }
}

/// The `idx` header the test producer puts on record `i`.
fn idx(r: &KafkaRecord) -> usize {
    let raw = r.header("idx").expect("idx header");
    std::str::from_utf8(raw)
        .expect("utf8")
        .parse()
        .expect("number")
}

fn by_partition(items: &[Origin]) -> BTreeMap<i32, Vec<i64>> {
    let mut m: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for o in items {
        m.entry(o.partition).or_default().push(o.offset);
    }
    for v in m.values_mut() {
        v.sort_unstable();
    }
    m
}

/// Counts items whose offset is not above the last one seen for the same (key, partition).
#[derive(Default)]
struct OrderCheck {
    last: HashMap<(usize, i32), i64>,
    violations: Arc<AtomicUsize>,
}

impl Operator for OrderCheck {
    type In = (Origin, usize);
    type Out = (Origin, usize);

    fn process(&mut self, input: Vec<Self::In>, out: &mut Vec<Self::Out>) -> Result<(), BoxError> {
        for (o, i) in input {
            let prev = self.last.insert((i % 5, o.partition), o.offset);
            if prev.is_some_and(|p| p >= o.offset) {
                self.violations.fetch_add(1, Ordering::Relaxed);
            }
            out.push((o, i));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_stage_graph_delivers_each_record_once_and_commits_what_sinks_hold() {
    const N: usize = 20_000;
    const P: i32 = 4;
    let topic = unique("rt_graph");
    let group = unique("rt_graph_group");
    create_topic(&topic, P).await;
    produce(&topic, P, N, |i| format!("value-{i}").into_bytes());

    let kept_a = CollectSink::new();
    let copy_b = CollectSink::new();
    let kept_c = CollectSink::new();
    let violations = Arc::new(AtomicUsize::new(0));

    let pipeline = Pipeline::new(PipelineConfig::default());
    let parsed = pipeline
        .source("kafka", source(&group, &topic, true))
        .map(Stage::new("parse").workers(2), |r: KafkaRecord| {
            (origin(&r), idx(&r))
        })
        .filter("drop-tenths", |(_, i): &(Origin, usize)| i % 10 != 0);
    let v = violations.clone();
    let ordered = parsed.apply_keyed(
        Stage::new("order-check").workers(3),
        |(_, i): &(Origin, usize)| i % 5,
        move || OrderCheck {
            violations: v.clone(),
            ..Default::default()
        },
    );
    let mut branches = ordered
        .route("route", 2, |(_, i): &(Origin, usize)| i % 100)
        .into_iter();
    let (even, odd) = (branches.next().unwrap(), branches.next().unwrap());
    let limits = BatchLimits {
        max_rows: 700,
        max_bytes: 1 << 20,
        max_linger: Duration::from_millis(50),
    };
    let mut copies = even
        .batch("batch-even", limits.clone(), |_| 16)
        .fan_out("copy", 2)
        .into_iter();
    let (a, b) = (copies.next().unwrap(), copies.next().unwrap());
    let (sa, sb, sc) = (kept_a.clone(), copy_b.clone(), kept_c.clone());
    a.sink("sink-a", move || sa.clone());
    b.sink("sink-b", move || sb.clone());
    odd.batch("batch-odd", limits, |_| 16)
        .sink(Stage::new("sink-c").workers(2), move || sc.clone());

    tokio::time::timeout(Duration::from_secs(120), pipeline.run())
        .await
        .expect("drained in time")
        .expect("pipeline ok");

    let a: Vec<_> = kept_a.items();
    let b: Vec<_> = copy_b.items();
    let c: Vec<_> = kept_c.items();
    let expected: HashSet<usize> = (0..N).filter(|i| i % 10 != 0).collect();
    let mut seen = HashSet::new();
    for (_, i) in a.iter().chain(&c) {
        assert!(seen.insert(*i), "record {i} written twice");
    }
    assert_eq!(
        seen, expected,
        "every kept record reaches exactly one of sink-a / sink-c"
    );
    let keys_a: HashSet<usize> = a.iter().map(|(_, i)| i % 100).collect();
    let keys_c: HashSet<usize> = c.iter().map(|(_, i)| i % 100).collect();
    assert!(
        keys_a.is_disjoint(&keys_c),
        "routing sends each key to one branch only"
    );
    assert!(
        !keys_a.is_empty() && !keys_c.is_empty(),
        "both branches get keys"
    );
    let mut a_sorted = a.clone();
    let mut b_sorted = b.clone();
    a_sorted.sort();
    b_sorted.sort();
    assert_eq!(
        a_sorted, b_sorted,
        "fan-out gives both sinks the same items"
    );
    assert_eq!(
        violations.load(Ordering::Relaxed),
        0,
        "per-key order kept by keyed workers"
    );

    let committed = committed_offsets(&group, &topic, P);
    let per_partition = (N / P as usize) as i64;
    assert_eq!(
        committed,
        (0..P).map(|p| (p, per_partition)).collect(),
        "committed to the end of every partition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_at_committed_offsets_without_loss_or_redelivery() {
    const N: usize = 30_000;
    const P: i32 = 3;
    let topic = unique("rt_restart");
    let group = unique("rt_restart_group");
    create_topic(&topic, P).await;
    produce(&topic, P, N, |i| format!("value-{i}").into_bytes());
    let limits = BatchLimits {
        max_rows: 500,
        max_bytes: 1 << 20,
        max_linger: Duration::from_millis(20),
    };

    // First run: stopped part-way through by a graceful shutdown.
    let first = CollectSink::slow(Duration::from_millis(100));
    // Small queues: a graceful stop flushes what is in flight, which must stay well below N.
    let pipeline = Pipeline::new(PipelineConfig {
        queue_capacity: 1,
        ..Default::default()
    });
    let handle = pipeline.handle();
    let s = first.clone();
    pipeline
        .source("kafka", source(&group, &topic, false))
        .map("origin", |r: KafkaRecord| origin(&r))
        .batch("batch", limits.clone(), |_| 16)
        .sink("sink", move || s.clone());
    let run = tokio::spawn(pipeline.run());
    wait_until(
        "5,000 records in the first run",
        Duration::from_secs(60),
        || first.len() >= 5_000,
    )
    .await;
    handle.shutdown();
    run.await.expect("join").expect("first run ok");
    let committed = committed_offsets(&group, &topic, P);
    let first_items = by_partition(&first.items());
    assert!(first.len() < N, "the first run was stopped part-way");
    for p in 0..P {
        let c = committed.get(&p).copied().unwrap_or(0);
        let got = first_items.get(&p).cloned().unwrap_or_default();
        assert_eq!(
            got,
            (0..c).collect::<Vec<_>>(),
            "partition {p}: the sink holds exactly the committed prefix"
        );
    }

    // Second run: resumes where the first committed, drains to the end.
    let second = CollectSink::new();
    let pipeline = Pipeline::new(PipelineConfig::default());
    let s = second.clone();
    pipeline
        .source("kafka", source(&group, &topic, true))
        .map("origin", |r: KafkaRecord| origin(&r))
        .batch("batch", limits, |_| 16)
        .sink("sink", move || s.clone());
    tokio::time::timeout(Duration::from_secs(120), pipeline.run())
        .await
        .expect("drained in time")
        .expect("second run ok");
    let second_items = by_partition(&second.items());
    let per_partition = (N / P as usize) as i64;
    for p in 0..P {
        let c = committed.get(&p).copied().unwrap_or(0);
        let got = second_items.get(&p).cloned().unwrap_or_default();
        assert_eq!(
            got,
            (c..per_partition).collect::<Vec<_>>(),
            "partition {p}: the rest, once"
        );
    }
    assert_eq!(
        committed_offsets(&group, &topic, P),
        (0..P).map(|p| (p, per_partition)).collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_partitions_and_survive_join_and_leave() {
    const N: usize = 120_000;
    const P: i32 = 6;
    init_logs();
    let topic = unique("rt_group");
    let group = unique("rt_group_group");
    create_topic(&topic, P).await;
    produce(&topic, P, N, |i| format!("value-{i}").into_bytes());
    let limits = BatchLimits {
        max_rows: 500,
        max_bytes: 1 << 20,
        max_linger: Duration::from_millis(20),
    };

    let worker = |sink: CollectSink<usize>| {
        let pipeline = Pipeline::new(PipelineConfig {
            queue_capacity: 2,
            ..Default::default()
        });
        let handle = pipeline.handle();
        pipeline
            .source("kafka", {
                let mut cfg =
                    KafkaSourceConfig::new(sluice_testkit::brokers(), &group, vec![topic.clone()]);
                cfg.client
                    .insert("session.timeout.ms".into(), "6000".into());
                cfg.client
                    .insert("heartbeat.interval.ms".into(), "1000".into());
                KafkaSource::new(cfg)
            })
            .map("idx", |r: KafkaRecord| idx(&r))
            .batch("batch", limits.clone(), |_| 8)
            .sink("sink", move || sink.clone());
        (handle, tokio::spawn(pipeline.run()))
    };
    let one = CollectSink::slow(Duration::from_millis(100));
    let two = CollectSink::slow(Duration::from_millis(100));
    let (h1, run1) = worker(one.clone());
    wait_until(
        "worker one to start writing",
        Duration::from_secs(60),
        || one.len() >= 5_000,
    )
    .await;
    let (h2, run2) = worker(two.clone());

    wait_until(
        "worker two to get partitions and write",
        Duration::from_secs(90),
        || {
            assert!(
                one.len() < N,
                "worker one finished alone before worker two joined: the test needs more records"
            );
            two.len() >= 2_000
        },
    )
    .await;
    assert!(one.len() < N, "worker one had not finished alone");
    h1.shutdown();
    run1.await.expect("join").expect("worker one ok");
    wait_until("every record delivered", Duration::from_secs(120), || {
        let all: HashSet<usize> = one.items().into_iter().chain(two.items()).collect();
        all.len() == N
    })
    .await;
    h2.shutdown();
    run2.await.expect("join").expect("worker two ok");

    let (a, b) = (one.items(), two.items());
    let mut count: HashMap<usize, usize> = HashMap::new();
    for i in a.iter().chain(&b) {
        *count.entry(*i).or_default() += 1;
    }
    let twice: Vec<_> = count
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(i, _)| *i)
        .collect();
    assert!(
        twice.is_empty(),
        "{} records delivered twice although every revocation flushed and committed",
        twice.len()
    );
    assert_eq!(count.len(), N);
    assert!(!b.is_empty() && !a.is_empty());
    let per_partition = (N / P as usize) as i64;
    assert_eq!(
        committed_offsets(&group, &topic, P),
        (0..P).map(|p| (p, per_partition)).collect()
    );
}
