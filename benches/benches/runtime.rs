//! Runtime micro-benchmarks: the cost of a queue hop between stages, per item, for the
//! batch sizes a Kafka poll yields.
//!
//! Run: `cargo bench -p sluice-benches --bench runtime`. The hop cost per item is the
//! difference between the 0-hop and 4-hop figures divided by 4.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BATCHES: usize = 200;

fn queue_hops(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for per_batch in [100usize, 1_000] {
        let mut group = c.benchmark_group(format!("queue_hop/batch_{per_batch}"));
        let items = (BATCHES * per_batch) as u64;
        // Items are u64s: 8 bytes each.
        group.throughput(Throughput::ElementsAndBytes {
            elements: items,
            bytes: items * 8,
        });
        for hops in [0usize, 4] {
            group.bench_function(format!("{hops}_hops"), |b| {
                b.iter(|| {
                    let n = rt.block_on(sluice_benches::run_hops(hops, BATCHES, per_batch));
                    assert_eq!(n, (BATCHES * per_batch) as u64);
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, queue_hops);
criterion_main!(benches);
