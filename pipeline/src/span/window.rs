//! Event-time tumbling windows over span-logged cuts: per source partition and window, items
//! are aggregated by key; a window closes when the partition's watermark (the latest event
//! time seen, minus the allowed lateness) passes its end, or after a wall-clock bound. Late
//! items are never dropped: they open the window again and close it at once, as one more row
//! per key. Each cut is recorded in a [`SpanLog`] before it moves on (with its window), so
//! records redelivered after a crash are cut into the same windows at the same places and a
//! deduplicating sink writes each window row once.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::core::{Cut, Parts};
use super::io::{Cuts, SpanIo};
use super::{SourceSpan, Sourced, SpanLog};
use crate::ack::{AckSet, TopicPartition};
use crate::batch::Batch;
use crate::error::PipelineError;
use crate::metrics as m;
use crate::stages::{BatchLimits, Input, sleep_until_opt};

/// How items aggregate into window rows.
///
/// ```
/// use sluice_pipeline::WindowAggregate;
///
/// /// Bytes per tenant and minute, from (event time, tenant, bytes) items.
/// struct BytesPerTenant;
///
/// impl WindowAggregate for BytesPerTenant {
///     type In = (i64, String, u64);
///     type Key = String;
///     type Acc = u64;
///     type Out = (i64, String, u64);
///     fn event_time(&self, item: &Self::In) -> i64 { item.0 }
///     fn key(&self, item: &Self::In) -> String { item.1.clone() }
///     fn add(&self, acc: &mut u64, item: &Self::In) { *acc += item.2 }
///     fn finish(&self, start: i64, tenant: String, bytes: u64) -> Self::Out { (start, tenant, bytes) }
/// }
/// ```
pub trait WindowAggregate: Send + Sync + 'static {
    /// What is aggregated.
    type In: Send + 'static;
    /// Rows of one window are per key (e.g. tenant and usage type).
    type Key: Hash + Eq + Clone + Send;
    /// The running aggregate of one key in one window.
    type Acc: Default + Send;
    /// A finished row.
    type Out: Send + 'static;

    /// The item's event time, seconds since the epoch.
    fn event_time(&self, item: &Self::In) -> i64;

    /// The item's key.
    fn key(&self, item: &Self::In) -> Self::Key;

    /// Adds the item to its key's aggregate.
    fn add(&self, acc: &mut Self::Acc, item: &Self::In);

    /// The row of `key` for the window starting at `window_start`.
    fn finish(&self, window_start: i64, key: Self::Key, acc: Self::Acc) -> Self::Out;

    /// Marks a finished row with the span of records it was aggregated from (the same span
    /// when a replay cuts the window again). Rows that leave gathered
    /// ([`Flow::window_across`](crate::Flow::window_across)) are compared row by row after a
    /// ClickHouse crash during their insert, so rows of different windows must differ: the
    /// span's partition and first offset make them. By default rows are left as they are.
    fn stamp(&self, _row: &mut Self::Out, _source: &SourceSpan) {}
}

/// Window length, lateness and the wall-clock bound.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowSpec {
    /// Tumbling window length (whole seconds, at least one).
    pub length: Duration,
    /// How far behind the latest event time an item may be and still join its open window.
    pub allowed_lateness: Duration,
    /// A window open this long (wall clock) closes even if the watermark has not passed it
    /// (an idle partition).
    pub max_open: Duration,
}

impl Default for WindowSpec {
    fn default() -> Self {
        Self {
            length: Duration::from_secs(60),
            allowed_lateness: Duration::from_secs(30),
            max_open: Duration::from_secs(150),
        }
    }
}

/// The window task behind [`Flow::window`](crate::Flow::window).
pub(crate) struct Windower<A: WindowAggregate, L> {
    pub(crate) io: SpanIo<A::Out, L>,
    pub(crate) spec: WindowSpec,
    pub(crate) agg: A,
    /// Closed windows of every partition wait up to `max_linger` (or until they hold
    /// `max_rows` rows) to leave as one batch; `None`: each leaves at once, alone.
    pub(crate) gather: Option<BatchLimits>,
}

/// Closed windows waiting to leave together.
struct Ready<T> {
    cuts: Vec<Cut<T>>,
    rows: usize,
    since: Option<Instant>,
}

impl<T> Default for Ready<T> {
    fn default() -> Self {
        Self {
            cuts: Vec::new(),
            rows: 0,
            since: None,
        }
    }
}

/// A window pane: one aggregate per key.
type Accs<A> = HashMap<<A as WindowAggregate>::Key, <A as WindowAggregate>::Acc>;

/// The windows of every partition.
pub(crate) struct State<A: WindowAggregate> {
    parts: Parts<Accs<A>>,
    /// Partitions whose held records were last reported non-zero.
    reported: Vec<TopicPartition>,
    length: i64,
    lateness: i64,
}

impl<A: WindowAggregate, L: SpanLog> Windower<A, L> {
    pub(crate) async fn run(
        self,
        input: Input<Sourced<A::In>>,
        flush: watch::Receiver<u64>,
    ) -> Result<(), PipelineError> {
        self.io.drive(|cuts| self.cut(input, flush, cuts)).await
    }

    fn state(&self) -> State<A> {
        State {
            parts: Parts::new(self.gather.is_some()),
            reported: Vec::new(),
            length: self.spec.length.as_secs().max(1) as i64,
            lateness: self.spec.allowed_lateness.as_secs() as i64,
        }
    }

    /// A window's aggregates as rows, stamped with their span.
    fn finish(&self) -> impl FnMut(Accs<A>, i64, &SourceSpan) -> Vec<A::Out> + '_ {
        |accs, window, span| {
            accs.into_iter()
                .map(|(k, acc)| {
                    let mut row = self.agg.finish(window, k, acc);
                    self.agg.stamp(&mut row, span);
                    row
                })
                .collect()
        }
    }

    async fn cut(
        &self,
        mut input: Input<Sourced<A::In>>,
        mut flush: watch::Receiver<u64>,
        tx: Cuts<A::Out>,
    ) -> Result<(), PipelineError> {
        let mut state = self.state();
        let mut flush_open = true;
        let mut ready = Ready::default();
        loop {
            let gathered = self
                .gather
                .as_ref()
                .and_then(|g| ready.since.map(|s| s + g.max_linger));
            let deadline = state
                .parts
                .map
                .values()
                .flat_map(|part| part.free().map(|(_, p)| p.opened + self.spec.max_open))
                .chain(gathered)
                .min();
            tokio::select! {
                biased;
                changed = flush.changed(), if flush_open => {
                    flush_open = changed.is_ok();
                    let cuts = state.parts.flush(false, &mut self.finish());
                    self.pass(&tx, &mut ready, cuts, true).await?;
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    let now = Instant::now();
                    state.parts.purge_revoked();
                    let max_open = self.spec.max_open;
                    let cuts = state
                        .parts
                        .take_where(|_, p| p.opened + max_open <= now, &mut self.finish());
                    let due = gathered.is_some_and(|g| g <= now);
                    self.pass(&tx, &mut ready, cuts, due).await?;
                }
                next = input.recv() => match next {
                    Some(batch) => self.on_input(&mut state, batch, &tx, &mut ready).await?,
                    None => break,
                },
            }
            self.report_held(&mut state);
        }
        let cuts = state.parts.flush(true, &mut self.finish());
        self.pass(&tx, &mut ready, cuts, true).await
    }

    /// Sets, per partition, how many records open windows hold back from the offset commit:
    /// from the first record of the oldest open window to the last record seen (what explains
    /// a committed offset that trails processing while a topic is quiet).
    fn report_held(&self, state: &mut State<A>) {
        let gauge = |tp: &TopicPartition| metrics::gauge!(m::WINDOW_HELD_RECORDS, "stage" => self.io.stage.to_string(), "topic" => tp.topic.to_string(), "partition" => tp.partition.to_string());
        let mut now = Vec::new();
        for (tp, part) in &state.parts.map {
            if let Some(first) = part.panes.values().map(|p| p.first).min() {
                gauge(tp).set((part.seen - first + 1).max(0) as f64);
                now.push(tp.clone());
            }
        }
        for tp in state.reported.iter().filter(|tp| !now.contains(tp)) {
            gauge(tp).set(0.0);
        }
        state.reported = now;
    }

    /// Sends `cuts` on, at once or (gathering) with the others once the gathered ones are
    /// due (`now`) or hold `max_rows` rows.
    async fn pass(
        &self,
        tx: &Cuts<A::Out>,
        ready: &mut Ready<A::Out>,
        cuts: Vec<Cut<A::Out>>,
        now: bool,
    ) -> Result<(), PipelineError> {
        let Some(limits) = &self.gather else {
            return tx.pass(cuts, false).await;
        };
        if !cuts.is_empty() {
            ready.since.get_or_insert_with(Instant::now);
            ready.rows += cuts.iter().map(|c| c.rows.len()).sum::<usize>();
            ready.cuts.extend(cuts);
        }
        if now || ready.rows >= limits.max_rows {
            ready.rows = 0;
            ready.since = None;
            return tx.pass(std::mem::take(&mut ready.cuts), true).await;
        }
        Ok(())
    }

    async fn on_input(
        &self,
        state: &mut State<A>,
        batch: Batch<Sourced<A::In>>,
        tx: &Cuts<A::Out>,
        ready: &mut Ready<A::Out>,
    ) -> Result<(), PipelineError> {
        metrics::counter!(m::STAGE_ITEMS_IN, "stage" => self.io.stage.to_string())
            .increment(batch.len() as u64);
        let (items, acks) = batch.into_parts();
        let seen = state.parts.begin(&acks);
        for &(tp, assignment, from) in &seen.new {
            let cuts = state.parts.retire(tp, &mut self.finish());
            self.pass(tx, ready, cuts, false).await?;
            let recorded = self.io.load(tp, from).await?;
            state.parts.assign(tp, assignment, recorded);
        }
        let mut cuts = Vec::new();
        for Sourced { tp, offset, item } in items {
            if !seen.over.contains(&&tp) {
                self.push(state, &tp, offset, item, &acks, &mut cuts)
                    .map_err(|e| PipelineError::OutOfOrder {
                        stage: self.io.stage.clone(),
                        partition: e.tp,
                        offset: e.offset,
                        after: e.after,
                    })?;
            }
        }
        self.after_input(state, &mut cuts);
        acks.release();
        self.pass(tx, ready, cuts, false).await
    }

    fn push(
        &self,
        state: &mut State<A>,
        tp: &TopicPartition,
        offset: i64,
        item: A::In,
        acks: &AckSet,
        cuts: &mut Vec<Cut<A::Out>>,
    ) -> Result<(), super::core::OutOfOrder> {
        let t = self.agg.event_time(&item);
        let window = t.div_euclid(state.length) * state.length;
        state
            .parts
            .prepare(tp, offset, window, &mut self.finish(), cuts)?;
        let part = state.parts.map.get_mut(tp).expect("prepared");
        part.max_time = part.max_time.max(t);
        let key = self.agg.key(&item);
        state.parts.add(tp, offset, window, 0, acks, |accs| {
            self.agg.add(accs.entry(key).or_default(), &item)
        });
        Ok(())
    }

    /// After a whole input: recorded spans whose last record arrived are cut; windows the
    /// watermark has passed are closed.
    fn after_input(&self, state: &mut State<A>, cuts: &mut Vec<Cut<A::Out>>) {
        let mut finish = self.finish();
        state.parts.cut_completed(&mut finish, cuts);
        let (length, lateness) = (state.length, state.lateness);
        let tps: Vec<TopicPartition> = state.parts.map.keys().cloned().collect();
        for tp in tps {
            let part = &state.parts.map[&tp];
            let watermark = part.max_time.saturating_sub(lateness);
            let due: Vec<i64> = part
                .free()
                .filter(|(w, _)| w + length <= watermark)
                .map(|(w, _)| w)
                .collect();
            for w in due {
                cuts.extend(state.parts.take(&tp, w, None, &mut finish));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::super::Rng;
    use super::super::core::CutKind;
    use super::super::io::batches;
    use crate::ack::PartitionLedger;
    use crate::batch::Delivery;
    use crate::error::SinkError;
    use crate::lifecycle::Health;
    use crate::retry::RetryPolicy;
    use crate::stages::Output;

    /// A window row: window start, key, sum, and the stamp (partition × 10⁶ + first offset;
    /// 0 when not stamped).
    type Row = (i64, u8, u64, i64);

    /// Sums values per key; `stamped`: marks rows with their source span.
    struct Sum {
        stamped: bool,
    }

    impl WindowAggregate for Sum {
        type In = (i64, u8, u64);
        type Key = u8;
        type Acc = u64;
        type Out = Row;
        fn event_time(&self, item: &Self::In) -> i64 {
            item.0
        }
        fn key(&self, item: &Self::In) -> u8 {
            item.1
        }
        fn add(&self, acc: &mut u64, item: &Self::In) {
            *acc += item.2;
        }
        fn finish(&self, window: i64, key: u8, acc: u64) -> Self::Out {
            (window, key, acc, 0)
        }
        fn stamp(&self, row: &mut Row, source: &SourceSpan) {
            if self.stamped {
                row.3 = i64::from(source.tp.partition) * 1_000_000 + source.first;
            }
        }
    }

    /// Never called by the synchronous parts under test.
    struct NoLog;

    impl SpanLog for NoLog {
        async fn record(&self, _: &[SourceSpan]) -> Result<(), SinkError> {
            Ok(())
        }
        async fn load(&self, _: &TopicPartition, _: i64) -> Result<Vec<SourceSpan>, SinkError> {
            unreachable!()
        }
    }

    #[tokio::test]
    async fn gathered_windows_leave_together_at_the_row_limit_or_when_due() {
        let (tx, mut rx) = Cuts::test_channel(4);
        let mut w = windower();
        w.gather = Some(BatchLimits {
            max_rows: 3,
            max_bytes: usize::MAX,
            max_linger: Duration::from_secs(3600),
        });
        let tp = TopicPartition::new("t", 0);
        let cut = |first: i64, rows: usize| Cut {
            rows: vec![(60i64, 0u8, 1u64, 0i64); rows],
            acks: AckSet::new(),
            span: SourceSpan {
                tp: tp.clone(),
                first,
                last: first,
                items: rows as u64,
                window: Some(60),
                across: true,
                batch: None,
            },
            kind: CutKind::Fresh,
        };
        let mut ready = Ready::default();
        w.pass(&tx, &mut ready, vec![cut(0, 2)], false)
            .await
            .unwrap();
        assert!(rx.try_recv().is_err(), "two rows wait for more");
        assert!(ready.since.is_some(), "and have a deadline");
        w.pass(&tx, &mut ready, vec![cut(1, 2)], false)
            .await
            .unwrap();
        let (cuts, across) = rx.try_recv().expect("leave at the row limit");
        let out = batches(cuts, across);
        assert_eq!(out.len(), 1, "as one batch");
        assert_eq!((out[0].len(), out[0].spans().len()), (4, 2));
        w.pass(&tx, &mut ready, vec![cut(2, 1)], false)
            .await
            .unwrap();
        assert!(rx.try_recv().is_err());
        w.pass(&tx, &mut ready, Vec::new(), true).await.unwrap();
        assert_eq!(rx.try_recv().expect("due").0.len(), 1);
        assert!(ready.cuts.is_empty() && ready.since.is_none());
    }

    fn windower() -> Windower<Sum, NoLog> {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        Windower {
            io: SpanIo {
                stage: "w".into(),
                out: Output::new("w".into(), tx),
                log: NoLog,
                retry: RetryPolicy::default(),
                health: Health::new(),
                in_flight: Default::default(),
            },
            gather: None,
            spec: WindowSpec {
                length: Duration::from_secs(60),
                allowed_lateness: Duration::from_secs(20),
                max_open: Duration::from_secs(3600),
            },
            agg: Sum { stamped: false },
        }
    }

    type Item = (i64, (i64, u8, u64));

    /// Rows written, by window span (deduplicated as ClickHouse does by token).
    type Table = BTreeMap<(i64, i64, i64), Vec<Row>>;

    fn feed(
        w: &Windower<Sum, NoLog>,
        st: &mut State<Sum>,
        ledger: &Arc<PartitionLedger>,
        recorded: &mut Option<Vec<SourceSpan>>,
        items: &[Item],
    ) -> Vec<Cut<Row>> {
        let tp = ledger.topic_partition().clone();
        let mut acks = AckSet::new();
        acks.push(ledger.issue(items[0].0, items[items.len() - 1].0).unwrap());
        let _ = st.parts.begin(&acks);
        if let Some(recorded) = recorded.take() {
            st.parts
                .assign(&tp, acks.handles()[0].assignment(), recorded);
        }
        let mut cuts = Vec::new();
        for &(offset, item) in items {
            w.push(st, &tp, offset, item, &acks, &mut cuts)
                .expect("in order");
        }
        w.after_input(st, &mut cuts);
        acks.release();
        cuts
    }

    fn flush(w: &Windower<Sum, NoLog>, st: &mut State<Sum>, end: bool) -> Vec<Cut<Row>> {
        st.parts.flush(end, &mut w.finish())
    }

    /// Records with event times moving forward, some late (beyond the lateness), one record
    /// per offset, gaps between offsets; and their sums per window and key.
    fn random_items(rng: &mut Rng) -> (Vec<Item>, BTreeMap<(i64, u8), u64>) {
        let mut items: Vec<Item> = Vec::new();
        let (mut offset, mut t) = (0i64, 1_760_000_000i64);
        for _ in 0..(50 + rng.next(150)) {
            t += rng.next(15) as i64;
            let late = if rng.next(10) == 0 {
                rng.next(200) as i64
            } else {
                0
            };
            items.push((offset, (t - late, rng.next(3) as u8, 1 + rng.next(100))));
            offset += 1 + rng.next(2) as i64;
        }
        let mut sums: BTreeMap<(i64, u8), u64> = BTreeMap::new();
        for (_, (t, k, v)) in &items {
            *sums.entry((t.div_euclid(60) * 60, *k)).or_default() += v;
        }
        (items, sums)
    }

    /// Gathered windows of two partitions with the same records (so the same sums): batches
    /// written or lost until a crash, then redelivery from a committed offset per partition,
    /// where replayed spans are written as the rows the table lacks (as `restore_missing`
    /// does). Every item counts once because stamped rows of different spans differ.
    #[test]
    fn gathered_window_rows_are_exact_across_a_crash_when_stamped() {
        for seed in 1..200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5bd1);
            let (items, sums) = random_items(&mut rng);
            let mut w = windower();
            w.agg = Sum { stamped: true };
            w.gather = Some(BatchLimits::default());
            let tps = [TopicPartition::new("t", 0), TopicPartition::new("t", 1)];
            let mut table: Vec<Row> = Vec::new();
            let write = |batch: Batch<Row>, table: &mut Vec<Row>| {
                if batch.delivery() == Delivery::Recovered {
                    let mut held = table.clone();
                    for row in &batch.items {
                        match held.iter().position(|r| r == row) {
                            Some(i) => {
                                held.swap_remove(i);
                            }
                            None => table.push(*row),
                        }
                    }
                } else {
                    table.extend(batch.items.iter().copied());
                }
                batch.ack();
            };
            // Micro-batches of both partitions, interleaved.
            let steps = |from: [i64; 2], rng: &mut Rng| {
                let mut at = [0usize; 2];
                let rest: Vec<Vec<Item>> = from
                    .iter()
                    .map(|&c| items.iter().copied().filter(|i| i.0 >= c).collect())
                    .collect();
                let mut out: Vec<(usize, Vec<Item>)> = Vec::new();
                while at[0] < rest[0].len() || at[1] < rest[1].len() {
                    let p = rng.next(2) as usize;
                    if at[p] < rest[p].len() {
                        let end = (at[p] + 1 + rng.next(8) as usize).min(rest[p].len());
                        out.push((p, rest[p][at[p]..end].to_vec()));
                        at[p] = end;
                    }
                }
                out
            };

            // Run 1, until a crash: cuts recorded, their batches written or lost.
            let ledgers = tps.clone().map(PartitionLedger::new);
            let mut st = w.state();
            let mut recorded = [Some(Vec::new()), Some(Vec::new())];
            let mut log: Vec<SourceSpan> = Vec::new();
            let mut lost_from = [i64::MAX; 2];
            let input = steps([0, 0], &mut rng);
            let crash_at = rng.next(input.len() as u64) as usize;
            for (p, micro) in &input[..crash_at] {
                let mut cuts = feed(&w, &mut st, &ledgers[*p], &mut recorded[*p], micro);
                if rng.next(6) == 0 {
                    cuts.extend(flush(&w, &mut st, false));
                }
                log.extend(cuts.iter().map(|c| c.span.clone()));
                for batch in batches(cuts, true) {
                    if rng.next(2) == 0 {
                        write(batch, &mut table);
                    } else {
                        for span in batch.spans() {
                            let p = span.tp.partition as usize;
                            lost_from[p] = lost_from[p].min(span.first);
                        }
                    }
                }
            }
            for (tp, part) in &st.parts.map {
                for pane in part.panes.values() {
                    let p = tp.partition as usize;
                    lost_from[p] = lost_from[p].min(pane.first);
                }
            }
            // Where each partition had got to: its next unfed record.
            let mut next = [i64::MAX; 2];
            for (p, micro) in &input[crash_at..] {
                next[*p] = next[*p].min(micro[0].0);
            }
            let end = items.last().map_or(0, |i| i.0 + 1);
            let committed = [0, 1].map(|p| {
                let bound = lost_from[p].min(next[p]).min(end);
                rng.next(bound as u64 + 1) as i64
            });
            drop(st);

            // Run 2: redelivery from the committed offsets, to the end.
            let ledgers = tps.clone().map(PartitionLedger::new);
            let mut recorded = [0, 1].map(|p| {
                Some(
                    log.iter()
                        .filter(|s| s.tp.partition == p as i32 && s.last >= committed[p])
                        .cloned()
                        .collect(),
                )
            });
            let mut st = w.state();
            for (p, micro) in steps(committed, &mut rng) {
                let mut cuts = feed(&w, &mut st, &ledgers[p], &mut recorded[p], &micro);
                if rng.next(6) == 0 {
                    cuts.extend(flush(&w, &mut st, false));
                }
                for batch in batches(cuts, true) {
                    write(batch, &mut table);
                }
            }
            for batch in batches(flush(&w, &mut st, true), true) {
                write(batch, &mut table);
            }

            let mut written: BTreeMap<(i64, u8), u64> = BTreeMap::new();
            for (window, key, sum, _) in &table {
                *written.entry((*window, *key)).or_default() += sum;
            }
            let twice: BTreeMap<(i64, u8), u64> = sums.iter().map(|(k, v)| (*k, 2 * v)).collect();
            assert_eq!(written, twice, "seed {seed}: every item counted once");
            for (p, ledger) in ledgers.iter().enumerate() {
                if committed[p] < end {
                    assert_eq!(
                        ledger.committable(),
                        Some(end),
                        "seed {seed}, partition {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn window_rows_are_exact_across_a_crash_and_redelivery() {
        for seed in 1..200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let (items, reference) = random_items(&mut rng);
            let offset = items.last().map_or(0, |i| i.0 + 1);
            let w = windower();
            let tp = TopicPartition::new("t", 0);
            let mut table: Table = BTreeMap::new();
            let mut insert = |cut: Cut<Row>| {
                table
                    .entry((cut.span.window_key(), cut.span.first, cut.span.last))
                    .or_insert_with(|| cut.rows.clone());
                cut.acks.release();
            };

            // Run 1: micro-batches, random flushes, a crash; each cut recorded, written or not.
            let ledger = PartitionLedger::new(tp.clone());
            let mut st = w.state();
            let mut recorded = Some(Vec::new());
            let mut log: Vec<SourceSpan> = Vec::new();
            let mut lost_from = i64::MAX;
            let crash_at = rng.next(items.len() as u64) as usize;
            let mut at = 0;
            while at < crash_at {
                let end = (at + 1 + rng.next(8) as usize).min(crash_at);
                let mut cuts = feed(&w, &mut st, &ledger, &mut recorded, &items[at..end]);
                if rng.next(6) == 0 {
                    cuts.extend(flush(&w, &mut st, false));
                }
                for cut in cuts {
                    log.push(cut.span.clone());
                    if rng.next(2) == 0 {
                        insert(cut);
                    } else {
                        lost_from = lost_from.min(cut.span.first);
                    }
                }
                at = end;
            }
            if let Some(part) = st.parts.map.get(&tp) {
                for pane in part.panes.values() {
                    lost_from = lost_from.min(pane.first);
                }
            }
            let end = items.get(crash_at).map_or(offset, |i| i.0);
            let committed = rng.next(lost_from.min(end) as u64 + 1) as i64;
            drop(st);

            // Run 2: from the committed offset, other micro-batches, to the end.
            let ledger = PartitionLedger::new(tp.clone());
            let mut recorded = Some(
                log.iter()
                    .filter(|s| s.last >= committed)
                    .cloned()
                    .collect(),
            );
            let mut st = w.state();
            let rest: Vec<Item> = items.iter().copied().filter(|i| i.0 >= committed).collect();
            let mut at = 0;
            while at < rest.len() {
                let end = (at + 1 + rng.next(8) as usize).min(rest.len());
                let mut cuts = feed(&w, &mut st, &ledger, &mut recorded, &rest[at..end]);
                if rng.next(6) == 0 {
                    cuts.extend(flush(&w, &mut st, false));
                }
                cuts.into_iter().for_each(&mut insert);
                at = end;
            }
            flush(&w, &mut st, true).into_iter().for_each(&mut insert);

            let mut written: BTreeMap<(i64, u8), u64> = BTreeMap::new();
            for (window, key, sum, _) in table.values().flatten() {
                *written.entry((*window, *key)).or_default() += sum;
            }
            assert_eq!(written, reference, "seed {seed}: every item counted once");
            if let Some(last) = rest.last() {
                assert_eq!(ledger.committable(), Some(last.0 + 1), "seed {seed}");
            }
        }
    }

    #[test]
    fn windows_close_on_the_watermark_and_late_items_make_one_more_row() {
        let w = windower();
        let mut st = w.state();
        let ledger = PartitionLedger::new(TopicPartition::new("t", 0));
        let mut plans = Some(Vec::new());
        let t0 = 1_760_000_040; // window 1_760_000_040 .. +60 (aligned: 1_760_000_040 % 60 == 0)
        assert_eq!(t0 % 60, 0);
        let cuts = feed(
            &w,
            &mut st,
            &ledger,
            &mut plans,
            &[(0, (t0, 1, 5)), (1, (t0 + 30, 1, 7))],
        );
        assert!(cuts.is_empty(), "open until the watermark passes its end");
        // 70 s later minus 20 s lateness = t0 + 50 + …: still open at t0 + 79.
        let cuts = feed(&w, &mut st, &ledger, &mut plans, &[(2, (t0 + 79, 1, 1))]);
        assert!(cuts.is_empty());
        let cuts = feed(&w, &mut st, &ledger, &mut plans, &[(3, (t0 + 80, 2, 1))]);
        assert_eq!(cuts.len(), 1);
        assert_eq!(cuts[0].rows, vec![(t0, 1, 12, 0)]);
        assert_eq!(
            (
                cuts[0].span.window_key(),
                cuts[0].span.first,
                cuts[0].span.last
            ),
            (t0, 0, 1)
        );
        // A late item for the closed window: one more row, at once.
        let cuts = feed(&w, &mut st, &ledger, &mut plans, &[(4, (t0 + 10, 1, 100))]);
        assert_eq!(cuts.len(), 1);
        assert_eq!(cuts[0].rows, vec![(t0, 1, 100, 0)]);
    }
}
