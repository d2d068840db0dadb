//! The FrameWorks analytics event: envelope, event type, tenant resolution, and lenient
//! access to the `data` fields (numbers and booleans arrive as JSON strings or as JSON values).

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// The tenant of events that name none.
pub const DEFAULT_TENANT: Uuid = Uuid::from_u128(1);

/// Last second a ClickHouse `DateTime` can hold (2106-02-07 06:28:15 UTC).
const MAX_DATETIME: i64 = u32::MAX as i64;

/// The twelve event types of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// `stream-lifecycle`
    StreamLifecycle,
    /// `stream-buffer`
    StreamBuffer,
    /// `stream-end`
    StreamEnd,
    /// `stream-view`
    StreamView,
    /// `stream-ingest`
    StreamIngest,
    /// `push-lifecycle`
    PushLifecycle,
    /// `recording-lifecycle`
    RecordingLifecycle,
    /// `user-connection`
    UserConnection,
    /// `client-lifecycle`
    ClientLifecycle,
    /// `node-lifecycle`
    NodeLifecycle,
    /// `load-balancing`
    LoadBalancing,
    /// `track-list`
    TrackList,
}

impl EventType {
    /// Every event type.
    pub const ALL: [EventType; 12] = [
        EventType::StreamLifecycle,
        EventType::StreamBuffer,
        EventType::StreamEnd,
        EventType::StreamView,
        EventType::StreamIngest,
        EventType::PushLifecycle,
        EventType::RecordingLifecycle,
        EventType::UserConnection,
        EventType::ClientLifecycle,
        EventType::NodeLifecycle,
        EventType::LoadBalancing,
        EventType::TrackList,
    ];

    /// The wire name (`stream-lifecycle`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::StreamLifecycle => "stream-lifecycle",
            EventType::StreamBuffer => "stream-buffer",
            EventType::StreamEnd => "stream-end",
            EventType::StreamView => "stream-view",
            EventType::StreamIngest => "stream-ingest",
            EventType::PushLifecycle => "push-lifecycle",
            EventType::RecordingLifecycle => "recording-lifecycle",
            EventType::UserConnection => "user-connection",
            EventType::ClientLifecycle => "client-lifecycle",
            EventType::NodeLifecycle => "node-lifecycle",
            EventType::LoadBalancing => "load-balancing",
            EventType::TrackList => "track-list",
        }
    }

    /// The type with this wire name.
    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// Why a record is not a usable event. The message is meant for the person reading the
/// dead-letter topic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// No value at all.
    #[error("record has no value")]
    Empty,
    /// Not JSON.
    #[error("value is not valid JSON: {0}")]
    Json(String),
    /// JSON, but not an object.
    #[error("value is a JSON {0}, not an object")]
    NotObject(&'static str),
    /// Required envelope field missing.
    #[error("envelope lacks `{0}`")]
    Missing(&'static str),
    /// A field has the wrong form.
    #[error("`{field}` is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Event type not in the contract.
    #[error("unknown event type `{0}`")]
    UnknownType(String),
}

/// A decoded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `id` (or `event_id`).
    pub id: Uuid,
    /// `type` (or `event_type`).
    pub kind: EventType,
    /// `timestamp`, in UTC.
    pub timestamp: OffsetDateTime,
    /// Resolved tenant.
    pub tenant_id: Uuid,
    /// `source`, if any.
    pub source: Option<String>,
    /// The `data` object (empty when absent).
    pub data: Map<String, Value>,
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn non_empty(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

impl Event {
    /// Decodes a record value. `header_tenant` is the record's `tenant_id` header, which wins
    /// over the envelope's and `data`'s.
    pub fn decode(value: &[u8], header_tenant: Option<&[u8]>) -> Result<Event, DecodeError> {
        if value.is_empty() {
            return Err(DecodeError::Empty);
        }
        let root: Value =
            serde_json::from_slice(value).map_err(|e| DecodeError::Json(e.to_string()))?;
        let Value::Object(mut env) = root else {
            return Err(DecodeError::NotObject(json_kind(&root)));
        };
        let id_str = non_empty(env.get("id"))
            .or(non_empty(env.get("event_id")))
            .ok_or(DecodeError::Missing("id"))?;
        let id = Uuid::parse_str(id_str).map_err(|e| DecodeError::Invalid {
            field: "id",
            reason: format!("`{}` is not a UUID: {e}", clip(id_str)),
        })?;
        let type_str = non_empty(env.get("type"))
            .or(non_empty(env.get("event_type")))
            .ok_or(DecodeError::Missing("type"))?;
        let kind =
            EventType::parse(type_str).ok_or_else(|| DecodeError::UnknownType(clip(type_str)))?;
        let ts_str = non_empty(env.get("timestamp")).ok_or(DecodeError::Missing("timestamp"))?;
        let timestamp = parse_timestamp(ts_str)?;
        let data = match env.remove("data") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(DecodeError::Invalid {
                    field: "data",
                    reason: format!("is a JSON {}, not an object", json_kind(&other)),
                });
            }
        };
        let header = header_tenant
            .map(|h| String::from_utf8_lossy(h).trim().to_owned())
            .filter(|s| !s.is_empty());
        let tenant_str = header
            .as_deref()
            .or(non_empty(env.get("tenant_id")))
            .or(non_empty(data.get("tenant_id")));
        let tenant_id = match tenant_str {
            None => DEFAULT_TENANT,
            Some(t) => Uuid::parse_str(t).map_err(|_| DecodeError::Invalid {
                field: "tenant_id",
                reason: format!("`{}` is not a UUID", clip(t)),
            })?,
        };
        let source = non_empty(env.get("source")).map(str::to_owned);
        Ok(Event {
            id,
            kind,
            timestamp,
            tenant_id,
            source,
            data,
        })
    }

    /// Seconds since the epoch (fits a ClickHouse `DateTime`: checked when decoding).
    pub fn unix_seconds(&self) -> u32 {
        self.timestamp.unix_timestamp().clamp(0, MAX_DATETIME) as u32
    }

    /// A `data` field as text: strings as they are, numbers and booleans formatted; `None`
    /// when absent, null, empty, or an object/array.
    pub fn str(&self, key: &str) -> Option<&str> {
        non_empty(self.data.get(key))
    }

    /// A `data` field as text, numbers and booleans included.
    pub fn text(&self, key: &str) -> Option<String> {
        match self.data.get(key)? {
            Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// A `data` field as a number: `42`, `42.5`, `"42"`, `"12.5"`.
    pub fn f64(&self, key: &str) -> Option<f64> {
        let v = match self.data.get(key)? {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }?;
        v.is_finite().then_some(v)
    }

    /// A `data` field as a whole number: `42`, `42.0`, `"42"`; `None` for fractions and
    /// values outside `i64`.
    pub fn i64(&self, key: &str) -> Option<i64> {
        match self.data.get(key)? {
            Value::Number(n) => n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                    .map(|f| f as i64)
            }),
            Value::String(s) => {
                let s = s.trim();
                s.parse::<i64>().ok().or_else(|| {
                    s.parse::<f64>()
                        .ok()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                        .map(|f| f as i64)
                })
            }
            _ => None,
        }
    }

    /// A `data` field as a boolean: `true`, `"true"`, `1`, `"1"` (and their false forms).
    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.data.get(key)? {
            Value::Bool(b) => Some(*b),
            Value::Number(n) => n.as_f64().map(|f| f != 0.0),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Some(true),
                "false" | "0" | "no" => Some(false),
                _ => None,
            },
            _ => None,
        }
    }

    /// The `data` object re-serialised as JSON (`event_data`).
    pub fn data_json(&self) -> String {
        serde_json::to_string(&self.data).unwrap_or_else(|_| "{}".to_owned())
    }
}

fn parse_timestamp(s: &str) -> Result<OffsetDateTime, DecodeError> {
    let ts = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| DecodeError::Invalid {
            field: "timestamp",
            reason: format!("`{}` is not RFC 3339: {e}", clip(s)),
        })?
        .to_offset(time::UtcOffset::UTC);
    let secs = ts.unix_timestamp();
    if !(0..=MAX_DATETIME).contains(&secs) {
        return Err(DecodeError::Invalid {
            field: "timestamp",
            reason: format!(
                "`{}` is outside ClickHouse DateTime's range (1970-01-01 to 2106-02-07 UTC)",
                clip(s)
            ),
        });
    }
    Ok(ts)
}

/// A value quoted in an error message, cut to a readable length.
fn clip(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f1c3a52-1b8e-4f0e-9a51-2f4b8f6d1c11";
    const TENANT: &str = "9b2f0a7c-4d3e-4b8a-8c1d-0e5f6a7b8c9d";

    fn decode(json: &str) -> Result<Event, DecodeError> {
        Event::decode(json.as_bytes(), None)
    }

    #[test]
    fn decodes_the_contract_example_with_either_field_name() {
        let e = decode(&format!(
            r#"{{"event_id":"{ID}","event_type":"user-connection","timestamp":"2025-07-22T12:00:00.123456789+02:00","source":"helmsman","data":{{"internal_name":"live+abc","up_bytes":"1024","action":"connect"}}}}"#
        ))
        .unwrap();
        assert_eq!(e.id.to_string(), ID);
        assert_eq!(e.kind, EventType::UserConnection);
        assert_eq!(
            e.unix_seconds(),
            1_753_178_400,
            "offset applied: 10:00:00 UTC"
        );
        assert_eq!(e.timestamp.nanosecond(), 123_456_789);
        assert_eq!(e.tenant_id, DEFAULT_TENANT);
        assert_eq!(e.str("internal_name"), Some("live+abc"));
        assert_eq!(e.i64("up_bytes"), Some(1024));
        assert_eq!(e.source.as_deref(), Some("helmsman"));
    }

    #[test]
    fn tenant_resolution_order() {
        let other = "11111111-2222-4333-8444-555555555555";
        let json = format!(
            r#"{{"id":"{ID}","type":"track-list","timestamp":"2025-07-22T10:00:00Z","tenant_id":"{TENANT}","data":{{"tenant_id":"{other}"}}}}"#
        );
        assert_eq!(
            Event::decode(json.as_bytes(), None)
                .unwrap()
                .tenant_id
                .to_string(),
            TENANT
        );
        assert_eq!(
            Event::decode(json.as_bytes(), Some(other.as_bytes()))
                .unwrap()
                .tenant_id
                .to_string(),
            other
        );
        let json = format!(
            r#"{{"id":"{ID}","type":"track-list","timestamp":"2025-07-22T10:00:00Z","tenant_id":"","data":{{"tenant_id":"{other}"}}}}"#
        );
        assert_eq!(
            Event::decode(json.as_bytes(), Some(b" "))
                .unwrap()
                .tenant_id
                .to_string(),
            other
        );
        let json = format!(
            r#"{{"id":"{ID}","type":"track-list","timestamp":"2025-07-22T10:00:00Z","tenant_id":"acme"}}"#
        );
        assert!(matches!(
            decode(&json),
            Err(DecodeError::Invalid {
                field: "tenant_id",
                ..
            })
        ));
    }

    #[test]
    fn lenient_numbers_and_booleans() {
        let e = decode(&format!(
            r#"{{"id":"{ID}","type":"node-lifecycle","timestamp":"2025-07-22T10:00:00Z","data":{{"a":"42","b":42,"c":42.0,"d":"12.5","e":true,"f":"true","g":1,"h":"1","i":"0","j":"nope","k":12.5}}}}"#
        ))
        .unwrap();
        assert_eq!(
            (e.i64("a"), e.i64("b"), e.i64("c")),
            (Some(42), Some(42), Some(42))
        );
        assert_eq!(
            (e.f64("d"), e.f64("b"), e.i64("d"), e.i64("k")),
            (Some(12.5), Some(42.0), None, None)
        );
        assert_eq!(
            (
                e.bool("e"),
                e.bool("f"),
                e.bool("g"),
                e.bool("h"),
                e.bool("i")
            ),
            (Some(true), Some(true), Some(true), Some(true), Some(false))
        );
        assert_eq!(
            (e.bool("j"), e.i64("j"), e.f64("missing")),
            (None, None, None)
        );
        assert_eq!(e.text("b").as_deref(), Some("42"));
    }

    #[test]
    fn rejections_say_why() {
        let ok_tail = r#""timestamp":"2025-07-22T10:00:00Z""#;
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "no value"),
            ("{\"id\":".into(), "not valid JSON"),
            ("[1,2]".into(), "JSON array, not an object"),
            ("null".into(), "JSON null"),
            (
                format!(r#"{{"type":"track-list",{ok_tail}}}"#),
                "lacks `id`",
            ),
            (format!(r#"{{"id":"{ID}",{ok_tail}}}"#), "lacks `type`"),
            (
                format!(r#"{{"id":"{ID}","type":"track-list"}}"#),
                "lacks `timestamp`",
            ),
            (
                format!(r#"{{"id":"not-a-uuid","type":"track-list",{ok_tail}}}"#),
                "not a UUID",
            ),
            (
                format!(r#"{{"id":"{ID}","type":"stream-teleport",{ok_tail}}}"#),
                "unknown event type `stream-teleport`",
            ),
            (
                format!(r#"{{"id":"{ID}","type":"track-list","timestamp":"yesterday"}}"#),
                "not RFC 3339",
            ),
            (
                format!(
                    r#"{{"id":"{ID}","type":"track-list","timestamp":"1969-12-31T23:59:59Z"}}"#
                ),
                "outside ClickHouse DateTime",
            ),
            (
                format!(
                    r#"{{"id":"{ID}","type":"track-list","timestamp":"2106-02-07T06:28:16Z"}}"#
                ),
                "outside ClickHouse DateTime",
            ),
            (
                format!(r#"{{"id":"{ID}","type":"track-list",{ok_tail},"data":[1]}}"#),
                "`data` is invalid",
            ),
        ];
        for (json, expect) in cases {
            let err = decode(&json).expect_err(&json).to_string();
            assert!(err.contains(expect), "{json}: {err}");
        }
        assert!(
            Event::decode(b"\xff\xfe", None)
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
        let deep = "[".repeat(10_000);
        assert!(
            decode(&deep).is_err(),
            "deep nesting is refused, not a stack overflow"
        );
    }
}
