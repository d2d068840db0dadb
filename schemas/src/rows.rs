//! Row types of the ClickHouse tables, as written with RowBinary. Timestamps are `DateTime`
//! seconds since the epoch. Columns the contract leaves empty are written empty; columns no
//! event fills (node and codec details, JSON metadata) have DEFAULTs in the DDL and are left out.
//!
//! An event table's row borrows its strings (`Cow<'a, str>`) from the event it is routed
//! from, so that it can be encoded straight from the record and never owned;
//! `into_owned` detaches one (tests, reading rows back).

use std::borrow::Cow;

use std::cell::RefCell;

use clickhouse::Row;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::Data;

/// A column of an event's `data` as JSON text: written straight into the row's encoding when
/// routed (no `String` of it in between), text when read back. Equal when the texts are.
#[derive(Clone)]
pub enum DataJson<'a> {
    /// The event's `data`, written as [`Data::to_json`] writes it. (A trait object, so that a
    /// row may borrow an event for less than the event borrows its record.)
    Data(&'a (dyn WriteJson + Sync + 'a)),
    /// JSON text.
    Text(Cow<'a, str>),
}

/// Something written as JSON text into a buffer: an event's [`Data`].
pub trait WriteJson {
    /// Appends the JSON text to `out`.
    fn write_json(&self, out: &mut Vec<u8>);
}

impl WriteJson for Data<'_> {
    fn write_json(&self, out: &mut Vec<u8>) {
        Data::write_json(self, out)
    }
}

impl DataJson<'_> {
    /// The JSON text.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            DataJson::Data(d) => {
                let mut out = Vec::new();
                d.write_json(&mut out);
                Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| "{}".to_owned()))
            }
            DataJson::Text(t) => Cow::Borrowed(t),
        }
    }

    /// The same text, owned.
    pub fn into_owned(self) -> DataJson<'static> {
        DataJson::Text(Cow::Owned(self.text().into_owned()))
    }
}

impl std::fmt::Debug for DataJson<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.text(), f)
    }
}

impl Default for DataJson<'_> {
    fn default() -> Self {
        DataJson::Text(Cow::Borrowed(""))
    }
}

impl PartialEq for DataJson<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.text() == other.text()
    }
}

impl PartialEq<&str> for DataJson<'_> {
    fn eq(&self, other: &&str) -> bool {
        self.text() == *other
    }
}

impl<'a> From<&'a str> for DataJson<'a> {
    fn from(text: &'a str) -> Self {
        DataJson::Text(Cow::Borrowed(text))
    }
}

impl From<String> for DataJson<'_> {
    fn from(text: String) -> Self {
        DataJson::Text(Cow::Owned(text))
    }
}

thread_local! {
    /// Where `data` is written before it is encoded (a string's length comes first).
    static JSON_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Serialize for DataJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let DataJson::Data(data) = self else {
            return serializer.serialize_str(&self.text());
        };
        JSON_SCRATCH.with(|scratch| {
            let Ok(mut buf) = scratch.try_borrow_mut() else {
                return serializer.serialize_str(&self.text());
            };
            buf.clear();
            data.write_json(&mut buf);
            let result = match std::str::from_utf8(&buf) {
                Ok(text) => serializer.serialize_str(text),
                Err(_) => serializer.serialize_str("{}"),
            };
            // One huge event does not keep its buffer for the thread's life.
            if buf.capacity() > 1 << 16 {
                *buf = Vec::new();
            }
            result
        })
    }
}

impl<'de> Deserialize<'de> for DataJson<'_> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(DataJson::from)
    }
}

/// `stream_events`.
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct StreamEventRow<'a> {
    /// Event id.
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Stream.
    pub internal_name: Cow<'a, str>,
    /// Event type name.
    pub event_type: Cow<'a, str>,
    /// `data.status` (`request` for `stream-view`).
    pub status: Cow<'a, str>,
    /// Node.
    pub node_id: Cow<'a, str>,
    /// `stream-ingest` only.
    pub ingest_type: Option<Cow<'a, str>>,
    /// `stream-ingest` and `push-lifecycle` only.
    pub protocol: Option<Cow<'a, str>>,
    /// `push-lifecycle` only.
    pub target: Option<Cow<'a, str>>,
    /// `recording-lifecycle` only.
    pub file_size: Option<u64>,
    /// `recording-lifecycle` only.
    pub duration: Option<u32>,
    /// `data` as JSON.
    pub event_data: DataJson<'a>,
}

/// `connection_events` (geo columns left at their defaults).
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct ConnectionEventRow<'a> {
    /// Event id.
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Stream.
    pub internal_name: Cow<'a, str>,
    /// Viewer.
    pub user_id: Cow<'a, str>,
    /// Session.
    pub session_id: Cow<'a, str>,
    /// Viewer address.
    pub connection_addr: Cow<'a, str>,
    /// User agent.
    pub user_agent: Cow<'a, str>,
    /// Connector (protocol handler).
    pub connector: Cow<'a, str>,
    /// Node.
    pub node_id: Cow<'a, str>,
    /// Geo data: not in the events, written empty (contract).
    pub country_code: [u8; 2],
    /// Geo data: empty.
    pub city: Cow<'a, str>,
    /// Geo data: zero.
    pub latitude: f64,
    /// Geo data: zero.
    pub longitude: f64,
    /// `action`: `connect` or `disconnect`.
    pub event_type: Cow<'a, str>,
    /// `seconds_connected`.
    pub session_duration: u32,
    /// `up_bytes + down_bytes`.
    pub bytes_transferred: u64,
}

/// `stream_health_metrics` (from `client-lifecycle`).
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct StreamHealthRow<'a> {
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Stream.
    pub internal_name: Cow<'a, str>,
    /// Node.
    pub node_id: Cow<'a, str>,
    /// Bitrate.
    pub bitrate: u32,
    /// Frames per second.
    pub fps: f32,
    /// Buffer health.
    pub buffer_health: f32,
    /// Packets sent.
    pub packets_sent: u64,
    /// Packets lost.
    pub packets_lost: u64,
    /// Packets retransmitted.
    pub packets_retransmitted: u64,
    /// Bandwidth in.
    pub bandwidth_in: u64,
    /// Bandwidth out.
    pub bandwidth_out: u64,
}

/// `viewer_metrics` (second row of `client-lifecycle`; geo columns left at defaults).
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct ViewerMetricRow<'a> {
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Stream.
    pub internal_name: Cow<'a, str>,
    /// Always 1: one client.
    pub viewer_count: u32,
    /// `protocol`.
    pub connection_type: Cow<'a, str>,
    /// Node.
    pub node_id: Cow<'a, str>,
    /// Geo data: not in the events, written empty (contract).
    pub country_code: [u8; 2],
    /// Geo data: empty.
    pub city: Cow<'a, str>,
    /// Geo data: zero.
    pub latitude: f64,
    /// Geo data: zero.
    pub longitude: f64,
    /// 1 − lost/sent (clamped), 0 without packets.
    pub connection_quality: f32,
    /// Buffer health.
    pub buffer_health: f32,
}

/// `node_metrics` (from `node-lifecycle`).
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct NodeMetricRow<'a> {
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Node.
    pub node_id: Cow<'a, str>,
    /// CPU usage.
    pub cpu_usage: f32,
    /// RAM size.
    pub ram_max: u64,
    /// RAM used.
    pub ram_current: u64,
    /// Upload speed.
    pub up_speed: u64,
    /// Download speed.
    pub down_speed: u64,
    /// Streams on the node.
    pub stream_count: u32,
    /// 1 when healthy.
    pub is_healthy: u8,
}

/// `routing_events` (from `load-balancing`).
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct RoutingEventRow<'a> {
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// `internal_name`, else `stream_name`.
    pub stream_name: Cow<'a, str>,
    /// Chosen node.
    pub selected_node: Cow<'a, str>,
    /// Decision status.
    pub status: Cow<'a, str>,
    /// Details.
    pub details: Cow<'a, str>,
    /// Score.
    pub score: i64,
    /// Client address.
    pub client_ip: Cow<'a, str>,
    /// Two-letter country (`client_country`, else `country_code`).
    pub client_country: [u8; 2],
    /// Region (`client_region`, else `region`).
    pub client_region: Cow<'a, str>,
    /// City (`client_city`, else `city`).
    pub client_city: Cow<'a, str>,
    /// Latitude.
    pub client_latitude: f64,
    /// Longitude.
    pub client_longitude: f64,
    /// Node scores (JSON text).
    pub node_scores: Cow<'a, str>,
    /// Routing metadata (JSON text).
    pub routing_metadata: Cow<'a, str>,
}

/// `track_list_events`.
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct TrackListRow<'a> {
    /// Event time.
    pub timestamp: u32,
    /// Event id.
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Stream.
    pub internal_name: Cow<'a, str>,
    /// Node.
    pub node_id: Cow<'a, str>,
    /// Track list (JSON text).
    pub track_list: Cow<'a, str>,
    /// Number of tracks.
    pub track_count: u16,
}

/// `usage_records`: one usage figure of one tenant for one window.
#[derive(Clone, Debug, PartialEq, Row, Serialize, Deserialize)]
pub struct UsageRow {
    /// Window start.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// The worker's cluster (`pipeline.cluster_id`).
    pub cluster_id: String,
    /// `viewer_seconds`, `egress_bytes`, `ingress_bytes` or `connections`.
    pub usage_type: String,
    /// The figure.
    pub usage_value: f64,
    /// First day of the window's month.
    #[serde(with = "clickhouse::serde::time::date")]
    pub billing_month: time::Date,
    /// How the figure was made (JSON).
    pub usage_details: String,
}

impl Default for UsageRow {
    fn default() -> Self {
        Self {
            timestamp: 0,
            tenant_id: Uuid::nil(),
            cluster_id: String::new(),
            usage_type: String::new(),
            usage_value: 0.0,
            billing_month: time::Date::from_calendar_date(1970, time::Month::January, 1)
                .expect("valid date"),
            usage_details: String::new(),
        }
    }
}

/// Calls the macro `$m` with every event table the worker writes, as `Variant: RowType =
/// "table"` entries separated by commas: the one list of them, which [`TableRow`], its
/// [`TableRow::table`], [`EVENT_TABLES`] and the worker's wiring are made from.
#[macro_export]
macro_rules! with_event_tables {
    ($m:ident) => {
        $m! {
            StreamEvent: StreamEventRow = "stream_events",
            ConnectionEvent: ConnectionEventRow = "connection_events",
            StreamHealth: StreamHealthRow = "stream_health_metrics",
            ViewerMetric: ViewerMetricRow = "viewer_metrics",
            NodeMetric: NodeMetricRow = "node_metrics",
            RoutingEvent: RoutingEventRow = "routing_events",
            TrackList: TrackListRow = "track_list_events",
        }
    };
}

macro_rules! table_row {
    ($($variant:ident: $row:ident = $table:literal,)*) => {
        /// One row for one of the event tables, as the router produces it.
        #[derive(Clone, Debug, PartialEq)]
        pub enum TableRow<'a> {
            $(
                #[doc = concat!("`", $table, "`.")]
                $variant($row<'a>),
            )*
        }

        impl TableRow<'_> {
            /// The table this row belongs to.
            pub fn table(&self) -> &'static str {
                match self {
                    $(TableRow::$variant(_) => $table,)*
                }
            }

            /// The same row, owning its strings.
            pub fn into_owned(self) -> TableRow<'static> {
                match self {
                    $(TableRow::$variant(r) => TableRow::$variant(r.into_owned()),)*
                }
            }
        }

        /// The event tables, in the order of [`TableRow`]'s variants (`usage_records`, made
        /// by windows, is not one of them).
        pub const EVENT_TABLES: &[&str] = &[$($table),*];
    };
}

with_event_tables!(table_row);

/// Bytes a row holds in memory: the struct and its strings' buffers. What a batch's byte limit
/// counts, so that the limit bounds memory whatever the events carry.
pub trait RowBytes {
    /// This row's bytes.
    fn row_bytes(&self) -> usize;
}

impl RowBytes for UsageRow {
    fn row_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.cluster_id.capacity()
            + self.usage_type.capacity()
            + self.usage_details.capacity()
    }
}

/// `into_owned` of a row type: its strings (`Cow`) owned, its other fields moved.
macro_rules! into_owned {
    ($row:ident { $($f:ident),* } { $($s:ident),* }) => {
        impl $row<'_> {
            /// The same row, owning its strings.
            pub fn into_owned(self) -> $row<'static> {
                $row {
                    $($f: self.$f,)*
                    $($s: Cow::Owned(self.$s.into_owned()),)*
                }
            }
        }
    };
}

impl StreamEventRow<'_> {
    /// The same row, owning its strings.
    pub fn into_owned(self) -> StreamEventRow<'static> {
        let owned = |s: Cow<'_, str>| Cow::Owned(s.into_owned());
        StreamEventRow {
            event_id: self.event_id,
            timestamp: self.timestamp,
            tenant_id: self.tenant_id,
            internal_name: owned(self.internal_name),
            event_type: owned(self.event_type),
            status: owned(self.status),
            node_id: owned(self.node_id),
            ingest_type: self.ingest_type.map(owned),
            protocol: self.protocol.map(owned),
            target: self.target.map(owned),
            file_size: self.file_size,
            duration: self.duration,
            event_data: self.event_data.into_owned(),
        }
    }
}
into_owned!(ConnectionEventRow {
    event_id, timestamp, tenant_id, country_code, latitude, longitude, session_duration,
    bytes_transferred
} {
    internal_name, user_id, session_id, connection_addr, user_agent, connector, node_id, city,
    event_type
});
into_owned!(StreamHealthRow {
    timestamp, tenant_id, bitrate, fps, buffer_health, packets_sent, packets_lost,
    packets_retransmitted, bandwidth_in, bandwidth_out
} { internal_name, node_id });
into_owned!(ViewerMetricRow {
    timestamp, tenant_id, viewer_count, country_code, latitude, longitude, connection_quality,
    buffer_health
} { internal_name, connection_type, node_id, city });
into_owned!(NodeMetricRow {
    timestamp, tenant_id, cpu_usage, ram_max, ram_current, up_speed, down_speed, stream_count,
    is_healthy
} { node_id });
into_owned!(RoutingEventRow {
    timestamp, tenant_id, score, client_country, client_latitude, client_longitude
} {
    stream_name, selected_node, status, details, client_ip, client_region, client_city,
    node_scores, routing_metadata
});
into_owned!(TrackListRow { timestamp, event_id, tenant_id, track_count }
    { internal_name, node_id, track_list });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_row_bytes_count_the_struct_and_every_string() {
        let base = UsageRow::default().row_bytes();
        assert_eq!(base, std::mem::size_of::<UsageRow>());
        let row = UsageRow {
            usage_details: "x".repeat(1000),
            cluster_id: "c".into(),
            ..Default::default()
        };
        assert_eq!(row.row_bytes(), base + 1000 + row.cluster_id.capacity());
    }

    #[test]
    fn into_owned_keeps_every_field() {
        let text = String::from("live+a");
        let row = StreamEventRow {
            timestamp: 7,
            internal_name: Cow::Borrowed(&text),
            protocol: Some(Cow::Borrowed(&text[..4])),
            file_size: Some(9),
            ..Default::default()
        };
        let owned = TableRow::StreamEvent(row.clone()).into_owned();
        drop(text);
        assert_eq!(
            owned,
            TableRow::StreamEvent(StreamEventRow {
                timestamp: 7,
                internal_name: "live+a".into(),
                protocol: Some("live".into()),
                file_size: Some(9),
                ..Default::default()
            })
        );
    }
}
