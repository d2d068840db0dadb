//! The FrameWorks analytics event: envelope, event type, tenant resolution, and lenient
//! access to the `data` fields (numbers and booleans arrive as JSON strings or as JSON values).

use std::borrow::Cow;

use serde::de::MapAccess;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::data::{Checked, CowStr, Data, Field, Json, MaybeStr, ReadMap};

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

/// A decoded event. Its strings borrow from the record's value where they can
/// ([`Event::into_owned`] detaches it).
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    /// `id` (or `event_id`).
    pub id: Uuid,
    /// `type` (or `event_type`).
    pub kind: EventType,
    /// `timestamp`, in UTC.
    pub timestamp: OffsetDateTime,
    /// Resolved tenant.
    pub tenant_id: Uuid,
    /// `source`, if any.
    pub source: Option<Cow<'a, str>>,
    /// The `data` object (empty when absent).
    pub data: Data<'a>,
}

/// The envelope's fields as read: strings only (any other JSON value counts as absent, as
/// before), the last of duplicate keys winning.
#[derive(Default)]
struct Envelope<'a> {
    id: Option<Cow<'a, str>>,
    event_id: Option<Cow<'a, str>>,
    kind: Option<Cow<'a, str>>,
    event_type: Option<Cow<'a, str>>,
    timestamp: Option<Cow<'a, str>>,
    source: Option<Cow<'a, str>>,
    tenant_id: Option<Cow<'a, str>>,
    data: Option<Json<'a, Data<'a>>>,
}

impl<'de> ReadMap<'de> for Envelope<'de> {
    fn read_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut env = Envelope::default();
        while let Some(CowStr(key)) = map.next_key()? {
            let slot = match key.as_ref() {
                "id" => &mut env.id,
                "event_id" => &mut env.event_id,
                "type" => &mut env.kind,
                "event_type" => &mut env.event_type,
                "timestamp" => &mut env.timestamp,
                "source" => &mut env.source,
                "tenant_id" => &mut env.tenant_id,
                "data" => {
                    env.data = map.next_value()?;
                    continue;
                }
                _ => {
                    map.next_value::<Checked>()?;
                    continue;
                }
            };
            *slot = map.next_value::<MaybeStr>()?.0;
        }
        Ok(env)
    }
}

/// The text of a string, trimmed, if it is not blank.
fn non_empty(v: Option<&str>) -> Option<&str> {
    v.map(str::trim).filter(|s| !s.is_empty())
}

impl<'a> Event<'a> {
    /// Decodes a record value. `header_tenant` is the record's `tenant_id` header, which wins
    /// over the envelope's and `data`'s.
    ///
    /// The envelope is read field by field and `data` into borrowed strings, without a
    /// `serde_json::Value` tree; what is accepted and rejected is exactly what parsing into a
    /// `Value` would accept and reject (tested).
    pub fn decode(value: &'a [u8], header_tenant: Option<&[u8]>) -> Result<Event<'a>, DecodeError> {
        if value.is_empty() {
            return Err(DecodeError::Empty);
        }
        // One UTF-8 check of the whole value is cheaper than serde_json's check of every
        // string; a value that fails it is parsed from bytes for serde_json's own error.
        let root: Json<'a, Envelope<'a>> = match std::str::from_utf8(value) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(value),
        }
        .map_err(|e| DecodeError::Json(e.to_string()))?;
        let env = match root {
            Json::Object(env) => env,
            other => return Err(DecodeError::NotObject(other.kind())),
        };
        let id_str = non_empty(env.id.as_deref())
            .or(non_empty(env.event_id.as_deref()))
            .ok_or(DecodeError::Missing("id"))?;
        let id = Uuid::parse_str(id_str).map_err(|e| DecodeError::Invalid {
            field: "id",
            reason: format!("`{}` is not a UUID: {e}", clip(id_str)),
        })?;
        let type_str = non_empty(env.kind.as_deref())
            .or(non_empty(env.event_type.as_deref()))
            .ok_or(DecodeError::Missing("type"))?;
        let kind =
            EventType::parse(type_str).ok_or_else(|| DecodeError::UnknownType(clip(type_str)))?;
        let ts_str =
            non_empty(env.timestamp.as_deref()).ok_or(DecodeError::Missing("timestamp"))?;
        let timestamp = parse_timestamp(ts_str)?;
        let data = match env.data {
            None | Some(Json::Null) => Data::default(),
            Some(Json::Object(data)) => data,
            Some(other) => {
                return Err(DecodeError::Invalid {
                    field: "data",
                    reason: format!("is a JSON {}, not an object", other.kind()),
                });
            }
        };
        let header = header_tenant.map(String::from_utf8_lossy);
        let tenant_str = non_empty(header.as_deref())
            .or(non_empty(env.tenant_id.as_deref()))
            .or(non_empty(data.get("tenant_id").and_then(Field::as_str)));
        let tenant_id = match tenant_str {
            None => DEFAULT_TENANT,
            Some(t) => Uuid::parse_str(t).map_err(|_| DecodeError::Invalid {
                field: "tenant_id",
                reason: format!("`{}` is not a UUID", clip(t)),
            })?,
        };
        let source = match env.source {
            Some(Cow::Borrowed(s)) => non_empty(Some(s)).map(Cow::Borrowed),
            Some(Cow::Owned(s)) => non_empty(Some(&s)).map(|s| Cow::Owned(s.to_owned())),
            None => None,
        };
        Ok(Event {
            id,
            kind,
            timestamp,
            tenant_id,
            source,
            data,
        })
    }

    /// The same event, owning its strings.
    pub fn into_owned(self) -> Event<'static> {
        Event {
            id: self.id,
            kind: self.kind,
            timestamp: self.timestamp,
            tenant_id: self.tenant_id,
            source: self.source.map(|s| Cow::Owned(s.into_owned())),
            data: self.data.into_owned(),
        }
    }

    /// Seconds since the epoch (fits a ClickHouse `DateTime`: checked when decoding).
    pub fn unix_seconds(&self) -> u32 {
        self.timestamp.unix_timestamp().clamp(0, MAX_DATETIME) as u32
    }

    /// A `data` field as text: strings as they are, numbers and booleans formatted; `None`
    /// when absent, null, empty, or an object/array.
    pub fn str(&self, key: &str) -> Option<&str> {
        non_empty(self.data.get(key).and_then(Field::as_str))
    }

    /// A `data` field as text, numbers and booleans included.
    /// Borrowed from the event where the record held it as a string.
    pub fn text(&self, key: &str) -> Option<Cow<'_, str>> {
        match self.data.get(key)? {
            Field::Str(s) if !s.trim().is_empty() => Some(Cow::Borrowed(s.as_ref())),
            Field::Json(Value::Number(n)) => Some(Cow::Owned(n.to_string())),
            Field::Json(Value::Bool(b)) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
            _ => None,
        }
    }

    /// A `data` field as a number: `42`, `42.5`, `"42"`, `"12.5"`.
    pub fn f64(&self, key: &str) -> Option<f64> {
        let v = match self.data.get(key)? {
            Field::Json(Value::Number(n)) => n.as_f64(),
            Field::Str(s) => s.trim().parse::<f64>().ok(),
            Field::Json(Value::Bool(b)) => Some(f64::from(u8::from(*b))),
            _ => None,
        }?;
        v.is_finite().then_some(v)
    }

    /// A `data` field as a whole number: `42`, `42.0`, `"42"`; `None` for fractions and
    /// values outside `i64`.
    pub fn i64(&self, key: &str) -> Option<i64> {
        match self.data.get(key)? {
            Field::Json(Value::Number(n)) => n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                    .map(|f| f as i64)
            }),
            Field::Str(s) => {
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
            Field::Json(Value::Bool(b)) => Some(*b),
            Field::Json(Value::Number(n)) => n.as_f64().map(|f| f != 0.0),
            Field::Str(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Some(true),
                "false" | "0" | "no" => Some(false),
                _ => None,
            },
            _ => None,
        }
    }

    /// The `data` object re-serialised as JSON (`event_data`).
    pub fn data_json(&self) -> String {
        self.data.to_json()
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

    fn decode(json: &str) -> Result<Event<'static>, DecodeError> {
        Event::decode(json.as_bytes(), None).map(Event::into_owned)
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

    /// What both decoders are compared on: id, type, time, tenant, source and `data`'s JSON.
    type Decoded = (
        Uuid,
        EventType,
        OffsetDateTime,
        Uuid,
        Option<String>,
        String,
    );

    /// The decoder before it read fields directly: everything through a `serde_json::Value`.
    /// The fast decoder must give the same event, or the same error, for any input.
    fn reference_decode(
        value: &[u8],
        header_tenant: Option<&[u8]>,
    ) -> Result<Decoded, DecodeError> {
        fn kind_of(v: &Value) -> &'static str {
            match v {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            }
        }
        fn text(v: Option<&Value>) -> Option<&str> {
            non_empty(v.and_then(Value::as_str))
        }
        if value.is_empty() {
            return Err(DecodeError::Empty);
        }
        let root: Value =
            serde_json::from_slice(value).map_err(|e| DecodeError::Json(e.to_string()))?;
        let Value::Object(mut env) = root else {
            return Err(DecodeError::NotObject(kind_of(&root)));
        };
        let id_str = text(env.get("id"))
            .or(text(env.get("event_id")))
            .ok_or(DecodeError::Missing("id"))?;
        let id = Uuid::parse_str(id_str).map_err(|e| DecodeError::Invalid {
            field: "id",
            reason: format!("`{}` is not a UUID: {e}", clip(id_str)),
        })?;
        let type_str = text(env.get("type"))
            .or(text(env.get("event_type")))
            .ok_or(DecodeError::Missing("type"))?;
        let kind =
            EventType::parse(type_str).ok_or_else(|| DecodeError::UnknownType(clip(type_str)))?;
        let ts_str = text(env.get("timestamp")).ok_or(DecodeError::Missing("timestamp"))?;
        let timestamp = parse_timestamp(ts_str)?;
        let data = match env.remove("data") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(DecodeError::Invalid {
                    field: "data",
                    reason: format!("is a JSON {}, not an object", kind_of(&other)),
                });
            }
        };
        let header = header_tenant
            .map(|h| String::from_utf8_lossy(h).trim().to_owned())
            .filter(|s| !s.is_empty());
        let tenant_str = header
            .as_deref()
            .or(text(env.get("tenant_id")))
            .or(text(data.get("tenant_id")));
        let tenant_id = match tenant_str {
            None => DEFAULT_TENANT,
            Some(t) => Uuid::parse_str(t).map_err(|_| DecodeError::Invalid {
                field: "tenant_id",
                reason: format!("`{}` is not a UUID", clip(t)),
            })?,
        };
        let source = text(env.get("source")).map(str::to_owned);
        let data = serde_json::to_string(&data).unwrap();
        Ok((id, kind, timestamp, tenant_id, source, data))
    }

    fn same_as_reference(value: &[u8], header: Option<&[u8]>) {
        let fast = Event::decode(value, header).map(|e| {
            (
                e.id,
                e.kind,
                e.timestamp,
                e.tenant_id,
                e.source.as_deref().map(str::to_owned),
                e.data_json(),
            )
        });
        assert_eq!(
            fast,
            reference_decode(value, header),
            "{}",
            String::from_utf8_lossy(value)
        );
    }

    #[test]
    fn decodes_exactly_as_through_a_value() {
        let mut generator = crate::sample::Generator::new(3, 4, 2_000);
        let mut samples = Vec::new();
        for i in 0..2_000 {
            let (_, value, tenant) = generator.event(i);
            same_as_reference(value.as_bytes(), Some(tenant.as_bytes()));
            same_as_reference(value.as_bytes(), None);
            if i % 400 == 0 {
                samples.push(value);
            }
        }
        let ts = r#""timestamp":"2025-07-22T10:00:00Z""#;
        let t2 = "11111111-2222-4333-8444-555555555555";
        let odd = [
            // Duplicate keys: the last wins, whatever its type.
            format!(r#"{{"id":"{ID}","id":5,"event_id":"{t2}","type":"track-list",{ts}}}"#),
            format!(r#"{{"id":"x","id":"{ID}","type":"stream-view","type":"track-list",{ts}}}"#),
            format!(r#"{{"id":"{ID}","type":"track-list",{ts},"data":[1],"data":{{"a":"1"}}}}"#),
            format!(r#"{{"id":"{ID}","type":"track-list",{ts},"data":{{"a":"1"}},"data":"s"}}"#),
            format!(
                r#"{{"id":"{ID}","type":"track-list",{ts},"data":{{"a":1,"a":"2","b":{{"y":1,"x":2}}}}}}"#
            ),
            // Non-string envelope fields count as absent.
            format!(
                r#"{{"id":{{"a":1}},"event_id":"{ID}","type":["track-list"],"event_type":"track-list",{ts}}}"#
            ),
            format!(
                r#"{{"id":"{ID}","type":"track-list",{ts},"tenant_id":7,"data":{{"tenant_id":"{t2}"}}}}"#
            ),
            format!(r#"{{"id":"{ID}","type":"track-list",{ts},"source":"  helmsman  "}}"#),
            format!(
                r#"{{"id":"{ID}","type":"track-list",{ts},"source":"  h\u00e9  ","data":null}}"#
            ),
            // Escaped keys name the same fields.
            format!(
                r#"{{"\u0069d":"{ID}","typ\u0065":"track-list",{ts},"d\u0061ta":{{"\u006b":"v\"w"}}}}"#
            ),
            // What `Value` refuses anywhere in the record, the decoder refuses too.
            format!(r#"{{"id":"{ID}","type":"track-list",{ts},"extra":"\ud800"}}"#),
            format!(r#"{{"id":"{ID}","type":"track-list",{ts},"extra":[1,{{"a":1e999}}]}}"#),
            format!(r#"{{"id":"{ID}","type":"track-list",{ts},"extra":{{"deep":[[[["ok"]]]]}}}}"#),
            format!(r#"{{"id":"{ID}","type":"track-list",{ts}}} "#),
            format!(r#"{{"id":"{ID}","type":"track-list",{ts}}}x"#),
            "\"just a string\"".to_owned(),
            "12.5".to_owned(),
            "true".to_owned(),
            "[{\"id\":1}]".to_owned(),
        ];
        for json in &odd {
            for header in [
                None,
                Some(&b" "[..]),
                Some(t2.as_bytes()),
                Some(&b"\xffbad"[..]),
            ] {
                same_as_reference(json.as_bytes(), header);
            }
        }
        let mut invalid_utf8 = odd[0].clone().into_bytes();
        invalid_utf8.splice(2..2, *b"\"k\":\"\xff\",");
        same_as_reference(&invalid_utf8, None);
        // Every prefix of some events, and each byte replaced by a few that break structure.
        for value in &samples {
            let bytes = value.as_bytes();
            for end in 0..bytes.len() {
                same_as_reference(&bytes[..end], None);
            }
            for at in 0..bytes.len() {
                for b in [b'"', b'\\', b'{', b']', b',', b':', b' ', b'0', 0xff, 0x01] {
                    let mut v = bytes.to_vec();
                    v[at] = b;
                    same_as_reference(&v, None);
                }
            }
        }
    }
}
