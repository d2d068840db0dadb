//! Sluice runtime: typed operator graphs over bounded, backpressured stages, a Kafka source
//! with a consumer group, and acknowledgements that commit an offset only once every sink
//! holding data derived from it has written it.
//!
//! ```no_run
//! use sluice_pipeline::{Batch, BatchLimits, KafkaSource, KafkaSourceConfig, Pipeline, PipelineConfig, Sink, SinkError};
//!
//! /// Logs the total size of each batch.
//! struct LogSizes;
//!
//! impl Sink for LogSizes {
//!     type Item = usize;
//!     async fn write(&mut self, batch: &Batch<usize>) -> Result<(), SinkError> {
//!         tracing::info!(bytes = batch.items.iter().sum::<usize>(), "batch");
//!         Ok(())
//!     }
//! }
//!
//! let pipeline = Pipeline::new(PipelineConfig::default());
//! let source = KafkaSource::new(KafkaSourceConfig::new("127.0.0.1:9092", "group", vec!["events".into()]));
//! pipeline
//!     .source("kafka", source)
//!     .map("measure", |record| record.byte_size())
//!     .filter("non-empty", |size| *size > 0)
//!     .batch("batch", BatchLimits::default(), |_| 8)
//!     .sink("store", || LogSizes);
//! # let _ = pipeline.run();
//! ```

mod ack;
mod batch;
mod dead_letter;
mod decode;
mod error;
mod graph;
pub mod http;
mod kafka;
mod lifecycle;
mod metrics;
mod operator;
mod retry;
mod sources;
mod span;
mod split;
mod stages;

pub use ack::{AckHandle, AckSet, TopicPartition};
pub use batch::{Batch, Delivery};
pub use dead_letter::{DeadLetter, DeadLetterSink, producer_properties};
pub use decode::{Decode, DecodePort, Decoded};
pub use error::{BoxError, ErrorKind, PipelineError, SinkError};
pub use graph::{
    Flow, FlushTrigger, Pipeline, PipelineConfig, PipelineHandle, Source, SourceContext, Stage,
    StageContext,
};
pub use kafka::{DrainProgress, KafkaRecord, KafkaSource, KafkaSourceConfig, send_waiting};
pub use lifecycle::{Health, Shutdown, shutdown_on_signals};
pub use operator::{AsyncOperator, Operator, Sink};
pub use retry::RetryPolicy;
pub use sources::BatchSource;
pub use span::{BatchRef, SourceSpan, Sourced, SpanLog, WindowAggregate, WindowSpec};
pub use split::{Emit, Port, Split};
pub use stages::{BatchLimits, Output};

/// Helpers for tests of sources, stages and sinks outside this crate: acknowledgements issued
/// by hand, as the Kafka source issues them (enable the `test-util` feature).
#[cfg(feature = "test-util")]
pub mod testing {
    pub use crate::ack::PartitionLedger;
}
