//! Producing records into a topic: what `bench` fills its topics with, and what a pipeline's
//! own generator commands use.

use std::io::Write as _;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::Error;
use crate::config::KafkaConfig;
use crate::services::ensure_topic;

/// One record to produce.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// The key (partitions are picked by it).
    pub key: Option<Vec<u8>>,
    /// The value.
    pub value: Vec<u8>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Counts the records the broker did not take, so that producing fails rather than report
/// records it lost.
#[derive(Default)]
struct Deliveries {
    failed: std::sync::atomic::AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

/// Produces `records` into `topic` (created with `partitions` if it does not exist) with an
/// idempotent producer, at `rate` records per second (0: as fast as the broker takes them);
/// fails if any record was not delivered. `progress`: a line on stderr every half second,
/// counting towards `total`. Returns how many records were sent.
pub async fn produce(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
    records: impl Iterator<Item = Record> + Send + 'static,
    total: u64,
    rate: u64,
    progress: bool,
) -> Result<u64, Error> {
    ensure_topic(kafka, topic, partitions).await?;
    let kafka_error = |message: String| Error::Service {
        service: "kafka".into(),
        message,
    };
    // Idempotent, so that retries after a broken connection do not write a record twice.
    let producer: ThreadedProducer<Deliveries> = kafka
        .producer_client()?
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.kbytes", "131072")
        .create_with_context(Deliveries::default())
        .map_err(|e| kafka_error(format!("cannot create the producer: {e}")))?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut sent = 0u64;
        for record in records {
            let mut headers = rdkafka::message::OwnedHeaders::new();
            for (k, v) in &record.headers {
                headers = headers.insert(rdkafka::message::Header {
                    key: k,
                    value: Some(v),
                });
            }
            let mut base = BaseRecord::<Vec<u8>, Vec<u8>>::to(&topic)
                .payload(&record.value)
                .headers(headers);
            if let Some(key) = &record.key {
                base = base.key(key);
            }
            sluice_pipeline::send_waiting(&producer, base)
                .map_err(|e| kafka_error(format!("producing record {sent}: {e}")))?;
            sent += 1;
            if rate > 0 {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            if progress && last_report.elapsed() >= Duration::from_millis(500) {
                last_report = Instant::now();
                let per_sec = sent as f64 / started.elapsed().as_secs_f64().max(1e-9);
                eprint!("\rproduce: {sent}/{total} records ({per_sec:.0}/s)   ");
                let _ = std::io::stderr().flush();
            }
        }
        producer
            .flush(Duration::from_secs(120))
            .map_err(|e| kafka_error(format!("flushing the producer: {e}")))?;
        let deliveries = producer.context();
        let failed = deliveries.failed.load(std::sync::atomic::Ordering::Relaxed);
        if failed > 0 {
            let first = deliveries
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(kafka_error(format!(
                "{failed} records were not delivered (first error: {first})"
            )));
        }
        if progress {
            let per_sec = sent as f64 / started.elapsed().as_secs_f64().max(1e-9);
            eprintln!("\rproduce: {sent} records ({per_sec:.0}/s), done   ");
        }
        Ok(sent)
    })
    .await
    .map_err(|e| Error::Other(e.to_string()))?
}
