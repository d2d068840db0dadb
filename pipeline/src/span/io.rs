//! What a span-cutting stage does with the outside: load the spans recorded for a partition,
//! record new cuts before they move on, and send the cuts downstream as batches.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::core::{Cut, CutKind};
use super::rebuild::Rebuilds;
use super::{BatchRef, SourceSpan, SpanLog};
use crate::ack::{AckSet, TopicPartition};
use crate::batch::{Batch, Delivery, InFlight};
use crate::error::PipelineError;
use crate::lifecycle::Health;
use crate::metrics as m;
use crate::retry::{Attempts, RetryPolicy};
use crate::stages::Output;

/// The span log, retries, health and output of a span-cutting stage.
pub(crate) struct SpanIo<T, L> {
    pub(crate) stage: Arc<str>,
    pub(crate) out: Output<T>,
    pub(crate) log: L,
    pub(crate) retry: RetryPolicy,
    pub(crate) health: Health,
    /// The batches sent and not yet written.
    pub(crate) in_flight: InFlight,
}

impl<T: Send + 'static, L: SpanLog> SpanIo<T, L> {
    /// The spans recorded for `tp` past `from`, retried while the log is unreachable.
    pub(crate) async fn load(
        &self,
        tp: &TopicPartition,
        from: i64,
    ) -> Result<Vec<SourceSpan>, PipelineError> {
        let mut attempts = Attempts::new(&self.stage, "load spans", &self.retry, &self.health);
        loop {
            match self.log.load(tp, from).await {
                Ok(spans) => {
                    attempts.succeeded();
                    if !spans.is_empty() {
                        tracing::info!(stage = %self.stage, partition = %tp, from, spans = spans.len(), "cutting redelivered records along recorded spans");
                    }
                    return Ok(spans);
                }
                Err(e) => attempts.failed(e).await?,
            }
        }
    }

    /// Runs `cut`, which hands its cuts to the [`Cuts`] it is given, beside the loop that
    /// records and sends them: cutting goes on while the span log is written (a round trip to
    /// its store per cut).
    pub(crate) async fn drive<F>(&self, cut: impl FnOnce(Cuts<T>) -> F) -> Result<(), PipelineError>
    where
        F: Future<Output = Result<(), PipelineError>>,
    {
        let (tx, mut rx) = mpsc::channel(1);
        let emitter = async {
            let mut rebuilds = Rebuilds::default();
            loop {
                let deadline = rebuilds.deadline();
                let wait = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    got = rx.recv() => match got {
                        Some((cuts, across)) => self.emit(cuts, across, &mut rebuilds).await?,
                        None => break,
                    },
                    () = wait => {
                        let late = rebuilds.due(Instant::now());
                        self.send(late).await?;
                    }
                }
            }
            rebuilds.abandon();
            Ok(())
        };
        let cuts = Cuts {
            tx,
            stage: self.stage.clone(),
        };
        tokio::try_join!(cut(cuts), emitter)?;
        Ok(())
    }

    /// Records the fresh spans, then sends the cuts downstream: each alone, or, with
    /// `across`, the fresh ones together as one batch.
    ///
    /// A recorded span whose batch held other spans ([`SourceSpan::across`]) cannot be
    /// written under that batch's identity again: cut again whole, it goes out (with the
    /// other such spans) as a [`Delivery::Recovered`] batch, written only if its batch did
    /// not land; a tail is dropped, because redelivery that starts inside a span means its
    /// batch was acknowledged, so written. Such spans first wait in `rebuilds` for the rest
    /// of their batch: whole again, it goes out under its identity (see [`super::rebuild`]).
    async fn emit(
        &self,
        mut cuts: Vec<Cut<T>>,
        across: bool,
        rebuilds: &mut Rebuilds<T>,
    ) -> Result<(), PipelineError> {
        if cuts.is_empty() {
            return Ok(());
        }
        if across {
            name_the_batch(&mut cuts);
        }
        let fresh: Vec<SourceSpan> = cuts
            .iter()
            .filter(|c| c.kind == CutKind::Fresh)
            .map(|c| c.span.clone())
            .collect();
        if !fresh.is_empty() {
            let started = std::time::Instant::now();
            let mut attempts =
                Attempts::new(&self.stage, "record spans", &self.retry, &self.health);
            loop {
                match self.log.record(&fresh).await {
                    Ok(()) => break,
                    Err(e) => attempts.failed(e).await?,
                }
            }
            attempts.succeeded();
            metrics::histogram!(m::SPAN_RECORD_SECONDS, "stage" => self.stage.to_string())
                .record(started.elapsed().as_secs_f64());
        }
        let replayed = cuts.len() - fresh.len();
        if replayed > 0 {
            metrics::counter!(m::SPANS_REPLAYED, "stage" => self.stage.to_string())
                .increment(replayed as u64);
        }
        let (cuts, mut out) = rebuilds.gather(cuts, Instant::now());
        out.extend(batches(cuts, across));
        self.send(out).await
    }

    async fn send(&self, batches: Vec<Batch<T>>) -> Result<(), PipelineError> {
        let stage = self.stage.to_string();
        for batch in batches {
            let result = match batch.delivery() {
                Delivery::Rebuilt => Some("rebuilt"),
                Delivery::Recovered => Some("alone"),
                Delivery::Fresh | Delivery::Redelivered => None,
            };
            if let Some(result) = result {
                metrics::counter!(m::BATCHES_REBUILT, "stage" => stage.clone(), "result" => result)
                    .increment(1);
            }
            metrics::histogram!(m::BATCH_SIZE, "stage" => stage.clone()).record(batch.len() as f64);
            metrics::counter!(m::STAGE_ITEMS_OUT, "stage" => stage.clone())
                .increment(batch.len() as u64);
            self.out.send(batch.tracked(&self.in_flight)).await?;
        }
        Ok(())
    }
}

/// One hand-off to the recording loop: cuts, and whether the fresh ones leave as one batch.
type Handoff<T> = (Vec<Cut<T>>, bool);

/// Where a span-cutting stage hands its cuts to the loop that records and sends them (see
/// [`SpanIo::drive`]).
pub(crate) struct Cuts<T> {
    tx: mpsc::Sender<Handoff<T>>,
    stage: Arc<str>,
}

impl<T> Cuts<T> {
    /// Hands `cuts` on (`across`: the fresh ones as one batch, see [`SpanIo::emit`]), waiting
    /// while the previous ones are still being recorded.
    pub(crate) async fn pass(&self, cuts: Vec<Cut<T>>, across: bool) -> Result<(), PipelineError> {
        if cuts.is_empty() {
            return Ok(());
        }
        self.tx
            .send((cuts, across))
            .await
            .map_err(|_| PipelineError::DownstreamClosed {
                stage: self.stage.clone(),
            })
    }

    /// Whether nothing waits to be recorded.
    pub(crate) fn is_idle(&self) -> bool {
        self.tx.capacity() == self.tx.max_capacity()
    }

    /// A hand-off whose receiving end a test reads.
    #[cfg(test)]
    pub(crate) fn test_channel(capacity: usize) -> (Self, mpsc::Receiver<Handoff<T>>) {
        let (tx, rx) = mpsc::channel(capacity);
        let stage = "test".into();
        (Self { tx, stage }, rx)
    }
}

/// Marks the fresh cuts, which leave together as one batch, with that batch's reference, so
/// that it is recorded with each of their spans.
pub(crate) fn name_the_batch<T>(cuts: &mut [Cut<T>]) {
    let fresh = |c: &&mut Cut<T>| c.kind == CutKind::Fresh;
    let spans: Vec<SourceSpan> = cuts
        .iter_mut()
        .filter(fresh)
        .map(|c| c.span.clone())
        .collect();
    if spans.is_empty() {
        return;
    }
    let rows: usize = cuts.iter_mut().filter(fresh).map(|c| c.rows.len()).sum();
    let batch = BatchRef::of(&spans, rows as u64);
    for cut in cuts.iter_mut().filter(fresh) {
        cut.span.batch = Some(batch);
    }
}

/// The batches that carry `cuts` (see [`SpanIo::emit`]).
pub(crate) fn batches<T>(cuts: Vec<Cut<T>>, across: bool) -> Vec<Batch<T>> {
    let mut out = Vec::new();
    let mut together = Merged::default();
    let mut recovered = Merged::default();
    for cut in cuts {
        match cut.kind {
            CutKind::Whole if cut.span.across => recovered.add(cut),
            CutKind::Tail if cut.span.across => {
                tracing::debug!(partition = %cut.span.tp, first = cut.span.first, last = cut.span.last, "the tail of a span written with other spans came again; its batch was acknowledged, so it is not written again");
                cut.acks.release();
            }
            CutKind::Fresh if across => together.add(cut),
            kind => {
                let delivery = match kind {
                    CutKind::Whole => Delivery::Redelivered,
                    CutKind::Fresh | CutKind::Tail => Delivery::Fresh,
                };
                out.push(
                    Batch::new(cut.rows, cut.acks)
                        .with_spans(vec![cut.span])
                        .with_delivery(delivery),
                );
            }
        }
    }
    out.extend(together.into_batch());
    out.extend(
        recovered
            .into_batch()
            .map(|b| b.with_delivery(Delivery::Recovered)),
    );
    out
}

/// Cuts of several partitions gathered into one batch.
pub(crate) struct Merged<T> {
    rows: Vec<T>,
    acks: AckSet,
    spans: Vec<SourceSpan>,
}

impl<T> Default for Merged<T> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            acks: AckSet::new(),
            spans: Vec::new(),
        }
    }
}

impl<T> Merged<T> {
    /// Appends the cut's rows after those held: the batch's rows are its spans' rows in the
    /// order of its spans, `span.items` of each (see [`Batch::span_items`]).
    pub(crate) fn add(&mut self, mut cut: Cut<T>) {
        cut.span.items = cut.rows.len() as u64;
        if self.rows.is_empty() {
            self.rows = cut.rows;
        } else {
            self.rows.extend(cut.rows);
        }
        self.acks.merge(cut.acks);
        self.spans.push(cut.span);
    }

    pub(crate) fn into_batch(self) -> Option<Batch<T>> {
        (!self.spans.is_empty()).then(|| Batch::new(self.rows, self.acks).with_spans(self.spans))
    }
}
