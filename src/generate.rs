//! `sluice generate`: FrameWorks' event stream from [`Generator`] into Kafka, at a rate or as
//! fast as the broker takes it; and the same events as `sluice bench`'s workload.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use sluice_schemas::sample::Generator;
use sluice_worker::{BoxError, Config, Record};

use crate::frameworks::FrameWorks;

/// FrameWorks' own commands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Produce a realistic FrameWorks event stream into the configured topic.
    Generate(Options),
}

/// What to generate.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Number of events.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Events per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Random seed: the same seed gives the same events.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Partitions of the topic, if it has to be created.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Number of tenants.
    #[arg(long, default_value_t = 8)]
    tenants: usize,
    /// Topic (default: the first of KAFKA_TOPICS).
    #[arg(long)]
    topic: Option<String>,
    /// Key records by tenant and stream instead of by event id, so each stream's events
    /// keep one order (FrameWorks' producers key by event id).
    #[arg(long)]
    key_by_stream: bool,
    /// End of the hour the events span, as seconds since the Unix epoch (default: now);
    /// with the same seed, the same value gives byte-identical events.
    #[arg(long)]
    until: Option<i64>,
    /// Publish about this many events in a thousand a second time, 1 to 400 events later
    /// (same key, value and headers at a new offset), as a producer's retry does.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
    republish_permille: u32,
}

/// Runs FrameWorks' own commands.
pub async fn command(command: Command, config: Config<FrameWorks>) -> Result<(), BoxError> {
    let Command::Generate(opts) = command;
    let topic = opts
        .topic
        .clone()
        .or_else(|| config.kafka.topics.first().cloned())
        .ok_or("no topic configured")?;
    let generator = Generator::new(opts.seed, opts.tenants, opts.events)
        .key_by_stream(opts.key_by_stream)
        .until(opts.until);
    let records = Events::new(generator, opts.seed, opts.events, opts.republish_permille);
    let total = opts.events;
    sluice_worker::produce(
        &config.kafka,
        &topic,
        opts.partitions,
        records,
        total,
        opts.rate,
        true,
    )
    .await?;
    Ok(())
}

/// The generator's events as records, with the republished copies after the events they
/// follow.
struct Events {
    generator: Generator,
    next: u64,
    total: u64,
    /// Copies to publish again, by the event they follow.
    repeats: HashMap<u64, Vec<u64>>,
    to_repeat: HashSet<u64>,
    held: HashMap<u64, Record>,
    ready: VecDeque<Record>,
}

impl Events {
    fn new(generator: Generator, seed: u64, total: u64, republish_permille: u32) -> Self {
        let mut repeats: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut to_repeat = HashSet::new();
        for (event, after) in sluice_schemas::sample::republished(seed, total, republish_permille) {
            repeats.entry(after).or_default().push(event);
            to_repeat.insert(event);
        }
        Self {
            generator,
            next: 0,
            total,
            repeats,
            to_repeat,
            held: HashMap::new(),
            ready: VecDeque::new(),
        }
    }
}

impl Iterator for Events {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        if let Some(r) = self.ready.pop_front() {
            return Some(r);
        }
        if self.next >= self.total {
            return None;
        }
        let i = self.next;
        self.next += 1;
        let record = record(self.generator.event(i));
        if self.to_repeat.contains(&i) {
            self.held.insert(i, record.clone());
        }
        for e in self.repeats.remove(&i).unwrap_or_default() {
            self.ready.extend(self.held.remove(&e));
        }
        Some(record)
    }
}

/// One generated event as a record, with its `tenant_id` header.
fn record((key, value, tenant): (String, String, String)) -> Record {
    Record {
        key: Some(key.into_bytes()),
        value: value.into_bytes(),
        headers: vec![
            ("tenant_id".into(), tenant.into_bytes()),
            ("source".into(), b"sluice-generate".to_vec()),
        ],
    }
}

/// `sluice bench`'s workload: the generator's events (8 tenants).
pub struct Workload;

impl sluice_worker::Workload for Workload {
    fn records(
        &self,
        seed: u64,
        count: u64,
        live: Option<Duration>,
    ) -> Box<dyn Iterator<Item = Record> + Send> {
        let mut generator = Generator::new(seed, 8, count.max(1));
        if let Some(live) = live {
            generator = generator.live(live.as_secs());
        }
        Box::new((0..count).map(move |i| record(generator.event(i))))
    }

    fn expected_rows(&self, seed: u64, count: u64) -> Option<u64> {
        let mut generator = Generator::new(seed, 8, count.max(1));
        Some(
            (0..count)
                .map(|i| {
                    let (_, value, tenant) = generator.event(i);
                    sluice_schemas::Event::decode(value.as_bytes(), Some(tenant.as_bytes()))
                        .ok()
                        .and_then(|e| sluice_operators::route(&e).ok().map(|r| r.len() as u64))
                        .unwrap_or(0)
                })
                .sum(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode_and_route_and_the_seed_repeats_them() {
        let mut a = Generator::new(7, 5, 10_000);
        let mut b = Generator::new(7, 5, 10_000);
        let mut kinds = HashSet::new();
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

    #[test]
    fn republished_events_follow_the_events_they_repeat() {
        let generator = Generator::new(3, 2, 2_000).until(Some(1_793_491_200));
        let records: Vec<Record> = Events::new(generator, 3, 2_000, 50).collect();
        let copies = sluice_schemas::sample::republished(3, 2_000, 50);
        assert!(!copies.is_empty());
        assert_eq!(records.len(), 2_000 + copies.len());
        let mut seen = HashMap::new();
        for r in &records {
            *seen.entry(r.value.clone()).or_insert(0) += 1;
        }
        assert_eq!(seen.values().filter(|&&n| n == 2).count(), copies.len());
    }
}
