//! What Sluice's benchmarks share: building workloads for the runtime micro-benchmarks.

use sluice_pipeline::{Batch, BatchSource, Pipeline, PipelineConfig, Sink, SinkError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts the items it is given (a sink that costs next to nothing).
#[derive(Clone, Default)]
pub struct CountSink(pub Arc<AtomicU64>);

impl Sink for CountSink {
    type Item = u64;

    async fn write(&mut self, batch: &Batch<u64>) -> Result<(), SinkError> {
        self.0
            .fetch_add(batch.items.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Runs `batches` batches of `per_batch` items through `hops` identity map stages into a
/// counting sink; returns how many items arrived.
pub async fn run_hops(hops: usize, batches: usize, per_batch: usize) -> u64 {
    let pipeline = Pipeline::new(PipelineConfig::default());
    let source = BatchSource::new((0..batches).map(move |b| {
        let start = (b * per_batch) as u64;
        Batch::unacked((start..start + per_batch as u64).collect())
    }));
    let mut flow = pipeline.source("source", source);
    for i in 0..hops {
        flow = flow.map(format!("hop{i}").as_str(), |x: u64| x);
    }
    let sink = CountSink::default();
    let count = sink.0.clone();
    flow.sink("count", move || sink.clone());
    // A benchmark input cannot fail: the stages are infallible.
    let _ = pipeline.run().await;
    count.load(Ordering::Relaxed)
}
