//! `sluice generate`: a realistic FrameWorks event stream in the exact wire format: tenants,
//! streams going live and ending, viewers connecting and disconnecting, client and node
//! metrics, routing decisions and track lists; Decklog-style string numbers, Foghorn-style
//! real JSON numbers for routing decisions.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::ClientContext;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

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
}

/// Deterministic event maker.
pub struct Generator {
    rng: SmallRng,
    tenants: Vec<Uuid>,
    streams_per_tenant: usize,
    nodes: Vec<String>,
    /// Open viewer sessions: (tenant index, stream index, session id, connected at).
    sessions: Vec<(usize, usize, String, i64)>,
    start: i64,
    span_secs: i64,
    total: u64,
    key_by_stream: bool,
}

const EVENT_MIX: &[(&str, u32)] = &[
    ("user-connection", 34),
    ("client-lifecycle", 25),
    ("load-balancing", 10),
    ("node-lifecycle", 8),
    ("stream-lifecycle", 5),
    ("stream-buffer", 5),
    ("stream-view", 4),
    ("track-list", 3),
    ("stream-ingest", 2),
    ("push-lifecycle", 1),
    ("recording-lifecycle", 1),
    ("stream-end", 2),
];

const COUNTRIES: &[(&str, &str, &str, f64, f64)] = &[
    ("NL", "North Holland", "Amsterdam", 52.37, 4.89),
    ("DE", "Berlin", "Berlin", 52.52, 13.40),
    ("US", "California", "San Francisco", 37.77, -122.42),
    ("BR", "São Paulo", "São Paulo", -23.55, -46.63),
    ("JP", "Tokyo", "Tōkyō", 35.68, 139.69),
];

impl Generator {
    /// A generator of `total` events spread over the last hour, for `tenants` tenants.
    pub fn new(seed: u64, tenants: usize, total: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let tenants = (0..tenants.max(1)).map(|_| random_uuid(&mut rng)).collect();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        Self {
            rng,
            tenants,
            streams_per_tenant: 4,
            nodes: (1..=6).map(|i| format!("edge-{i}")).collect(),
            sessions: Vec::new(),
            start: now - 3600,
            span_secs: 3600,
            total: total.max(1),
            key_by_stream: false,
        }
    }

    /// Spreads the events over the hour before `until` (Unix seconds) instead of before now.
    pub fn until(mut self, until: Option<i64>) -> Self {
        if let Some(end) = until {
            self.start = end - self.span_secs;
        }
        self
    }

    /// Keys records by tenant and stream instead of by event id (the contract's producers use
    /// the event id), so that each stream's events share a partition and have one order.
    pub fn key_by_stream(mut self, on: bool) -> Self {
        self.key_by_stream = on;
        self
    }

    /// The tenants' ids.
    #[cfg(test)]
    pub fn tenants(&self) -> &[Uuid] {
        &self.tenants
    }

    /// Event number `i`: (key, JSON value, tenant header).
    pub fn event(&mut self, i: u64) -> (String, String, String) {
        let id = random_uuid(&mut self.rng);
        let ms = self.start * 1000
            + (i as i128 * self.span_secs as i128 * 1000 / self.total as i128) as i64;
        let ts = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
        let kind = self.pick_kind();
        let t = self.rng.random_range(0..self.tenants.len());
        let s = self.rng.random_range(0..self.streams_per_tenant);
        let tenant = self.tenants[t];
        let internal_name = format!("live+t{t}s{s}");
        let node = self.nodes[self.rng.random_range(0..self.nodes.len())].clone();
        let data = self.data(kind, t, s, &internal_name, &node, ts.unix_timestamp());
        let mut envelope = json!({
            "id": id.to_string(),
            "event_id": id.to_string(),
            "type": kind,
            "event_type": kind,
            "timestamp": ts.format(&Rfc3339).unwrap_or_default(),
            "source": if kind == "load-balancing" { "foghorn" } else { "helmsman" },
            "schema_version": "1.0",
            "data": data,
        });
        // Most producers put the tenant in the envelope; some only in the header.
        if self.rng.random_bool(0.7) {
            envelope["tenant_id"] = Value::String(tenant.to_string());
        }
        let key = if self.key_by_stream {
            format!("{tenant}/{internal_name}")
        } else {
            id.to_string()
        };
        (key, envelope.to_string(), tenant.to_string())
    }

    fn pick_kind(&mut self) -> &'static str {
        let total: u32 = EVENT_MIX.iter().map(|(_, w)| w).sum();
        let mut x = self.rng.random_range(0..total);
        for (kind, w) in EVENT_MIX {
            if x < *w {
                return kind;
            }
            x -= w;
        }
        "user-connection"
    }

    fn data(
        &mut self,
        kind: &str,
        t: usize,
        s: usize,
        internal_name: &str,
        node: &str,
        now: i64,
    ) -> Value {
        let r = &mut self.rng;
        let (cc, region, city, lat, lon) = COUNTRIES[r.random_range(0..COUNTRIES.len())];
        match kind {
            "user-connection" => {
                let open = self
                    .sessions
                    .iter()
                    .position(|(st, ss, _, _)| *st == t && *ss == s);
                match open {
                    Some(idx) if r.random_bool(0.5) => {
                        let (_, _, session, at) = self.sessions.swap_remove(idx);
                        json!({"internal_name": internal_name, "node_id": node, "action": "disconnect", "session_id": session,
                            "seconds_connected": (now - at).max(1).to_string(), "up_bytes": r.random_range(1_000..5_000_000u64).to_string(),
                            "down_bytes": r.random_range(10_000..500_000_000u64).to_string(), "connector": "HLS", "user_id": format!("viewer-{}", r.random_range(0..5000))})
                    }
                    _ => {
                        let session = format!("sess-{:016x}", r.random::<u64>());
                        self.sessions.push((t, s, session.clone(), now));
                        json!({"internal_name": internal_name, "node_id": node, "action": "connect", "session_id": session,
                            "connection_addr": format!("198.51.100.{}", r.random_range(1..255)), "user_agent": "Mozilla/5.0",
                            "connector": if r.random_bool(0.5) { "HLS" } else { "WebRTC" }, "user_id": format!("viewer-{}", r.random_range(0..5000))})
                    }
                }
            }
            "client-lifecycle" => {
                let sent = r.random_range(1_000..100_000u64);
                json!({"internal_name": internal_name, "node_id": node, "protocol": if r.random_bool(0.6) { "hls" } else { "webrtc" },
                    "bitrate": r.random_range(500..8_000u32).to_string(), "fps": format!("{:.2}", r.random_range(24.0..60.0f64)),
                    "buffer_health": format!("{:.3}", r.random_range(0.0..1.0f64)), "packets_sent": sent.to_string(),
                    "packets_lost": r.random_range(0..sent / 20).to_string(), "packets_retransmitted": r.random_range(0..sent / 50).to_string(),
                    "bandwidth_in": r.random_range(10_000..10_000_000u64).to_string(), "bandwidth_out": r.random_range(10_000..10_000_000u64).to_string()})
            }
            "load-balancing" => {
                json!({"internal_name": internal_name, "selected_node": node, "status": "success",
                "details": "lowest score", "score": r.random_range(0..1000i64), "client_ip": format!("203.0.113.{}", r.random_range(1..255)),
                "country_code": cc, "region": region, "city": city, "client_latitude": lat, "client_longitude": lon,
                "node_scores": {node: r.random_range(0..1000)}, "routing_metadata": {"algorithm": "geo"}})
            }
            "node-lifecycle" => {
                json!({"node_id": node, "cpu_usage": format!("{:.1}", r.random_range(0.0..100.0f64)),
                "ram_max": "68719476736", "ram_current": r.random_range(1u64 << 30..1u64 << 36).to_string(),
                "up_speed": r.random_range(0..1u64 << 30).to_string(), "down_speed": r.random_range(0..1u64 << 30).to_string(),
                "stream_count": r.random_range(0..200u32).to_string(), "is_healthy": if r.random_bool(0.95) { "true" } else { "false" }})
            }
            "stream-lifecycle" => {
                json!({"internal_name": internal_name, "node_id": node, "status": pick(r, &["live", "start", "ingest_start", "offline"])})
            }
            "stream-buffer" => {
                json!({"internal_name": internal_name, "node_id": node, "status": pick(r, &["FULL", "EMPTY", "RECOVER"])})
            }
            "stream-view" => json!({"internal_name": internal_name, "node_id": node}),
            "track-list" => json!({"internal_name": internal_name, "node_id": node,
                "track_list": json!([{"type": "video", "codec": "H264", "width": 1920, "height": 1080}, {"type": "audio", "codec": "AAC"}]).to_string(),
                "track_count": "2"}),
            "stream-ingest" => {
                json!({"internal_name": internal_name, "node_id": node, "status": "live", "ingest_type": "push", "protocol": "rtmp"})
            }
            "push-lifecycle" => {
                json!({"internal_name": internal_name, "node_id": node, "status": "active", "target": "rtmp://example.net/live", "protocol": "rtmp"})
            }
            "recording-lifecycle" => {
                json!({"internal_name": internal_name, "node_id": node, "status": "done",
                "file_size": r.random_range(1u64 << 20..1u64 << 32).to_string(), "duration": r.random_range(10..7200u32).to_string()})
            }
            _ => json!({"internal_name": internal_name, "node_id": node, "status": "ended"}),
        }
    }
}

fn pick(rng: &mut SmallRng, options: &[&'static str]) -> &'static str {
    options[rng.random_range(0..options.len())]
}

fn random_uuid(rng: &mut SmallRng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.random()).into_uuid()
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

/// Produces the events into Kafka; returns how many were sent.
pub async fn run(config: &Config, opts: &Options) -> anyhow::Result<u64> {
    let topic = opts
        .topic
        .clone()
        .or_else(|| config.kafka.topics.first().cloned())
        .context("no topic configured")?;
    crate::ensure_topic(config, &topic, opts.partitions).await?;
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (k, v) in config.kafka.librdkafka_options()? {
        if !sluice_pipeline::dead_letter::is_consumer_only(&k) {
            client.set(k, v);
        }
    }
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
    for i in 0..opts.events {
        let (key, value, tenant) = generator.event(i);
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
            .key(&key)
            .payload(&value)
            .headers(headers);
        sluice_pipeline::kafka::send_waiting(producer, record)
            .with_context(|| format!("producing event {i}"))?;
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
            "\rgenerate: {}/{} events ({rate:.0} events/s), done   ",
            opts.events, opts.events
        );
    }
    Ok(opts.events)
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
