//! Acknowledgements: which source offsets are durably handled, and how far a partition may be
//! committed.
//!
//! The source hands out one [`AckHandle`] per partition range of each micro-batch. Every item
//! derived from that range travels in a [`Batch`](crate::Batch) whose [`AckSet`] holds a share of
//! the handle; fan-out and routing clone shares, batching merges sets. A share is released
//! explicitly, by a sink after a durable write or by the runtime when a stage yields nothing.
//! A range is acknowledged when its last share is released. A share that is dropped without
//! release (a failed write, an aborted stage) poisons its range, so the partition is never
//! committed past it: its records are redelivered after a restart.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A topic and partition, cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition number.
    pub partition: i32,
}

impl TopicPartition {
    /// A topic-partition pair.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

#[derive(Debug)]
struct IssuedRange {
    first: i64,
    last: i64,
    acked: bool,
    poisoned: bool,
}

#[derive(Debug, Default)]
struct LedgerState {
    /// Ranges handed out and not yet contiguously acknowledged, in offset order.
    ranges: VecDeque<IssuedRange>,
    /// Next offset to commit: one past the highest contiguously acknowledged offset.
    committable: Option<i64>,
}

/// The offsets handed out for one assigned partition and which of them are acknowledged.
///
/// A new ledger is made for every assignment of a partition, so acknowledgements that arrive
/// for an earlier assignment land in the old ledger and cannot move the new one.
#[derive(Debug)]
pub struct PartitionLedger {
    tp: TopicPartition,
    /// Unique per ledger, so stages can tell one assignment of a partition from the next.
    id: u64,
    revoked: AtomicBool,
    state: Mutex<LedgerState>,
}

static NEXT_LEDGER_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl PartitionLedger {
    /// An empty ledger for `tp`.
    pub fn new(tp: TopicPartition) -> Arc<Self> {
        Arc::new(Self {
            tp,
            id: NEXT_LEDGER_ID.fetch_add(1, Ordering::Relaxed),
            revoked: AtomicBool::new(false),
            state: Mutex::new(LedgerState::default()),
        })
    }

    /// Marks the assignment as over (revoked and committed, or lost): stages must drop what
    /// they still hold of it, since its records now belong to the partition's next owner.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
    }

    /// The partition this ledger tracks.
    #[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code))]
    pub fn topic_partition(&self) -> &TopicPartition {
        &self.tp
    }

    fn lock(&self) -> MutexGuard<'_, LedgerState> {
        // A panic while holding this lock leaves plain data behind; keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands out the range `first..=last`. Returns `None` unless it lies after every range
    /// handed out before (a redelivery of offsets already handed out).
    #[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code))]
    pub fn issue(self: &Arc<Self>, first: i64, last: i64) -> Option<AckHandle> {
        self.issue_at(first, last, None)
    }

    /// As [`PartitionLedger::issue`], for records the oldest of which was created at
    /// `created_ms` (milliseconds since the epoch): sinks report how old it was once they hold
    /// it ([`AckHandle::created_ms`]).
    pub fn issue_at(
        self: &Arc<Self>,
        first: i64,
        last: i64,
        created_ms: Option<i64>,
    ) -> Option<AckHandle> {
        if first > last {
            return None;
        }
        {
            let mut st = self.lock();
            let after = st
                .ranges
                .back()
                .map(|r| r.last)
                .or(st.committable.map(|c| c - 1));
            if after.is_some_and(|a| first <= a) {
                return None;
            }
            st.ranges.push_back(IssuedRange {
                first,
                last,
                acked: false,
                poisoned: false,
            });
        }
        Some(AckHandle::new(Arc::new(AckNode {
            ledger: self.clone(),
            first,
            last,
            created_ms,
            shares: AtomicUsize::new(1),
            poisoned: AtomicBool::new(false),
        })))
    }

    fn settle(&self, first: i64, ok: bool) {
        let mut st = self.lock();
        let Ok(idx) = st.ranges.binary_search_by_key(&first, |r| r.first) else {
            return;
        };
        if !ok {
            st.ranges[idx].poisoned = true;
            return;
        }
        st.ranges[idx].acked = true;
        while st.ranges.front().is_some_and(|r| r.acked) {
            let r = st.ranges.pop_front().expect("front exists");
            st.committable = Some(r.last + 1);
        }
    }

    /// One past the last offset handed out, if any was.
    pub fn issued_until(&self) -> Option<i64> {
        let st = self.lock();
        st.ranges.back().map(|r| r.last + 1).or(st.committable)
    }

    /// The offset to commit (one past the highest contiguously acknowledged offset), if any.
    pub fn committable(&self) -> Option<i64> {
        self.lock().committable
    }

    /// How many handed-out ranges still wait for acknowledgement (or were poisoned).
    pub fn outstanding(&self) -> usize {
        self.lock().ranges.len()
    }

    /// Whether every handed-out range is either acknowledged or poisoned: nothing derived
    /// from this partition is still on its way to a sink.
    pub fn settled(&self) -> bool {
        self.lock().ranges.iter().all(|r| r.acked || r.poisoned)
    }
}

#[derive(Debug)]
struct AckNode {
    ledger: Arc<PartitionLedger>,
    first: i64,
    last: i64,
    created_ms: Option<i64>,
    shares: AtomicUsize,
    poisoned: AtomicBool,
}

impl AckNode {
    fn release_share(&self, ok: bool) {
        if !ok {
            self.poisoned.store(true, Ordering::Release);
        }
        if self.shares.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.ledger
                .settle(self.first, !self.poisoned.load(Ordering::Acquire));
        }
    }
}

/// One share of the acknowledgement of a partition range.
#[derive(Debug)]
pub struct AckHandle {
    node: Arc<AckNode>,
    released: bool,
}

impl AckHandle {
    fn new(node: Arc<AckNode>) -> Self {
        Self {
            node,
            released: false,
        }
    }

    /// Another share of the same range: the range is acknowledged once every share is released.
    pub fn share(&self) -> Self {
        self.node.shares.fetch_add(1, Ordering::AcqRel);
        Self::new(self.node.clone())
    }

    /// Releases this share: the data derived from the range is durably handled here.
    pub fn release(mut self) {
        self.released = true;
        self.node.release_share(true);
    }

    /// The partition of the range.
    pub fn topic_partition(&self) -> &TopicPartition {
        &self.node.ledger.tp
    }

    /// First and last offset of the range (inclusive).
    pub fn offsets(&self) -> (i64, i64) {
        (self.node.first, self.node.last)
    }

    /// When the oldest record of the range was created (its Kafka timestamp, milliseconds
    /// since the epoch), if the source knew.
    pub fn created_ms(&self) -> Option<i64> {
        self.node.created_ms
    }

    /// Identifies the assignment (ledger) the range belongs to; a partition assigned again
    /// gets a new one.
    pub fn assignment(&self) -> u64 {
        self.node.ledger.id
    }

    /// Whether this assignment is over (revoked and committed, or lost): what derives from its
    /// range belongs to the partition's next owner.
    pub fn is_revoked(&self) -> bool {
        self.node.ledger.revoked.load(Ordering::Acquire)
    }
}

/// A partition's start or end of assignment, as the inputs of a stage show them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AssignmentChange {
    /// Records of the partition come under a new assignment, from this offset.
    Assigned(TopicPartition, i64),
    /// The partition's assignment is over.
    Revoked(TopicPartition),
}

/// The assignments a stage has seen, so that it hears of each partition's start and end
/// (from the acknowledgements of its inputs; it holds no share, so commits never wait for it).
#[derive(Default)]
pub(crate) struct AssignmentTracker {
    seen: std::collections::HashMap<TopicPartition, Arc<PartitionLedger>>,
}

impl AssignmentTracker {
    /// What changed since the last input: assignments found over, then new ones in `acks`.
    pub(crate) fn update(&mut self, acks: &AckSet) -> Vec<AssignmentChange> {
        let mut changes = Vec::new();
        self.seen.retain(|tp, ledger| {
            let over = ledger.revoked.load(Ordering::Acquire);
            if over {
                changes.push(AssignmentChange::Revoked(tp.clone()));
            }
            !over
        });
        for h in acks.handles() {
            let ledger = &h.node.ledger;
            if h.is_revoked() || self.seen.get(&ledger.tp).is_some_and(|l| l.id == ledger.id) {
                continue;
            }
            if self
                .seen
                .insert(ledger.tp.clone(), ledger.clone())
                .is_some()
            {
                changes.push(AssignmentChange::Revoked(ledger.tp.clone()));
            }
            changes.push(AssignmentChange::Assigned(ledger.tp.clone(), h.offsets().0));
        }
        changes
    }
}

impl Drop for AckHandle {
    fn drop(&mut self) {
        if !self.released {
            // Not released: whatever was to be written from this range was not, so the range
            // must never be committed.
            self.node.release_share(false);
        }
    }
}

/// The acknowledgement shares a [`Batch`](crate::Batch) carries: one per source range it
/// derives from.
#[derive(Debug, Default)]
pub struct AckSet {
    handles: Vec<AckHandle>,
}

impl AckSet {
    /// An empty set (for batches that derive from no source record, e.g. in tests).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one handle.
    pub fn push(&mut self, handle: AckHandle) {
        self.handles.push(handle);
    }

    /// Moves every share of `other` into this set.
    pub fn merge(&mut self, other: AckSet) {
        let mut other = other;
        self.handles.append(&mut other.handles);
    }

    /// A second set holding one more share of each range.
    pub fn share(&self) -> AckSet {
        AckSet {
            handles: self.handles.iter().map(AckHandle::share).collect(),
        }
    }

    /// Releases every share: all data derived from these ranges is durably handled.
    pub fn release(self) {
        let mut this = self;
        for h in this.handles.drain(..) {
            h.release();
        }
    }

    /// The source ranges: partition with first and last offset (inclusive).
    pub fn ranges(&self) -> impl Iterator<Item = (&TopicPartition, i64, i64)> + '_ {
        self.handles.iter().map(|h| {
            let (a, b) = h.offsets();
            (h.topic_partition(), a, b)
        })
    }

    /// The shares held, one per source range.
    pub fn handles(&self) -> &[AckHandle] {
        &self.handles
    }

    /// Number of shares held.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether the set holds no share.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tracker_hears_of_assignments_starting_and_ending() {
        let tp = TopicPartition::new("t", 2);
        let first = PartitionLedger::new(tp.clone());
        let mut tracker = AssignmentTracker::default();
        let mut acks = AckSet::new();
        acks.push(first.issue(5, 9).unwrap());
        assert_eq!(
            tracker.update(&acks),
            vec![AssignmentChange::Assigned(tp.clone(), 5)]
        );
        assert!(tracker.update(&acks).is_empty(), "heard once");
        first.revoke();
        assert_eq!(
            tracker.update(&AckSet::new()),
            vec![AssignmentChange::Revoked(tp.clone())]
        );
        assert!(
            tracker.update(&acks).is_empty(),
            "a revoked range is no new assignment"
        );
        // Assigned again without the end being seen first: it ends, then starts again.
        let second = PartitionLedger::new(tp.clone());
        let third = PartitionLedger::new(tp.clone());
        let mut next = AckSet::new();
        next.push(second.issue(10, 10).unwrap());
        tracker.update(&next);
        let mut last = AckSet::new();
        last.push(third.issue(3, 4).unwrap());
        assert_eq!(
            tracker.update(&last),
            vec![
                AssignmentChange::Revoked(tp.clone()),
                AssignmentChange::Assigned(tp, 3)
            ]
        );
        for set in [acks, next, last] {
            set.release();
        }
    }

    fn ledger() -> Arc<PartitionLedger> {
        PartitionLedger::new(TopicPartition::new("t", 0))
    }

    #[test]
    fn commits_only_contiguous_ranges() {
        let l = ledger();
        let a = l.issue(0, 9).unwrap();
        let b = l.issue(10, 19).unwrap();
        let c = l.issue(20, 29).unwrap();
        b.release();
        assert_eq!(l.committable(), None);
        a.release();
        assert_eq!(l.committable(), Some(20));
        assert_eq!(l.outstanding(), 1);
        c.release();
        assert_eq!(l.committable(), Some(30));
        assert_eq!(l.outstanding(), 0);
    }

    #[test]
    fn range_waits_for_every_share() {
        let l = ledger();
        let a = l.issue(5, 7).unwrap();
        let s1 = a.share();
        let s2 = s1.share();
        a.release();
        s2.release();
        assert_eq!(l.committable(), None);
        s1.release();
        assert_eq!(l.committable(), Some(8));
    }

    #[test]
    fn dropped_share_poisons_the_range_and_blocks_later_ones() {
        let l = ledger();
        let a = l.issue(0, 4).unwrap();
        let b = l.issue(5, 9).unwrap();
        let a2 = a.share();
        a.release();
        drop(a2);
        b.release();
        assert_eq!(
            l.committable(),
            None,
            "a poisoned range is never committed past"
        );
        assert_eq!(l.outstanding(), 2);
        assert!(l.settled());
    }

    #[test]
    fn refuses_ranges_already_handed_out() {
        let l = ledger();
        let a = l.issue(0, 9).unwrap();
        assert!(l.issue(5, 12).is_none());
        assert!(!l.settled());
        a.release();
        assert!(l.issue(9, 9).is_none(), "below the committable position");
        assert!(l.issue(10, 10).is_some());
    }

    #[test]
    fn ack_set_share_and_merge() {
        let l0 = ledger();
        let l1 = PartitionLedger::new(TopicPartition::new("t", 1));
        let mut set = AckSet::new();
        set.push(l0.issue(0, 0).unwrap());
        let mut other = AckSet::new();
        other.push(l1.issue(3, 4).unwrap());
        set.merge(other);
        let copy = set.share();
        assert_eq!(copy.len(), 2);
        set.release();
        assert_eq!((l0.committable(), l1.committable()), (None, None));
        copy.release();
        assert_eq!((l0.committable(), l1.committable()), (Some(1), Some(5)));
    }
}
