//! The dead-letter sink: records that cannot be processed go to a Kafka topic with their
//! original key, value and headers, plus headers saying why (`error`, `error_stage`) and where
//! they came from (`source_topic`, `source_partition`, `source_offset`). A batch counts as
//! written once the broker acknowledged every record, so the source offsets are committed only
//! after the dead letters are safe.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::batch::Batch;
use crate::error::SinkError;
use crate::kafka::KafkaRecord;
use crate::operator::Sink;

/// Metric: dead letters written (labels `stage`, `reason`).
pub const DEAD_LETTERS: &str = "sluice_dead_letters_total";

/// A record that could not be processed, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// The original record.
    pub record: KafkaRecord,
    /// What is wrong with it, for a person to read.
    pub error: String,
    /// The stage that refused it (`decode`, `route`, …).
    pub stage: &'static str,
    /// A short, low-cardinality reason for metrics (`invalid_json`, `unknown_type`, …).
    pub reason: &'static str,
}

/// Writes dead letters to one topic.
#[derive(Clone)]
pub struct DeadLetterSink {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetterSink {
    /// A sink into `topic`; `options` are librdkafka properties (security settings and the like).
    pub fn new(
        brokers: &str,
        topic: impl Into<String>,
        options: &BTreeMap<String, String>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            // Whatever the source topic held must fit (the broker may still refuse it: then
            // the value is cut, see `write`).
            .set("message.max.bytes", "16777216");
        for (k, v) in producer_properties(options) {
            config.set(k, v);
        }
        Ok(Self {
            producer: config.create()?,
            topic: topic.into(),
        })
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// The librdkafka properties of `options` a producer takes (TLS, SASL, …): consumer-only ones
/// would make a producer refuse to start.
pub fn producer_properties<'a>(
    options: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> impl Iterator<Item = (&'a String, &'a String)> {
    options.into_iter().filter(|(k, _)| !is_consumer_only(k))
}

/// Whether a librdkafka property applies to consumers only (a producer warns about it).
fn is_consumer_only(key: &str) -> bool {
    key.starts_with("group.")
        || key.starts_with("fetch.")
        || key.starts_with("queued.")
        || key.starts_with("auto.")
        || key.starts_with("enable.auto")
        || key.starts_with("enable.partition.eof")
        || key.starts_with("partition.assignment")
        || matches!(
            key,
            "session.timeout.ms"
                | "heartbeat.interval.ms"
                | "max.poll.interval.ms"
                | "isolation.level"
                | "check.crcs"
        )
}

/// How much of a value is kept when the whole record is too large for the dead-letter topic.
pub const TRUNCATED_VALUE_BYTES: usize = 64 << 10;

impl DeadLetterSink {
    /// Writes one dead letter; with `cut`, only the value's first `cut` bytes, and headers
    /// `value_truncated` and `value_bytes`.
    async fn send(&self, dl: &DeadLetter, cut: Option<usize>) -> Result<(), KafkaError> {
        let r = &dl.record;
        let (partition, offset) = (r.partition.to_string(), r.offset.to_string());
        let value_len = r.value.as_ref().map_or(0, |v| v.len()).to_string();
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 8);
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_ref()),
            });
        }
        for (k, v) in [
            ("error", dl.error.as_str()),
            ("error_stage", dl.stage),
            ("error_reason", dl.reason),
            ("source_topic", &*r.topic),
            ("source_partition", partition.as_str()),
            ("source_offset", offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        if cut.is_some() {
            for (k, v) in [
                ("value_truncated", "true"),
                ("value_bytes", value_len.as_str()),
            ] {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = &r.key {
            record = record.key(k.as_ref());
        }
        if let Some(v) = &r.value {
            let v: &[u8] = v.as_ref();
            record = record.payload(&v[..cut.map_or(v.len(), |c| c.min(v.len()))]);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }

    fn failed(&self, e: KafkaError) -> SinkError {
        SinkError::transient(format!("dead-letter write to {} failed: {e}", self.topic))
    }
}

impl Sink for DeadLetterSink {
    type Item = DeadLetter;

    async fn write(&mut self, batch: &Batch<DeadLetter>) -> Result<(), SinkError> {
        let deliveries: Vec<_> = batch.items.iter().map(|dl| self.send(dl, None)).collect();
        let results = futures::future::join_all(deliveries).await;
        for (dl, result) in batch.items.iter().zip(results) {
            match result {
                Ok(()) => {}
                Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                    // Too large for the dead-letter topic: keep the head of the value and say
                    // so; the whole record stays in its source topic at the offset given.
                    tracing::warn!(topic = %self.topic, source_offset = dl.record.offset, bytes = dl.record.value.as_ref().map_or(0, |v| v.len()), "dead letter too large for its topic; writing it with the value cut");
                    self.send(dl, Some(TRUNCATED_VALUE_BYTES))
                        .await
                        .map_err(|e| self.failed(e))?;
                }
                Err(e) => return Err(self.failed(e)),
            }
        }
        // Counted once the whole batch is safe, so that a retried batch is not counted twice.
        for dl in &batch.items {
            metrics::counter!(DEAD_LETTERS, "stage" => dl.stage, "reason" => dl.reason)
                .increment(1);
        }
        Ok(())
    }
}
