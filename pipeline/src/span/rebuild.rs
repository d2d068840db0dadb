//! Batches cut across partitions, rebuilt after a crash: the redelivered spans of one such
//! batch are held until all of them came again, then leave together as that batch, so a sink
//! writes it under its original identity once more.
//!
//! Why whole: ClickHouse commits a table's part and each of its materialised views' parts
//! one by one, so an insert cut short by a server crash can leave the table with the rows and
//! a view without them. Only the same block under the same deduplication token puts it right
//! (the table and each view drop what they already hold and take what they lack); spans
//! written one by one under their own tokens never reach the views that missed the batch.
//!
//! When some span of the batch does not come back within [`REBUILD_WAIT`] (its partition went
//! to another worker, or was committed past it because the batch was written), or one of
//! them is revoked, the spans held go out as a [`Delivery::Recovered`] batch, as they would
//! without rebuilding.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::core::{Cut, CutKind};
use super::io::{Merged, batches};
use super::{BatchRef, SourceSpan};
use crate::batch::{Batch, Delivery};

/// How long the spans of a batch wait for the rest of it before they go out on their own.
pub(crate) const REBUILD_WAIT: Duration = Duration::from_secs(10);

/// The redelivered spans of batches cut across partitions, per batch, until each batch is
/// whole.
pub(crate) struct Rebuilds<T> {
    waiting: HashMap<u128, Waiting<T>>,
    wait: Duration,
}

/// The spans of one batch that came again so far.
struct Waiting<T> {
    batch: BatchRef,
    cuts: Vec<Cut<T>>,
    /// Rows of the spans held (for a window stage, their aggregate rows, not the records'
    /// items their spans count): the batch is whole at `batch.items`, its rows.
    items: u64,
    since: Instant,
}

impl<T> Default for Rebuilds<T> {
    fn default() -> Self {
        Self::new(REBUILD_WAIT)
    }
}

impl<T> Rebuilds<T> {
    pub(crate) fn new(wait: Duration) -> Self {
        Self {
            waiting: HashMap::new(),
            wait,
        }
    }

    /// Holds the cuts that are redelivered spans of a batch cut across partitions and returns
    /// the others, with the batches this made whole ([`Delivery::Rebuilt`]) and those given
    /// up on ([`Delivery::Recovered`]).
    pub(crate) fn gather(
        &mut self,
        cuts: Vec<Cut<T>>,
        now: Instant,
    ) -> (Vec<Cut<T>>, Vec<Batch<T>>) {
        let mut out = self.purge_revoked();
        let mut rest = Vec::with_capacity(cuts.len());
        for cut in cuts {
            let batch = match (&cut.span.batch, cut.kind) {
                (Some(b), CutKind::Whole) if cut.span.across => *b,
                (Some(b), CutKind::Tail) if cut.span.across => {
                    // Redelivery began inside one of its spans: the batch was acknowledged,
                    // so written; its other spans need not wait for the rest.
                    out.extend(self.give_up(b.id));
                    rest.push(cut);
                    continue;
                }
                _ => {
                    rest.push(cut);
                    continue;
                }
            };
            let waiting = self.waiting.entry(batch.id).or_insert_with(|| Waiting {
                batch,
                cuts: Vec::new(),
                items: 0,
                since: now,
            });
            if let Some(i) = waiting
                .cuts
                .iter()
                .position(|c| same_span(&c.span, &cut.span))
            {
                // The same span again (only a revoked assignment's redelivery does that): the
                // newer cut holds the live acknowledgements.
                let old = waiting.cuts.swap_remove(i);
                waiting.items -= old.rows.len() as u64;
            }
            waiting.items += cut.rows.len() as u64;
            waiting.cuts.push(cut);
            if waiting.items >= waiting.batch.items {
                let whole = self.waiting.remove(&batch.id).expect("entry above");
                out.push(whole.rebuilt());
            }
        }
        (rest, out)
    }

    /// When the longest-waiting batch gives up.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.waiting.values().map(|w| w.since + self.wait).min()
    }

    /// The batches that waited too long, their spans as [`Delivery::Recovered`] batches.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<Batch<T>> {
        let mut out = self.purge_revoked();
        let late: Vec<u128> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.since + self.wait <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(w) = self.waiting.get(&id) {
                tracing::warn!(batch = %format_args!("{id:032x}"), spans = w.cuts.len(), items = w.items, of = w.batch.items, "the rest of a batch cut across partitions did not come again; writing its redelivered spans on their own");
            }
            out.extend(self.give_up(id));
        }
        out
    }

    /// At the end of the input: what still waits is dropped, never acknowledged, so its
    /// records come again to whoever reads them next.
    pub(crate) fn abandon(&mut self) {
        for (id, w) in self.waiting.drain() {
            tracing::warn!(batch = %format_args!("{id:032x}"), spans = w.cuts.len(), "a batch cut across partitions was not whole when the stage ended; its records will be redelivered");
        }
    }

    /// The spans held of batch `id`, as a [`Delivery::Recovered`] batch.
    fn give_up(&mut self, id: u128) -> Vec<Batch<T>> {
        match self.waiting.remove(&id) {
            Some(w) => batches(w.cuts, false),
            None => Vec::new(),
        }
    }

    /// Drops the held spans whose partition was revoked (their next owner writes them); the
    /// rest of such a batch can no longer be whole here, so it goes out on its own.
    fn purge_revoked(&mut self) -> Vec<Batch<T>> {
        let broken: Vec<u128> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.cuts.iter().any(|c| revoked(c)))
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in broken {
            if let Some(w) = self.waiting.get_mut(&id) {
                w.cuts.retain(|c| !revoked(c));
            }
            out.extend(self.give_up(id));
        }
        out
    }
}

impl<T> Waiting<T> {
    /// The batch whole again, its spans in the order of their partitions and offsets.
    fn rebuilt(mut self) -> Batch<T> {
        self.cuts.sort_by(|a, b| {
            let key = |s: &SourceSpan| (s.tp.clone(), s.window_key(), s.first);
            key(&a.span).cmp(&key(&b.span))
        });
        let mut merged = Merged::default();
        for cut in self.cuts {
            merged.add(cut);
        }
        tracing::info!(batch = %format_args!("{:032x}", self.batch.id), items = self.batch.items, "rebuilt a batch cut across partitions from its redelivered spans");
        merged
            .into_batch()
            .map(|b| b.with_delivery(Delivery::Rebuilt))
            .expect("a waiting batch holds at least one span")
    }
}

fn same_span(a: &SourceSpan, b: &SourceSpan) -> bool {
    a.tp == b.tp && a.window_key() == b.window_key() && a.first == b.first
}

fn revoked<T>(cut: &Cut<T>) -> bool {
    cut.acks.handles().iter().any(|h| h.is_revoked())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ack::{AckSet, PartitionLedger, TopicPartition};

    /// A batch of 3 items of partition 0 (offsets 10..=12) and 2 of partition 1 (20..=21).
    struct Fixture {
        ledgers: [Arc<PartitionLedger>; 2],
        batch: BatchRef,
    }

    impl Fixture {
        fn new() -> Self {
            Self::with_items(5)
        }

        /// The same spans, in a batch of `items` items.
        fn with_items(items: u64) -> Self {
            let ledgers = [0, 1].map(|p| PartitionLedger::new(TopicPartition::new("t", p)));
            let spans = [span(0, 10, 12, None), span(1, 20, 21, None)];
            Self {
                ledgers,
                batch: BatchRef::of(&spans, items),
            }
        }

        /// Partition `p`'s span of the batch, cut again as `kind`.
        fn cut(&self, p: usize, kind: CutKind) -> Cut<u32> {
            let (first, last) = [(10, 12), (20, 21)][p];
            let mut acks = AckSet::new();
            acks.push(self.ledgers[p].issue(first, last).expect("in order"));
            Cut {
                rows: (first..=last).map(|o| o as u32).collect(),
                acks,
                span: span(p as i32, first, last, Some(self.batch)),
                kind,
            }
        }
    }

    fn span(p: i32, first: i64, last: i64, batch: Option<BatchRef>) -> SourceSpan {
        SourceSpan {
            tp: TopicPartition::new("t", p),
            first,
            last,
            items: (last - first + 1) as u64,
            window: None,
            across: true,
            batch,
        }
    }

    #[test]
    fn spans_of_a_batch_leave_together_once_all_came_again() {
        let f = Fixture::new();
        let mut r = Rebuilds::default();
        let now = Instant::now();
        let (rest, out) = r.gather(vec![f.cut(1, CutKind::Whole)], now);
        assert!(
            rest.is_empty() && out.is_empty(),
            "partition 1's span waits"
        );
        let other = Cut {
            rows: vec![99],
            acks: AckSet::new(),
            span: span(2, 99, 99, None),
            kind: CutKind::Fresh,
        };
        let (rest, out) = r.gather(vec![other, f.cut(0, CutKind::Whole)], now);
        assert_eq!(rest.len(), 1, "a fresh cut passes");
        assert_eq!(out.len(), 1);
        let batch = out.into_iter().next().expect("one");
        assert_eq!(batch.delivery(), Delivery::Rebuilt);
        assert_eq!(
            batch.items,
            vec![10, 11, 12, 20, 21],
            "spans in partition order"
        );
        let spans: Vec<(i32, u64)> = batch
            .spans()
            .iter()
            .map(|s| (s.tp.partition, s.items))
            .collect();
        assert_eq!(spans, vec![(0, 3), (1, 2)]);
        assert!(batch.spans().iter().all(|s| s.batch == Some(f.batch)));
        assert_eq!(r.deadline(), None);
        batch.ack();
        assert_eq!(f.ledgers[0].committable(), Some(13));
        assert_eq!(f.ledgers[1].committable(), Some(22));
    }

    /// A window stage's spans count the records they aggregate; its batches count rows.
    #[test]
    fn a_batch_of_aggregates_is_whole_when_its_rows_are() {
        let f = Fixture::with_items(2);
        let mut r = Rebuilds::default();
        let now = Instant::now();
        let aggregate = |p: usize| {
            let mut cut = f.cut(p, CutKind::Whole);
            cut.span.window = Some(1_800_000_000);
            cut.rows.truncate(1);
            cut
        };
        let (_, out) = r.gather(vec![aggregate(0)], now);
        assert!(out.is_empty(), "1 of 2 rows (3 records): waits");
        let (_, out) = r.gather(vec![aggregate(1)], now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].delivery(), Delivery::Rebuilt);
        assert_eq!(out[0].items, vec![10, 20]);
    }

    #[test]
    fn a_tail_of_the_batch_sends_its_waiting_spans_on_their_own() {
        let f = Fixture::new();
        let mut r = Rebuilds::default();
        let now = Instant::now();
        let _ = r.gather(vec![f.cut(0, CutKind::Whole)], now);
        let (rest, out) = r.gather(vec![f.cut(1, CutKind::Tail)], now);
        assert_eq!(rest.len(), 1, "the tail passes (and is dropped downstream)");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].delivery(), Delivery::Recovered);
        assert_eq!(out[0].items, vec![10, 11, 12]);
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn spans_give_up_waiting_after_the_wait() {
        let f = Fixture::new();
        let wait = Duration::from_secs(10);
        let mut r = Rebuilds::new(wait);
        let now = Instant::now();
        let _ = r.gather(vec![f.cut(0, CutKind::Whole)], now);
        assert_eq!(r.deadline(), Some(now + wait));
        assert!(r.due(now + wait - Duration::from_millis(1)).is_empty());
        let out = r.due(now + wait);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].delivery(), Delivery::Recovered);
        assert_eq!(out[0].items, vec![10, 11, 12]);
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn a_revoked_span_is_dropped_and_the_rest_goes_on_its_own() {
        // The batch had a third span, of a partition this stage does not read.
        let f = Fixture::with_items(6);
        let mut r = Rebuilds::default();
        let now = Instant::now();
        let (_, out) = r.gather(
            vec![f.cut(0, CutKind::Whole), f.cut(1, CutKind::Whole)],
            now,
        );
        assert!(out.is_empty(), "5 of 6 items: waits");
        f.ledgers[0].revoke();
        let (_, out) = r.gather(vec![], now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].delivery(), Delivery::Recovered);
        assert_eq!(out[0].items, vec![20, 21], "partition 0's span dropped");
        assert_eq!(r.deadline(), None);
        assert_eq!(f.ledgers[0].committable(), None, "never acknowledged");
    }

    #[test]
    fn what_still_waits_at_the_end_is_never_acknowledged() {
        let f = Fixture::new();
        let mut r = Rebuilds::default();
        let _ = r.gather(vec![f.cut(1, CutKind::Whole)], Instant::now());
        r.abandon();
        assert_eq!(r.deadline(), None);
        assert_eq!(f.ledgers[1].committable(), None);
    }
}
