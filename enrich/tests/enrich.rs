//! The enrich stage over a counting in-memory lookup: what reaches the lookup (one batched
//! call per micro-batch, only keys the cache does not hold), what items get, and the error
//! policies. The lookup is a test double; the stage and the pipeline around it are real.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_enrich::{CacheConfig, Enrich, EnrichFlow, Lookup, LookupError, OnError};
use sluice_pipeline::{
    AsyncOperator, Batch, BatchSource, Health, Pipeline, PipelineConfig, RetryPolicy, StageContext,
};
use sluice_testkit::CollectSink;

/// Knows every key below 1,000,000 (value: the key times ten); counts calls and keys asked,
/// and fails transiently while `fail_next` is above zero.
#[derive(Clone, Default)]
struct Tens {
    calls: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<u64>>>,
    fail_next: Arc<AtomicUsize>,
    permanent: bool,
    generation: Arc<AtomicUsize>,
}

impl Lookup for Tens {
    type Key = u64;
    type Value = u64;

    async fn lookup(&self, keys: &[u64]) -> Result<Vec<Option<u64>>, LookupError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(if self.permanent {
                LookupError::permanent("bad query")
            } else {
                LookupError::transient("connection reset")
            });
        }
        self.keys.lock().unwrap().extend_from_slice(keys);
        Ok(keys
            .iter()
            .map(|&k| (k < 1_000_000).then_some(k * 10))
            .collect())
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst) as u64
    }
}

/// An item: its key (none for some) and what the lookup gave it.
#[derive(Clone, Debug, PartialEq)]
struct Item {
    key: Option<u64>,
    value: Option<u64>,
}

fn item(key: u64) -> Item {
    Item {
        key: Some(key),
        value: None,
    }
}

fn enrich(lookup: Tens) -> Enrich<Item, Tens> {
    Enrich::new(lookup, |i: &Item| i.key, |i, v| i.value = Some(*v))
}

/// Runs `batches` through source → enrich (2 workers) → collecting sink.
async fn run(enrich: Enrich<Item, Tens>, batches: Vec<Vec<Item>>) -> Vec<Item> {
    let pipeline = Pipeline::new(PipelineConfig::default());
    let sink = CollectSink::new();
    let s = sink.clone();
    pipeline
        .source(
            "src",
            BatchSource::new(batches.into_iter().map(Batch::unacked)),
        )
        .enrich(sluice_pipeline::Stage::new("lookup").workers(2), enrich)
        .sink("collect", move || s.clone());
    pipeline.run().await.expect("pipeline runs");
    sink.items()
}

#[tokio::test]
async fn hit_heavy_mix_asks_each_key_once() {
    let lookup = Tens::default();
    // 100 batches of 1,000 items over 50 distinct keys.
    let batches: Vec<Vec<Item>> = (0..100)
        .map(|b| (0..1_000).map(|i| item((b * 7 + i) % 50)).collect())
        .collect();
    let out = run(enrich(lookup.clone()), batches).await;
    assert_eq!(out.len(), 100_000);
    assert!(out.iter().all(|i| i.value == i.key.map(|k| k * 10)));
    let asked = lookup.keys.lock().unwrap().clone();
    // Two workers may both miss a key before either has cached it: at most twice each.
    let distinct: HashSet<u64> = asked.iter().copied().collect();
    assert_eq!(distinct.len(), 50);
    assert!(asked.len() <= 100, "asked {} keys", asked.len());
    assert!(
        lookup.calls.load(Ordering::SeqCst) <= 2,
        "one call per worker at most"
    );
}

#[tokio::test]
async fn miss_heavy_mix_sends_each_batchs_misses_in_one_call() {
    let lookup = Tens::default();
    // 40 batches of 500 distinct keys each, none repeated, some unknown to the lookup.
    let batches: Vec<Vec<Item>> = (0..40u64)
        .map(|b| {
            (0..500u64)
                .map(|i| {
                    item(if i % 100 == 0 {
                        2_000_000 + b * 500 + i
                    } else {
                        b * 500 + i
                    })
                })
                .collect()
        })
        .collect();
    let e = enrich(lookup.clone()).cache(CacheConfig {
        capacity: 1_000,
        ttl: Duration::from_secs(60),
    });
    let out = run(e.clone(), batches).await;
    assert_eq!(out.len(), 20_000);
    for i in &out {
        let k = i.key.unwrap();
        assert_eq!(i.value, (k < 1_000_000).then_some(k * 10), "{i:?}");
    }
    assert_eq!(
        lookup.calls.load(Ordering::SeqCst),
        40,
        "one lookup per batch"
    );
    assert_eq!(
        lookup.keys.lock().unwrap().len(),
        20_000,
        "every key asked once"
    );
    assert!(
        e.cached() <= 1_100,
        "the cache stays bounded: {}",
        e.cached()
    );
}

fn ctx(health: &Health) -> StageContext {
    StageContext::new(
        "geo",
        health.clone(),
        RetryPolicy {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(50),
            max_retries: None,
        },
    )
}

#[tokio::test]
async fn items_without_key_or_value_pass_unchanged_and_a_batch_asks_a_key_once() {
    let lookup = Tens::default();
    let mut op = enrich(lookup.clone()).operator(&ctx(&Health::new()));
    let input = vec![
        Item {
            key: None,
            value: Some(7),
        },
        item(3),
        item(3_000_000),
        item(3),
    ];
    let out = op.process(input).await.unwrap();
    assert_eq!(
        out,
        vec![
            Item {
                key: None,
                value: Some(7)
            },
            Item {
                key: Some(3),
                value: Some(30)
            },
            item(3_000_000),
            Item {
                key: Some(3),
                value: Some(30)
            },
        ]
    );
    assert_eq!(*lookup.keys.lock().unwrap(), vec![3, 3_000_000]);
    // Answers, "no value" included, are cached.
    op.process(vec![item(3), item(3_000_000)]).await.unwrap();
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn expired_entries_and_a_new_generation_are_looked_up_again() {
    let lookup = Tens::default();
    let e = enrich(lookup.clone()).cache(CacheConfig {
        capacity: 100,
        ttl: Duration::from_millis(100),
    });
    let mut op = e.operator(&ctx(&Health::new()));
    op.process(vec![item(1)]).await.unwrap();
    op.process(vec![item(1)]).await.unwrap();
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    op.process(vec![item(1)]).await.unwrap();
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 2, "after the TTL");
    lookup.generation.store(1, Ordering::SeqCst);
    op.process(vec![item(1)]).await.unwrap();
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 3, "after a reload");
}

#[tokio::test]
async fn transient_failures_are_retried_with_the_lookup_named_on_ready() {
    let lookup = Tens::default();
    lookup.fail_next.store(4, Ordering::SeqCst);
    let health = Health::new();
    health.set_assigned(true);
    let mut op = enrich(lookup.clone()).operator(&ctx(&health));
    let task = tokio::spawn(async move { op.process(vec![item(5), item(6)]).await });
    sluice_testkit::wait_until("the lookup named on /ready", Duration::from_secs(5), || {
        health.not_ready_reasons() == vec!["lookup geo failing".to_owned()]
    })
    .await;
    let out = task.await.unwrap().unwrap();
    assert_eq!(
        out,
        vec![
            Item {
                key: Some(5),
                value: Some(50)
            },
            Item {
                key: Some(6),
                value: Some(60)
            },
        ]
    );
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 5);
    assert!(health.is_ready(), "{:?}", health.not_ready_reasons());
}

#[tokio::test]
async fn pass_through_forwards_unenriched_and_caches_nothing() {
    let lookup = Tens::default();
    lookup.fail_next.store(1, Ordering::SeqCst);
    let mut op = enrich(lookup.clone())
        .on_error(OnError::PassThrough)
        .operator(&ctx(&Health::new()));
    let out = op.process(vec![item(8), item(9)]).await.unwrap();
    assert_eq!(out, vec![item(8), item(9)]);
    let out = op.process(vec![item(8)]).await.unwrap();
    assert_eq!(
        out[0].value,
        Some(80),
        "looked up again once the lookup works"
    );
}

#[tokio::test]
async fn a_permanent_failure_stops_the_stage() {
    let lookup = Tens {
        permanent: true,
        ..Tens::default()
    };
    lookup.fail_next.store(1, Ordering::SeqCst);
    let mut op = enrich(lookup.clone()).operator(&ctx(&Health::new()));
    let err = op.process(vec![item(1)]).await.unwrap_err();
    assert!(err.to_string().contains("bad query"), "{err}");
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 1);
}
