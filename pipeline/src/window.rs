//! Event-time tumbling windows over span-logged cuts: per source partition and window, items
//! are aggregated by key; a window closes when the partition's watermark (the latest event
//! time seen, minus the allowed lateness) passes its end, or after a wall-clock bound. Late
//! items are never dropped: they open the window again and close it at once, as one more row
//! per key. Each cut is recorded in a [`SpanLog`] before it moves on (key = window start), so
//! records redelivered after a crash are cut into the same windows at the same places and a
//! deduplicating sink writes each window row once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::ack::{AckSet, TopicPartition};
use crate::batch::Batch;
use crate::error::PipelineError;
use crate::metrics as m;
use crate::span::{Assignments, Cut, Cuts, Sourced, Span, SpanIo, SpanLog, replay_plan, shares_of};
use crate::stages::{BatchLimits, Input, sleep_until_opt};

/// How items aggregate into window rows.
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
    /// ([`Flow::window_across`](crate::Flow::window_across)) are replayed by comparing rows,
    /// so rows of different windows must differ: the span's partition and first offset make
    /// them. By default rows are left as they are.
    fn stamp(&self, _row: &mut Self::Out, _source: &Span) {}
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

/// The aggregates of one window of one partition since its last cut.
struct Pane<K, A> {
    accs: HashMap<K, A>,
    first: i64,
    last: i64,
    items: u64,
    acks: AckSet,
    acks_seq: u64,
    opened: Instant,
}

impl<K, A> Pane<K, A> {
    fn new(offset: i64) -> Self {
        Self {
            accs: HashMap::new(),
            first: offset,
            last: offset,
            items: 0,
            acks: AckSet::new(),
            acks_seq: 0,
            opened: Instant::now(),
        }
    }

    fn holds(&self, span: &Span) -> bool {
        span.first <= self.first && self.first <= span.last
    }
}

/// One partition under one assignment.
struct Part<K, A> {
    assignment: u64,
    /// Latest event time seen.
    max_time: i64,
    /// Highest offset seen.
    seen: i64,
    panes: BTreeMap<i64, Pane<K, A>>,
    /// Recorded spans still to cut again, per window, in offset order.
    plans: HashMap<i64, VecDeque<Span>>,
}

impl<K, A> Part<K, A> {
    fn replaying(&self, window: i64) -> Option<&Span> {
        let pane = self.panes.get(&window)?;
        self.plans.get(&window)?.front().filter(|p| pane.holds(p))
    }

    fn is_revoked(&self) -> bool {
        self.panes
            .values()
            .any(|p| p.acks.handles().iter().any(|h| h.is_revoked()))
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

struct State<K, A> {
    parts: HashMap<TopicPartition, Part<K, A>>,
    /// Partitions whose held records were last reported non-zero.
    reported: Vec<TopicPartition>,
    seq: u64,
    length: i64,
    lateness: i64,
}

impl<K, A> State<K, A> {
    /// Drops what is held of assignments that are over: never written, so never twice.
    fn purge_revoked(&mut self) {
        self.parts.retain(|tp, p| {
            let keep = !p.is_revoked();
            if !keep {
                tracing::debug!(partition = %tp, windows = p.panes.len(), "dropped windows of a revoked assignment; the next owner writes them");
            }
            keep
        });
    }
}

impl<A: WindowAggregate, L: SpanLog> Windower<A, L> {
    pub(crate) async fn run(
        self,
        input: Input<Sourced<A::In>>,
        flush: watch::Receiver<u64>,
    ) -> Result<(), PipelineError> {
        self.io.drive(|cuts| self.cut(input, flush, cuts)).await
    }

    async fn cut(
        &self,
        mut input: Input<Sourced<A::In>>,
        mut flush: watch::Receiver<u64>,
        tx: Cuts<A::Out>,
    ) -> Result<(), PipelineError> {
        let mut state: State<A::Key, A::Acc> = State {
            parts: HashMap::new(),
            reported: Vec::new(),
            seq: 0,
            length: self.spec.length.as_secs().max(1) as i64,
            lateness: self.spec.allowed_lateness.as_secs() as i64,
        };
        let mut flush_open = true;
        let mut ready = Ready {
            cuts: Vec::new(),
            rows: 0,
            since: None,
        };
        loop {
            let gathered = self
                .gather
                .as_ref()
                .and_then(|g| ready.since.map(|s| s + g.max_linger));
            let deadline = state
                .parts
                .values()
                .flat_map(|part| {
                    part.panes
                        .iter()
                        .filter(|(w, _)| part.replaying(**w).is_none())
                        .map(|(_, p)| p.opened + self.spec.max_open)
                })
                .chain(gathered)
                .min();
            tokio::select! {
                biased;
                changed = flush.changed(), if flush_open => {
                    flush_open = changed.is_ok();
                    state.purge_revoked();
                    let cuts = self.flush(&mut state, false);
                    self.pass(&tx, &mut ready, cuts, true).await?;
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    let now = Instant::now();
                    state.purge_revoked();
                    let cuts = self.close_idle(&mut state, now);
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
        let cuts = self.flush(&mut state, true);
        self.pass(&tx, &mut ready, cuts, true).await
    }

    /// Sets, per partition, how many records open windows hold back from the offset commit:
    /// from the first record of the oldest open window to the last record seen (what explains
    /// a committed offset that trails processing while a topic is quiet).
    fn report_held(&self, state: &mut State<A::Key, A::Acc>) {
        let gauge = |tp: &TopicPartition| metrics::gauge!(m::WINDOW_HELD_RECORDS, "stage" => self.io.stage.to_string(), "topic" => tp.topic.to_string(), "partition" => tp.partition.to_string());
        let mut now = Vec::new();
        for (tp, part) in &state.parts {
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
        state: &mut State<A::Key, A::Acc>,
        batch: Batch<Sourced<A::In>>,
        tx: &Cuts<A::Out>,
        ready: &mut Ready<A::Out>,
    ) -> Result<(), PipelineError> {
        metrics::counter!(m::STAGE_ITEMS_IN, "stage" => self.io.stage.to_string())
            .increment(batch.len() as u64);
        state.seq += 1;
        state.purge_revoked();
        let (items, acks) = batch.into_parts();
        let seen = Assignments::of(&acks, |tp| state.parts.get(tp).map(|p| p.assignment));
        for &(tp, assignment, from) in &seen.new {
            if let Some(mut old) = state.parts.remove(tp) {
                let cuts = self.retire(tp, &mut old);
                self.pass(tx, ready, cuts, false).await?;
            }
            let recorded = self.io.load(tp, from).await?;
            let mut by_window: HashMap<i64, Vec<Span>> = HashMap::new();
            for span in recorded {
                by_window.entry(span.key).or_default().push(span);
            }
            let plans: HashMap<i64, VecDeque<Span>> = by_window
                .into_iter()
                .map(|(w, spans)| (w, replay_plan(spans)))
                .collect();
            if !plans.is_empty() {
                tracing::info!(stage = %self.io.stage, partition = %tp, from, windows = plans.len(), "cutting redelivered records along recorded window spans");
            }
            state.parts.insert(
                tp.clone(),
                Part {
                    assignment,
                    max_time: i64::MIN,
                    seen: i64::MIN,
                    panes: BTreeMap::new(),
                    plans,
                },
            );
        }
        let mut cuts = Vec::new();
        for Sourced { tp, offset, item } in items {
            if !seen.over.contains(&&tp) {
                self.push(state, &tp, offset, item, &acks, &mut cuts);
            }
        }
        self.after_input(state, &mut cuts);
        acks.release();
        self.pass(tx, ready, cuts, false).await
    }

    fn push(
        &self,
        state: &mut State<A::Key, A::Acc>,
        tp: &TopicPartition,
        offset: i64,
        item: A::In,
        acks: &AckSet,
        cuts: &mut Vec<Cut<A::Out>>,
    ) {
        let t = self.agg.event_time(&item);
        let window = t.div_euclid(state.length) * state.length;
        let seq = state.seq;
        let part = state.parts.entry(tp.clone()).or_insert_with(|| Part {
            // Items that no acknowledgement covers (tests, generated data).
            assignment: 0,
            max_time: i64::MIN,
            seen: i64::MIN,
            panes: BTreeMap::new(),
            plans: HashMap::new(),
        });
        part.max_time = part.max_time.max(t);
        part.seen = part.seen.max(offset);
        if part.plans.contains_key(&window) {
            // Recorded spans of this window that end before this record are complete.
            while let Some(plan) = part.plans.get_mut(&window).and_then(|q| {
                let done = q.front().is_some_and(|p| p.last < offset);
                done.then(|| q.pop_front()).flatten()
            }) {
                if part.panes.get(&window).is_some_and(|p| p.holds(&plan)) {
                    cuts.extend(self.take(part, tp, window, Some(plan)));
                }
            }
            let in_plan = part
                .plans
                .get(&window)
                .and_then(VecDeque::front)
                .is_some_and(|p| p.first <= offset);
            if in_plan && part.replaying(window).is_none() {
                // Free rows of this window before a recorded span starts.
                cuts.extend(self.take(part, tp, window, None));
            }
        }
        let pane = part
            .panes
            .entry(window)
            .or_insert_with(|| Pane::new(offset));
        if pane.acks_seq != seq {
            pane.acks.merge(shares_of(acks, tp));
            pane.acks_seq = seq;
        }
        self.agg
            .add(pane.accs.entry(self.agg.key(&item)).or_default(), &item);
        pane.last = offset;
        pane.items += 1;
    }

    /// After a whole input: recorded spans whose last record arrived are cut; windows the
    /// watermark has passed are closed.
    fn after_input(&self, state: &mut State<A::Key, A::Acc>, cuts: &mut Vec<Cut<A::Out>>) {
        let (length, lateness) = (state.length, state.lateness);
        for (tp, part) in state.parts.iter_mut() {
            let windows: Vec<i64> = part.panes.keys().copied().collect();
            let watermark = part.max_time.saturating_sub(lateness);
            for w in windows {
                match part.replaying(w).cloned() {
                    Some(plan) if part.panes[&w].last >= plan.last => {
                        part.plans.get_mut(&w).map(VecDeque::pop_front);
                        cuts.extend(self.take(part, tp, w, Some(plan)));
                    }
                    Some(_) => {}
                    None if w + length <= watermark => {
                        cuts.extend(self.take(part, tp, w, None));
                    }
                    None => {}
                }
            }
        }
    }

    fn close_idle(&self, state: &mut State<A::Key, A::Acc>, now: Instant) -> Vec<Cut<A::Out>> {
        let mut cuts = Vec::new();
        for (tp, part) in state.parts.iter_mut() {
            let due: Vec<i64> = part
                .panes
                .iter()
                .filter(|(w, p)| {
                    part.replaying(**w).is_none() && p.opened + self.spec.max_open <= now
                })
                .map(|(w, _)| *w)
                .collect();
            for w in due {
                cuts.extend(self.take(part, tp, w, None));
            }
        }
        cuts
    }

    /// A flush request or the end: every free window is cut; a recorded span not yet
    /// complete waits, or is dropped (its records redelivered) when its partition was revoked
    /// or the input ended.
    fn flush(&self, state: &mut State<A::Key, A::Acc>, end: bool) -> Vec<Cut<A::Out>> {
        let mut cuts = Vec::new();
        let mut dropped = Vec::new();
        for (tp, part) in state.parts.iter_mut() {
            let windows: Vec<i64> = part.panes.keys().copied().collect();
            let give_up = end || part.is_revoked();
            for w in windows {
                if part.replaying(w).is_some() {
                    if give_up {
                        part.panes.remove(&w);
                        tracing::warn!(partition = %tp, window = w, "a recorded window span was not complete when its partition was given up; its records will be redelivered");
                    }
                    continue;
                }
                cuts.extend(self.take(part, tp, w, None));
            }
            if give_up && part.panes.is_empty() && part.is_revoked() {
                dropped.push(tp.clone());
            }
        }
        for tp in dropped {
            state.parts.remove(&tp);
        }
        cuts
    }

    fn retire(&self, tp: &TopicPartition, old: &mut Part<A::Key, A::Acc>) -> Vec<Cut<A::Out>> {
        let windows: Vec<i64> = old.panes.keys().copied().collect();
        let mut cuts = Vec::new();
        for w in windows {
            if old.replaying(w).is_some() {
                old.panes.remove(&w);
            } else {
                cuts.extend(self.take(old, tp, w, None));
            }
        }
        cuts
    }

    fn take(
        &self,
        part: &mut Part<A::Key, A::Acc>,
        tp: &TopicPartition,
        window: i64,
        replay: Option<Span>,
    ) -> Option<Cut<A::Out>> {
        let pane = part.panes.remove(&window)?;
        let (span, replay, whole) = match replay {
            Some(plan) => {
                // A window whose first records were committed was written; only its tail
                // comes again (see the span batcher).
                let whole = pane.first <= plan.first;
                if whole && (plan.items != pane.items || plan.last != pane.last) {
                    tracing::warn!(partition = %tp, window, first = plan.first, last = plan.last, recorded_items = plan.items, items = pane.items, "a recorded window span came out differently this time (changed code or data?)");
                }
                (plan, true, whole)
            }
            None => (
                Span {
                    tp: tp.clone(),
                    first: pane.first,
                    last: pane.last,
                    items: pane.items,
                    key: window,
                    across: self.gather.is_some(),
                    batch: None,
                },
                false,
                false,
            ),
        };
        let rows: Vec<A::Out> = pane
            .accs
            .into_iter()
            .map(|(k, acc)| {
                let mut row = self.agg.finish(window, k, acc);
                self.agg.stamp(&mut row, &span);
                row
            })
            .collect();
        Some(Cut {
            rows,
            acks: pane.acks,
            span,
            replay,
            whole_replay: whole,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::ack::PartitionLedger;
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
        fn stamp(&self, row: &mut Row, source: &Span) {
            if self.stamped {
                row.3 = i64::from(source.tp.partition) * 1_000_000 + source.first;
            }
        }
    }

    /// Never called by the synchronous parts under test.
    struct NoLog;

    impl SpanLog for NoLog {
        async fn record(&self, _: &[Span]) -> Result<(), SinkError> {
            Ok(())
        }
        async fn load(&self, _: &TopicPartition, _: i64) -> Result<Vec<Span>, SinkError> {
            unreachable!()
        }
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
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
            span: Span {
                tp: tp.clone(),
                first,
                last: first,
                items: rows as u64,
                key: 60,
                across: true,
                batch: None,
            },
            replay: false,
            whole_replay: false,
        };
        let mut ready = Ready {
            cuts: Vec::new(),
            rows: 0,
            since: None,
        };
        w.pass(&tx, &mut ready, vec![cut(0, 2)], false)
            .await
            .unwrap();
        assert!(rx.try_recv().is_err(), "two rows wait for more");
        assert!(ready.since.is_some(), "and have a deadline");
        w.pass(&tx, &mut ready, vec![cut(1, 2)], false)
            .await
            .unwrap();
        let (cuts, across) = rx.try_recv().expect("leave at the row limit");
        let out = crate::span::batches(cuts, across);
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

    fn state() -> State<u8, u64> {
        State {
            parts: HashMap::new(),
            reported: Vec::new(),
            seq: 0,
            length: 60,
            lateness: 20,
        }
    }

    type Item = (i64, (i64, u8, u64));

    /// Rows written, by window span (deduplicated as ClickHouse does by token).
    type Table = BTreeMap<(i64, i64, i64), Vec<Row>>;

    fn feed(
        w: &Windower<Sum, NoLog>,
        st: &mut State<u8, u64>,
        ledger: &Arc<PartitionLedger>,
        plans: &mut Option<HashMap<i64, VecDeque<Span>>>,
        items: &[Item],
    ) -> Vec<Cut<Row>> {
        let tp = ledger.topic_partition().clone();
        let mut acks = AckSet::new();
        acks.push(ledger.issue(items[0].0, items[items.len() - 1].0).unwrap());
        st.seq += 1;
        if let Some(plans) = plans.take() {
            st.parts.insert(
                tp.clone(),
                Part {
                    assignment: acks.handles()[0].assignment(),
                    max_time: i64::MIN,
                    seen: i64::MIN,
                    panes: BTreeMap::new(),
                    plans,
                },
            );
        }
        let mut cuts = Vec::new();
        for &(offset, item) in items {
            w.push(st, &tp, offset, item, &acks, &mut cuts);
        }
        w.after_input(st, &mut cuts);
        acks.release();
        cuts
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
                if batch.is_recovered() {
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
            let mut st = state();
            let mut plans = [Some(HashMap::new()), Some(HashMap::new())];
            let mut log: Vec<Span> = Vec::new();
            let mut lost_from = [i64::MAX; 2];
            let input = steps([0, 0], &mut rng);
            let crash_at = rng.next(input.len() as u64) as usize;
            for (p, micro) in &input[..crash_at] {
                let mut cuts = feed(&w, &mut st, &ledgers[*p], &mut plans[*p], micro);
                if rng.next(6) == 0 {
                    cuts.extend(w.flush(&mut st, false));
                }
                log.extend(cuts.iter().map(|c| c.span.clone()));
                for batch in crate::span::batches(cuts, true) {
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
            for (tp, part) in &st.parts {
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
            let mut plans = [0, 1].map(|p| {
                let mut by_window: HashMap<i64, Vec<Span>> = HashMap::new();
                for s in log
                    .iter()
                    .filter(|s| s.tp.partition == p as i32 && s.last >= committed[p])
                {
                    by_window.entry(s.key).or_default().push(s.clone());
                }
                Some(
                    by_window
                        .into_iter()
                        .map(|(k, v)| (k, replay_plan(v)))
                        .collect(),
                )
            });
            let mut st = state();
            for (p, micro) in steps(committed, &mut rng) {
                let mut cuts = feed(&w, &mut st, &ledgers[p], &mut plans[p], &micro);
                if rng.next(6) == 0 {
                    cuts.extend(w.flush(&mut st, false));
                }
                for batch in crate::span::batches(cuts, true) {
                    write(batch, &mut table);
                }
            }
            for batch in crate::span::batches(w.flush(&mut st, true), true) {
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
                    .entry((cut.span.key, cut.span.first, cut.span.last))
                    .or_insert_with(|| cut.rows.clone());
                cut.acks.release();
            };

            // Run 1: micro-batches, random flushes, a crash; each cut recorded, written or not.
            let ledger = PartitionLedger::new(tp.clone());
            let mut st = state();
            let mut plans = Some(HashMap::new());
            let mut log: Vec<Span> = Vec::new();
            let mut lost_from = i64::MAX;
            let crash_at = rng.next(items.len() as u64) as usize;
            let mut at = 0;
            while at < crash_at {
                let end = (at + 1 + rng.next(8) as usize).min(crash_at);
                let mut cuts = feed(&w, &mut st, &ledger, &mut plans, &items[at..end]);
                if rng.next(6) == 0 {
                    cuts.extend(w.flush(&mut st, false));
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
            if let Some(part) = st.parts.get(&tp) {
                for pane in part.panes.values() {
                    lost_from = lost_from.min(pane.first);
                }
            }
            let end = items.get(crash_at).map_or(offset, |i| i.0);
            let committed = rng.next(lost_from.min(end) as u64 + 1) as i64;
            drop(st);

            // Run 2: from the committed offset, other micro-batches, to the end.
            let ledger = PartitionLedger::new(tp.clone());
            let mut by_window: HashMap<i64, Vec<Span>> = HashMap::new();
            for s in log.iter().filter(|s| s.last >= committed) {
                by_window.entry(s.key).or_default().push(s.clone());
            }
            let mut plans = Some(
                by_window
                    .into_iter()
                    .map(|(k, v)| (k, replay_plan(v)))
                    .collect(),
            );
            let mut st = state();
            let rest: Vec<Item> = items.iter().copied().filter(|i| i.0 >= committed).collect();
            let mut at = 0;
            while at < rest.len() {
                let end = (at + 1 + rng.next(8) as usize).min(rest.len());
                let mut cuts = feed(&w, &mut st, &ledger, &mut plans, &rest[at..end]);
                if rng.next(6) == 0 {
                    cuts.extend(w.flush(&mut st, false));
                }
                cuts.into_iter().for_each(&mut insert);
                at = end;
            }
            w.flush(&mut st, true).into_iter().for_each(&mut insert);

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
        let mut st = state();
        let ledger = PartitionLedger::new(TopicPartition::new("t", 0));
        let mut plans = Some(HashMap::new());
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
            (cuts[0].span.key, cuts[0].span.first, cuts[0].span.last),
            (t0, 0, 1)
        );
        // A late item for the closed window: one more row, at once.
        let cuts = feed(&w, &mut st, &ledger, &mut plans, &[(4, (t0 + 10, 1, 100))]);
        assert_eq!(cuts.len(), 1);
        assert_eq!(cuts[0].rows, vec![(t0, 1, 100, 0)]);
    }
}
