//! The span batcher behind [`Flow::batch_spans`](crate::Flow::batch_spans): rows cut per
//! partition (or all partitions together) at the row and byte limits and after the linger,
//! on the shared span core.

use tokio::sync::watch;
use tokio::time::Instant;

use super::Sourced;
use super::SpanLog;
use super::core::{Cut, Parts};
use super::io::{Cuts, SpanIo};
use crate::ack::{AckSet, TopicPartition};
use crate::batch::Batch;
use crate::error::PipelineError;
use crate::metrics as m;
use crate::stages::{BatchLimits, Input, sleep_until_opt};

/// How often a batcher whose linger passed looks again whether its batches are written.
const BUSY_RECHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// The span batcher task.
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
        let mut state = Batches::new(self.across);
        let mut flush_open = true;
        // While a batch is not yet written, a due linger is put off: the rows keep filling the
        // next batch (up to the limits), so a busy sink gets fewer, larger writes, and an idle
        // one gets every batch at its linger.
        let mut busy_until: Option<Instant> = None;
        loop {
            let deadline = state
                .deadline(&self.limits)
                .map(|d| busy_until.map_or(d, |b| d.max(b)));
            tokio::select! {
                biased;
                changed = flush.changed(), if flush_open => {
                    flush_open = changed.is_ok();
                    tx.pass(state.flush(false), self.across).await?;
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    let now = Instant::now();
                    if !tx.is_idle() || self.io.in_flight.count() > 0 {
                        busy_until = Some(now + BUSY_RECHECK);
                        continue;
                    }
                    busy_until = None;
                    state.parts.purge_revoked();
                    tx.pass(state.lingered(now, &self.limits), self.across).await?;
                }
                next = input.recv() => match next {
                    Some(batch) => self.on_input(&mut state, batch, &tx).await?,
                    None => break,
                },
            }
        }
        tx.pass(state.flush(true), self.across).await
    }

    async fn on_input(
        &self,
        state: &mut Batches<T>,
        batch: Batch<Sourced<T>>,
        tx: &Cuts<T>,
    ) -> Result<(), PipelineError> {
        metrics::counter!(m::STAGE_ITEMS_IN, "stage" => self.io.stage.to_string())
            .increment(batch.len() as u64);
        let (items, acks) = batch.into_parts();
        let seen = state.parts.begin(&acks);
        // A partition seen under a new assignment: finish what is held of the old one, then
        // load the spans recorded past the new assignment's start.
        for &(tp, assignment, from) in &seen.new {
            tx.pass(state.parts.retire(tp, &mut keep_rows), self.across)
                .await?;
            let recorded = self.io.load(tp, from).await?;
            state.parts.assign(tp, assignment, recorded);
        }
        let mut cuts = Vec::new();
        for Sourced { tp, offset, item } in items {
            if seen.over.contains(&&tp) {
                continue;
            }
            let size = (self.size_of)(&item);
            state
                .push(&tp, offset, item, size, &acks, &self.limits, &mut cuts)
                .map_err(|e| PipelineError::OutOfOrder {
                    stage: self.io.stage.clone(),
                    partition: e.tp,
                    offset: e.offset,
                    after: e.after,
                })?;
        }
        state.after_input(&self.limits, &mut cuts);
        acks.release();
        tx.pass(cuts, self.across).await
    }
}

/// A span batcher's pane holds its rows as they came.
fn keep_rows<T>(rows: Vec<T>, _: i64, _: &super::SourceSpan) -> Vec<T> {
    rows
}

/// The batcher's cutting rules over the span core, without the I/O (unit-testable).
pub(crate) struct Batches<T> {
    pub(crate) parts: Parts<Vec<T>>,
    /// Free rows of all partitions are cut together, at limits that apply to their sum.
    across: bool,
}

impl<T> Batches<T> {
    pub(crate) fn new(across: bool) -> Self {
        Self {
            parts: Parts::new(across),
            across,
        }
    }

    /// When the next linger is due (free panes only: a recorded span waits for its records).
    fn deadline(&self, limits: &BatchLimits) -> Option<Instant> {
        self.parts
            .map
            .values()
            .flat_map(|p| p.free())
            .map(|(_, pane)| pane.opened + limits.max_linger)
            .min()
    }

    /// Adds one item of the current input.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push(
        &mut self,
        tp: &TopicPartition,
        offset: i64,
        item: T,
        size: usize,
        acks: &AckSet,
        limits: &BatchLimits,
        cuts: &mut Vec<Cut<T>>,
    ) -> Result<(), super::core::OutOfOrder> {
        let at = self.parts.prepare(tp, offset, 0, &mut keep_rows, cuts)?;
        // Free rows are cut at the limits, but never between two items of one record.
        if at.boundary && !at.in_plan && !self.across {
            let full = self.parts.map[tp].panes.get(&0).is_some_and(|p| {
                p.items as usize >= limits.max_rows || p.bytes >= limits.max_bytes
            });
            if full {
                cuts.extend(self.parts.take(tp, 0, None, &mut keep_rows));
            }
        }
        // Other partitions' rows always end at a record: only this one may be inside one.
        if self.across && (at.boundary || at.in_plan) && self.free_full(limits) {
            cuts.extend(self.parts.take_free(&mut keep_rows));
        }
        self.parts
            .add(tp, offset, 0, size, acks, |rows| rows.push(item));
        Ok(())
    }

    /// Whether the free rows of all partitions together reach a limit.
    fn free_full(&self, limits: &BatchLimits) -> bool {
        let held = &self.parts.held;
        if held.rows < limits.max_rows && held.bytes < limits.max_bytes {
            return false;
        }
        let (rows, bytes) = self.parts.free_totals();
        rows >= limits.max_rows || bytes >= limits.max_bytes
    }

    /// After a whole input: recorded spans whose last record arrived are cut; the largest
    /// free panes (or, across partitions, all of them) are cut while the bytes held exceed
    /// the limit.
    pub(crate) fn after_input(&mut self, limits: &BatchLimits, cuts: &mut Vec<Cut<T>>) {
        self.parts.cut_completed(&mut keep_rows, cuts);
        if self.across {
            if self.parts.held.bytes >= limits.max_bytes {
                cuts.extend(self.parts.take_free(&mut keep_rows));
            }
            return;
        }
        while self.parts.held.bytes >= limits.max_bytes {
            let Some(tp) = self
                .parts
                .map
                .iter()
                .flat_map(|(tp, p)| p.free().map(move |(_, pane)| (tp, pane.bytes)))
                .max_by_key(|(_, bytes)| *bytes)
                .map(|(tp, _)| tp.clone())
            else {
                break;
            };
            cuts.extend(self.parts.take(&tp, 0, None, &mut keep_rows));
        }
    }

    /// Free panes whose linger passed (across partitions: all of them, once one is due).
    pub(crate) fn lingered(&mut self, now: Instant, limits: &BatchLimits) -> Vec<Cut<T>> {
        let linger = limits.max_linger;
        let due = |_: i64, p: &super::core::Pane<Vec<T>>| p.opened + linger <= now;
        if self.across {
            let any_due = self
                .parts
                .map
                .values()
                .flat_map(|p| p.free())
                .any(|(k, p)| due(k, p));
            return if any_due {
                self.parts.take_free(&mut keep_rows)
            } else {
                Vec::new()
            };
        }
        self.parts.take_where(due, &mut keep_rows)
    }

    /// A flush request (rebalance, drain) or the end of the input (see [`Parts::flush`]).
    pub(crate) fn flush(&mut self, end: bool) -> Vec<Cut<T>> {
        self.parts.flush(end, &mut keep_rows)
    }
}

#[cfg(test)]
mod tests {
    use super::super::core::CutKind;
    use super::super::io::{batches, name_the_batch};
    use super::super::rebuild::Rebuilds;
    use super::super::{Rng, SourceSpan};
    use super::*;
    use crate::ack::PartitionLedger;
    use crate::batch::Delivery;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    fn limits(max_rows: usize) -> BatchLimits {
        BatchLimits {
            max_rows,
            max_bytes: usize::MAX,
            max_linger: Duration::from_secs(3600),
        }
    }

    /// Feeds one source micro-batch (records `items[0].0..=items[last].0`) as the batcher
    /// does: a new assignment with its recorded spans, every item, then the cuts that
    /// complete recorded spans.
    fn feed(
        state: &mut Batches<u32>,
        ledger: &Arc<PartitionLedger>,
        recorded: &mut Option<Vec<SourceSpan>>,
        items: &[(i64, u32)],
        limits: &BatchLimits,
    ) -> Vec<Cut<u32>> {
        let tp = ledger.topic_partition().clone();
        let mut acks = AckSet::new();
        acks.push(ledger.issue(items[0].0, items[items.len() - 1].0).unwrap());
        let seen = state.parts.begin(&acks);
        assert!(seen.over.is_empty());
        let mut cuts = Vec::new();
        if let Some(recorded) = recorded.take() {
            cuts.extend(state.parts.retire(&tp, &mut keep_rows));
            state
                .parts
                .assign(&tp, acks.handles()[0].assignment(), recorded);
        }
        for &(offset, item) in items {
            state
                .push(&tp, offset, item, 1, &acks, limits, &mut cuts)
                .expect("in order");
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
            let mut state = Batches::new(false);
            let mut recorded = Some(Vec::new());
            let mut log: Vec<SourceSpan> = Vec::new();
            let mut table = BTreeMap::new();
            let mut lost_from = i64::MAX;
            let batches = micro_batches(&items, &mut rng);
            let crash_after = rng.next(batches.len() as u64 + 1) as usize;
            for batch in &batches[..crash_after] {
                let mut cuts = feed(&mut state, &ledger, &mut recorded, batch, &limits);
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
            let held = state.parts.map.get(&tp).and_then(|p| p.panes.get(&0));
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
            let mut recorded = Some(
                log.iter()
                    .filter(|s| s.last >= committed)
                    .cloned()
                    .collect(),
            );
            let mut state = Batches::new(false);
            let rest: Vec<(i64, u32)> =
                items.iter().copied().filter(|i| i.0 >= committed).collect();
            for batch in micro_batches(&rest, &mut rng) {
                let mut cuts = feed(&mut state, &ledger, &mut recorded, &batch, &limits);
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
            let recovery = |s: &SourceSpan| {
                let b = s
                    .batch
                    .expect("a span cut across partitions names its batch");
                Token::Recovery(b.id, s.tp.partition, s.window_key(), s.first, s.last)
            };
            // A rebuilt batch goes whole unless some span of it was written alone.
            let recovered = match batch.delivery() {
                Delivery::Recovered => true,
                Delivery::Rebuilt => batch
                    .spans()
                    .iter()
                    .any(|s| self.landed.contains(&recovery(s))),
                _ => false,
            };
            if recovered {
                let parts = batch
                    .span_items()
                    .expect("a recovered batch holds its spans' rows");
                for (s, rows) in parts {
                    let b = s.batch.expect("checked above");
                    if !self.landed.contains(&Token::Batch(b.id)) && self.landed.insert(recovery(s))
                    {
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
                            .map(|s| (s.tp.partition, s.window_key(), s.first, s.last))
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
    /// until a crash; then redelivered from a committed offset per partition, cut in the same
    /// or the other mode, until a second crash; then again, to the end: every item lands
    /// exactly once. Redelivered spans of batches cut across partitions wait to be rebuilt,
    /// or give up waiting at random moments (a partition gone elsewhere). Partitions hold
    /// equal items (the same event published to each), which must all land.
    #[test]
    fn redelivered_records_land_once_when_batches_were_cut_across_partitions() {
        const PARTS: i32 = 3;
        let modes = [
            [true, true, true],
            [true, false, true],
            [false, true, true],
            [true, true, false],
        ];
        for modes in modes {
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
                let mut log: Vec<SourceSpan> = Vec::new();
                let mut table = Table::default();
                // Emits cuts as `SpanIo` does: fresh spans logged, spans of batches cut across
                // partitions held until rebuilt, then each batch written unless `lose` says
                // the crash came first.
                let emit = |mut cuts: Vec<Cut<u32>>,
                            across: bool,
                            log: &mut Vec<SourceSpan>,
                            rebuilds: &mut Rebuilds<u32>,
                            give_up: bool,
                            table: &mut Table,
                            lose: &mut dyn FnMut() -> bool| {
                    if across {
                        name_the_batch(&mut cuts);
                    }
                    log.extend(
                        cuts.iter()
                            .filter(|c| c.kind == CutKind::Fresh)
                            .map(|c| c.span.clone()),
                    );
                    let (cuts, mut out) = rebuilds.gather(cuts, Instant::now());
                    out.extend(batches(cuts, across));
                    if give_up {
                        out.extend(rebuilds.due(Instant::now() + Duration::from_secs(7200)));
                    }
                    for batch in out {
                        if !lose() {
                            table.write(batch);
                        }
                    }
                };
                // One run over `input` (partition, micro-batch) with per-partition records.
                let run = |across: bool,
                           input: Vec<(usize, Vec<(i64, u32)>)>,
                           ledgers: &[Arc<PartitionLedger>],
                           mut recorded: Vec<Option<Vec<SourceSpan>>>,
                           crash_after: usize,
                           rng: &mut Rng,
                           log: &mut Vec<SourceSpan>,
                           table: &mut Table| {
                    let mut state = Batches::new(across);
                    let mut rebuilds = Rebuilds::default();
                    let mut flip = Rng(rng.next(u64::MAX));
                    let crashes = crash_after < input.len();
                    let mut lose = move || crashes && flip.next(2) == 0;
                    for (p, batch) in input.into_iter().take(crash_after) {
                        let mut cuts =
                            feed(&mut state, &ledgers[p], &mut recorded[p], &batch, &limits);
                        match rng.next(4) {
                            0 => cuts.extend(state.flush(false)),
                            1 => cuts.extend(
                                state.lingered(Instant::now() + Duration::from_secs(7200), &limits),
                            ),
                            _ => {}
                        }
                        let give_up = rng.next(8) == 0;
                        emit(cuts, across, log, &mut rebuilds, give_up, table, &mut lose);
                    }
                    if !crashes {
                        // What still waits at the end never comes whole: it gives up waiting.
                        let cuts = state.flush(true);
                        emit(cuts, across, log, &mut rebuilds, true, table, &mut lose);
                    }
                };
                let interleave = |parts: Vec<Vec<Vec<(i64, u32)>>>, rng: &mut Rng| {
                    let mut queues: Vec<std::collections::VecDeque<Vec<(i64, u32)>>> =
                        parts.into_iter().map(Into::into).collect();
                    let mut out = Vec::new();
                    while queues.iter().any(|q| !q.is_empty()) {
                        let p = rng.next(queues.len() as u64) as usize;
                        if let Some(b) = queues[p].pop_front() {
                            out.push((p, b));
                        }
                    }
                    out
                };

                let tps: Vec<TopicPartition> =
                    (0..PARTS).map(|p| TopicPartition::new("t", p)).collect();
                let mut committed = vec![0i64; PARTS as usize];
                let mut ledgers = Vec::new();
                for (round, &across) in modes.iter().enumerate() {
                    let last = round + 1 == modes.len();
                    ledgers = tps
                        .iter()
                        .map(|tp| PartitionLedger::new(tp.clone()))
                        .collect();
                    let recorded = tps
                        .iter()
                        .zip(&committed)
                        .map(|(tp, &c)| {
                            Some(
                                log.iter()
                                    .filter(|s| &s.tp == tp && s.last >= c)
                                    .cloned()
                                    .collect(),
                            )
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
                    let crash_after = if last {
                        input.len()
                    } else {
                        rng.next(input.len() as u64) as usize
                    };
                    run(
                        across,
                        input,
                        &ledgers,
                        recorded,
                        crash_after,
                        &mut rng,
                        &mut log,
                        &mut table,
                    );
                    if !last {
                        for (c, l) in committed.iter_mut().zip(&ledgers) {
                            let up_to = l.committable().unwrap_or(*c).max(*c);
                            *c += rng.next((up_to - *c) as u64 + 1) as i64;
                        }
                    }
                }

                let mut written = table.written.clone();
                written.sort_unstable();
                let mut expected: Vec<u32> = items.iter().flatten().map(|i| i.1).collect();
                expected.sort_unstable();
                assert_eq!(
                    written, expected,
                    "{modes:?} seed {seed}: every item exactly once"
                );
                for (l, i) in ledgers.iter().zip(&items) {
                    if i.last()
                        .is_some_and(|x| x.0 >= committed[l.topic_partition().partition as usize])
                    {
                        assert_eq!(
                            l.committable(),
                            Some(i.last().unwrap().0 + 1),
                            "{modes:?} seed {seed}: all acknowledged"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn across_partitions_one_batch_takes_every_partition_at_the_row_limit() {
        let mut state = Batches::<u32>::new(true);
        let mut cuts = Vec::new();
        let limits = limits(6);
        let tps: Vec<TopicPartition> = (0..3).map(|p| TopicPartition::new("t", p)).collect();
        let acks = AckSet::new();
        let _ = state.parts.begin(&acks);
        for offset in 0..3 {
            for tp in &tps {
                state
                    .push(tp, offset, offset as u32, 1, &acks, &limits, &mut cuts)
                    .expect("in order");
            }
        }
        // Six rows held: the seventh, a new record, cuts all three partitions' rows.
        assert!(cuts.len() == 3, "{}", cuts.len());
        assert!(cuts.iter().all(|c| c.rows.len() == 2 && c.span.across));
        let out = batches(cuts, true);
        assert_eq!(out.len(), 1, "one batch");
        assert_eq!(out[0].len(), 6);
        assert_eq!(out[0].spans().len(), 3);
        assert_eq!(state.parts.held.rows, 3);
        let lingered = state.lingered(Instant::now() + Duration::from_secs(7200), &limits);
        assert_eq!(lingered.len(), 3, "every partition's rows once one is due");
        assert_eq!(state.parts.held.rows, 0);
    }

    #[test]
    fn an_incomplete_recorded_span_is_dropped_when_revoked_and_never_committed() {
        let tp = TopicPartition::new("t", 0);
        let ledger = PartitionLedger::new(tp.clone());
        let plan = SourceSpan {
            tp: tp.clone(),
            first: 0,
            last: 9,
            items: 10,
            window: None,
            across: false,
            batch: None,
        };
        let mut state = Batches::new(false);
        let mut recorded = Some(vec![plan]);
        let items: Vec<(i64, u32)> = (0..5).map(|i| (i, i as u32)).collect();
        let cuts = feed(&mut state, &ledger, &mut recorded, &items, &limits(100));
        assert!(cuts.is_empty(), "the span is not complete yet");
        assert!(state.flush(false).is_empty(), "a flush does not cut it");
        assert_eq!(state.parts.map[&tp].panes[&0].items, 5);
        ledger.revoke();
        assert!(state.flush(false).is_empty());
        assert!(
            state.parts.map.is_empty() && state.parts.held.bytes == 0 && state.parts.held.rows == 0,
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
    fn items_out_of_offset_order_are_refused() {
        let tp = TopicPartition::new("t", 0);
        let ledger = PartitionLedger::new(tp.clone());
        let mut state = Batches::new(false);
        let mut acks = AckSet::new();
        acks.push(ledger.issue(0, 9).unwrap());
        let _ = state.parts.begin(&acks);
        let mut cuts = Vec::new();
        let limits = limits(100);
        for offset in [0, 1, 1, 4] {
            state
                .push(&tp, offset, 0u32, 1, &acks, &limits, &mut cuts)
                .expect("in order, two items of record 1");
        }
        let e = state
            .push(&tp, 3, 0, 1, &acks, &limits, &mut cuts)
            .expect_err("3 after 4");
        assert_eq!((e.offset, e.after), (3, 4));
        acks.release();
    }
}
