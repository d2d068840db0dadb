//! Errors of the runtime and of the stages it runs.

use std::sync::Arc;

/// Any error a user stage may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whether a failed write may succeed when tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Connection lost, timeout, overload: retried with backoff.
    Transient,
    /// Schema mismatch, bad credentials, invalid data: stops the pipeline.
    Permanent,
}

/// A failed sink write.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?} sink error: {source}")]
pub struct SinkError {
    /// Whether the write may be retried.
    pub kind: ErrorKind,
    /// The cause.
    #[source]
    pub source: BoxError,
}

impl SinkError {
    /// A failure that may go away (retried).
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Transient, source.into())
    }

    /// A failure that will not go away by retrying (stops the pipeline).
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Permanent, source.into())
    }

    /// A sink error of `kind`; a `source` that is itself a sink error gives up its cause, so
    /// that a stage re-classifying a sink's failure does not say "sink error" twice.
    fn new(kind: ErrorKind, source: BoxError) -> Self {
        let source = match source.downcast::<SinkError>() {
            Ok(inner) => inner.source,
            Err(source) => source,
        };
        Self { kind, source }
    }

    /// Whether the write may be retried.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

/// Why a pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// An operator returned an error.
    #[error("stage `{stage}` failed: {source}")]
    Operator {
        /// Stage name.
        stage: Arc<str>,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// A sink failed permanently, or transiently for longer than its retry limit.
    #[error("sink `{stage}` failed after {attempts} attempt(s): {source}")]
    Sink {
        /// Stage name.
        stage: Arc<str>,
        /// Attempts made.
        attempts: u32,
        /// The cause.
        #[source]
        source: SinkError,
    },
    /// The source failed.
    #[error("source `{stage}` failed: {message}")]
    Source {
        /// Stage name.
        stage: Arc<str>,
        /// What happened.
        message: String,
    },
    /// A stage's downstream stopped (because it failed; that failure is reported on its own).
    #[error("stage `{stage}`: downstream stage stopped")]
    DownstreamClosed {
        /// Stage name.
        stage: Arc<str>,
    },
    /// A stage panicked.
    #[error("stage `{stage}` panicked: {message}")]
    Panicked {
        /// Stage name.
        stage: Arc<str>,
        /// Panic message.
        message: String,
    },
    /// Stages did not finish flushing within the shutdown deadline.
    #[error(
        "shutdown deadline of {0:?} passed before every stage flushed; committed only what was written"
    )]
    DrainDeadline(std::time::Duration),
    /// Items of one partition reached a span-cutting stage out of offset order: a stage with
    /// several workers between the keyed split and it reorders them, and cuts along offsets
    /// would no longer be the same in every run.
    #[error(
        "stage `{stage}`: partition {partition} offset {offset} came after offset {after}; \
         items must reach a span batcher or window in offset order (keep one worker, or \
         `apply_keyed` by partition, between the keyed split and it)"
    )]
    OutOfOrder {
        /// Stage name.
        stage: Arc<str>,
        /// The partition.
        partition: crate::ack::TopicPartition,
        /// The offset that came late.
        offset: i64,
        /// The highest offset seen before it.
        after: i64,
    },
    /// Invalid pipeline configuration.
    #[error("invalid configuration `{key}`: {message}")]
    Config {
        /// The configuration key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl PipelineError {
    /// Whether this error only follows from another stage's failure.
    pub fn is_secondary(&self) -> bool {
        matches!(self, PipelineError::DownstreamClosed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_error_wrapped_again_names_its_cause_once() {
        let inner = SinkError::transient("clickhouse: connection refused");
        let outer = SinkError::permanent(BoxError::from(inner));
        assert_eq!(
            outer.to_string(),
            "Permanent sink error: clickhouse: connection refused"
        );
        assert!(!outer.is_transient());
        let plain = SinkError::transient("timeout");
        assert_eq!(plain.to_string(), "Transient sink error: timeout");
    }
}
