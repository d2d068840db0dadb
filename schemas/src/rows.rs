//! Row types of the ClickHouse tables, as written with RowBinary. Timestamps are `DateTime`
//! seconds since the epoch. Columns the contract leaves empty are written empty; columns no
//! event fills (node and codec details, JSON metadata) have DEFAULTs in the DDL and are left out.

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `stream_events`.
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct StreamEventRow {
    /// Event id.
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Stream.
    pub internal_name: String,
    /// Event type name.
    pub event_type: String,
    /// `data.status` (`request` for `stream-view`).
    pub status: String,
    /// Node.
    pub node_id: String,
    /// `stream-ingest` only.
    pub ingest_type: Option<String>,
    /// `stream-ingest` and `push-lifecycle` only.
    pub protocol: Option<String>,
    /// `push-lifecycle` only.
    pub target: Option<String>,
    /// `recording-lifecycle` only.
    pub file_size: Option<u64>,
    /// `recording-lifecycle` only.
    pub duration: Option<u32>,
    /// `data` as JSON.
    pub event_data: String,
}

/// `connection_events` (geo columns left at their defaults).
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct ConnectionEventRow {
    /// Event id.
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Stream.
    pub internal_name: String,
    /// Viewer.
    pub user_id: String,
    /// Session.
    pub session_id: String,
    /// Viewer address.
    pub connection_addr: String,
    /// User agent.
    pub user_agent: String,
    /// Connector (protocol handler).
    pub connector: String,
    /// Node.
    pub node_id: String,
    /// Geo data: not in the events, written empty (contract).
    pub country_code: [u8; 2],
    /// Geo data: empty.
    pub city: String,
    /// Geo data: zero.
    pub latitude: f64,
    /// Geo data: zero.
    pub longitude: f64,
    /// `action`: `connect` or `disconnect`.
    pub event_type: String,
    /// `seconds_connected`.
    pub session_duration: u32,
    /// `up_bytes + down_bytes`.
    pub bytes_transferred: u64,
}

/// `stream_health_metrics` (from `client-lifecycle`).
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct StreamHealthRow {
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Stream.
    pub internal_name: String,
    /// Node.
    pub node_id: String,
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
pub struct ViewerMetricRow {
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Stream.
    pub internal_name: String,
    /// Always 1: one client.
    pub viewer_count: u32,
    /// `protocol`.
    pub connection_type: String,
    /// Node.
    pub node_id: String,
    /// Geo data: not in the events, written empty (contract).
    pub country_code: [u8; 2],
    /// Geo data: empty.
    pub city: String,
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
pub struct NodeMetricRow {
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Node.
    pub node_id: String,
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
pub struct RoutingEventRow {
    /// Event time.
    pub timestamp: u32,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// `internal_name`, else `stream_name`.
    pub stream_name: String,
    /// Chosen node.
    pub selected_node: String,
    /// Decision status.
    pub status: String,
    /// Details.
    pub details: String,
    /// Score.
    pub score: i64,
    /// Client address.
    pub client_ip: String,
    /// Two-letter country (`client_country`, else `country_code`).
    pub client_country: [u8; 2],
    /// Region (`client_region`, else `region`).
    pub client_region: String,
    /// City (`client_city`, else `city`).
    pub client_city: String,
    /// Latitude.
    pub client_latitude: f64,
    /// Longitude.
    pub client_longitude: f64,
    /// Node scores (JSON text).
    pub node_scores: String,
    /// Routing metadata (JSON text).
    pub routing_metadata: String,
}

/// `track_list_events`.
#[derive(Clone, Debug, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct TrackListRow {
    /// Event time.
    pub timestamp: u32,
    /// Event id.
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    /// Tenant.
    #[serde(with = "clickhouse::serde::uuid")]
    pub tenant_id: Uuid,
    /// Stream.
    pub internal_name: String,
    /// Node.
    pub node_id: String,
    /// Track list (JSON text).
    pub track_list: String,
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
        pub enum TableRow {
            $(
                #[doc = concat!("`", $table, "`.")]
                $variant($row),
            )*
        }

        impl TableRow {
            /// The table this row belongs to.
            pub fn table(&self) -> &'static str {
                match self {
                    $(TableRow::$variant(_) => $table,)*
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

macro_rules! row_bytes {
    ($row:ty { $($s:ident),* } $({ $($o:ident),* })?) => {
        impl RowBytes for $row {
            fn row_bytes(&self) -> usize {
                std::mem::size_of::<Self>()
                    $(+ self.$s.capacity())*
                    $($(+ self.$o.as_ref().map_or(0, String::capacity))*)?
            }
        }
    };
}

row_bytes!(StreamEventRow { internal_name, event_type, status, node_id, event_data }
    { ingest_type, protocol, target });
row_bytes!(ConnectionEventRow {
    internal_name,
    user_id,
    session_id,
    connection_addr,
    user_agent,
    connector,
    node_id,
    city,
    event_type
});
row_bytes!(StreamHealthRow {
    internal_name,
    node_id
});
row_bytes!(ViewerMetricRow {
    internal_name,
    connection_type,
    node_id,
    city
});
row_bytes!(NodeMetricRow { node_id });
row_bytes!(RoutingEventRow {
    stream_name,
    selected_node,
    status,
    details,
    client_ip,
    client_region,
    client_city,
    node_scores,
    routing_metadata
});
row_bytes!(UsageRow {
    cluster_id,
    usage_type,
    usage_details
});
row_bytes!(TrackListRow {
    internal_name,
    node_id,
    track_list
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_bytes_count_the_struct_and_every_string() {
        let base = StreamEventRow::default().row_bytes();
        assert_eq!(base, std::mem::size_of::<StreamEventRow>());
        let row = StreamEventRow {
            event_data: "x".repeat(1000),
            protocol: Some("srt".into()),
            ..Default::default()
        };
        assert_eq!(row.row_bytes(), base + 1003);
        let routing = RoutingEventRow {
            routing_metadata: "y".repeat(10),
            ..Default::default()
        };
        assert_eq!(
            routing.row_bytes(),
            std::mem::size_of::<RoutingEventRow>() + 10
        );
    }
}
