//! The contract's `stream_analytics` rules as a pure fold: the state of one
//! (tenant, internal_name) after applying events one at a time, in order; plus the rules added
//! beyond the Go consumer (`docs/stream-analytics.md`), which only touch columns the Go rules
//! never set.

use std::borrow::Cow;

use sluice_schemas::{Event, EventType};
use time::OffsetDateTime;
use uuid::Uuid;

/// Statuses that open a session (`session_start_time` is set on the first of them).
const SESSION_START: &[&str] = &["start", "started", "ingest_start", "live"];

/// The key of a `stream_analytics` row.
pub type StreamKey = (Uuid, String);

/// The reduced columns of one `stream_analytics` row. `Default` is a new row as the table's
/// defaults make it.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamState {
    /// `status`.
    pub status: Option<String>,
    /// `session_start_time`.
    pub session_start_time: Option<OffsetDateTime>,
    /// `session_end_time`.
    pub session_end_time: Option<OffsetDateTime>,
    /// `total_session_duration`, seconds.
    pub total_session_duration: i64,
    /// `current_viewers`.
    pub current_viewers: i64,
    /// `peak_viewers`.
    pub peak_viewers: i64,
    /// `total_connections`.
    pub total_connections: i64,
    /// `bandwidth_in` (= sum of `up_bytes` on disconnect).
    pub bandwidth_in: i64,
    /// `bandwidth_out` (= sum of `down_bytes` on disconnect).
    pub bandwidth_out: i64,
    /// `upbytes`.
    pub upbytes: i64,
    /// `downbytes`.
    pub downbytes: i64,
    /// `last_updated`.
    pub last_updated: Option<OffsetDateTime>,
    /// `bitrate_kbps` (beyond Go: latest `client-lifecycle` `bitrate`).
    pub bitrate_kbps: Option<i64>,
    /// `packets_sent` (beyond Go: latest `client-lifecycle` figure).
    pub packets_sent: i64,
    /// `packets_lost` (beyond Go).
    pub packets_lost: i64,
    /// `packets_retrans` (beyond Go: `packets_retransmitted`).
    pub packets_retrans: i64,
    /// `track_count` (beyond Go: latest `track-list`).
    pub track_count: i64,
    /// `track_details` (beyond Go: latest `track-list` `track_list`, as JSON).
    pub track_details: Option<serde_json::Value>,
    /// `node_id` (beyond Go: latest non-empty `node_id` of any reduced event).
    pub node_id: Option<String>,
}

impl Default for StreamState {
    fn default() -> Self {
        Self {
            status: Some("offline".to_owned()),
            session_start_time: None,
            session_end_time: None,
            total_session_duration: 0,
            current_viewers: 0,
            peak_viewers: 0,
            total_connections: 0,
            bandwidth_in: 0,
            bandwidth_out: 0,
            upbytes: 0,
            downbytes: 0,
            last_updated: None,
            bitrate_kbps: None,
            packets_sent: 0,
            packets_lost: 0,
            packets_retrans: 0,
            track_count: 0,
            track_details: None,
            node_id: None,
        }
    }
}

/// What one event does to its row.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// `stream-lifecycle`.
    Lifecycle {
        /// `data.status`.
        status: Option<String>,
    },
    /// `user-connection` with `action` = `connect`.
    Connect,
    /// `user-connection` with `action` = `disconnect`.
    Disconnect {
        /// `seconds_connected`.
        seconds: i64,
        /// `up_bytes`.
        up: i64,
        /// `down_bytes`.
        down: i64,
    },
    /// Any other `user-connection`.
    OtherConnection,
    /// `stream-end`.
    End {
        /// `data.status`.
        status: Option<String>,
    },
    /// `client-lifecycle` (beyond Go).
    Client {
        /// `bitrate`.
        bitrate: Option<i64>,
        /// `packets_sent`, `packets_lost`, `packets_retransmitted`.
        packets: [Option<i64>; 3],
    },
    /// `track-list` (beyond Go).
    Tracks {
        /// `track_count`.
        count: Option<i64>,
        /// `track_list`, parsed when it is JSON.
        details: Option<serde_json::Value>,
    },
}

/// One event as the reducer needs it: its row, time and effect (a few dozen bytes, not the
/// whole JSON).
#[derive(Clone, Debug, PartialEq)]
pub struct StateEvent {
    /// The row.
    pub key: StreamKey,
    /// Event time.
    pub at: OffsetDateTime,
    /// `data.node_id`, when present.
    pub node_id: Option<String>,
    /// The effect.
    pub change: Change,
}

/// Why an event cannot be reduced into `stream_analytics`.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StateError {
    /// The stream name does not fit the key column.
    #[error("`data.internal_name` is {0} characters long; stream_analytics keeps at most 255")]
    NameTooLong(usize),
    /// PostgreSQL text cannot hold NUL.
    #[error("`data.internal_name` contains a NUL character, which PostgreSQL text cannot hold")]
    NameHasNul,
}

/// `s` as PostgreSQL text of at most `max` characters: NULs removed, cut at `max`.
fn pg_text(s: Cow<'_, str>, max: usize) -> String {
    if !s.contains('\0') && s.len() <= max {
        return s.into_owned();
    }
    s.chars().filter(|c| *c != '\0').take(max).collect()
}

/// Bytes a parsed JSON value holds: its nodes, keys and strings (counted without serialising
/// it: the batcher asks for every event).
fn json_bytes(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    std::mem::size_of::<Value>()
        + match v {
            Value::String(s) => s.capacity(),
            Value::Array(a) => a.iter().map(json_bytes).sum(),
            Value::Object(o) => o.iter().map(|(k, v)| k.capacity() + json_bytes(v)).sum(),
            _ => 0,
        }
}

/// `v` without NUL characters in any string (PostgreSQL `jsonb` refuses `\u0000`).
fn pg_json(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) if s.contains('\0') => Value::String(s.replace('\0', "")),
        Value::Array(a) => Value::Array(a.into_iter().map(pg_json).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k.replace('\0', ""), pg_json(v)))
                .collect(),
        ),
        other => other,
    }
}

impl StateEvent {
    /// Bytes this event holds in memory: the struct, its strings and parsed track details.
    /// What the reducer's batch byte limit counts.
    pub fn bytes(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
        let change = match &self.change {
            Change::Lifecycle { status } | Change::End { status } => text(status),
            Change::Tracks {
                details: Some(d), ..
            } => json_bytes(d),
            _ => 0,
        };
        std::mem::size_of::<Self>() + self.key.1.capacity() + text(&self.node_id) + change
    }

    /// The reducer's view of `e`, if its type is reduced and it names a stream; an error when
    /// its stream name cannot be a key. Text is made to fit its column (NULs removed, cut to
    /// the column's width).
    pub fn from_event(e: &Event) -> Result<Option<StateEvent>, StateError> {
        let Some(name) = e.str("internal_name") else {
            return Ok(None);
        };
        let Some(ev) = Self::reduced(e, name) else {
            return Ok(None);
        };
        let chars = name.chars().count();
        if chars > 255 {
            return Err(StateError::NameTooLong(chars));
        }
        if name.contains('\0') {
            return Err(StateError::NameHasNul);
        }
        Ok(Some(ev))
    }

    fn reduced(e: &Event, name: &str) -> Option<StateEvent> {
        let change = match e.kind {
            EventType::StreamLifecycle => Change::Lifecycle {
                status: e.text("status").map(|s| pg_text(s, 50)),
            },
            EventType::UserConnection => match e.str("action") {
                Some("connect") => Change::Connect,
                Some("disconnect") => Change::Disconnect {
                    seconds: e.i64("seconds_connected").unwrap_or(0),
                    up: e.i64("up_bytes").unwrap_or(0),
                    down: e.i64("down_bytes").unwrap_or(0),
                },
                _ => Change::OtherConnection,
            },
            EventType::StreamEnd => Change::End {
                status: e.text("status").map(|s| pg_text(s, 50)),
            },
            EventType::ClientLifecycle => Change::Client {
                bitrate: e.i64("bitrate"),
                packets: [
                    e.i64("packets_sent"),
                    e.i64("packets_lost"),
                    e.i64("packets_retransmitted"),
                ],
            },
            EventType::TrackList => Change::Tracks {
                count: e.i64("track_count"),
                details: e.text("track_list").map(|t| {
                    pg_json(
                        serde_json::from_str(&t)
                            .unwrap_or_else(|_| serde_json::Value::String(t.into_owned())),
                    )
                }),
            },
            _ => return None,
        };
        Some(StateEvent {
            key: (e.tenant_id, name.to_owned()),
            at: e.timestamp,
            node_id: e.text("node_id").map(|n| pg_text(n, 100)),
            change,
        })
    }
}

/// The row an event reduces into, if its type is reduced at all.
pub fn state_key(e: &Event) -> Option<StreamKey> {
    StateEvent::from_event(e).ok().flatten().map(|s| s.key)
}

impl StreamState {
    /// Applies one event: the contract's rules for the Go consumer's types, the documented
    /// extra rules for the others.
    pub fn apply(&mut self, e: &StateEvent) {
        let at = e.at;
        if let Some(node) = &e.node_id {
            self.node_id = Some(node.clone());
        }
        match &e.change {
            Change::Lifecycle { status } => {
                if self.session_start_time.is_none()
                    && status
                        .as_deref()
                        .is_some_and(|s| SESSION_START.contains(&s))
                {
                    self.session_start_time = Some(at);
                }
                self.status = status.clone();
            }
            Change::Connect => {
                self.current_viewers = self.current_viewers.saturating_add(1);
                self.peak_viewers = self.peak_viewers.max(self.current_viewers);
                self.total_connections = self.total_connections.saturating_add(1);
            }
            Change::Disconnect { seconds, up, down } => {
                self.current_viewers = (self.current_viewers - 1).max(0);
                self.total_session_duration = self.total_session_duration.saturating_add(*seconds);
                self.upbytes = self.upbytes.saturating_add(*up);
                self.bandwidth_in = self.bandwidth_in.saturating_add(*up);
                self.downbytes = self.downbytes.saturating_add(*down);
                self.bandwidth_out = self.bandwidth_out.saturating_add(*down);
            }
            Change::OtherConnection => {}
            Change::End { status } => {
                self.status = status.clone();
                self.session_end_time = Some(at);
            }
            // Beyond Go: these leave every column of the Go rules alone, `last_updated`
            // included, so those columns stay exactly what the Go rules give.
            Change::Client { bitrate, packets } => {
                if bitrate.is_some() {
                    self.bitrate_kbps = *bitrate;
                }
                let [sent, lost, retrans] = *packets;
                self.packets_sent = sent.unwrap_or(self.packets_sent);
                self.packets_lost = lost.unwrap_or(self.packets_lost);
                self.packets_retrans = retrans.unwrap_or(self.packets_retrans);
                return;
            }
            Change::Tracks { count, details } => {
                self.track_count = count.unwrap_or(self.track_count);
                if details.is_some() {
                    self.track_details = details.clone();
                }
                return;
            }
        }
        self.last_updated = Some(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, secs: i64, data: &str) -> Event<'static> {
        let ts = OffsetDateTime::from_unix_timestamp(1_760_000_000 + secs).unwrap();
        let ts = ts
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let json = format!(
            r#"{{"id":"6f1c3a52-1b8e-4f0e-9a51-2f4b8f6d1c11","type":"{kind}","timestamp":"{ts}","data":{data}}}"#
        );
        Event::decode(json.as_bytes(), None).unwrap().into_owned()
    }

    #[test]
    fn the_contract_rules_in_order() {
        let mut s = StreamState::default();
        let events = [
            ev(
                "stream-lifecycle",
                0,
                r#"{"internal_name":"a","status":"offline"}"#,
            ),
            ev(
                "stream-lifecycle",
                1,
                r#"{"internal_name":"a","status":"live"}"#,
            ),
            ev(
                "stream-lifecycle",
                2,
                r#"{"internal_name":"a","status":"started"}"#,
            ),
            ev(
                "user-connection",
                3,
                r#"{"internal_name":"a","action":"connect"}"#,
            ),
            ev(
                "user-connection",
                4,
                r#"{"internal_name":"a","action":"connect"}"#,
            ),
            ev(
                "user-connection",
                5,
                r#"{"internal_name":"a","action":"disconnect","seconds_connected":"30","up_bytes":"10","down_bytes":20}"#,
            ),
            ev(
                "user-connection",
                6,
                r#"{"internal_name":"a","action":"disconnect","seconds_connected":5}"#,
            ),
            ev(
                "user-connection",
                7,
                r#"{"internal_name":"a","action":"disconnect"}"#,
            ),
            ev(
                "user-connection",
                8,
                r#"{"internal_name":"a","action":"reconnect"}"#,
            ),
            ev("stream-end", 9, r#"{"internal_name":"a","status":"ended"}"#),
        ];
        for e in &events {
            s.apply(&StateEvent::from_event(e).unwrap().unwrap());
        }
        let t =
            |secs: i64| Some(OffsetDateTime::from_unix_timestamp(1_760_000_000 + secs).unwrap());
        assert_eq!(s.status.as_deref(), Some("ended"));
        assert_eq!(
            (s.session_start_time, s.session_end_time, s.last_updated),
            (t(1), t(9), t(9))
        );
        assert_eq!(
            (s.current_viewers, s.peak_viewers, s.total_connections),
            (0, 2, 2),
            "never below zero"
        );
        assert_eq!(
            (
                s.total_session_duration,
                s.upbytes,
                s.bandwidth_in,
                s.downbytes,
                s.bandwidth_out
            ),
            (35, 10, 10, 20, 20)
        );
    }

    #[test]
    fn only_reduced_types_with_a_stream_have_a_key() {
        let e = ev(
            "user-connection",
            0,
            r#"{"internal_name":"live+a","action":"connect"}"#,
        );
        assert_eq!(
            state_key(&e),
            Some((sluice_schemas::DEFAULT_TENANT, "live+a".to_owned()))
        );
        assert_eq!(
            state_key(&ev("node-lifecycle", 0, r#"{"internal_name":"live+a"}"#)),
            None
        );
        assert_eq!(
            state_key(&ev("user-connection", 0, r#"{"action":"connect"}"#)),
            None
        );
    }

    #[test]
    fn rules_beyond_go_leave_the_go_columns_alone() {
        let mut s = StreamState::default();
        for e in [
            ev(
                "stream-lifecycle",
                0,
                r#"{"internal_name":"a","status":"live","node_id":"n1"}"#,
            ),
            ev(
                "client-lifecycle",
                1,
                r#"{"internal_name":"a","node_id":"n2","bitrate":"2500","packets_sent":"100","packets_lost":3}"#,
            ),
            ev(
                "client-lifecycle",
                2,
                r#"{"internal_name":"a","packets_sent":"150"}"#,
            ),
            ev(
                "track-list",
                3,
                r#"{"internal_name":"a","track_count":"2","track_list":"[{\"codec\":\"H264\"}]"}"#,
            ),
            ev(
                "track-list",
                4,
                r#"{"internal_name":"a","track_list":"not json"}"#,
            ),
        ] {
            s.apply(&StateEvent::from_event(&e).unwrap().unwrap());
        }
        let t0 = Some(OffsetDateTime::from_unix_timestamp(1_760_000_000).unwrap());
        assert_eq!((s.status.as_deref(), s.last_updated), (Some("live"), t0));
        assert_eq!(s.node_id.as_deref(), Some("n2"));
        assert_eq!(s.bitrate_kbps, Some(2500));
        assert_eq!(
            (s.packets_sent, s.packets_lost, s.packets_retrans),
            (150, 3, 0)
        );
        assert_eq!(s.track_count, 2);
        assert_eq!(
            s.track_details,
            Some(serde_json::Value::String("not json".into()))
        );
    }

    #[test]
    fn bytes_count_the_struct_and_what_it_holds() {
        let state = |kind, data| StateEvent::from_event(&ev(kind, 0, data)).unwrap().unwrap();
        let base = std::mem::size_of::<StateEvent>();
        let connect = state(
            "user-connection",
            r#"{"internal_name":"abc","action":"connect"}"#,
        );
        assert_eq!(connect.bytes(), base + 3);
        let live = state(
            "stream-lifecycle",
            r#"{"internal_name":"abc","status":"live"}"#,
        );
        assert_eq!(live.bytes(), base + 3 + 4);
        let tracks = format!(r#"[{{"codec":"{}"}}]"#, "x".repeat(1000));
        let data = serde_json::json!({"internal_name": "abc", "track_list": tracks}).to_string();
        assert!(state("track-list", &data).bytes() > base + 1000);
    }
}
