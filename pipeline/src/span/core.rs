//! The per-partition machinery every span-cutting stage shares: what a partition holds under
//! its assignment (panes, one per window key), the recorded spans still to cut again, the
//! offset order check, and how panes are cut, retired, flushed and dropped.
//!
//! A stage decides *when* to cut (row limits and linger for the span batcher, the watermark
//! and wall-clock bound for windows) and *what* a pane's buffer becomes (its rows as they
//! came, or one aggregate row per key); this core does the rest the same way for both.

use std::collections::{BTreeMap, HashMap, VecDeque};

use tokio::time::Instant;

use super::{SourceSpan, replay_plan};
use crate::ack::{AckSet, TopicPartition};

/// How a cut relates to the span log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CutKind {
    /// New rows: their span is recorded before they move on.
    Fresh,
    /// A recorded span cut again from its first record: an earlier run may have written it,
    /// in whole or in part.
    Whole,
    /// The tail of a recorded span: redelivery began inside it, so its batch was
    /// acknowledged, hence written.
    Tail,
}

/// A batch cut from one pane.
pub(crate) struct Cut<T> {
    pub(crate) rows: Vec<T>,
    pub(crate) acks: AckSet,
    pub(crate) span: SourceSpan,
    pub(crate) kind: CutKind,
}

/// What one pane (a partition, or a partition's window) gathered since its last cut.
pub(crate) struct Pane<B> {
    pub(crate) buf: B,
    pub(crate) first: i64,
    pub(crate) last: i64,
    pub(crate) items: u64,
    pub(crate) bytes: usize,
    /// When its first item arrived (linger and wall-clock bounds count from it).
    pub(crate) opened: Instant,
    acks: AckSet,
    /// The input (by sequence number) whose acknowledgements `acks` already shares.
    acks_seq: u64,
}

impl<B: Default> Pane<B> {
    fn open(offset: i64) -> Self {
        Self {
            buf: B::default(),
            first: offset,
            last: offset,
            items: 0,
            bytes: 0,
            opened: Instant::now(),
            acks: AckSet::new(),
            acks_seq: 0,
        }
    }
}

impl<B> Pane<B> {
    /// Whether the pane's items belong to `span`.
    fn holds(&self, span: &SourceSpan) -> bool {
        span.first <= self.first && self.first <= span.last
    }
}

/// One partition under one assignment.
pub(crate) struct Part<B> {
    pub(crate) assignment: u64,
    /// Panes by window key (0 for a span batcher's one pane).
    pub(crate) panes: BTreeMap<i64, Pane<B>>,
    /// Recorded spans still to cut again, per window key, in offset order.
    plans: HashMap<i64, VecDeque<SourceSpan>>,
    /// Highest offset seen: no item may come below it.
    pub(crate) seen: i64,
    /// Latest event time seen (window stages).
    pub(crate) max_time: i64,
}

impl<B> Part<B> {
    fn new(assignment: u64, plans: HashMap<i64, VecDeque<SourceSpan>>) -> Self {
        Self {
            assignment,
            panes: BTreeMap::new(),
            plans,
            seen: i64::MIN,
            max_time: i64::MIN,
        }
    }

    /// The recorded span the pane of `key` is being cut along, if any.
    pub(crate) fn replaying(&self, key: i64) -> Option<&SourceSpan> {
        let pane = self.panes.get(&key)?;
        self.plans.get(&key)?.front().filter(|p| pane.holds(p))
    }

    fn is_revoked(&self) -> bool {
        self.panes
            .values()
            .any(|p| p.acks.handles().iter().any(|h| h.is_revoked()))
    }

    /// The panes not held for a recorded span, with their keys.
    pub(crate) fn free(&self) -> impl Iterator<Item = (i64, &Pane<B>)> {
        self.panes
            .iter()
            .filter(|(k, _)| self.replaying(**k).is_none())
            .map(|(k, p)| (*k, p))
    }
}

/// Items and bytes held over all partitions.
#[derive(Default)]
pub(crate) struct Held {
    pub(crate) rows: usize,
    pub(crate) bytes: usize,
}

impl Held {
    fn remove<B>(&mut self, pane: &Pane<B>) {
        self.rows -= pane.items as usize;
        self.bytes -= pane.bytes;
    }
}

/// An item that came below its partition's highest offset.
#[derive(Debug)]
pub(crate) struct OutOfOrder {
    pub(crate) tp: TopicPartition,
    pub(crate) offset: i64,
    pub(crate) after: i64,
}

/// Where an item lands, as [`Parts::prepare`] finds it.
pub(crate) struct Position {
    /// The item's record lies in a recorded span still to cut again.
    pub(crate) in_plan: bool,
    /// The item starts a new record for its pane (items of one record are never cut apart).
    pub(crate) boundary: bool,
}

/// What a pane's buffer becomes once cut: its rows, given the window key and the span.
pub(crate) trait Finish<B, R>: FnMut(B, i64, &SourceSpan) -> Vec<R> {}
impl<B, R, F: FnMut(B, i64, &SourceSpan) -> Vec<R>> Finish<B, R> for F {}

/// Every partition a span-cutting stage holds.
pub(crate) struct Parts<B> {
    pub(crate) map: HashMap<TopicPartition, Part<B>>,
    pub(crate) held: Held,
    /// Sequence number of the current input.
    seq: u64,
    /// Fresh spans leave with other spans ([`SourceSpan::across`]).
    across: bool,
}

/// What an input's acknowledgements say about its partitions.
pub(crate) struct Assignments<'a> {
    /// Partitions whose assignment is over: their items belong to the next owner.
    pub(crate) over: Vec<&'a TopicPartition>,
    /// Partitions seen under another assignment than the stage holds: (partition,
    /// assignment, first offset of the range).
    pub(crate) new: Vec<(&'a TopicPartition, u64, i64)>,
}

impl<B: Default> Parts<B> {
    pub(crate) fn new(across: bool) -> Self {
        Self {
            map: HashMap::new(),
            held: Held::default(),
            seq: 0,
            across,
        }
    }

    /// Starts an input: drops what is held of assignments that are over, and sorts the
    /// input's acknowledgements into assignments over and new ones.
    pub(crate) fn begin<'a>(&mut self, acks: &'a AckSet) -> Assignments<'a> {
        self.seq += 1;
        self.purge_revoked();
        let mut seen = Assignments {
            over: Vec::new(),
            new: Vec::new(),
        };
        for h in acks.handles() {
            let tp = h.topic_partition();
            if h.is_revoked() {
                seen.over.push(tp);
            } else if self.map.get(tp).map(|p| p.assignment) != Some(h.assignment())
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

    /// Ends `tp`'s assignment before a new one: free panes are cut, recorded spans not yet
    /// complete are dropped (their records come again to whoever owns them).
    pub(crate) fn retire<R>(
        &mut self,
        tp: &TopicPartition,
        finish: &mut impl Finish<B, R>,
    ) -> Vec<Cut<R>> {
        let Some(mut old) = self.map.remove(tp) else {
            return Vec::new();
        };
        let keys: Vec<i64> = old.panes.keys().copied().collect();
        let mut cuts = Vec::new();
        for key in keys {
            if old.replaying(key).is_some() {
                let pane = old.panes.remove(&key).expect("key listed");
                self.held.remove(&pane);
            } else {
                cuts.extend(self.take_from(&mut old, tp, key, None, finish));
            }
        }
        cuts
    }

    /// Starts `tp`'s new assignment with the spans recorded past its start, to cut again.
    pub(crate) fn assign(
        &mut self,
        tp: &TopicPartition,
        assignment: u64,
        recorded: Vec<SourceSpan>,
    ) {
        let mut by_key: HashMap<i64, Vec<SourceSpan>> = HashMap::new();
        for span in recorded {
            by_key.entry(span.window_key()).or_default().push(span);
        }
        let plans = by_key
            .into_iter()
            .map(|(k, spans)| (k, replay_plan(spans)))
            .collect();
        self.map.insert(tp.clone(), Part::new(assignment, plans));
    }

    /// Makes way for an item of `tp`'s record at `offset` in the pane of `key`: checks the
    /// offset order, then cuts the recorded spans of `key` that ended before this record and
    /// free items held before a recorded span starts.
    pub(crate) fn prepare<R>(
        &mut self,
        tp: &TopicPartition,
        offset: i64,
        key: i64,
        finish: &mut impl Finish<B, R>,
        cuts: &mut Vec<Cut<R>>,
    ) -> Result<Position, OutOfOrder> {
        let across = self.across;
        let held = &mut self.held;
        // Looked up before inserting: `entry` would clone the key for every item.
        if !self.map.contains_key(tp) {
            // Items that no acknowledgement covers (tests, generated data): nothing to replay.
            self.map.insert(tp.clone(), Part::new(0, HashMap::new()));
        }
        let part = self.map.get_mut(tp).expect("inserted above");
        if offset < part.seen {
            return Err(OutOfOrder {
                tp: tp.clone(),
                offset,
                after: part.seen,
            });
        }
        part.seen = offset;
        if part.plans.is_empty() {
            // Nothing recorded to cut again (the usual case): a pane is cut only by the stage.
            let boundary = part.panes.get(&key).is_none_or(|p| offset > p.last);
            return Ok(Position {
                in_plan: false,
                boundary,
            });
        }
        while let Some(plan) = part.plans.get_mut(&key).and_then(|q| {
            let done = q.front().is_some_and(|p| p.last < offset);
            done.then(|| q.pop_front()).flatten()
        }) {
            if part.panes.get(&key).is_some_and(|p| p.holds(&plan)) {
                cuts.extend(take(part, tp, key, Some(plan), across, held, finish));
            }
        }
        if part.plans.get(&key).is_some_and(VecDeque::is_empty) {
            part.plans.remove(&key);
        }
        let in_plan = part
            .plans
            .get(&key)
            .and_then(VecDeque::front)
            .is_some_and(|p| p.first <= offset);
        let boundary = part.panes.get(&key).is_none_or(|p| offset > p.last);
        if in_plan && boundary && part.replaying(key).is_none() {
            cuts.extend(take(part, tp, key, None, across, held, finish));
        }
        Ok(Position { in_plan, boundary })
    }

    /// Adds an item (after [`Parts::prepare`]): opens the pane if need be and takes a share of
    /// the input's acknowledgements for it, once per input.
    pub(crate) fn add(
        &mut self,
        tp: &TopicPartition,
        offset: i64,
        key: i64,
        bytes: usize,
        acks: &AckSet,
        fill: impl FnOnce(&mut B),
    ) {
        let seq = self.seq;
        let part = self.map.get_mut(tp).expect("prepared");
        let pane = part.panes.entry(key).or_insert_with(|| Pane::open(offset));
        if pane.acks_seq != seq {
            pane.acks.merge(shares_of(acks, tp));
            pane.acks_seq = seq;
        }
        fill(&mut pane.buf);
        pane.last = offset;
        pane.items += 1;
        pane.bytes += bytes;
        self.held.rows += 1;
        self.held.bytes += bytes;
    }

    /// The pane of `key` of `tp` as one cut: along the recorded span `replay`, or fresh.
    pub(crate) fn take<R>(
        &mut self,
        tp: &TopicPartition,
        key: i64,
        replay: Option<SourceSpan>,
        finish: &mut impl Finish<B, R>,
    ) -> Option<Cut<R>> {
        let part = self.map.get_mut(tp)?;
        take(part, tp, key, replay, self.across, &mut self.held, finish)
    }

    fn take_from<R>(
        &mut self,
        part: &mut Part<B>,
        tp: &TopicPartition,
        key: i64,
        replay: Option<SourceSpan>,
        finish: &mut impl Finish<B, R>,
    ) -> Option<Cut<R>> {
        take(part, tp, key, replay, self.across, &mut self.held, finish)
    }

    /// After a whole input: the panes whose recorded span's last record arrived are cut.
    pub(crate) fn cut_completed<R>(
        &mut self,
        finish: &mut impl Finish<B, R>,
        cuts: &mut Vec<Cut<R>>,
    ) {
        let across = self.across;
        for (tp, part) in self.map.iter_mut() {
            if part.plans.is_empty() {
                continue;
            }
            let keys: Vec<i64> = part.panes.keys().copied().collect();
            for key in keys {
                if let Some(plan) = part.replaying(key)
                    && part.panes[&key].last >= plan.last
                {
                    let plan = part
                        .plans
                        .get_mut(&key)
                        .and_then(VecDeque::pop_front)
                        .expect("replaying a front plan");
                    cuts.extend(take(
                        part,
                        tp,
                        key,
                        Some(plan),
                        across,
                        &mut self.held,
                        finish,
                    ));
                }
            }
        }
    }

    /// Every free pane of every partition (one cut each).
    pub(crate) fn take_free<R>(&mut self, finish: &mut impl Finish<B, R>) -> Vec<Cut<R>> {
        self.take_where(|_, _| true, finish)
    }

    /// The free panes `due` picks (by key and pane), one cut each.
    pub(crate) fn take_where<R>(
        &mut self,
        mut due: impl FnMut(i64, &Pane<B>) -> bool,
        finish: &mut impl Finish<B, R>,
    ) -> Vec<Cut<R>> {
        let across = self.across;
        let mut cuts = Vec::new();
        for (tp, part) in self.map.iter_mut() {
            let keys: Vec<i64> = part
                .free()
                .filter(|(k, p)| due(*k, p))
                .map(|(k, _)| k)
                .collect();
            for key in keys {
                cuts.extend(take(part, tp, key, None, across, &mut self.held, finish));
            }
        }
        cuts
    }

    /// Items and bytes of the free panes of all partitions.
    pub(crate) fn free_totals(&self) -> (usize, usize) {
        self.map
            .values()
            .flat_map(Part::free)
            .fold((0, 0), |(r, b), (_, p)| (r + p.items as usize, b + p.bytes))
    }

    /// A flush request (rebalance, drain) or the end of the input (`end`): every free pane is
    /// cut. A recorded span whose records have not all arrived cannot be cut: it waits, or at
    /// the end is dropped, so its records are never committed and their next owner cuts it
    /// again.
    pub(crate) fn flush<R>(&mut self, end: bool, finish: &mut impl Finish<B, R>) -> Vec<Cut<R>> {
        self.purge_revoked();
        let across = self.across;
        let mut cuts = Vec::new();
        for (tp, part) in self.map.iter_mut() {
            let keys: Vec<i64> = part.panes.keys().copied().collect();
            for key in keys {
                if part.replaying(key).is_some() {
                    if end {
                        let pane = part.panes.remove(&key).expect("key listed");
                        self.held.remove(&pane);
                        tracing::warn!(partition = %tp, window = key, "a recorded span was not complete when its partition was given up; its records will be redelivered");
                    } else {
                        tracing::warn!(partition = %tp, window = key, "flush waits for the rest of a recorded span");
                    }
                    continue;
                }
                cuts.extend(take(part, tp, key, None, across, &mut self.held, finish));
            }
        }
        cuts
    }

    /// Drops what is held of assignments that are over: never written, so never twice.
    pub(crate) fn purge_revoked(&mut self) {
        let held = &mut self.held;
        self.map.retain(|tp, part| {
            if !part.is_revoked() {
                return true;
            }
            for pane in part.panes.values() {
                held.remove(pane);
            }
            tracing::debug!(partition = %tp, panes = part.panes.len(), "dropped what a revoked assignment held; the next owner writes it");
            false
        });
    }
}

/// The pane of `key` of `part` as one cut: along the recorded span `replay`, or as a fresh
/// span (`across`: to be written with other spans).
fn take<B, R>(
    part: &mut Part<B>,
    tp: &TopicPartition,
    key: i64,
    replay: Option<SourceSpan>,
    across: bool,
    held: &mut Held,
    finish: &mut impl Finish<B, R>,
) -> Option<Cut<R>> {
    let pane = part.panes.remove(&key)?;
    held.remove(&pane);
    let (span, kind) = match replay {
        Some(plan) => {
            let whole = pane.first <= plan.first;
            if whole && (plan.items != pane.items || plan.last != pane.last) {
                tracing::warn!(partition = %tp, window = key, first = plan.first, last = plan.last, recorded_items = plan.items, items = pane.items, "a recorded span came out differently this time (changed code or data?)");
            }
            (plan, if whole { CutKind::Whole } else { CutKind::Tail })
        }
        None => (
            SourceSpan {
                tp: tp.clone(),
                first: pane.first,
                last: pane.last,
                items: pane.items,
                window: SourceSpan::window_of(key),
                across,
                batch: None,
            },
            CutKind::Fresh,
        ),
    };
    let rows = finish(pane.buf, key, &span);
    Some(Cut {
        rows,
        acks: pane.acks,
        span,
        kind,
    })
}

/// Shares of the acknowledgements in `acks` that belong to `tp`.
fn shares_of(acks: &AckSet, tp: &TopicPartition) -> AckSet {
    let mut set = AckSet::new();
    for h in acks.handles() {
        if h.topic_partition() == tp {
            set.push(h.share());
        }
    }
    set
}
