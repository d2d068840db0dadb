//! `sluice generate`: produces [`Generator`]'s FrameWorks event stream into Kafka, at a rate or
//! as fast as the broker takes it.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::ClientContext;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use sluice_schemas::sample::Generator;

use crate::config::Config;

/// What to generate.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of events.
    pub events: u64,
    /// Events per second; 0 = as fast as the broker takes them.
    pub rate: u64,
    /// Random seed (same seed, same events).
    pub seed: u64,
    /// Partitions of the topic if it is created.
    pub partitions: i32,
    /// Topic (default: the first configured topic).
    pub topic: Option<String>,
    /// Number of tenants.
    pub tenants: usize,
    /// Print a progress line.
    pub progress: bool,
    /// Key records by tenant and stream (see [`Generator::key_by_stream`]).
    pub key_by_stream: bool,
    /// End of the hour the events span, Unix seconds (default: now).
    pub until: Option<i64>,
    /// Events in a thousand published a second time, later (see
    /// [`sluice_schemas::sample::republished`]).
    pub republish_permille: u32,
}

/// Counts the events the broker did not take, so that `generate` fails rather than report
/// events it lost.
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

/// Produces the events into Kafka; returns how many records were sent (republished copies
/// included).
pub async fn run(config: &Config, opts: &Options) -> anyhow::Result<u64> {
    let topic = opts
        .topic
        .clone()
        .or_else(|| config.kafka.topics.first().cloned())
        .context("no topic configured")?;
    crate::ensure_topic(config, &topic, opts.partitions).await?;
    let client = config.kafka.producer_client()?;
    // Idempotent, so that retries after a broken connection do not write an event twice.
    let producer: ThreadedProducer<Deliveries> = client
        .clone()
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.kbytes", "131072")
        .create_with_context(Deliveries::default())
        .context("cannot create Kafka producer")?;
    let opts = opts.clone();
    tokio::task::spawn_blocking(move || produce(&producer, &topic, &opts)).await?
}

fn produce(
    producer: &ThreadedProducer<Deliveries>,
    topic: &str,
    opts: &Options,
) -> anyhow::Result<u64> {
    let mut generator = Generator::new(opts.seed, opts.tenants, opts.events)
        .key_by_stream(opts.key_by_stream)
        .until(opts.until);
    let started = Instant::now();
    let mut last_report = Instant::now();
    // Copies to publish again, by the event they follow.
    let mut repeats: std::collections::HashMap<u64, Vec<u64>> = Default::default();
    let mut to_repeat = std::collections::HashSet::new();
    for (event, after) in
        sluice_schemas::sample::republished(opts.seed, opts.events, opts.republish_permille)
    {
        repeats.entry(after).or_default().push(event);
        to_repeat.insert(event);
    }
    let mut held: std::collections::HashMap<u64, (String, String, String)> = Default::default();
    let mut sent = 0u64;
    for i in 0..opts.events {
        let event = generator.event(i);
        if to_repeat.contains(&i) {
            held.insert(i, event.clone());
        }
        let mut copies = vec![event];
        for e in repeats.remove(&i).unwrap_or_default() {
            copies.extend(held.remove(&e));
        }
        for (key, value, tenant) in &copies {
            send(producer, topic, key, value, tenant)
                .with_context(|| format!("producing event {i}"))?;
            sent += 1;
        }
        if opts.rate > 0 {
            let due = Duration::from_secs_f64((i + 1) as f64 / opts.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if opts.progress && last_report.elapsed() >= Duration::from_millis(500) {
            last_report = Instant::now();
            let rate = (i + 1) as f64 / started.elapsed().as_secs_f64().max(1e-9);
            eprint!(
                "\rgenerate: {}/{} events ({rate:.0} events/s)   ",
                i + 1,
                opts.events
            );
            let _ = std::io::stderr().flush();
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing the producer")?;
    let deliveries = producer.context();
    let failed = deliveries.failed.load(std::sync::atomic::Ordering::Relaxed);
    if failed > 0 {
        let first = deliveries
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        anyhow::bail!("{failed} events were not delivered (first error: {first})");
    }
    if opts.progress {
        let rate = opts.events as f64 / started.elapsed().as_secs_f64().max(1e-9);
        eprintln!(
            "\rgenerate: {}/{} events ({rate:.0} events/s), {sent} records, done   ",
            opts.events, opts.events
        );
    }
    Ok(sent)
}

/// Sends one event with its `tenant_id` header.
fn send(
    producer: &ThreadedProducer<Deliveries>,
    topic: &str,
    key: &str,
    value: &str,
    tenant: &str,
) -> Result<(), rdkafka::error::KafkaError> {
    let headers = rdkafka::message::OwnedHeaders::new()
        .insert(rdkafka::message::Header {
            key: "tenant_id",
            value: Some(tenant.as_bytes()),
        })
        .insert(rdkafka::message::Header {
            key: "source",
            value: Some("sluice-generate".as_bytes()),
        });
    let record = BaseRecord::to(topic)
        .key(key)
        .payload(value)
        .headers(headers);
    sluice_pipeline::send_waiting(producer, record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode_and_route_and_the_seed_repeats_them() {
        let mut a = Generator::new(7, 5, 10_000);
        let mut b = Generator::new(7, 5, 10_000);
        let mut kinds = std::collections::HashSet::new();
        for i in 0..10_000 {
            let (key, value, tenant) = a.event(i);
            let event = sluice_schemas::Event::decode(value.as_bytes(), Some(tenant.as_bytes()))
                .expect("decodes");
            assert_eq!(event.id.to_string(), key);
            assert!(a.tenants().contains(&event.tenant_id));
            sluice_operators::route(&event).unwrap_or_else(|e| panic!("{value}: {e}"));
            kinds.insert(event.kind);
            let (_, value_b, _) = b.event(i);
            if i < 100 {
                // Timestamps derive from the wall clock; compare the rest.
                let strip = |v: &str| v.split("\"timestamp\"").next().map(str::to_owned);
                assert_eq!(strip(&value), strip(&value_b));
            }
        }
        assert_eq!(kinds.len(), 12, "every event type appears");
    }
}
