//! The unit that travels between stages: a micro-batch of items and the acknowledgement shares
//! of the source records they derive from.

use crate::ack::{AckHandle, AckSet};
use crate::span::Span;

/// A micro-batch of items with the acknowledgement shares of the records they derive from.
///
/// Items travel between stages in batches (one per Kafka poll, or one per sink flush), never one
/// channel send per item.
#[derive(Debug)]
pub struct Batch<T> {
    /// The items, in source order within each partition.
    pub items: Vec<T>,
    acks: AckSet,
    span: Option<Span>,
    replayed: bool,
}

impl<T> Batch<T> {
    /// A batch carrying `acks`.
    pub fn new(items: Vec<T>, acks: AckSet) -> Self {
        Self {
            items,
            acks,
            span: None,
            replayed: false,
        }
    }

    /// A batch derived from one source range.
    pub fn from_handle(items: Vec<T>, handle: AckHandle) -> Self {
        let mut acks = AckSet::new();
        acks.push(handle);
        Self {
            items,
            acks,
            span: None,
            replayed: false,
        }
    }

    /// A batch that derives from no source record (tests, generated data).
    pub fn unacked(items: Vec<T>) -> Self {
        Self::new(items, AckSet::new())
    }

    /// The same batch marked as cut from exactly `span` (see [`Flow::batch_spans`](crate::Flow::batch_spans)).
    pub fn with_span(mut self, span: Span) -> Self {
        self.span = Some(span);
        self
    }

    /// The same batch marked as a recorded span cut again whole after a restart or rebalance:
    /// an earlier run may have written it, in whole or (if the sink crashed meanwhile) in part.
    pub fn replayed(mut self) -> Self {
        self.replayed = true;
        self
    }

    /// Whether the batch is a recorded span cut again (see [`Batch::replayed`]).
    pub fn is_replay(&self) -> bool {
        self.replayed
    }

    /// The source span the batch was cut from, if it was cut by a span batcher: its items are
    /// exactly those derived from the span's records, in any run.
    pub fn span(&self) -> Option<&Span> {
        self.span.as_ref()
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
            span: self.span,
            replayed: self.replayed,
        }
    }

    /// Releases the acknowledgement shares: everything derived from this batch is handled.
    pub fn ack(self) {
        self.acks.release();
    }
}
