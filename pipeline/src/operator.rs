//! The traits a user implements to add a stage: [`Operator`] for CPU work over a micro-batch,
//! [`AsyncOperator`] where the stage needs I/O, and [`Sink`] for the end of a branch.

use std::future::Future;
use std::marker::PhantomData;

use crate::ack::TopicPartition;
use crate::batch::Batch;
use crate::error::{BoxError, SinkError};

/// A synchronous operator: turns a micro-batch of inputs into outputs (CPU work).
///
/// An `Err` stops the pipeline; model per-item failures as data instead (e.g. an output enum
/// with a dead-letter variant), so that one bad record does not stop the stream.
pub trait Operator: Send + 'static {
    /// Input item type.
    type In: Send + 'static;
    /// Output item type.
    type Out: Send + 'static;

    /// Processes one micro-batch, pushing results to `out` (which arrives empty).
    fn process(&mut self, input: Vec<Self::In>, out: &mut Vec<Self::Out>) -> Result<(), BoxError>;

    /// Called before the first input that holds records of `partition` under a new
    /// assignment, with the offset they start at: where state kept per partition is restored
    /// from (it must reflect exactly the records before `from`). An `Err` stops the pipeline.
    fn assigned(&mut self, _partition: &TopicPartition, _from: i64) -> Result<(), BoxError> {
        Ok(())
    }

    /// Called at the first input after `partition`'s assignment ended (revoked or lost): what
    /// is kept for it belongs to its next owner now.
    fn revoked(&mut self, _partition: &TopicPartition) {}
}

/// An asynchronous operator, for stages that need I/O (lookups, enrichment services).
pub trait AsyncOperator: Send + 'static {
    /// Input item type.
    type In: Send + 'static;
    /// Output item type.
    type Out: Send + 'static;

    /// Processes one micro-batch.
    fn process(
        &mut self,
        input: Vec<Self::In>,
    ) -> impl Future<Output = Result<Vec<Self::Out>, BoxError>> + Send;

    /// As [`Operator::assigned`]: state kept per partition is restored here (e.g. read back
    /// from a store as of offset `from`).
    fn assigned(
        &mut self,
        _partition: &TopicPartition,
        _from: i64,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        async { Ok(()) }
    }

    /// As [`Operator::revoked`].
    fn revoked(&mut self, _partition: &TopicPartition) {}
}

/// The end of a branch: writes batches durably.
///
/// The runtime acknowledges a batch's source records only after `write` returns `Ok`, retries
/// [`SinkError::transient`] failures with capped exponential backoff, and stops the pipeline on
/// [`SinkError::permanent`] ones. `write` must therefore be safe to call again with the same
/// batch (idempotent, e.g. through a deduplication token derived from [`Batch::acks`]).
pub trait Sink: Send + 'static {
    /// Item type written (`Sync` because a retried write borrows the batch across awaits).
    type Item: Send + Sync + 'static;

    /// Writes the batch; returns once it is durable.
    fn write(
        &mut self,
        batch: &Batch<Self::Item>,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// [`Operator`] from a closure mapping each item.
pub struct MapOp<F, In, Out> {
    f: F,
    _types: PhantomData<fn(In) -> Out>,
}

impl<F, In, Out> MapOp<F, In, Out> {
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        Self {
            f,
            _types: PhantomData,
        }
    }
}

impl<In, Out, F> Operator for MapOp<F, In, Out>
where
    In: Send + 'static,
    Out: Send + 'static,
    F: FnMut(In) -> Out + Send + 'static,
{
    type In = In;
    type Out = Out;

    fn process(&mut self, input: Vec<In>, out: &mut Vec<Out>) -> Result<(), BoxError> {
        out.extend(input.into_iter().map(&mut self.f));
        Ok(())
    }
}

/// [`Operator`] from a predicate keeping the items it accepts.
pub struct FilterOp<F, T> {
    f: F,
    _types: PhantomData<fn(T) -> T>,
}

impl<F, T> FilterOp<F, T> {
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        Self {
            f,
            _types: PhantomData,
        }
    }
}

impl<T, F> Operator for FilterOp<F, T>
where
    T: Send + 'static,
    F: FnMut(&T) -> bool + Send + 'static,
{
    type In = T;
    type Out = T;

    fn process(&mut self, input: Vec<T>, out: &mut Vec<T>) -> Result<(), BoxError> {
        out.extend(input.into_iter().filter(&mut self.f));
        Ok(())
    }
}

/// [`Operator`] from a closure turning each item into zero or more items.
pub struct FlatMapOp<F, In, I> {
    f: F,
    _types: PhantomData<fn(In) -> I>,
}

impl<F, In, I> FlatMapOp<F, In, I> {
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        Self {
            f,
            _types: PhantomData,
        }
    }
}

impl<In, I, F> Operator for FlatMapOp<F, In, I>
where
    In: Send + 'static,
    I: IntoIterator + 'static,
    I::Item: Send + 'static,
    F: FnMut(In) -> I + Send + 'static,
{
    type In = In;
    type Out = I::Item;

    fn process(&mut self, input: Vec<In>, out: &mut Vec<I::Item>) -> Result<(), BoxError> {
        for item in input {
            out.extend((self.f)(item));
        }
        Ok(())
    }
}
