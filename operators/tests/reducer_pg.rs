//! The `stream_analytics` reducer sink against the real PostgreSQL: the state after batches
//! with random boundaries, redeliveries included, equals applying every event once in order;
//! and a worker that lost its partition cannot write it any more.

use std::collections::BTreeMap;
use std::sync::Arc;

use sluice_operators::{Change, StateEvent, StreamAnalytics, StreamKey, StreamState};
use sluice_pipeline::{Batch, Sink, Sourced, TopicPartition};
use sluice_sinks::{Reducer, ReducerSink};
use sluice_testkit::{create_pg_database, drop_pg_database, unique};
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

async fn migrated_pool() -> (PgPool, String) {
    let url = create_pg_database("sluice_reducer").await;
    sluice_worker::migrate::postgres(&url, "frameworks", sluice_schemas::POSTGRES_MIGRATIONS)
        .await
        .expect("migrate");
    let pool = PgPool::connect(&url).await.expect("connect");
    (pool, url)
}

/// A deterministic mix of every change over a few streams of two tenants.
fn events(n: usize, seed: u64) -> Vec<StateEvent> {
    let mut x = seed;
    let mut next = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let tenants = [Uuid::new_v4(), Uuid::new_v4()];
    (0..n)
        .map(|i| {
            let change = match next(9) {
                0 => Change::Lifecycle {
                    status: Some(["live", "offline", "ingest_start"][next(3) as usize].into()),
                },
                1 | 2 => Change::Connect,
                3 | 4 => Change::Disconnect {
                    seconds: next(300) as i64,
                    up: next(1 << 20) as i64,
                    down: next(1 << 24) as i64,
                },
                5 => Change::End {
                    status: Some("ended".into()),
                },
                6 => Change::Client {
                    bitrate: Some(next(6000) as i64),
                    packets: [Some(next(1000) as i64), Some(next(10) as i64), None],
                },
                7 => Change::Tracks {
                    count: Some(next(4) as i64),
                    details: Some(serde_json::json!([{"codec": "H264", "n": i}])),
                },
                _ => Change::OtherConnection,
            };
            StateEvent {
                key: (tenants[next(2) as usize], format!("live+{}", next(25))),
                at: OffsetDateTime::from_unix_timestamp(1_760_000_000 + i as i64).unwrap(),
                node_id: (next(3) == 0).then(|| format!("edge-{}", next(4))),
                change,
            }
        })
        .collect()
}

fn sequential(events: &[StateEvent]) -> BTreeMap<StreamKey, StreamState> {
    let mut out: BTreeMap<StreamKey, StreamState> = BTreeMap::new();
    for e in events {
        out.entry(e.key.clone()).or_default().apply(e);
    }
    out
}

async fn stored(pool: &PgPool, keys: &[StreamKey]) -> BTreeMap<StreamKey, StreamState> {
    let mut conn = pool.acquire().await.expect("conn");
    StreamAnalytics
        .load(&mut conn, keys)
        .await
        .expect("load")
        .into_iter()
        .collect()
}

fn batch(
    tp: &TopicPartition,
    events: &[StateEvent],
    first_offset: usize,
) -> Batch<Sourced<StateEvent>> {
    Batch::unacked(
        events
            .iter()
            .enumerate()
            .map(|(i, e)| Sourced::new(tp, (first_offset + i) as i64, e.clone()))
            .collect(),
    )
}

async fn next_offset(pool: &PgPool, group: &str) -> i64 {
    sqlx::query_scalar("SELECT next_offset FROM sluice_applied_offsets WHERE group_id = $1")
        .bind(group)
        .fetch_one(pool)
        .await
        .expect("applied offset")
}

#[tokio::test]
async fn batches_with_redeliveries_equal_sequential_application() {
    let (pool, url) = migrated_pool().await;
    let events = events(6_000, 0x9E37_79B9);
    let tp = TopicPartition::new("analytics_events", 0);
    let group = unique("g");
    let mut sink = ReducerSink::new(pool.clone(), Arc::new(StreamAnalytics), group.as_str());
    // Batches of varying size; every third one is followed by a redelivery that starts
    // inside what was already applied (a crash before the offset commit).
    let (mut at, mut round) = (0usize, 0usize);
    while at < events.len() {
        round += 1;
        let len = (round * 37) % 900 + 1;
        let end = (at + len).min(events.len());
        sink.write(&batch(&tp, &events[at..end], at))
            .await
            .expect("write");
        if round % 3 == 0 {
            let back = at.saturating_sub(len / 2);
            let again = (end + 50).min(events.len());
            sink.write(&batch(&tp, &events[back..again], back))
                .await
                .expect("redelivery");
            at = again;
        } else {
            at = end;
        }
    }
    let reference = sequential(&events);
    let keys: Vec<StreamKey> = reference.keys().cloned().collect();
    assert_eq!(stored(&pool, &keys).await, reference);
    assert_eq!(next_offset(&pool, &group).await, events.len() as i64);
    let gb: f64 =
        sqlx::query_scalar("SELECT sum(total_bandwidth_gb)::float8 FROM stream_analytics")
            .fetch_one(&pool)
            .await
            .expect("gb");
    let bytes: i64 = reference
        .values()
        .map(|s| s.bandwidth_in + s.bandwidth_out)
        .sum();
    assert!(
        (gb - bytes as f64 / 1e9).abs() < 1e-3,
        "{gb} GB vs {bytes} bytes"
    );
    pool.close().await;
    drop_pg_database(&url).await;
}

#[tokio::test]
async fn a_worker_that_lost_its_partition_is_fenced_out() {
    let (pool, url) = migrated_pool().await;
    let events = events(300, 7);
    let tp = TopicPartition::new("analytics_events", 3);
    let group = unique("g");
    let mut old = ReducerSink::new(pool.clone(), Arc::new(StreamAnalytics), group.as_str());
    let mut new = ReducerSink::new(pool.clone(), Arc::new(StreamAnalytics), group.as_str());
    old.write(&batch(&tp, &events[..100], 0))
        .await
        .expect("old owner");
    // The new owner starts from the committed offset (nothing was committed) and claims.
    new.write(&batch(&tp, &events[..200], 0))
        .await
        .expect("new owner");
    // The old owner, not knowing, goes on: refused.
    old.write(&batch(&tp, &events[200..], 200))
        .await
        .expect("a fenced write is a no-op");
    let keys: Vec<StreamKey> = sequential(&events).keys().cloned().collect();
    let after_200 = sequential(&events[..200]);
    for (k, s) in &stored(&pool, &keys).await {
        let want = after_200.get(k).cloned().unwrap_or_default();
        assert_eq!(s, &want, "{k:?}");
    }
    assert_eq!(next_offset(&pool, &group).await, 200);
    new.write(&batch(&tp, &events[200..], 200))
        .await
        .expect("new owner goes on");
    assert_eq!(stored(&pool, &keys).await, sequential(&events));
    pool.close().await;
    drop_pg_database(&url).await;
}
