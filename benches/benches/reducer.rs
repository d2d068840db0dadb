//! The `stream_analytics` reducer against the Go consumer's design (one UPSERT per event), on
//! the same events and the same PostgreSQL.
//!
//! `cargo bench -p sluice-benches --bench reducer [-- EVENTS]` with the local services up
//! (`scripts/services.sh up`; `DATABASE_URL` to use another server). Each design runs three
//! times on a fresh database; medians are reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_operators::{Change, StateEvent, StreamAnalytics};
use sluice_pipeline::{Batch, Sink, Sourced, TopicPartition};
use sluice_sinks::ReducerSink;
use sqlx::PgPool;
use time::{OffsetDateTime, PrimitiveDateTime};
use uuid::Uuid;

/// The generator's mix of reduced events: mostly connects and disconnects, some lifecycle
/// and end events, over 32 streams of 8 tenants.
fn events(n: usize) -> Vec<StateEvent> {
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let tenants: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    (0..n)
        .map(|i| {
            let change = match next(20) {
                0..=7 => Change::Connect,
                8..=15 => Change::Disconnect {
                    seconds: next(600) as i64,
                    up: next(1 << 20) as i64,
                    down: next(1 << 26) as i64,
                },
                16 | 17 => Change::Lifecycle {
                    status: Some("live".into()),
                },
                18 => Change::End {
                    status: Some("ended".into()),
                },
                _ => Change::OtherConnection,
            };
            StateEvent {
                key: (tenants[next(8) as usize], format!("live+s{}", next(4))),
                at: OffsetDateTime::from_unix_timestamp(1_760_000_000 + i as i64).unwrap(),
                node_id: None,
                change,
            }
        })
        .collect()
}

async fn fresh_pool() -> (PgPool, String) {
    let url = sluice_testkit::create_pg_database("sluice_bench").await;
    sluice_worker::migrate::postgres(&url, "frameworks", sluice_schemas::POSTGRES_MIGRATIONS)
        .await
        .expect("migrate");
    let pool = PgPool::connect(&url).await.expect("connect");
    (pool, url)
}

fn ts(t: OffsetDateTime) -> PrimitiveDateTime {
    PrimitiveDateTime::new(t.date(), t.time())
}

/// The Go consumer's design: each event is its own INSERT … ON CONFLICT DO UPDATE, committed
/// on its own.
async fn per_event_upsert(pool: &PgPool, events: &[StateEvent]) {
    for e in events {
        let (t, n) = (&e.key.0, e.key.1.as_str());
        let at = ts(e.at);
        let q = match &e.change {
            Change::Connect => sqlx::query(
                "INSERT INTO stream_analytics (tenant_id, internal_name, current_viewers, peak_viewers, total_connections, last_updated) \
                 VALUES ($1, $2, 1, 1, 1, $3) ON CONFLICT (tenant_id, internal_name) DO UPDATE SET \
                 current_viewers = stream_analytics.current_viewers + 1, \
                 peak_viewers = GREATEST(stream_analytics.peak_viewers, stream_analytics.current_viewers + 1), \
                 total_connections = stream_analytics.total_connections + 1, last_updated = EXCLUDED.last_updated",
            )
            .bind(t)
            .bind(n)
            .bind(at),
            Change::Disconnect { seconds, up, down } => sqlx::query(
                "INSERT INTO stream_analytics (tenant_id, internal_name, total_session_duration, upbytes, bandwidth_in, downbytes, bandwidth_out, last_updated) \
                 VALUES ($1, $2, $4, $5, $5, $6, $6, $3) ON CONFLICT (tenant_id, internal_name) DO UPDATE SET \
                 current_viewers = GREATEST(stream_analytics.current_viewers - 1, 0), \
                 total_session_duration = stream_analytics.total_session_duration + $4, \
                 upbytes = stream_analytics.upbytes + $5, bandwidth_in = stream_analytics.bandwidth_in + $5, \
                 downbytes = stream_analytics.downbytes + $6, bandwidth_out = stream_analytics.bandwidth_out + $6, \
                 last_updated = EXCLUDED.last_updated",
            )
            .bind(t)
            .bind(n)
            .bind(at)
            .bind(*seconds as i32)
            .bind(up)
            .bind(down),
            Change::Lifecycle { status } => sqlx::query(
                "INSERT INTO stream_analytics (tenant_id, internal_name, status, session_start_time, last_updated) \
                 VALUES ($1, $2, $4, CASE WHEN $4 IN ('start','started','ingest_start','live') THEN $3 END, $3) \
                 ON CONFLICT (tenant_id, internal_name) DO UPDATE SET status = EXCLUDED.status, \
                 session_start_time = COALESCE(stream_analytics.session_start_time, EXCLUDED.session_start_time), \
                 last_updated = EXCLUDED.last_updated",
            )
            .bind(t)
            .bind(n)
            .bind(at)
            .bind(status.as_deref()),
            Change::End { status } => sqlx::query(
                "INSERT INTO stream_analytics (tenant_id, internal_name, status, session_end_time, last_updated) \
                 VALUES ($1, $2, $4, $3, $3) ON CONFLICT (tenant_id, internal_name) DO UPDATE SET \
                 status = EXCLUDED.status, session_end_time = EXCLUDED.session_end_time, last_updated = EXCLUDED.last_updated",
            )
            .bind(t)
            .bind(n)
            .bind(at)
            .bind(status.as_deref()),
            _ => sqlx::query(
                "INSERT INTO stream_analytics (tenant_id, internal_name, last_updated) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant_id, internal_name) DO UPDATE SET last_updated = EXCLUDED.last_updated",
            )
            .bind(t)
            .bind(n)
            .bind(at),
        };
        q.execute(pool).await.expect("upsert");
    }
}

/// Sluice's sink: batches of `batch` events (the pipeline's batcher would cut them), each one
/// transaction with the applied offsets.
async fn reducer_sink(pool: &PgPool, events: &[StateEvent], batch: usize) {
    let tp = TopicPartition::new("analytics_events", 0);
    let mut sink = ReducerSink::new(pool.clone(), Arc::new(StreamAnalytics), "bench");
    for (i, chunk) in events.chunks(batch).enumerate() {
        let items = chunk
            .iter()
            .enumerate()
            .map(|(j, e)| Sourced::new(&tp, (i * batch + j) as i64, e.clone()))
            .collect();
        sink.write(&Batch::unacked(items)).await.expect("write");
    }
}

/// The Go rules' columns of every row, in key order.
async fn state(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT concat_ws('|', tenant_id, internal_name, status, session_start_time, \
                session_end_time, total_session_duration, current_viewers, peak_viewers, \
                total_connections, bandwidth_in, bandwidth_out, upbytes, downbytes, last_updated) \
         FROM stream_analytics ORDER BY tenant_id, internal_name",
    )
    .fetch_all(pool)
    .await
    .expect("state")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let events = events(n);
        let mut go = Vec::new();
        let mut sluice = Vec::new();
        for _ in 0..3 {
            let (go_pool, go_url) = fresh_pool().await;
            let started = Instant::now();
            per_event_upsert(&go_pool, &events).await;
            go.push(started.elapsed());

            let (pool, url) = fresh_pool().await;
            let started = Instant::now();
            reducer_sink(&pool, &events, 5_000).await;
            sluice.push(started.elapsed());

            // Both designs must end in the same state, or the comparison means nothing.
            assert_eq!(
                state(&go_pool).await,
                state(&pool).await,
                "same final state"
            );
            for (p, u) in [(go_pool, go_url), (pool, url)] {
                p.close().await;
                sluice_testkit::drop_pg_database(&u).await;
            }
        }
        let (go, sluice) = (median(go), median(sluice));
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        println!("stream_analytics reduction, {n} events over 32 streams, medians of 3 runs:");
        println!(
            "  one UPSERT per event (Go design)   {:>10.0} events/s  ({:.2} s)",
            rate(go),
            go.as_secs_f64()
        );
        println!(
            "  Sluice reducer, batches of 5,000   {:>10.0} events/s  ({:.3} s)",
            rate(sluice),
            sluice.as_secs_f64()
        );
        println!(
            "  ratio                              {:>10.1}x",
            rate(sluice) / rate(go)
        );
    });
}
