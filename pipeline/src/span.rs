//! Span batching: batches cut per source partition along consecutive source offsets, each cut
//! recorded in a [`SpanLog`] before the batch moves on, so that records redelivered after a
//! crash are cut again at exactly the same places. A sink that deduplicates by batch identity
//! (ClickHouse's `insert_deduplication_token`) then sees the same batches and writes them once.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::ack::{AckSet, TopicPartition};
use crate::batch::Batch;
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

    /// Records the new spans, then sends every cut downstream.
    pub(crate) async fn emit(&self, cuts: Vec<Cut<T>>) -> Result<(), PipelineError> {
        if cuts.is_empty() {
            return Ok(());
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
        for cut in cuts {
            if cut.replay {
                metrics::counter!(m::SPANS_REPLAYED, "stage" => stage.clone()).increment(1);
            }
            metrics::histogram!(m::BATCH_SIZE, "stage" => stage.clone())
                .record(cut.rows.len() as f64);
            metrics::counter!(m::STAGE_ITEMS_OUT, "stage" => stage.clone())
                .increment(cut.rows.len() as u64);
            let mut batch = Batch::new(cut.rows, cut.acks).with_span(cut.span);
            if cut.whole_replay {
                batch = batch.replayed();
            }
            self.out.send(batch).await?;
        }
        Ok(())
    }
}

/// The span batcher task behind [`Flow::batch_spans`](crate::Flow::batch_spans).
pub(crate) struct SpanBatcher<T, F, L> {
    pub(crate) io: SpanIo<T, L>,
    pub(crate) limits: BatchLimits,
    pub(crate) size_of: F,
}

impl<T, F, L> SpanBatcher<T, F, L>
where
    T: Send + 'static,
    F: Fn(&T) -> usize,
    L: SpanLog,
{
    pub(crate) async fn run(
        self,
        mut input: Input<Sourced<T>>,
        mut flush: watch::Receiver<u64>,
    ) -> Result<(), PipelineError> {
        let mut state = State {
            parts: HashMap::new(),
            bytes: 0,
            seq: 0,
        };
        let mut flush_open = true;
        loop {
            let deadline = state
                .parts
                .values()
                .filter(|p| p.replaying().is_none())
                .filter_map(|p| p.deadline)
                .min();
            tokio::select! {
                biased;
                changed = flush.changed(), if flush_open => {
                    flush_open = changed.is_ok();
                    state.purge_revoked();
                    let cuts = state.flush(false);
                    self.io.emit(cuts).await?;
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    state.purge_revoked();
                    let cuts = state.lingered(Instant::now());
                    self.io.emit(cuts).await?;
                }
                next = input.recv() => match next {
                    Some(batch) => self.on_input(&mut state, batch).await?,
                    None => break,
                },
            }
        }
        let cuts = state.flush(true);
        self.io.emit(cuts).await
    }

    async fn on_input(
        &self,
        state: &mut State<T>,
        batch: Batch<Sourced<T>>,
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
                self.io.emit(cuts).await?;
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
        self.io.emit(cuts).await
    }
}

/// The batcher's buffers, without the I/O (unit-testable).
struct State<T> {
    parts: HashMap<TopicPartition, Part<T>>,
    /// Bytes held over all partitions.
    bytes: usize,
    /// Sequence number of the current input.
    seq: u64,
}

impl<T> State<T> {
    /// Drops what is held of assignments that are over: never written, so never twice.
    fn purge_revoked(&mut self) {
        let bytes = &mut self.bytes;
        self.parts.retain(|tp, p| {
            let keep = !p.is_revoked();
            if !keep && !p.rows.is_empty() {
                *bytes -= p.bytes;
                tracing::debug!(partition = %tp, rows = p.rows.len(), "dropped rows of a revoked assignment; the next owner writes them");
            }
            keep
        });
    }

    fn take(&mut self, tp: &TopicPartition, replay: Option<Span>) -> Option<Cut<T>> {
        let part = self.parts.get_mut(tp)?;
        take(part, tp, replay, &mut self.bytes)
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
        let part = self.parts.get_mut(tp).expect("inserted above");
        // Recorded spans that end before this record are complete.
        while let Some(plan) = part.plans.front() {
            if plan.last >= offset {
                break;
            }
            let plan = part.plans.pop_front().expect("front exists");
            if part.holds(&plan) {
                cuts.extend(take(part, tp, Some(plan), &mut self.bytes));
            }
        }
        let in_plan = part.plans.front().is_some_and(|p| p.first <= offset);
        if !part.rows.is_empty() && offset > part.last {
            let before_plan = in_plan && part.replaying().is_none();
            let full = part.rows.len() >= limits.max_rows || part.bytes >= limits.max_bytes;
            // Free rows are cut before a recorded span starts, and at the limits, but never
            // between two items of one record.
            if before_plan || (!in_plan && full) {
                cuts.extend(take(part, tp, None, &mut self.bytes));
            }
        }
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
        self.bytes += size;
    }

    /// After a whole input: recorded spans whose last record arrived are cut; the largest
    /// free buffers are cut while the bytes held exceed the limit.
    fn after_input(&mut self, limits: &BatchLimits, cuts: &mut Vec<Cut<T>>) {
        for (tp, part) in self.parts.iter_mut() {
            if let Some(plan) = part.replaying()
                && part.last >= plan.last
            {
                let plan = part.plans.pop_front().expect("replaying a front plan");
                cuts.extend(take(part, tp, Some(plan), &mut self.bytes));
            }
        }
        while self.bytes >= limits.max_bytes {
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

    /// Free buffers whose linger passed.
    fn lingered(&mut self, now: Instant) -> Vec<Cut<T>> {
        let due: Vec<TopicPartition> = self
            .parts
            .iter()
            .filter(|(_, p)| p.replaying().is_none() && p.deadline.is_some_and(|d| d <= now))
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
                    self.bytes -= part.bytes;
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
            self.bytes -= old.bytes;
            return Vec::new();
        }
        take(&mut old, tp, None, &mut self.bytes)
            .into_iter()
            .collect()
    }
}

fn take<T>(
    part: &mut Part<T>,
    tp: &TopicPartition,
    replay: Option<Span>,
    total_bytes: &mut usize,
) -> Option<Cut<T>> {
    if part.rows.is_empty() {
        return None;
    }
    let rows = std::mem::take(&mut part.rows);
    let items = rows.len() as u64;
    *total_bytes -= part.bytes;
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
            let mut state = State {
                parts: HashMap::new(),
                bytes: 0,
                seq: 0,
            };
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
            let mut state = State {
                parts: HashMap::new(),
                bytes: 0,
                seq: 0,
            };
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
        };
        let mut state = State {
            parts: HashMap::new(),
            bytes: 0,
            seq: 0,
        };
        let mut plans = Some(VecDeque::from([plan]));
        let items: Vec<(i64, u32)> = (0..5).map(|i| (i, i as u32)).collect();
        let cuts = feed(&mut state, &ledger, &mut plans, &items, &limits(100));
        assert!(cuts.is_empty(), "the span is not complete yet");
        assert!(state.flush(false).is_empty(), "a flush does not cut it");
        assert_eq!(state.parts[&tp].rows.len(), 5);
        ledger.revoke();
        assert!(state.flush(false).is_empty());
        assert!(state.parts.is_empty() && state.bytes == 0, "dropped");
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
        };
        let plan = replay_plan(vec![s(10, 19), s(0, 9), s(5, 14), s(10, 19), s(20, 20)]);
        let got: Vec<(i64, i64)> = plan.iter().map(|p| (p.first, p.last)).collect();
        assert_eq!(got, vec![(0, 9), (10, 19), (20, 20)]);
    }
}
