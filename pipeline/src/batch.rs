//! The unit that travels between stages: a micro-batch of items and the acknowledgement shares
//! of the source records they derive from.

use crate::ack::{AckHandle, AckSet};
use crate::span::SourceSpan;
use std::sync::Arc;

/// Counts the batches a stage sent that are not dropped yet (a sink drops a batch once it
/// has written it).
#[derive(Clone, Debug, Default)]
pub(crate) struct InFlight(Arc<()>);

impl InFlight {
    /// Batches sent and not yet dropped.
    pub(crate) fn count(&self) -> usize {
        Arc::strong_count(&self.0) - 1
    }
}

/// A micro-batch of items with the acknowledgement shares of the records they derive from.
///
/// Items travel between stages in batches (one per Kafka poll, or one per sink flush), never one
/// channel send per item.
#[derive(Debug)]
pub struct Batch<T> {
    /// The items, in source order within each partition.
    pub items: Vec<T>,
    acks: AckSet,
    spans: Vec<SourceSpan>,
    delivery: Delivery,
    in_flight: Option<InFlight>,
}

/// What an earlier run may have done with a batch's items, and so how a sink writes them
/// exactly once (see [`Flow::batch_spans`](crate::Flow::batch_spans)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Delivery {
    /// Items handed out for the first time, or the tail of a recorded span whose batch was
    /// written (redelivery began inside it): the batch's identity decides, so a
    /// deduplicating sink drops a repeat.
    #[default]
    Fresh,
    /// A recorded span cut again whole after a restart or rebalance: an earlier run may have
    /// written it, in whole or (if the sink crashed meanwhile) in part.
    Redelivered,
    /// Redelivered spans of batches that held other spans too (cut across partitions): an
    /// earlier run may have written them under that batch's identity
    /// ([`SourceSpan::batch`]), so a sink writes each span's items only if that batch did not
    /// land. The items are the spans' items in the order of the spans, `items` of each
    /// ([`Batch::span_items`]).
    Recovered,
    /// A batch cut across partitions, whole again from all its redelivered spans: an earlier
    /// run may have written it under its identity, in whole or (if the sink crashed
    /// meanwhile) in part, or written some of its spans alone as [`Delivery::Recovered`]
    /// ones. A sink that finds none written alone writes it as it did the first time, so a
    /// deduplicating one drops a repeat; else it writes it as a recovered batch. Its items
    /// are laid out as a recovered batch's.
    Rebuilt,
}

impl<T> Batch<T> {
    /// A batch carrying `acks`.
    pub fn new(items: Vec<T>, acks: AckSet) -> Self {
        Self {
            items,
            acks,
            spans: Vec::new(),
            delivery: Delivery::Fresh,
            in_flight: None,
        }
    }

    /// A batch derived from one source range.
    pub fn from_handle(items: Vec<T>, handle: AckHandle) -> Self {
        let mut acks = AckSet::new();
        acks.push(handle);
        Self {
            items,
            acks,
            spans: Vec::new(),
            delivery: Delivery::Fresh,
            in_flight: None,
        }
    }

    /// A batch that derives from no source record (tests, generated data).
    pub fn unacked(items: Vec<T>) -> Self {
        Self::new(items, AckSet::new())
    }

    /// The same batch marked as cut from exactly `spans` (see [`Flow::batch_spans`](crate::Flow::batch_spans)):
    /// one span, or one per partition for a batch cut across partitions.
    pub fn with_spans(mut self, spans: Vec<SourceSpan>) -> Self {
        self.spans = spans;
        self
    }

    /// The same batch with `delivery`.
    pub fn with_delivery(mut self, delivery: Delivery) -> Self {
        self.delivery = delivery;
        self
    }

    /// What an earlier run may have done with the items.
    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// The same batch counted in `in_flight` until it is dropped.
    pub(crate) fn tracked(mut self, in_flight: &InFlight) -> Self {
        self.in_flight = Some(in_flight.clone());
        self
    }

    /// The source spans the batch was cut from, if a span-cutting stage cut it (empty
    /// otherwise): its items are exactly those derived from the spans' records.
    pub fn spans(&self) -> &[SourceSpan] {
        &self.spans
    }

    /// Each span with its items, for a batch whose items are its spans' in order (a
    /// [`Delivery::Recovered`] or [`Delivery::Rebuilt`] one); `None` if the spans' counts do
    /// not add up to the items.
    pub fn span_items(&self) -> Option<Vec<(&SourceSpan, &[T])>> {
        let mut rest = &self.items[..];
        let mut out = Vec::with_capacity(self.spans.len());
        for span in &self.spans {
            let (head, tail) = rest.split_at_checked(usize::try_from(span.items).ok()?)?;
            out.push((span, head));
            rest = tail;
        }
        rest.is_empty().then_some(out)
    }

    /// The acknowledgement shares.
    pub fn acks(&self) -> &AckSet {
        &self.acks
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch has no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Splits into items and acknowledgement shares.
    pub fn into_parts(self) -> (Vec<T>, AckSet) {
        (self.items, self.acks)
    }

    /// The same acknowledgements over other items.
    pub fn with_items<U>(self, items: Vec<U>) -> Batch<U> {
        Batch {
            items,
            acks: self.acks,
            spans: self.spans,
            delivery: self.delivery,
            in_flight: self.in_flight,
        }
    }

    /// Releases the acknowledgement shares: everything derived from this batch is handled.
    pub fn ack(self) {
        self.acks.release();
    }
}
