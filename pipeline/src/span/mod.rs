//! Span cutting: batches cut per source partition along consecutive source offsets, each cut
//! recorded in a [`SpanLog`] before the batch moves on, so that records redelivered after a
//! crash are cut again at exactly the same places. A sink that deduplicates by batch identity
//! (ClickHouse's `insert_deduplication_token`) then sees the same batches and writes them once.
//!
//! Two stages cut spans, on one core ([`core`]): the span batcher ([`batcher`], rows as they
//! come) and the window stage ([`window`], aggregates per event-time window). Cut across
//! partitions instead ([`Flow::batch_spans_across`](crate::Flow::batch_spans_across)), a batch
//! holds one span per partition; a replay cannot cut it again, so each of its spans is recorded
//! with the batch's identity ([`BatchRef`]). Its redelivered spans wait for each other
//! ([`rebuild`]) and leave whole as a [`Delivery::Rebuilt`](crate::Delivery::Rebuilt) batch,
//! or, when the rest does not come, as [`Delivery::Recovered`](crate::Delivery::Recovered)
//! batches: the sink writes a span's items only if that batch did not land.

mod batcher;
mod core;
mod io;
mod rebuild;
mod window;

use std::collections::VecDeque;
use std::future::Future;

use crate::ack::TopicPartition;
use crate::error::SinkError;

pub(crate) use batcher::SpanBatcher;
pub(crate) use io::SpanIo;
pub(crate) use window::Windower;
pub use window::{WindowAggregate, WindowSpec};

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

    /// The item turned into another, from the same record.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Sourced<U> {
        Sourced {
            tp: self.tp,
            offset: self.offset,
            item: f(self.item),
        }
    }
}

/// The records `first..=last` of one partition a batch was cut from (`first` and `last` are
/// the offsets of its first and last item), and how many items it held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSpan {
    /// The partition.
    pub tp: TopicPartition,
    /// Offset of the record of the first item.
    pub first: i64,
    /// Offset of the record of the last item.
    pub last: i64,
    /// Items in the batch.
    pub items: u64,
    /// The start of the event-time window the span's items were aggregated in (seconds since
    /// the epoch), for a window stage's spans; `None` for a span batcher's (and for the window
    /// that starts at the epoch itself, which is kept apart all the same: see
    /// [`SourceSpan::window_key`]).
    pub window: Option<i64>,
    /// The span's batch held other spans too (other partitions', other windows'): a replay
    /// cannot cut that batch again, so its records leave as a
    /// [`Delivery::Recovered`](crate::Delivery::Recovered) batch.
    pub across: bool,
    /// The batch the span left in, when it left with other spans (set as the batch is cut,
    /// recorded with the span): a replay asks the sink whether that batch landed.
    pub batch: Option<BatchRef>,
}

impl SourceSpan {
    /// The sub-stream of its partition the span cuts: the window start, 0 for a plain span.
    pub fn window_key(&self) -> i64 {
        self.window.unwrap_or(0)
    }

    /// The `window` of a span cut from window key `key` (0: none).
    pub(crate) fn window_of(key: i64) -> Option<i64> {
        (key != 0).then_some(key)
    }
}

/// The identity of a batch that held several spans, and how many items it held: what a sink
/// needs to tell, after a crash, whether that batch was written (see
/// [`Delivery::Recovered`](crate::Delivery::Recovered)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchRef {
    /// A hash of every span of the batch (partition, window and offsets).
    pub id: u128,
    /// Items (rows) of the whole batch.
    pub items: u64,
}

impl BatchRef {
    /// The reference of a batch of `items` cut from exactly `spans`, whatever their order.
    pub fn of(spans: &[SourceSpan], items: u64) -> Self {
        let mut keys: Vec<(&str, i32, i64, i64, i64)> = spans
            .iter()
            .map(|s| {
                (
                    &*s.tp.topic,
                    s.tp.partition,
                    s.window_key(),
                    s.first,
                    s.last,
                )
            })
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

/// Where a span-cutting stage records its cuts (before the batches are written) and finds
/// them again when a partition is assigned. One log per stage, e.g. per consumer group and
/// table.
pub trait SpanLog: Send + Sync + 'static {
    /// Stores `spans` durably.
    fn record(&self, spans: &[SourceSpan]) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// The spans recorded for `tp` that end at or after offset `from`, in recording order.
    fn load(
        &self,
        tp: &TopicPartition,
        from: i64,
    ) -> impl Future<Output = Result<Vec<SourceSpan>, SinkError>> + Send;
}

/// The spans to cut again, in offset order: the recorded ones, where two overlap (only a
/// zombie worker or a change of code can cause that) the one recorded first.
fn replay_plan(recorded: Vec<SourceSpan>) -> VecDeque<SourceSpan> {
    let mut kept: Vec<SourceSpan> = Vec::with_capacity(recorded.len());
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

/// A small deterministic generator (xorshift64*), enough for the tests' shuffles and crashes.
#[cfg(test)]
pub(crate) struct Rng(pub(crate) u64);

#[cfg(test)]
impl Rng {
    pub(crate) fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_recorded_spans_keep_the_first_recorded() {
        let tp = TopicPartition::new("t", 0);
        let s = |first, last| SourceSpan {
            tp: tp.clone(),
            first,
            last,
            items: 1,
            window: None,
            across: false,
            batch: None,
        };
        let plan = replay_plan(vec![s(10, 19), s(0, 9), s(5, 14), s(10, 19), s(20, 20)]);
        let got: Vec<(i64, i64)> = plan.iter().map(|p| (p.first, p.last)).collect();
        assert_eq!(got, vec![(0, 9), (10, 19), (20, 20)]);
    }
}
