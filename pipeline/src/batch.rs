//! The unit that travels between stages: a micro-batch of items and the acknowledgement shares
//! of the source records they derive from.

use crate::ack::{AckHandle, AckSet};

/// A micro-batch of items with the acknowledgement shares of the records they derive from.
///
/// Items travel between stages in batches (one per Kafka poll, or one per sink flush), never one
/// channel send per item.
#[derive(Debug)]
pub struct Batch<T> {
    /// The items, in source order within each partition.
    pub items: Vec<T>,
    acks: AckSet,
}

impl<T> Batch<T> {
    /// A batch carrying `acks`.
    pub fn new(items: Vec<T>, acks: AckSet) -> Self {
        Self { items, acks }
    }

    /// A batch derived from one source range.
    pub fn from_handle(items: Vec<T>, handle: AckHandle) -> Self {
        let mut acks = AckSet::new();
        acks.push(handle);
        Self { items, acks }
    }

    /// A batch that derives from no source record (tests, generated data).
    pub fn unacked(items: Vec<T>) -> Self {
        Self {
            items,
            acks: AckSet::new(),
        }
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
        }
    }

    /// Releases the acknowledgement shares: everything derived from this batch is handled.
    pub fn ack(self) {
        self.acks.release();
    }
}
