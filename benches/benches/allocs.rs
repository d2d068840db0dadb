//! Heap allocations per event on the in-process path, counted by a global allocator that
//! wraps the system's: every `alloc`, `alloc_zeroed` and `realloc` is one allocation (a
//! `realloc` that grows a buffer costs as much as a fresh one), with the bytes it asked for.
//!
//! The stages are those of `benches/path.rs`, on the same sample: `decode`, `route`, `encode`
//! (routed rows → RowBinary), `insert` (the encoded rows of all seven tables through the
//! `clickhouse` client to a loopback server that discards them), `decode_route_encode` (all of
//! it), `reducer_fold` and `span_batcher`. The first six
//! run on this thread in a current-thread runtime, so the client's HTTP work is counted and the
//! discarding server, on a thread of its own, is not; `span_batcher` runs a pipeline on two
//! worker threads and counts every thread.
//!
//! Each stage runs once to warm up (connections, first buffers), then three times; the median
//! is reported per event (per state event for the fold, per item for the batcher).
//!
//! Run: `cargo bench -p sluice-benches --bench allocs`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_benches::{TableRows, discarding_server, sample_events};
use sluice_operators::{RowEncoders, StateEvent, StreamAnalytics, route};
use sluice_schemas::Event;

struct Counting;

static ALL_ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALL_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // `const` and without a destructor: safe to touch from inside the allocator, including
    // while a thread is being torn down.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

fn count(size: usize) {
    ALL_ALLOCS.fetch_add(1, Ordering::Relaxed);
    ALL_BYTES.fetch_add(size as u64, Ordering::Relaxed);
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    let _ = BYTES.try_with(|c| c.set(c.get() + size as u64));
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting allocates
// nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations and bytes asked for, on this thread or on all of them.
#[derive(Clone, Copy)]
enum Scope {
    Thread,
    Process,
}

fn counters(scope: Scope) -> (u64, u64) {
    match scope {
        Scope::Thread => (ALLOCS.with(Cell::get), BYTES.with(Cell::get)),
        Scope::Process => (
            ALL_ALLOCS.load(Ordering::Relaxed),
            ALL_BYTES.load(Ordering::Relaxed),
        ),
    }
}

/// Runs `f` once to warm up and three times counted; returns the median allocations and
/// bytes per unit.
fn measure(scope: Scope, units: u64, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut runs: Vec<(u64, u64)> = (0..3)
        .map(|_| {
            let (a0, b0) = counters(scope);
            f();
            let (a1, b1) = counters(scope);
            (a1 - a0, b1 - b0)
        })
        .collect();
    runs.sort_unstable();
    let (allocs, bytes) = runs[1];
    (allocs as f64 / units as f64, bytes as f64 / units as f64)
}

const EVENTS: u64 = 20_000;

fn main() {
    let sample = sample_events(EVENTS);
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
    let state: Vec<StateEvent> = events
        .iter()
        .filter_map(|e| StateEvent::from_event(e).ok().flatten())
        .collect();

    // The discarding server on a thread of its own, so its allocations are not this thread's.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let _ = addr_tx.send(discarding_server().await);
            std::future::pending::<()>().await
        })
    });
    let addr = addr_rx.recv().expect("server address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = sluice_sinks::connect()
        .expect("TLS")
        .with_url(format!("http://{addr}"))
        .with_validation(false);

    let mut results: Vec<(&str, &str, (f64, f64))> = Vec::new();
    results.push((
        "decode",
        "event",
        measure(Scope::Thread, EVENTS, || {
            for (value, tenant) in &sample {
                black_box(Event::decode(value, Some(tenant)).ok());
            }
        }),
    ));
    results.push((
        "route",
        "event",
        measure(Scope::Thread, EVENTS, || {
            for e in &events {
                black_box(route(e).ok());
            }
        }),
    ));
    results.push((
        "encode",
        "event",
        measure(Scope::Thread, EVENTS, || {
            for row in routed.iter().flatten() {
                black_box(encoders.encode(row).ok());
            }
        }),
    ));
    results.push((
        "insert",
        "event",
        measure(Scope::Thread, EVENTS, || {
            rt.block_on(rows.insert(&client)).expect("insert")
        }),
    ));
    results.push((
        "decode_route_encode",
        "event",
        measure(Scope::Thread, EVENTS, || {
            let rows = TableRows::decode_route_encode(&sample, &mut encoders);
            rt.block_on(rows.insert(&client)).expect("insert");
        }),
    ));
    results.push((
        "reducer_fold",
        "state event",
        measure(Scope::Thread, state.len() as u64, || {
            let mut states = BTreeMap::new();
            sluice_sinks::coalesce(&StreamAnalytics, &mut states, &state);
            black_box(states.len());
        }),
    ));
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (batches, per_batch) = (200usize, 1_000usize);
    results.push((
        "span_batcher",
        "item",
        measure(Scope::Process, (batches * per_batch) as u64, || {
            let n = mt.block_on(sluice_benches::run_span_batcher(batches, per_batch, 100));
            assert_eq!(n, (batches * per_batch) as u64);
        }),
    ));

    println!("heap allocations on the in-process path, {EVENTS} sample events, medians of 3 runs:");
    println!(
        "  {:<22} {:>12} {:>14}  per",
        "stage", "allocations", "bytes asked"
    );
    for (stage, unit, (allocs, bytes)) in results {
        println!("  {stage:<22} {allocs:>12.2} {bytes:>14.0}  {unit}");
    }
}
