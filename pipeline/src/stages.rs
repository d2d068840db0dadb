//! The tasks behind each kind of stage, and the queue ends they read and write.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hash};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::ack::{AckSet, AssignmentChange, AssignmentTracker};
use crate::batch::Batch;
use crate::error::PipelineError;
use crate::lifecycle::Health;
use crate::metrics as m;
use crate::operator::{AsyncOperator, Operator, Sink};
use crate::retry::{Attempts, RetryPolicy};

/// The receiving end of a stage's input queue (shared between the workers of a stage).
pub(crate) enum Input<T> {
    One(mpsc::Receiver<Batch<T>>),
    Shared(Arc<tokio::sync::Mutex<mpsc::Receiver<Batch<T>>>>),
}

impl<T> Input<T> {
    pub(crate) async fn recv(&mut self) -> Option<Batch<T>> {
        match self {
            Input::One(rx) => rx.recv().await,
            Input::Shared(rx) => rx.lock().await.recv().await,
        }
    }
}

/// The sending end of a stage's output queue.
pub struct Output<T> {
    stage: Arc<str>,
    tx: mpsc::Sender<Batch<T>>,
}

impl<T> Output<T> {
    pub(crate) fn new(stage: Arc<str>, tx: mpsc::Sender<Batch<T>>) -> Self {
        Self { stage, tx }
    }

    /// Sends a batch, waiting while the queue is full (backpressure).
    pub async fn send(&self, batch: Batch<T>) -> Result<(), PipelineError> {
        self.tx
            .send(batch)
            .await
            .map_err(|_| PipelineError::DownstreamClosed {
                stage: self.stage.clone(),
            })
    }

    /// The queue itself, for sources that must not block (e.g. to keep polling Kafka).
    pub fn sender(&self) -> &mpsc::Sender<Batch<T>> {
        &self.tx
    }
}

/// Limits of a batching stage.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchLimits {
    /// Flush once this many items are held.
    pub max_rows: usize,
    /// Flush once the items' measured size reaches this many bytes.
    pub max_bytes: usize,
    /// Flush this long after the first item of a batch arrived.
    pub max_linger: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_rows: 100_000,
            max_bytes: 16 << 20,
            max_linger: Duration::from_millis(500),
        }
    }
}

struct Counters {
    items_in: metrics::Counter,
    items_out: metrics::Counter,
}

impl Counters {
    fn new(stage: &str) -> Self {
        Self {
            items_in: metrics::counter!(m::STAGE_ITEMS_IN, "stage" => stage.to_owned()),
            items_out: metrics::counter!(m::STAGE_ITEMS_OUT, "stage" => stage.to_owned()),
        }
    }
}

/// Forwards a non-empty result downstream; acknowledges at once when nothing was produced.
async fn emit<U>(
    out: &Output<U>,
    items: Vec<U>,
    acks: AckSet,
    c: &Counters,
) -> Result<(), PipelineError> {
    if items.is_empty() {
        acks.release();
        return Ok(());
    }
    c.items_out.increment(items.len() as u64);
    out.send(Batch::new(items, acks)).await
}

pub(crate) async fn run_operator<O: Operator>(
    stage: Arc<str>,
    mut op: O,
    mut input: Input<O::In>,
    out: Output<O::Out>,
) -> Result<(), PipelineError> {
    let c = Counters::new(&stage);
    let mut assignments = AssignmentTracker::default();
    let failed = |source| PipelineError::Operator {
        stage: stage.clone(),
        source,
    };
    while let Some(batch) = input.recv().await {
        c.items_in.increment(batch.len() as u64);
        let (items, acks) = batch.into_parts();
        for change in assignments.update(&acks) {
            match change {
                AssignmentChange::Assigned(tp, from) => op.assigned(&tp, from).map_err(failed)?,
                AssignmentChange::Revoked(tp) => op.revoked(&tp),
            }
        }
        let mut produced = Vec::with_capacity(items.len());
        op.process(items, &mut produced).map_err(failed)?;
        emit(&out, produced, acks, &c).await?;
    }
    Ok(())
}

pub(crate) async fn run_async_operator<O: AsyncOperator>(
    stage: Arc<str>,
    mut op: O,
    mut input: Input<O::In>,
    out: Output<O::Out>,
) -> Result<(), PipelineError> {
    let c = Counters::new(&stage);
    let mut assignments = AssignmentTracker::default();
    let failed = |source| PipelineError::Operator {
        stage: stage.clone(),
        source,
    };
    while let Some(batch) = input.recv().await {
        c.items_in.increment(batch.len() as u64);
        let (items, acks) = batch.into_parts();
        for change in assignments.update(&acks) {
            match change {
                AssignmentChange::Assigned(tp, from) => {
                    op.assigned(&tp, from).await.map_err(failed)?
                }
                AssignmentChange::Revoked(tp) => op.revoked(&tp),
            }
        }
        let produced = op.process(items).await.map_err(failed)?;
        emit(&out, produced, acks, &c).await?;
    }
    Ok(())
}

pub(crate) async fn run_route<T, K, F>(
    stage: Arc<str>,
    mut input: Input<T>,
    outs: Vec<Output<T>>,
    key: F,
) -> Result<(), PipelineError>
where
    K: Hash,
    F: Fn(&T) -> K,
{
    // A fixed hasher: the same key goes to the same branch in every run and process.
    let hasher = BuildHasherDefault::<DefaultHasher>::default();
    let n = outs.len();
    let c = Counters::new(&stage);
    while let Some(batch) = input.recv().await {
        c.items_in.increment(batch.len() as u64);
        let (items, acks) = batch.into_parts();
        let mut parts: Vec<Vec<T>> = (0..n).map(|_| Vec::new()).collect();
        for item in items {
            let slot = (hasher.hash_one(key(&item)) % n as u64) as usize;
            parts[slot].push(item);
        }
        for (part, out) in parts.into_iter().zip(&outs) {
            if !part.is_empty() {
                c.items_out.increment(part.len() as u64);
                out.send(Batch::new(part, acks.share())).await?;
            }
        }
        acks.release();
    }
    Ok(())
}

pub(crate) async fn run_fan_out<T: Clone>(
    stage: Arc<str>,
    mut input: Input<T>,
    outs: Vec<Output<T>>,
) -> Result<(), PipelineError> {
    let c = Counters::new(&stage);
    while let Some(batch) = input.recv().await {
        c.items_in.increment(batch.len() as u64);
        let (items, acks) = batch.into_parts();
        if let Some((last, rest)) = outs.split_last() {
            for out in rest {
                out.send(Batch::new(items.clone(), acks.share())).await?;
            }
            last.send(Batch::new(items, acks)).await?;
        }
    }
    Ok(())
}

pub(crate) async fn run_forward<T>(
    mut input: Input<T>,
    out: Output<T>,
) -> Result<(), PipelineError> {
    while let Some(batch) = input.recv().await {
        out.send(batch).await?;
    }
    Ok(())
}

pub(crate) async fn run_batcher<T, F>(
    stage: Arc<str>,
    mut input: Input<T>,
    out: Output<T>,
    limits: BatchLimits,
    size_of: F,
    mut flush: watch::Receiver<u64>,
) -> Result<(), PipelineError>
where
    F: Fn(&T) -> usize,
{
    let c = Counters::new(&stage);
    let sizes = metrics::histogram!(m::BATCH_SIZE, "stage" => stage.to_string());
    let mut items: Vec<T> = Vec::new();
    let mut acks = AckSet::new();
    let mut bytes = 0usize;
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut flush_open = true;

    enum Event<T> {
        Flush,
        Input(Batch<T>),
        End,
    }
    loop {
        let event = tokio::select! {
            biased;
            changed = flush.changed(), if flush_open => {
                flush_open = changed.is_ok();
                Event::Flush
            }
            _ = sleep_until_opt(deadline), if deadline.is_some() => Event::Flush,
            next = input.recv() => next.map_or(Event::End, Event::Input),
        };
        match event {
            Event::End => break,
            Event::Flush => {
                if !items.is_empty() {
                    deadline = None;
                    bytes = 0;
                    emit_batch(
                        &out,
                        std::mem::take(&mut items),
                        std::mem::take(&mut acks),
                        &c,
                        &sizes,
                    )
                    .await?;
                }
            }
            Event::Input(batch) => {
                c.items_in.increment(batch.len() as u64);
                let (new_items, new_acks) = batch.into_parts();
                let mut rest = new_items.into_iter().peekable();
                // Split the input where a limit is reached, so no output batch exceeds
                // `max_rows`; each part holds a share of the input's acknowledgements.
                while rest.peek().is_some() {
                    if items.is_empty() {
                        deadline = Some(tokio::time::Instant::now() + limits.max_linger);
                    }
                    while items.len() < limits.max_rows && bytes < limits.max_bytes {
                        let Some(item) = rest.next() else { break };
                        bytes += size_of(&item);
                        items.push(item);
                    }
                    acks.merge(new_acks.share());
                    if items.len() >= limits.max_rows || bytes >= limits.max_bytes {
                        deadline = None;
                        bytes = 0;
                        emit_batch(
                            &out,
                            std::mem::take(&mut items),
                            std::mem::take(&mut acks),
                            &c,
                            &sizes,
                        )
                        .await?;
                    }
                }
                new_acks.release();
            }
        }
    }
    emit_batch(&out, items, acks, &c, &sizes).await
}

async fn emit_batch<T>(
    out: &Output<T>,
    items: Vec<T>,
    acks: AckSet,
    c: &Counters,
    sizes: &metrics::Histogram,
) -> Result<(), PipelineError> {
    if !items.is_empty() {
        sizes.record(items.len() as f64);
    }
    emit(out, items, acks, c).await
}

pub(crate) async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn run_rate_limit<T>(
    mut input: Input<T>,
    out: Output<T>,
    per_second: NonZeroU32,
) -> Result<(), PipelineError> {
    use governor::{Quota, RateLimiter};
    let limiter = RateLimiter::direct(Quota::per_second(per_second));
    while let Some(batch) = input.recv().await {
        // A batch larger than the burst is admitted in burst-sized steps.
        let mut remaining = batch.len() as u32;
        while remaining > 0 {
            let step = remaining.min(per_second.get());
            let n = NonZeroU32::new(step).expect("step > 0");
            limiter
                .until_n_ready(n)
                .await
                .expect("step is within the burst size");
            remaining -= step;
        }
        out.send(batch).await?;
    }
    Ok(())
}

pub(crate) async fn run_sink<S: Sink>(
    stage: Arc<str>,
    mut sink: S,
    mut input: Input<S::Item>,
    retry: RetryPolicy,
    health: Health,
    written: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), PipelineError> {
    let c = Counters::new(&stage);
    let sizes = metrics::histogram!(m::BATCH_SIZE, "stage" => stage.to_string());
    let latency = metrics::histogram!(m::FLUSH_SECONDS, "stage" => stage.to_string());
    let in_flight = metrics::gauge!(m::SINK_WRITES_IN_FLIGHT, "stage" => stage.to_string());
    let age = metrics::histogram!(m::RECORD_AGE_SECONDS, "stage" => stage.to_string());
    while let Some(batch) = input.recv().await {
        c.items_in.increment(batch.len() as u64);
        let started = Instant::now();
        in_flight.increment(1.0);
        let mut attempts = Attempts::new(&stage, "sink write", &retry, &health);
        loop {
            match sink.write(&batch).await {
                Ok(()) => break,
                Err(e) => attempts.failed(e).await?,
            }
        }
        attempts.succeeded();
        in_flight.decrement(1.0);
        latency.record(started.elapsed().as_secs_f64());
        record_ages(&age, batch.acks());
        sizes.record(batch.len() as f64);
        c.items_out.increment(batch.len() as u64);
        written.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        batch.ack();
    }
    Ok(())
}

/// Records, per source range of a written batch, how old its oldest record is now.
fn record_ages(age: &metrics::Histogram, acks: &AckSet) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    for h in acks.handles() {
        if let Some(created) = h.created_ms() {
            age.record((now_ms - created).max(0) as f64 / 1000.0);
        }
    }
}
