//! Span batching: batches cut per source partition along consecutive source offsets, each cut
//! recorded in a [`SpanLog`] before the batch moves on, so that records redelivered after a
//! crash are cut again at exactly the same places. A sink that deduplicates by batch identity
//! (ClickHouse's `insert_deduplication_token`) then sees the same batches and writes them once.
//!
//! Cut across partitions instead ([`Flow::batch_spans_across`](crate::Flow::batch_spans_across)),
//! a batch holds one span per partition; a replay cannot rebuild it, so each of its spans is
//! recorded with the batch's identity ([`BatchRef`]), and redelivered spans of it leave as
//! [`Batch::recovered`] batches: the sink writes a span's items only if that batch did not land.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::ack::{AckSet, TopicPartition};
use crate::batch::{Batch, InFlight};
use crate::error::{PipelineError, SinkError};
use crate::lifecycle::Health;
use crate::metrics as m;
use crate::retry::{Attempts, RetryPolicy};
use crate::stages::{BatchLimits, Input, Output, sleep_until_opt};

/// An item with the source record it derives from.
#[derive(Clone, Debug, PartialEq)]
pub struct Sourced<T> {
    /// The record's partition.
    pub tp: TopicPartition,
    /// The record's offset.
    pub offset: i64,
    /// The item derived from it.
    pub item: T,
}

impl<T> Sourced<T> {
    /// `item`, derived from the record at `offset` of `tp`.
    pub fn new(tp: &TopicPartition, offset: i64, item: T) -> Self {
        Self {
            tp: tp.clone(),
            offset,
            item,
        }
    }
}

/// The records `first..=last` of one partition a batch was cut from (`first` and `last` are
/// the offsets of its first and last item), and how many items it held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// The partition.
    pub tp: TopicPartition,
    /// Offset of the record of the first item.
    pub first: i64,
    /// Offset of the record of the last item.
    pub last: i64,
    /// Items in the batch.
    pub items: u64,
    /// Which sub-stream of the partition the span cuts (the window start for window spans);
    /// 0 for plain span batches.
    pub key: i64,
    /// The span's batch held other spans too (other partitions', other windows'): a replay
    /// cannot cut that batch again, so its records leave as a [`Batch::recovered`] batch.
    pub across: bool,
    /// The batch the span left in, when it left with other spans (set as the batch is cut,
    /// recorded with the span): a replay asks the sink whether that batch landed.
    pub batch: Option<BatchRef>,
}

/// The identity of a batch that held several spans, and how many items it held: what a sink
/// needs to tell, after a crash, whether that batch was written (see [`Batch::recovered`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchRef {
    /// A hash of every span of the batch (partition, window and offsets).
    pub id: u128,
    /// Items (rows) of the whole batch.
    pub items: u64,
}

impl BatchRef {
    /// The reference of a batch of `items` cut from exactly `spans`, whatever their order.
    pub fn of(spans: &[Span], items: u64) -> Self {
        let mut keys: Vec<(&str, i32, i64, i64, i64)> = spans
            .iter()
            .map(|s| (&*s.tp.topic, s.tp.partition, s.key, s.first, s.last))
            .collect();
        keys.sort_unstable();
        let mut text = String::new();
        for (topic, partition, key, first, last) in keys {
            use std::fmt::Write;
            let _ = write!(text, "{topic}:{partition}:{key}:{first}-{last},");
        }
        Self {
            id: twox_hash::XxHash3_128::oneshot(text.as_bytes()),
            items,
        }
    }
}

/// Where a span batcher records its cuts (before the batches are written) and finds them
/// again when a partition is assigned. One log per batcher, e.g. per consumer group and table.
pub trait SpanLog: Send + Sync + 'static {
    /// Stores `spans` durably.
    fn record(&self, spans: &[Span]) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// The spans recorded for `tp` that end at or after offset `from`, in recording order.
    fn load(
        &self,
        tp: &TopicPartition,
        from: i64,
    ) -> impl Future<Output = Result<Vec<Span>, SinkError>> + Send;
}

/// The spans to cut again, in offset order: the recorded ones, where two overlap (only a
/// zombie worker or a change of code can cause that) the one recorded first.
pub fn replay_plan(recorded: Vec<Span>) -> VecDeque<Span> {
    let mut kept: Vec<Span> = Vec::with_capacity(recorded.len());
    for span in recorded {
        match kept
            .iter()
            .find(|k| k.first <= span.last && span.first <= k.last)
        {
            Some(k) if *k == span => {}
            Some(k) => {
                tracing::warn!(partition = %span.tp, kept = ?(k.first, k.last), ignored = ?(span.first, span.last), "overlapping recorded spans; replaying the one recorded first");
            }
            None => kept.push(span),
        }
    }
    kept.sort_unstable_by_key(|s| s.first);
    kept.into()
}

/// What one partition's batcher holds.
struct Part<T> {
    assignment: u64,
    rows: Vec<T>,
    first: i64,
    last: i64,
    bytes: usize,
    acks: AckSet,
    /// The input (by sequence number) whose acknowledgements `acks` already shares.
    acks_seq: u64,
    deadline: Option<Instant>,
    /// Recorded spans still to cut again, in offset order.
    plans: VecDeque<Span>,
}

impl<T> Part<T> {
    fn new(assignment: u64, plans: VecDeque<Span>) -> Self {
        Self {
            assignment,
            rows: Vec::new(),
            first: 0,
            last: 0,
            bytes: 0,
            acks: AckSet::new(),
            acks_seq: 0,
            deadline: None,
            plans,
        }
    }

    /// Whether the rows held belong to `span`.
    fn holds(&self, span: &Span) -> bool {
        !self.rows.is_empty() && span.first <= self.first && self.first <= span.last
    }

    /// The recorded span the rows held belong to, if any.
    fn replaying(&self) -> Option<&Span> {
        self.plans.front().filter(|p| self.holds(p))
    }

    fn is_revoked(&self) -> bool {
        self.acks.handles().iter().any(|h| h.is_revoked())
    }
}

/// A batch cut from one partition (and window).
pub(crate) struct Cut<T> {
    pub(crate) rows: Vec<T>,
    pub(crate) acks: AckSet,
    pub(crate) span: Span,
    /// Cut again along a recorded span (already in the log).
    pub(crate) replay: bool,
    /// Cut again from the span's first record: an earlier run may have written it in part
    /// (a tail replay's batch was acknowledged, so written whole).
    pub(crate) whole_replay: bool,
}

/// What an input's acknowledgements say about its partitions.
pub(crate) struct Assignments<'a> {
    /// Partitions whose assignment is over: their items belong to the next owner.
    pub(crate) over: Vec<&'a TopicPartition>,
    /// Partitions seen under another assignment than the stage holds: (partition,
    /// assignment, first offset of the range).
    pub(crate) new: Vec<(&'a TopicPartition, u64, i64)>,
}

impl<'a> Assignments<'a> {
    /// Sorts `acks` by `current`, the assignment a stage holds for a partition.
    pub(crate) fn of(acks: &'a AckSet, current: impl Fn(&TopicPartition) -> Option<u64>) -> Self {
        let mut seen = Assignments {
            over: Vec::new(),
            new: Vec::new(),
        };
        for h in acks.handles() {
            let tp = h.topic_partition();
            if h.is_revoked() {
                seen.over.push(tp);
            } else if current(tp) != Some(h.assignment())
                && !seen
                    .new
                    .iter()
                    .any(|(t, a, _)| *t == tp && *a == h.assignment())
            {
                seen.new.push((tp, h.assignment(), h.offsets().0));
            }
        }
        seen
    }
}

/// What every span-cutting stage does with the outside: load the spans recorded for a
/// partition, record new cuts before they move on, send batches.
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
    ) -> Result<Vec<Span>, PipelineError> {
        let mut attempts = Attempts::new(&self.stage, "load spans", &self.retry, &self.health);
        loop {
            match self.log.load(tp, from).await {
                Ok(spans) => {
                    attempts.succeeded();
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
            while let Some((cuts, across)) = rx.recv().await {
                self.emit(cuts, across).await?;
            }
            Ok(())
        };
        let cuts = Cuts {
            tx,
            stage: self.stage.clone(),
        };
        tokio::try_join!(cut(cuts), emitter)?;
        Ok(())
    }

    /// Records the new spans, then sends the cuts downstream: each alone, or, with `across`,
    /// the fresh ones together as one batch.
    ///
    /// A replayed span whose batch held other spans ([`Span::across`]) cannot be
    /// written under that batch's identity again: cut again whole, it goes out (with the
    /// other such spans) as a [`Batch::recovered`] batch, written only if its batch did not
    /// land; a tail is dropped, because redelivery that starts inside a span means its batch was
    /// acknowledged, so written.
    pub(crate) async fn emit(
        &self,
        mut cuts: Vec<Cut<T>>,
        across: bool,
    ) -> Result<(), PipelineError> {
        if cuts.is_empty() {
            return Ok(());
        }
        if across {
            name_the_batch(&mut cuts);
        }
        let fresh: Vec<Span> = cuts
            .iter()
            .filter(|c| !c.replay)
            .map(|c| c.span.clone())
            .collect();
        if !fresh.is_empty() {
            let mut attempts =
                Attempts::new(&self.stage, "record spans", &self.retry, &self.health);
            loop {
                match self.log.record(&fresh).await {
                    Ok(()) => break,
                    Err(e) => attempts.failed(e).await?,
                }
            }
            attempts.succeeded();
        }
        let stage = self.stage.to_string();
        let replayed = cuts.iter().filter(|c| c.replay).count();
        if replayed > 0 {
            metrics::counter!(m::SPANS_REPLAYED, "stage" => stage.clone())
                .increment(replayed as u64);
        }
        for batch in batches(cuts, across) {
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
fn name_the_batch<T>(cuts: &mut [Cut<T>]) {
    let spans: Vec<Span> = cuts
        .iter()
        .filter(|c| !c.replay)
        .map(|c| c.span.clone())
        .collect();
    if spans.is_empty() {
        return;
    }
    let rows = cuts.iter().filter(|c| !c.replay).map(|c| c.rows.len());
    let batch = BatchRef::of(&spans, rows.sum::<usize>() as u64);
    for cut in cuts.iter_mut().filter(|c| !c.replay) {
        cut.span.batch = Some(batch);
    }
}

/// The batches that carry `cuts` (see [`SpanIo::emit`]).
pub(crate) fn batches<T>(cuts: Vec<Cut<T>>, across: bool) -> Vec<Batch<T>> {
    let mut out = Vec::new();
    let mut together = Merged::default();
    let mut recovered = Merged::default();
    for cut in cuts {
        if cut.replay && cut.span.across {
            if cut.whole_replay {
                recovered.add(cut);
            } else {
                tracing::debug!(partition = %cut.span.tp, first = cut.span.first, last = cut.span.last, "the tail of a span written across partitions came again; its batch was acknowledged, so it is not written again");
                cut.acks.release();
            }
        } else if across && !cut.replay {
            together.add(cut);
        } else {
            let whole = cut.whole_replay;
            let batch = Batch::new(cut.rows, cut.acks).with_spans(vec![cut.span]);
            out.push(if whole { batch.replayed() } else { batch });
        }
    }
    out.extend(together.into_batch());
    out.extend(recovered.into_batch().map(Batch::recovered));
    out
}

/// Cuts of several partitions gathered into one batch.
struct Merged<T> {
    rows: Vec<T>,
    acks: AckSet,
    spans: Vec<Span>,
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
    /// order of its spans, `span.items` of each (see [`Batch::span_rows`]).
    fn add(&mut self, mut cut: Cut<T>) {
        cut.span.items = cut.rows.len() as u64;
        if self.rows.is_empty() {
            self.rows = cut.rows;
        } else {
            self.rows.extend(cut.rows);
        }
        self.acks.merge(cut.acks);
        self.spans.push(cut.span);
    }

    fn into_batch(self) -> Option<Batch<T>> {
        (!self.spans.is_empty()).then(|| Batch::new(self.rows, self.acks).with_spans(self.spans))
    }
}

/// How often a batcher whose linger passed looks again whether its batches are written.
const BUSY_RECHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// The span batcher task behind [`Flow::batch_spans`](crate::Flow::batch_spans).
pub(crate) struct SpanBatcher<T, F, L> {
    pub(crate) io: SpanIo<T, L>,
    pub(crate) limits: BatchLimits,
    pub(crate) size_of: F,
    /// Cut all partitions' rows together: one batch (and insert) per cut, not one per partition.
    pub(crate) across: bool,
}

impl<T, F, L> SpanBatcher<T, F, L>
where
    T: Send + 'static,
    F: Fn(&T) -> usize,
    L: SpanLog,
{
    pub(crate) async fn run(
        self,
        input: Input<Sourced<T>>,
        flush: watch::Receiver<u64>,
    ) -> Result<(), PipelineError> {
        self.io.drive(|cuts| self.cut(input, flush, cuts)).await
    }

    async fn cut(
        &self,
        mut input: Input<Sourced<T>>,
        mut flush: watch::Receiver<u64>,
        tx: Cuts<T>,
    ) -> Result<(), PipelineError> {
        let mut state = State::new(self.across);
        let mut flush_open = true;
        // While a batch is not yet written, a due linger is put off: the rows keep filling the
        // next batch (up to the limits), so a busy sink gets fewer, larger writes, and an idle
        // one gets every batch at its linger.
        let mut busy_until: Option<Instant> = None;
        loop {
            let deadline = state
                .parts
                .values()
                .filter(|p| p.replaying().is_none())
                .filter_map(|p| p.deadline)
                .min()
                .map(|d| busy_until.map_or(d, |b| d.max(b)));
            tokio::select! {
                biased;
                changed = flush.changed(), if flush_open => {
                    flush_open = changed.is_ok();
                    state.purge_revoked();
                    let cuts = state.flush(false);
                    tx.pass(cuts, self.across).await?;
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    let now = Instant::now();
                    if !tx.is_idle() || self.io.in_flight.count() > 0 {
                        busy_until = Some(now + BUSY_RECHECK);
                        continue;
                    }
                    busy_until = None;
                    state.purge_revoked();
                    let cuts = state.lingered(now);
                    tx.pass(cuts, self.across).await?;
                }
                next = input.recv() => match next {
                    Some(batch) => self.on_input(&mut state, batch, &tx).await?,
                    None => break,
                },
            }
        }
        let cuts = state.flush(true);
        tx.pass(cuts, self.across).await
    }

    async fn on_input(
        &self,
        state: &mut State<T>,
        batch: Batch<Sourced<T>>,
        tx: &Cuts<T>,
    ) -> Result<(), PipelineError> {
        metrics::counter!(m::STAGE_ITEMS_IN, "stage" => self.io.stage.to_string())
            .increment(batch.len() as u64);
        state.seq += 1;
        state.purge_revoked();
        let (items, acks) = batch.into_parts();
        let seen = Assignments::of(&acks, |tp| state.parts.get(tp).map(|p| p.assignment));
        // A partition seen under a new assignment: finish what is held of the old one, then
        // load the spans recorded past the new assignment's start.
        for &(tp, assignment, from) in &seen.new {
            if let Some(old) = state.parts.remove(tp) {
                let cuts = state.retire(tp, old);
                tx.pass(cuts, self.across).await?;
            }
            let plans = replay_plan(self.io.load(tp, from).await?);
            if !plans.is_empty() {
                tracing::info!(stage = %self.io.stage, partition = %tp, from, spans = plans.len(), "cutting redelivered records along recorded spans");
            }
            state.parts.insert(tp.clone(), Part::new(assignment, plans));
        }
        let mut cuts = Vec::new();
        for Sourced { tp, offset, item } in items {
            if seen.over.contains(&&tp) {
                continue;
            }
            let size = (self.size_of)(&item);
            state.push(&tp, offset, item, size, &acks, &self.limits, &mut cuts);
        }
        state.after_input(&self.limits, &mut cuts);
        acks.release();
        tx.pass(cuts, self.across).await
    }
}

/// Rows and bytes held.
#[derive(Default)]
struct Held {
    rows: usize,
    bytes: usize,
}

impl Held {
    fn remove<T>(&mut self, part: &Part<T>) {
        self.rows -= part.rows.len();
        self.bytes -= part.bytes;
    }
}

/// The batcher's buffers, without the I/O (unit-testable).
struct State<T> {
    parts: HashMap<TopicPartition, Part<T>>,
    /// Held over all partitions.
    held: Held,
    /// Sequence number of the current input.
    seq: u64,
    /// Free rows of all partitions are cut together, at limits that apply to their sum.
    across: bool,
}

impl<T> State<T> {
    fn new(across: bool) -> Self {
        Self {
            parts: HashMap::new(),
            held: Held::default(),
            seq: 0,
            across,
        }
    }

    /// Drops what is held of assignments that are over: never written, so never twice.
    fn purge_revoked(&mut self) {
        let held = &mut self.held;
        self.parts.retain(|tp, p| {
            let keep = !p.is_revoked();
            if !keep && !p.rows.is_empty() {
                held.remove(p);
                tracing::debug!(partition = %tp, rows = p.rows.len(), "dropped rows of a revoked assignment; the next owner writes them");
            }
            keep
        });
    }

    fn take(&mut self, tp: &TopicPartition, replay: Option<Span>) -> Option<Cut<T>> {
        let across = self.across;
        let part = self.parts.get_mut(tp)?;
        take(part, tp, replay, across, &mut self.held)
    }

    /// Every partition's free rows (not held for a recorded span).
    fn take_free(&mut self) -> Vec<Cut<T>> {
        let across = self.across;
        let held = &mut self.held;
        self.parts
            .iter_mut()
            .filter(|(_, p)| p.replaying().is_none())
            .filter_map(|(tp, p)| take(p, tp, None, across, held))
            .collect()
    }

    /// Whether the free rows of all partitions together reach a limit.
    fn free_full(&self, limits: &BatchLimits) -> bool {
        if self.held.rows < limits.max_rows && self.held.bytes < limits.max_bytes {
            return false;
        }
        let (rows, bytes) = self
            .parts
            .values()
            .filter(|p| p.replaying().is_none())
            .fold((0, 0), |(r, b), p| (r + p.rows.len(), b + p.bytes));
        rows >= limits.max_rows || bytes >= limits.max_bytes
    }

    /// Adds one item of the current input.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        tp: &TopicPartition,
        offset: i64,
        item: T,
        size: usize,
        acks: &AckSet,
        limits: &BatchLimits,
        cuts: &mut Vec<Cut<T>>,
    ) {
        if !self.parts.contains_key(tp) {
            // Items that no acknowledgement covers (tests, generated data): nothing to replay.
            self.parts.insert(tp.clone(), Part::new(0, VecDeque::new()));
        }
        let across = self.across;
        let part = self.parts.get_mut(tp).expect("inserted above");
        // Recorded spans that end before this record are complete.
        while let Some(plan) = part.plans.front() {
            if plan.last >= offset {
                break;
            }
            let plan = part.plans.pop_front().expect("front exists");
            if part.holds(&plan) {
                cuts.extend(take(part, tp, Some(plan), across, &mut self.held));
            }
        }
        let in_plan = part.plans.front().is_some_and(|p| p.first <= offset);
        // Free rows are cut before a recorded span starts, and at the limits, but never
        // between two items of one record.
        let boundary = part.rows.is_empty() || offset > part.last;
        if !part.rows.is_empty() && offset > part.last {
            let before_plan = in_plan && part.replaying().is_none();
            let full = !self.across
                && (part.rows.len() >= limits.max_rows || part.bytes >= limits.max_bytes);
            if before_plan || (!in_plan && full) {
                cuts.extend(take(part, tp, None, across, &mut self.held));
            }
        }
        // Other partitions' rows always end at a record: only this one may be inside one.
        if self.across && (boundary || in_plan) && self.free_full(limits) {
            cuts.extend(self.take_free());
        }
        let part = self.parts.get_mut(tp).expect("inserted above");
        if part.rows.is_empty() {
            part.first = offset;
            part.deadline = Some(Instant::now() + limits.max_linger);
        }
        if part.acks_seq != self.seq {
            part.acks.merge(shares_of(acks, tp));
            part.acks_seq = self.seq;
        }
        part.rows.push(item);
        part.last = offset;
        part.bytes += size;
        self.held.rows += 1;
        self.held.bytes += size;
    }

    /// After a whole input: recorded spans whose last record arrived are cut; the largest
    /// free buffers (or, across partitions, all of them) are cut while the bytes held exceed
    /// the limit.
    fn after_input(&mut self, limits: &BatchLimits, cuts: &mut Vec<Cut<T>>) {
        let across = self.across;
        for (tp, part) in self.parts.iter_mut() {
            if let Some(plan) = part.replaying()
                && part.last >= plan.last
            {
                let plan = part.plans.pop_front().expect("replaying a front plan");
                cuts.extend(take(part, tp, Some(plan), across, &mut self.held));
            }
        }
        if self.across {
            if self.held.bytes >= limits.max_bytes {
                cuts.extend(self.take_free());
            }
            return;
        }
        while self.held.bytes >= limits.max_bytes {
            let Some(tp) = self
                .parts
                .iter()
                .filter(|(_, p)| !p.rows.is_empty() && p.replaying().is_none())
                .max_by_key(|(_, p)| p.bytes)
                .map(|(tp, _)| tp.clone())
            else {
                break;
            };
            cuts.extend(self.take(&tp, None));
        }
    }

    /// Free buffers whose linger passed (across partitions: all of them, once one is due).
    fn lingered(&mut self, now: Instant) -> Vec<Cut<T>> {
        let due = |p: &Part<T>| p.replaying().is_none() && p.deadline.is_some_and(|d| d <= now);
        if self.across {
            if self.parts.values().any(due) {
                return self.take_free();
            }
            return Vec::new();
        }
        let due: Vec<TopicPartition> = self
            .parts
            .iter()
            .filter(|(_, p)| due(p))
            .map(|(tp, _)| tp.clone())
            .collect();
        due.iter().filter_map(|tp| self.take(tp, None)).collect()
    }

    /// A flush request (rebalance, drain) or the end of the input: every free buffer is cut.
    /// A recorded span whose records have not all arrived cannot be cut: it waits, unless its
    /// partition was revoked or the input ended; then it is dropped, so its records are never
    /// committed and its next owner cuts it again.
    fn flush(&mut self, end: bool) -> Vec<Cut<T>> {
        let tps: Vec<TopicPartition> = self.parts.keys().cloned().collect();
        let mut cuts = Vec::new();
        for tp in tps {
            let part = self.parts.get_mut(&tp).expect("key listed");
            if part.replaying().is_some() {
                if end || part.is_revoked() {
                    let part = self.parts.remove(&tp).expect("key listed");
                    self.held.remove(&part);
                    tracing::warn!(partition = %tp, "a recorded span was not complete when its partition was given up; its records will be redelivered");
                } else {
                    tracing::warn!(partition = %tp, "flush waits for the rest of a recorded span");
                }
                continue;
            }
            cuts.extend(self.take(&tp, None));
        }
        cuts
    }

    /// What a partition held under an assignment that has ended.
    fn retire(&mut self, tp: &TopicPartition, mut old: Part<T>) -> Vec<Cut<T>> {
        if old.replaying().is_some() {
            self.held.remove(&old);
            return Vec::new();
        }
        let across = self.across;
        take(&mut old, tp, None, across, &mut self.held)
            .into_iter()
            .collect()
    }
}

/// The rows `part` holds as one cut: along the recorded span `replay`, or as a fresh span
/// (`across`: to be written with other partitions' spans).
fn take<T>(
    part: &mut Part<T>,
    tp: &TopicPartition,
    replay: Option<Span>,
    across: bool,
    held: &mut Held,
) -> Option<Cut<T>> {
    if part.rows.is_empty() {
        return None;
    }
    held.remove(part);
    let rows = std::mem::take(&mut part.rows);
    let items = rows.len() as u64;
    part.bytes = 0;
    part.deadline = None;
    let acks = std::mem::take(&mut part.acks);
    part.acks_seq = 0;
    let (span, replay, whole) = match replay {
        Some(plan) => {
            // Redelivery starting inside a span means its batch was acknowledged, so written:
            // only its tail comes again, and the repeated insert is skipped by its token.
            let whole = part.first <= plan.first;
            if whole && (plan.items != items || plan.last != part.last) {
                tracing::warn!(partition = %tp, first = plan.first, last = plan.last, recorded_items = plan.items, items, "a recorded span came out differently this time (changed code or data?)");
            }
            (plan, true, whole)
        }
        None => (
            Span {
                tp: tp.clone(),
                first: part.first,
                last: part.last,
                items,
                key: 0,
                across,
                batch: None,
            },
            false,
            false,
        ),
    };
    Some(Cut {
        rows,
        acks,
        span,
        replay,
        whole_replay: whole,
    })
}

/// Shares of the acknowledgements in `acks` that belong to `tp`.
pub(crate) fn shares_of(acks: &AckSet, tp: &TopicPartition) -> AckSet {
    let mut set = AckSet::new();
    for h in acks.handles() {
        if h.topic_partition() == tp {
            set.push(h.share());
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::PartitionLedger;
    use std::collections::BTreeMap;
    use std::time::Duration;

    /// A small deterministic generator (xorshift64*), enough for shuffling test inputs.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
        }
    }

    fn limits(max_rows: usize) -> BatchLimits {
        BatchLimits {
            max_rows,
            max_bytes: usize::MAX,
            max_linger: Duration::from_secs(3600),
        }
    }

    /// Feeds one source micro-batch (records `items[0].0..=items[last].0`) as the batcher
    /// does: a part for a new assignment with its replay plans, every item, then the cuts
    /// that complete recorded spans.
    fn feed(
        state: &mut State<u32>,
        ledger: &Arc<PartitionLedger>,
        plans: &mut Option<VecDeque<Span>>,
        items: &[(i64, u32)],
        limits: &BatchLimits,
    ) -> Vec<Cut<u32>> {
        let tp = ledger.topic_partition().clone();
        let mut acks = AckSet::new();
        acks.push(ledger.issue(items[0].0, items[items.len() - 1].0).unwrap());
        state.seq += 1;
        if let Some(plans) = plans.take() {
            state
                .parts
                .insert(tp.clone(), Part::new(acks.handles()[0].assignment(), plans));
        }
        let mut cuts = Vec::new();
        for &(offset, item) in items {
            state.push(&tp, offset, item, 1, &acks, limits, &mut cuts);
        }
        state.after_input(limits, &mut cuts);
        acks.release();
        cuts
    }

    /// Records, two items for some offsets, gaps between others.
    fn records(n: usize, rng: &mut Rng) -> Vec<(i64, u32)> {
        let mut out = Vec::new();
        let mut offset = 0i64;
        for id in 0..n as u32 {
            out.push((offset, id));
            if rng.next(5) != 0 {
                offset += 1 + rng.next(3) as i64;
            }
        }
        out
    }

    /// Splits `items` into micro-batches at random record boundaries.
    fn micro_batches(items: &[(i64, u32)], rng: &mut Rng) -> Vec<Vec<(i64, u32)>> {
        let mut out: Vec<Vec<(i64, u32)>> = Vec::new();
        for &it in items {
            let same_record = out
                .last()
                .and_then(|b| b.last())
                .is_some_and(|l| l.0 == it.0);
            if out.is_empty() || (!same_record && rng.next(4) == 0) {
                out.push(Vec::new());
            }
            out.last_mut().unwrap().push(it);
        }
        out
    }

    /// Writes cuts into a "table" that deduplicates by span, as ClickHouse does by token.
    fn insert(table: &mut BTreeMap<(i64, i64), Vec<u32>>, cut: Cut<u32>) {
        let key = (cut.span.first, cut.span.last);
        table.entry(key).or_insert_with(|| cut.rows.clone());
        cut.acks.release();
    }

    #[test]
    fn redelivered_records_are_cut_along_the_recorded_spans() {
        for seed in 1..300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let items = records(40 + rng.next(60) as usize, &mut rng);
            let limits = limits(1 + rng.next(12) as usize);
            let tp = TopicPartition::new("t", 0);

            // Run 1: crashes after a random number of micro-batches; each cut is recorded,
            // and written or not (the crash may come between the two).
            let ledger = PartitionLedger::new(tp.clone());
            let mut state = State::new(false);
            let mut plans = Some(VecDeque::new());
            let mut log: Vec<Span> = Vec::new();
            let mut table = BTreeMap::new();
            let mut lost_from = i64::MAX;
            let batches = micro_batches(&items, &mut rng);
            let crash_after = rng.next(batches.len() as u64 + 1) as usize;
            for batch in &batches[..crash_after] {
                let mut cuts = feed(&mut state, &ledger, &mut plans, batch, &limits);
                if rng.next(3) == 0 {
                    cuts.extend(state.flush(false));
                }
                for cut in cuts {
                    log.push(cut.span.clone());
                    if rng.next(2) == 0 {
                        insert(&mut table, cut);
                    } else {
                        lost_from = lost_from.min(cut.span.first);
                    }
                }
            }
            let held = state.parts.get(&tp).filter(|p| !p.rows.is_empty());
            if let Some(p) = held {
                lost_from = lost_from.min(p.first);
            }
            // The committed offset: at most where the first unwritten item starts.
            let end = batches[..crash_after]
                .last()
                .map_or(0, |b| b.last().unwrap().0 + 1);
            let committed = rng.next(lost_from.min(end) as u64 + 1) as i64;
            drop(state);

            // Run 2: redelivery from the committed offset, cut differently, to the end.
            let ledger = PartitionLedger::new(tp.clone());
            let recorded: Vec<Span> = log
                .iter()
                .filter(|s| s.last >= committed)
                .cloned()
                .collect();
            let mut plans = Some(replay_plan(recorded));
            let mut state = State::new(false);
            let rest: Vec<(i64, u32)> =
                items.iter().copied().filter(|i| i.0 >= committed).collect();
            for batch in micro_batches(&rest, &mut rng) {
                let mut cuts = feed(&mut state, &ledger, &mut plans, &batch, &limits);
                if rng.next(3) == 0 {
                    cuts.extend(state.flush(false));
                }
                for cut in cuts {
                    insert(&mut table, cut);
                }
            }
            for cut in state.flush(true) {
                insert(&mut table, cut);
            }

            let mut written: Vec<u32> = table.values().flatten().copied().collect();
            written.sort_unstable();
            let expected: Vec<u32> = (0..items.len() as u32).collect();
            assert_eq!(written, expected, "seed {seed}: every item exactly once");
            if let Some(last) = rest.last() {
                assert_eq!(
                    ledger.committable(),
                    Some(last.0 + 1),
                    "seed {seed}: all acknowledged"
                );
            }
        }
    }

    /// What a sink's landings know: the tokens rows landed under.
    #[derive(Hash, PartialEq, Eq)]
    enum Token {
        /// A batch of one span, or of several without a reference.
        Spans(Vec<(i32, i64, i64, i64)>),
        /// A batch that held several spans.
        Batch(u128),
        /// One span of a batch that did not land, written alone.
        Recovery(u128, i32, i64, i64, i64),
    }

    /// A table as `ClickHouseSink` keeps one: a batch lands once per token; a recovered batch
    /// lands the spans whose batch did not land, once each, whatever the items are.
    #[derive(Default)]
    struct Table {
        landed: std::collections::HashSet<Token>,
        written: Vec<u32>,
    }

    impl Table {
        fn write(&mut self, batch: Batch<u32>) {
            if batch.is_recovered() {
                let parts = batch
                    .span_items()
                    .expect("a recovered batch holds its spans' rows");
                for (s, rows) in parts {
                    let b = s
                        .batch
                        .expect("a span cut across partitions names its batch");
                    let again = Token::Recovery(b.id, s.tp.partition, s.key, s.first, s.last);
                    if !self.landed.contains(&Token::Batch(b.id)) && self.landed.insert(again) {
                        self.written.extend(rows);
                    }
                }
            } else {
                let token = match batch.spans().first().and_then(|s| s.batch) {
                    Some(b) => Token::Batch(b.id),
                    None => {
                        let mut spans: Vec<_> = batch
                            .spans()
                            .iter()
                            .map(|s| (s.tp.partition, s.key, s.first, s.last))
                            .collect();
                        spans.sort_unstable();
                        Token::Spans(spans)
                    }
                };
                if self.landed.insert(token) {
                    self.written.extend(&batch.items);
                }
            }
            batch.ack();
        }
    }

    /// Several partitions' records, cut (across partitions or not) and logged, written or not
    /// until a crash; then redelivered from a committed offset per partition and cut in the
    /// same or the other mode, to the end: every item lands exactly once. Partitions hold
    /// equal items (the same event published to each), which must all land.
    #[test]
    fn redelivered_records_land_once_when_batches_were_cut_across_partitions() {
        const PARTS: i32 = 3;
        for (across1, across2) in [(true, true), (true, false), (false, true)] {
            for seed in 1..200u64 {
                let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5bd1);
                let limits = limits(1 + rng.next(15) as usize);
                let items: Vec<Vec<(i64, u32)>> = (0..PARTS)
                    .map(|p| {
                        records(20 + rng.next(50) as usize, &mut rng)
                            .into_iter()
                            .map(|(o, id)| (o, id + p as u32 % 2))
                            .collect()
                    })
                    .collect();
                let mut log: Vec<Span> = Vec::new();
                let mut table = Table::default();
                // Emits cuts as the batcher does: fresh spans logged, then each batch written
                // unless `lose` says the crash came first.
                let emit = |mut cuts: Vec<Cut<u32>>,
                            across: bool,
                            log: &mut Vec<Span>,
                            table: &mut Table,
                            lose: &mut dyn FnMut() -> bool| {
                    if across {
                        name_the_batch(&mut cuts);
                    }
                    log.extend(cuts.iter().filter(|c| !c.replay).map(|c| c.span.clone()));
                    for batch in batches(cuts, across) {
                        if !lose() {
                            table.write(batch);
                        }
                    }
                };
                // One run over `input` (partition, micro-batch) with per-partition plans.
                let run = |across: bool,
                           input: Vec<(usize, Vec<(i64, u32)>)>,
                           ledgers: &[Arc<PartitionLedger>],
                           mut plans: Vec<Option<VecDeque<Span>>>,
                           crash_after: usize,
                           rng: &mut Rng,
                           log: &mut Vec<Span>,
                           table: &mut Table| {
                    let mut state = State::new(across);
                    let mut flip = Rng(rng.next(u64::MAX));
                    let crashes = crash_after < input.len();
                    let mut lose = move || crashes && flip.next(2) == 0;
                    for (p, batch) in input.into_iter().take(crash_after) {
                        let mut cuts =
                            feed(&mut state, &ledgers[p], &mut plans[p], &batch, &limits);
                        match rng.next(4) {
                            0 => cuts.extend(state.flush(false)),
                            1 => cuts
                                .extend(state.lingered(Instant::now() + Duration::from_secs(7200))),
                            _ => {}
                        }
                        emit(cuts, across, log, table, &mut lose);
                    }
                    if !crashes {
                        emit(state.flush(true), across, log, table, &mut lose);
                    }
                };
                let interleave = |parts: Vec<Vec<Vec<(i64, u32)>>>, rng: &mut Rng| {
                    let mut queues: Vec<VecDeque<Vec<(i64, u32)>>> =
                        parts.into_iter().map(VecDeque::from).collect();
                    let mut out = Vec::new();
                    while queues.iter().any(|q| !q.is_empty()) {
                        let p = rng.next(queues.len() as u64) as usize;
                        if let Some(b) = queues[p].pop_front() {
                            out.push((p, b));
                        }
                    }
                    out
                };

                // Run 1, until a crash.
                let tps: Vec<TopicPartition> =
                    (0..PARTS).map(|p| TopicPartition::new("t", p)).collect();
                let ledgers: Vec<_> = tps
                    .iter()
                    .map(|tp| PartitionLedger::new(tp.clone()))
                    .collect();
                let parts = items.iter().map(|i| micro_batches(i, &mut rng)).collect();
                let input = interleave(parts, &mut rng);
                let crash_after = rng.next(input.len() as u64) as usize;
                let plans = (0..PARTS).map(|_| Some(VecDeque::new())).collect();
                run(
                    across1,
                    input,
                    &ledgers,
                    plans,
                    crash_after,
                    &mut rng,
                    &mut log,
                    &mut table,
                );
                let committed: Vec<i64> = ledgers
                    .iter()
                    .map(|l| rng.next(l.committable().unwrap_or(0) as u64 + 1) as i64)
                    .collect();

                // Run 2: redelivery from the committed offsets, to the end.
                let ledgers: Vec<_> = tps
                    .iter()
                    .map(|tp| PartitionLedger::new(tp.clone()))
                    .collect();
                let plans = tps
                    .iter()
                    .zip(&committed)
                    .map(|(tp, &c)| {
                        let recorded = log.iter().filter(|s| &s.tp == tp && s.last >= c).cloned();
                        Some(replay_plan(recorded.collect()))
                    })
                    .collect();
                let parts = items
                    .iter()
                    .zip(&committed)
                    .map(|(i, &c)| {
                        let rest: Vec<_> = i.iter().copied().filter(|x| x.0 >= c).collect();
                        micro_batches(&rest, &mut rng)
                    })
                    .collect();
                let input = interleave(parts, &mut rng);
                let n = input.len();
                run(
                    across2, input, &ledgers, plans, n, &mut rng, &mut log, &mut table,
                );

                let mut written = table.written.clone();
                written.sort_unstable();
                let mut expected: Vec<u32> = items.iter().flatten().map(|i| i.1).collect();
                expected.sort_unstable();
                assert_eq!(
                    written, expected,
                    "{across1}/{across2} seed {seed}: every item exactly once"
                );
                for (l, i) in ledgers.iter().zip(&items) {
                    if i.last()
                        .is_some_and(|x| x.0 >= committed[l.topic_partition().partition as usize])
                    {
                        assert_eq!(
                            l.committable(),
                            Some(i.last().unwrap().0 + 1),
                            "{across1}/{across2} seed {seed}: all acknowledged"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn across_partitions_one_batch_takes_every_partition_at_the_row_limit() {
        let mut state = State::<u32>::new(true);
        let mut cuts = Vec::new();
        let limits = limits(6);
        let tps: Vec<TopicPartition> = (0..3).map(|p| TopicPartition::new("t", p)).collect();
        for offset in 0..3 {
            for tp in &tps {
                state.push(
                    tp,
                    offset,
                    offset as u32,
                    1,
                    &AckSet::new(),
                    &limits,
                    &mut cuts,
                );
            }
        }
        // Six rows held: the seventh, a new record, cuts all three partitions' rows.
        assert!(cuts.len() == 3, "{}", cuts.len());
        assert!(cuts.iter().all(|c| c.rows.len() == 2 && c.span.across));
        let out = batches(cuts, true);
        assert_eq!(out.len(), 1, "one batch");
        assert_eq!(out[0].len(), 6);
        assert_eq!(out[0].spans().len(), 3);
        assert_eq!(state.held.rows, 3);
        let lingered = state.lingered(Instant::now() + Duration::from_secs(7200));
        assert_eq!(lingered.len(), 3, "every partition's rows once one is due");
        assert_eq!(state.held.rows, 0);
    }

    #[test]
    fn an_incomplete_recorded_span_is_dropped_when_revoked_and_never_committed() {
        let tp = TopicPartition::new("t", 0);
        let ledger = PartitionLedger::new(tp.clone());
        let plan = Span {
            tp: tp.clone(),
            first: 0,
            last: 9,
            items: 10,
            key: 0,
            across: false,
            batch: None,
        };
        let mut state = State::new(false);
        let mut plans = Some(VecDeque::from([plan]));
        let items: Vec<(i64, u32)> = (0..5).map(|i| (i, i as u32)).collect();
        let cuts = feed(&mut state, &ledger, &mut plans, &items, &limits(100));
        assert!(cuts.is_empty(), "the span is not complete yet");
        assert!(state.flush(false).is_empty(), "a flush does not cut it");
        assert_eq!(state.parts[&tp].rows.len(), 5);
        ledger.revoke();
        assert!(state.flush(false).is_empty());
        assert!(
            state.parts.is_empty() && state.held.bytes == 0 && state.held.rows == 0,
            "dropped"
        );
        assert!(ledger.settled());
        assert_eq!(
            ledger.committable(),
            None,
            "its records go to the next owner"
        );
    }

    #[test]
    fn overlapping_recorded_spans_keep_the_first_recorded() {
        let tp = TopicPartition::new("t", 0);
        let s = |first, last| Span {
            tp: tp.clone(),
            first,
            last,
            items: 1,
            key: 0,
            across: false,
            batch: None,
        };
        let plan = replay_plan(vec![s(10, 19), s(0, 9), s(5, 14), s(10, 19), s(20, 20)]);
        let got: Vec<(i64, i64)> = plan.iter().map(|p| (p.first, p.last)).collect();
        assert_eq!(got, vec![(0, 9), (10, 19), (20, 20)]);
    }
}
