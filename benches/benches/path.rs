//! The in-process path of FrameWorks events, stage by stage and together:
//! - `decode`: record value (JSON) and `tenant_id` header → `Event`;
//! - `route`: `Event` → table rows, borrowing the event's strings;
//! - `encode`: routed rows → RowBinary, each into its table's `RowEncoder`, as the worker's
//!   decode stage does;
//! - `insert`: the encoded rows of all seven tables → one INSERT each (copied into the
//!   `clickhouse` client's buffer, lz4 and HTTP framing), as the worker's sinks send them, to a
//!   loopback server that reads and discards each request (its cost is included: it runs on
//!   the same thread); `insert_uncompressed` without lz4;
//! - `reducer_fold`: coalescing the sample's state events per stream (`StreamAnalytics`);
//! - `span_batcher`: a pipeline stage cutting per-partition spans of sourced items, from a
//!   source through the batcher into a counting sink;
//! - `decode_route_encode`: the three together on one thread.
//!
//! Throughput is per event of the sample (per state event for the fold, per item for the
//! batcher); bytes are the records' JSON values (the items' declared sizes for the batcher).
//!
//! Run: `cargo bench -p sluice-benches --bench path`.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_benches::{TableRows, discarding_server, sample_events};
use sluice_operators::{RowEncoders, StateEvent, StreamAnalytics, route};
use sluice_schemas::Event;

const EVENTS: u64 = 20_000;

fn path(c: &mut Criterion) {
    let sample = sample_events(EVENTS);
    let bytes: u64 = sample.iter().map(|(v, _)| v.len() as u64).sum();
    let events: Vec<Event> = sample
        .iter()
        .map(|(v, t)| Event::decode(v, Some(t)).expect("generated events decode"))
        .collect();
    let routed: Vec<_> = events
        .iter()
        .map(|e| route(e).expect("generated events route"))
        .collect();
    let mut encoders = RowEncoders::default();
    let mut rows = TableRows::default();
    for row in routed.iter().flatten() {
        rows.push(encoders.encode(row).expect("routed rows encode"));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let addr = rt.block_on(discarding_server());
    let client = sluice_sinks::connect()
        .expect("TLS")
        .with_url(format!("http://{addr}"))
        .with_validation(false);

    let mut group = c.benchmark_group("path");
    group.throughput(Throughput::ElementsAndBytes {
        elements: EVENTS,
        bytes,
    });
    group.bench_function("decode", |b| {
        b.iter(|| {
            for (value, tenant) in &sample {
                black_box(Event::decode(value, Some(tenant)).ok());
            }
        })
    });
    group.bench_function("route", |b| {
        b.iter(|| {
            for e in &events {
                black_box(route(e).ok());
            }
        })
    });
    group.bench_function("encode", |b| {
        b.iter(|| {
            for row in routed.iter().flatten() {
                black_box(encoders.encode(row).ok());
            }
        })
    });
    group.bench_function("insert", |b| {
        b.iter(|| rt.block_on(rows.insert(&client)).expect("insert"))
    });
    // `clickhouse.compression = "none"`, for a ClickHouse on the same host.
    let uncompressed = client
        .clone()
        .with_compression(clickhouse::Compression::None);
    group.bench_function("insert_uncompressed", |b| {
        b.iter(|| rt.block_on(rows.insert(&uncompressed)).expect("insert"))
    });
    group.bench_function("decode_route_encode", |b| {
        b.iter(|| {
            let rows = TableRows::decode_route_encode(&sample, &mut encoders);
            rt.block_on(rows.insert(&client)).expect("insert");
        })
    });
    group.finish();

    // The fold: per state event of the sample.
    let state: Vec<(StateEvent, u64)> = events
        .iter()
        .zip(&sample)
        .filter_map(|(e, (v, _))| {
            StateEvent::from_event(e)
                .ok()
                .flatten()
                .map(|s| (s, v.len() as u64))
        })
        .collect();
    let state_bytes = state.iter().map(|(_, b)| b).sum();
    let state: Vec<StateEvent> = state.into_iter().map(|(s, _)| s).collect();
    let mut group = c.benchmark_group("path");
    group.throughput(Throughput::ElementsAndBytes {
        elements: state.len() as u64,
        bytes: state_bytes,
    });
    group.bench_function("reducer_fold", |b| {
        b.iter(|| {
            let mut states = BTreeMap::new();
            sluice_sinks::coalesce(&StreamAnalytics, &mut states, &state);
            black_box(states.len())
        })
    });
    group.finish();

    // The span batcher: 200 batches of 1,000 items over 4 partitions.
    let (batches, per_batch, item_bytes) = (200usize, 1_000usize, 100u64);
    let items = (batches * per_batch) as u64;
    let mut group = c.benchmark_group("path");
    group.throughput(Throughput::ElementsAndBytes {
        elements: items,
        bytes: items * item_bytes,
    });
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    group.bench_function("span_batcher", |b| {
        b.iter(|| {
            let n = mt.block_on(sluice_benches::run_span_batcher(
                batches,
                per_batch,
                item_bytes as usize,
            ));
            assert_eq!(n, items);
        })
    });
    group.finish();
}

criterion_group!(benches, path);
criterion_main!(benches);
