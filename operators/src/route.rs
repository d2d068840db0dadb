//! Event → table rows, exactly per the contract's mapping. A field that is present but does
//! not fit its column (not a number, out of range) is an error, never a silent default, so
//! the record goes to the dead-letter topic with the reason.

use std::borrow::Cow;

use serde_json::Value;
use sluice_schemas::rows::{
    ConnectionEventRow, DataJson, NodeMetricRow, RoutingEventRow, StreamEventRow, StreamHealthRow,
    TableRow, TrackListRow, ViewerMetricRow,
};
use sluice_schemas::{Event, EventType, Field};
use smallvec::{SmallVec, smallvec};

/// Why an event cannot become rows.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    /// A field its type needs is absent or empty.
    #[error("{event_type} event lacks `data.{field}`")]
    Missing {
        /// Event type.
        event_type: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A numeric field is not a number.
    #[error("`data.{field}` is not a number: {value}")]
    NotNumber {
        /// The field.
        field: &'static str,
        /// Its value, clipped.
        value: String,
    },
    /// A numeric field does not fit its column.
    #[error("`data.{field}` = {value} does not fit the column type {column}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// The ClickHouse type.
        column: &'static str,
    },
    /// A text field has the wrong shape for its column.
    #[error("`data.{field}` is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// Reads typed fields of one event, turning bad values into [`RouteError`]s. Text borrows
/// from the event.
struct Fields<'e, 'd>(&'e Event<'d>);

impl<'e> Fields<'e, '_> {
    fn text(&self, key: &str) -> Cow<'e, str> {
        self.0.text(key).unwrap_or_default()
    }

    /// Objects and arrays as JSON text, scalars as text.
    fn json_text(&self, key: &str) -> Cow<'e, str> {
        match self.0.data.get(key) {
            Some(Field::Json(v @ (Value::Object(_) | Value::Array(_)))) => {
                Cow::Owned(v.to_string())
            }
            _ => self.text(key),
        }
    }

    fn required(&self, key: &'static str) -> Result<Cow<'e, str>, RouteError> {
        self.0.text(key).ok_or(RouteError::Missing {
            event_type: self.0.kind.as_str(),
            field: key,
        })
    }

    fn raw(&self, key: &str) -> String {
        let s = self.0.data.get(key).map(Field::to_json).unwrap_or_default();
        s.chars().take(60).collect()
    }

    fn present(&self, key: &str) -> bool {
        self.0
            .data
            .get(key)
            .is_some_and(|v| !v.is_null() && v.as_str().is_none_or(|s| !s.trim().is_empty()))
    }

    fn int<T: TryFrom<i64>>(
        &self,
        key: &'static str,
        column: &'static str,
    ) -> Result<Option<T>, RouteError> {
        if !self.present(key) {
            return Ok(None);
        }
        let Some(v) = self.0.i64(key) else {
            if self.0.f64(key).is_some() {
                return Err(RouteError::OutOfRange {
                    field: key,
                    value: self.raw(key),
                    column,
                });
            }
            return Err(RouteError::NotNumber {
                field: key,
                value: self.raw(key),
            });
        };
        T::try_from(v)
            .map(Some)
            .map_err(|_| RouteError::OutOfRange {
                field: key,
                value: v.to_string(),
                column,
            })
    }

    fn uint<T: TryFrom<i64> + Default>(
        &self,
        key: &'static str,
        column: &'static str,
    ) -> Result<T, RouteError> {
        Ok(self.int(key, column)?.unwrap_or_default())
    }

    fn float(&self, key: &'static str) -> Result<Option<f64>, RouteError> {
        if !self.present(key) {
            return Ok(None);
        }
        self.0
            .f64(key)
            .map(Some)
            .ok_or_else(|| RouteError::NotNumber {
                field: key,
                value: self.raw(key),
            })
    }

    fn f32(&self, key: &'static str) -> Result<f32, RouteError> {
        match self.float(key)? {
            None => Ok(0.0),
            Some(v) if v.abs() <= f64::from(f32::MAX) => Ok(v as f32),
            Some(v) => Err(RouteError::OutOfRange {
                field: key,
                value: v.to_string(),
                column: "Float32",
            }),
        }
    }
}

/// Stream-scoped types need the stream.
fn needs_internal_name(kind: EventType) -> bool {
    !matches!(kind, EventType::NodeLifecycle | EventType::LoadBalancing)
}

/// The rows of one event: one, or two for `client-lifecycle`, kept inline.
pub type Routed<'e> = SmallVec<[TableRow<'e>; 2]>;

/// The rows an event becomes (one, or two for `client-lifecycle`), their strings borrowed
/// from the event.
pub fn route<'e>(e: &'e Event<'_>) -> Result<Routed<'e>, RouteError> {
    let f = Fields(e);
    let internal_name = if needs_internal_name(e.kind) {
        f.required("internal_name")?
    } else {
        f.text("internal_name")
    };
    let (timestamp, tenant_id) = (e.unix_seconds(), e.tenant_id);
    let rows = match e.kind {
        EventType::StreamLifecycle
        | EventType::StreamBuffer
        | EventType::StreamEnd
        | EventType::StreamView
        | EventType::StreamIngest
        | EventType::PushLifecycle
        | EventType::RecordingLifecycle => {
            let k = e.kind;
            let opt = |key: &str, applies: bool| if applies { e.text(key) } else { None };
            smallvec![TableRow::StreamEvent(StreamEventRow {
                event_id: e.id,
                timestamp,
                tenant_id,
                internal_name,
                event_type: Cow::Borrowed(k.as_str()),
                status: if k == EventType::StreamView {
                    Cow::Borrowed("request")
                } else {
                    f.text("status")
                },
                node_id: f.text("node_id"),
                ingest_type: opt("ingest_type", k == EventType::StreamIngest),
                protocol: opt(
                    "protocol",
                    matches!(k, EventType::StreamIngest | EventType::PushLifecycle),
                ),
                target: opt("target", k == EventType::PushLifecycle),
                file_size: if k == EventType::RecordingLifecycle {
                    f.int("file_size", "UInt64")?
                } else {
                    None
                },
                duration: if k == EventType::RecordingLifecycle {
                    f.int("duration", "UInt32")?
                } else {
                    None
                },
                event_data: DataJson::Data(&e.data),
            })]
        }
        EventType::UserConnection => {
            let up: u64 = f.uint("up_bytes", "UInt64")?;
            let down: u64 = f.uint("down_bytes", "UInt64")?;
            let bytes = up.checked_add(down).ok_or_else(|| RouteError::OutOfRange {
                field: "up_bytes",
                value: format!("{up} + {down}"),
                column: "UInt64",
            })?;
            smallvec![TableRow::ConnectionEvent(ConnectionEventRow {
                event_id: e.id,
                timestamp,
                tenant_id,
                internal_name,
                user_id: f.text("user_id"),
                session_id: f.text("session_id"),
                connection_addr: f.text("connection_addr"),
                user_agent: f.text("user_agent"),
                connector: f.text("connector"),
                node_id: f.text("node_id"),
                event_type: f.text("action"),
                session_duration: f.uint("seconds_connected", "UInt32")?,
                bytes_transferred: bytes,
                ..Default::default()
            })]
        }
        EventType::ClientLifecycle => {
            let node_id = f.text("node_id");
            let sent: u64 = f.uint("packets_sent", "UInt64")?;
            let lost: u64 = f.uint("packets_lost", "UInt64")?;
            let buffer_health = f.f32("buffer_health")?;
            let quality = if sent > 0 {
                1.0 - (lost as f64 / sent as f64).clamp(0.0, 1.0)
            } else {
                0.0
            };
            smallvec![
                TableRow::StreamHealth(StreamHealthRow {
                    timestamp,
                    tenant_id,
                    internal_name: internal_name.clone(),
                    node_id: node_id.clone(),
                    bitrate: f.uint("bitrate", "UInt32")?,
                    fps: f.f32("fps")?,
                    buffer_health,
                    packets_sent: sent,
                    packets_lost: lost,
                    packets_retransmitted: f.uint("packets_retransmitted", "UInt64")?,
                    bandwidth_in: f.uint("bandwidth_in", "UInt64")?,
                    bandwidth_out: f.uint("bandwidth_out", "UInt64")?,
                }),
                TableRow::ViewerMetric(ViewerMetricRow {
                    timestamp,
                    tenant_id,
                    internal_name,
                    viewer_count: 1,
                    connection_type: f.text("protocol"),
                    node_id,
                    connection_quality: quality as f32,
                    buffer_health,
                    ..Default::default()
                }),
            ]
        }
        EventType::NodeLifecycle => smallvec![TableRow::NodeMetric(NodeMetricRow {
            timestamp,
            tenant_id,
            node_id: f.required("node_id")?,
            cpu_usage: f.f32("cpu_usage")?,
            ram_max: f.uint("ram_max", "UInt64")?,
            ram_current: f.uint("ram_current", "UInt64")?,
            up_speed: f.uint("up_speed", "UInt64")?,
            down_speed: f.uint("down_speed", "UInt64")?,
            stream_count: f.uint("stream_count", "UInt32")?,
            is_healthy: u8::from(e.bool("is_healthy").unwrap_or(false)),
        })],
        EventType::LoadBalancing => {
            let first = |a: &str, b: &str| e.text(a).or_else(|| e.text(b)).unwrap_or_default();
            let country_field = if f.present("client_country") {
                "client_country"
            } else {
                "country_code"
            };
            let country = first("client_country", "country_code");
            let client_country: [u8; 2] = match country.as_bytes() {
                [] => [0, 0],
                [a, b] => [*a, *b],
                _ => {
                    return Err(RouteError::Invalid {
                        field: country_field,
                        reason: format!(
                            "`{}` is not a two-letter country code",
                            country.chars().take(20).collect::<String>()
                        ),
                    });
                }
            };
            smallvec![TableRow::RoutingEvent(RoutingEventRow {
                timestamp,
                tenant_id,
                stream_name: if internal_name.is_empty() {
                    f.text("stream_name")
                } else {
                    internal_name
                },
                selected_node: f.text("selected_node"),
                status: f.text("status"),
                details: f.json_text("details"),
                score: f.int("score", "Int64")?.unwrap_or_default(),
                client_ip: f.text("client_ip"),
                client_country,
                client_region: first("client_region", "region"),
                client_city: first("client_city", "city"),
                client_latitude: f.float("client_latitude")?.unwrap_or_default(),
                client_longitude: f.float("client_longitude")?.unwrap_or_default(),
                node_scores: f.json_text("node_scores"),
                routing_metadata: f.json_text("routing_metadata"),
            })]
        }
        EventType::TrackList => {
            let track_list = f.json_text("track_list");
            let counted = serde_json::from_str::<Vec<Value>>(&track_list)
                .ok()
                .map(|v| v.len() as i64);
            let track_count = match f.int::<u16>("track_count", "UInt16")? {
                Some(n) => n,
                None => counted.map_or(Ok(0), |n| {
                    u16::try_from(n).map_err(|_| RouteError::OutOfRange {
                        field: "track_list",
                        value: format!("{n} tracks"),
                        column: "UInt16",
                    })
                })?,
            };
            smallvec![TableRow::TrackList(TrackListRow {
                timestamp,
                event_id: e.id,
                tenant_id,
                internal_name,
                node_id: f.text("node_id"),
                track_list,
                track_count,
            })]
        }
    };
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f1c3a52-1b8e-4f0e-9a51-2f4b8f6d1c11";

    fn event(kind: &str, data: &str) -> Event<'static> {
        let json = format!(
            r#"{{"id":"{ID}","type":"{kind}","timestamp":"2025-07-22T10:00:00Z","data":{data}}}"#
        );
        Event::decode(json.as_bytes(), None)
            .expect("valid event")
            .into_owned()
    }

    /// `route`, its rows detached from the event.
    fn routed(kind: &str, data: &str) -> Result<Vec<TableRow<'static>>, RouteError> {
        route(&event(kind, data)).map(|rows| rows.into_iter().map(TableRow::into_owned).collect())
    }

    fn one(kind: &str, data: &str) -> TableRow<'static> {
        let mut rows = routed(kind, data).expect("routes");
        assert_eq!(rows.len(), 1);
        rows.remove(0)
    }

    #[test]
    fn stream_types_fill_only_their_optional_columns() {
        let TableRow::StreamEvent(r) = one(
            "stream-ingest",
            r#"{"internal_name":"live+a","status":"live","node_id":"n1","ingest_type":"rtmp","protocol":"RTMP","target":"x"}"#,
        ) else {
            panic!()
        };
        assert_eq!(
            (r.ingest_type.as_deref(), r.protocol.as_deref(), r.target),
            (Some("rtmp"), Some("RTMP"), None)
        );
        assert_eq!(
            (&*r.status, &*r.node_id, &*r.event_type),
            ("live", "n1", "stream-ingest")
        );
        let TableRow::StreamEvent(r) =
            one("stream-view", r#"{"internal_name":"live+a","status":"x"}"#)
        else {
            panic!()
        };
        assert_eq!(r.status, "request");
        let TableRow::StreamEvent(r) = one(
            "recording-lifecycle",
            r#"{"internal_name":"live+a","file_size":"1048576","duration":12}"#,
        ) else {
            panic!()
        };
        assert_eq!(
            (r.file_size, r.duration, r.protocol),
            (Some(1_048_576), Some(12), None)
        );
        let TableRow::StreamEvent(r) = one(
            "push-lifecycle",
            r#"{"internal_name":"live+a","target":"rtmp://x","protocol":"rtmp"}"#,
        ) else {
            panic!()
        };
        assert_eq!(
            (r.target.as_deref(), r.protocol.as_deref(), r.ingest_type),
            (Some("rtmp://x"), Some("rtmp"), None)
        );
        assert_eq!(
            r.event_data,
            r#"{"internal_name":"live+a","protocol":"rtmp","target":"rtmp://x"}"#
        );
    }

    #[test]
    fn user_connection_sums_bytes_and_checks_ranges() {
        let TableRow::ConnectionEvent(r) = one(
            "user-connection",
            r#"{"internal_name":"s","action":"disconnect","seconds_connected":"30","up_bytes":"1024","down_bytes":2048,"user_id":"u"}"#,
        ) else {
            panic!()
        };
        assert_eq!(
            (
                &*r.event_type,
                r.session_duration,
                r.bytes_transferred,
                &*r.user_id
            ),
            ("disconnect", 30, 3072, "u")
        );
        let err = routed(
            "user-connection",
            r#"{"internal_name":"s","seconds_connected":"5000000000"}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("does not fit the column type UInt32"),
            "{err}"
        );
        let err = routed(
            "user-connection",
            r#"{"internal_name":"s","up_bytes":"-1"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("UInt64"), "{err}");
        let err = routed(
            "user-connection",
            r#"{"internal_name":"s","up_bytes":"lots"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");
    }

    #[test]
    fn client_lifecycle_becomes_health_and_viewer_rows() {
        let rows = routed("client-lifecycle", r#"{"internal_name":"s","node_id":"n","packets_sent":"200","packets_lost":"50","buffer_health":"0.75","protocol":"webrtc","bitrate":2500,"fps":"29.97"}"#).unwrap();
        let [TableRow::StreamHealth(h), TableRow::ViewerMetric(v)] = rows.as_slice() else {
            panic!("{rows:?}")
        };
        assert_eq!((h.bitrate, h.packets_sent, h.packets_lost), (2500, 200, 50));
        assert!((h.fps - 29.97).abs() < 1e-4);
        assert_eq!(
            (
                v.viewer_count,
                &*v.connection_type,
                v.connection_quality,
                v.buffer_health
            ),
            (1, "webrtc", 0.75, 0.75)
        );
        let rows = routed(
            "client-lifecycle",
            r#"{"internal_name":"s","packets_lost":"5"}"#,
        )
        .unwrap();
        let TableRow::ViewerMetric(v) = &rows[1] else {
            panic!()
        };
        assert_eq!(v.connection_quality, 0.0, "no packets sent: quality 0");
    }

    #[test]
    fn required_fields_per_type() {
        for kind in EventType::ALL {
            let r = routed(kind.as_str(), r#"{"node_id":"n"}"#);
            if needs_internal_name(kind) {
                assert_eq!(
                    r.unwrap_err(),
                    RouteError::Missing {
                        event_type: kind.as_str(),
                        field: "internal_name"
                    }
                );
            } else {
                assert!(r.is_ok(), "{kind:?}");
            }
        }
        assert!(
            routed("node-lifecycle", "{}")
                .unwrap_err()
                .to_string()
                .contains("node_id")
        );
    }

    #[test]
    fn load_balancing_fallbacks_and_json_fields() {
        let TableRow::RoutingEvent(r) = one(
            "load-balancing",
            r#"{"stream_name":"s","country_code":"NL","region":"NH","city":"Amsterdam","score":"42","client_latitude":52.37,"node_scores":{"n1":0.5}}"#,
        ) else {
            panic!()
        };
        assert_eq!(
            (
                &*r.stream_name,
                &r.client_country,
                &*r.client_region,
                &*r.client_city
            ),
            ("s", b"NL", "NH", "Amsterdam")
        );
        assert_eq!(
            (r.score, r.client_latitude, &*r.node_scores),
            (42, 52.37, r#"{"n1":0.5}"#)
        );
        let TableRow::RoutingEvent(r) = one(
            "load-balancing",
            r#"{"internal_name":"i","stream_name":"s","client_country":"DE","country_code":"NL"}"#,
        ) else {
            panic!()
        };
        assert_eq!((&*r.stream_name, &r.client_country), ("i", b"DE"));
        assert!(
            routed("load-balancing", r#"{"client_country":"Netherlands"}"#)
                .unwrap_err()
                .to_string()
                .contains("two-letter")
        );
    }

    #[test]
    fn node_and_track_list() {
        let TableRow::NodeMetric(n) = one(
            "node-lifecycle",
            r#"{"node_id":"n","cpu_usage":"12.5","ram_max":"1000","is_healthy":"true","stream_count":3}"#,
        ) else {
            panic!()
        };
        assert_eq!(
            (n.cpu_usage, n.ram_max, n.is_healthy, n.stream_count),
            (12.5, 1000, 1, 3)
        );
        let TableRow::TrackList(t) = one(
            "track-list",
            r#"{"internal_name":"s","track_list":[{"codec":"H264"},{"codec":"AAC"}]}"#,
        ) else {
            panic!()
        };
        assert_eq!(
            (t.track_count, &*t.track_list),
            (2, r#"[{"codec":"H264"},{"codec":"AAC"}]"#)
        );
        let TableRow::TrackList(t) = one(
            "track-list",
            r#"{"internal_name":"s","track_list":"[]","track_count":"3"}"#,
        ) else {
            panic!()
        };
        assert_eq!(t.track_count, 3);
    }
}
