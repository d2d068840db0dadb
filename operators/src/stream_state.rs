//! The contract's `stream_analytics` rules as a pure fold: the state of one
//! (tenant, internal_name) after applying events one at a time, in order.

use sluice_schemas::{Event, EventType};
use time::OffsetDateTime;
use uuid::Uuid;

/// Statuses that open a session (`session_start_time` is set on the first of them).
const SESSION_START: &[&str] = &["start", "started", "ingest_start", "live"];

/// The reduced columns of one `stream_analytics` row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamState {
    /// `status` (NULL until an event sets it; the table's default is `offline`).
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
}

/// The row an event reduces into, if its type is reduced at all.
pub fn state_key(e: &Event) -> Option<(Uuid, String)> {
    matches!(
        e.kind,
        EventType::StreamLifecycle | EventType::UserConnection | EventType::StreamEnd
    )
    .then(|| e.str("internal_name").map(|n| (e.tenant_id, n.to_owned())))
    .flatten()
}

impl StreamState {
    /// Applies one event by the contract's rules; returns whether it touched the state.
    pub fn apply(&mut self, e: &Event) -> bool {
        let at = e.timestamp;
        match e.kind {
            EventType::StreamLifecycle => {
                let status = e.text("status");
                if self.session_start_time.is_none()
                    && status
                        .as_deref()
                        .is_some_and(|s| SESSION_START.contains(&s))
                {
                    self.session_start_time = Some(at);
                }
                self.status = status;
            }
            EventType::UserConnection => match e.str("action") {
                Some("connect") => {
                    self.current_viewers = self.current_viewers.saturating_add(1);
                    self.peak_viewers = self.peak_viewers.max(self.current_viewers);
                    self.total_connections = self.total_connections.saturating_add(1);
                }
                Some("disconnect") => {
                    let (up, down) = (
                        e.i64("up_bytes").unwrap_or(0),
                        e.i64("down_bytes").unwrap_or(0),
                    );
                    self.current_viewers = (self.current_viewers - 1).max(0);
                    self.total_session_duration = self
                        .total_session_duration
                        .saturating_add(e.i64("seconds_connected").unwrap_or(0));
                    self.upbytes = self.upbytes.saturating_add(up);
                    self.bandwidth_in = self.bandwidth_in.saturating_add(up);
                    self.downbytes = self.downbytes.saturating_add(down);
                    self.bandwidth_out = self.bandwidth_out.saturating_add(down);
                }
                _ => {}
            },
            EventType::StreamEnd => {
                self.status = e.text("status");
                self.session_end_time = Some(at);
            }
            _ => return false,
        }
        self.last_updated = Some(at);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, secs: i64, data: &str) -> Event {
        let ts = OffsetDateTime::from_unix_timestamp(1_760_000_000 + secs).unwrap();
        let ts = ts
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let json = format!(
            r#"{{"id":"6f1c3a52-1b8e-4f0e-9a51-2f4b8f6d1c11","type":"{kind}","timestamp":"{ts}","data":{data}}}"#
        );
        Event::decode(json.as_bytes(), None).unwrap()
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
            assert!(s.apply(e));
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
            state_key(&ev("client-lifecycle", 0, r#"{"internal_name":"live+a"}"#)),
            None
        );
        let mut s = StreamState::default();
        assert!(!s.apply(&ev("track-list", 0, r#"{"internal_name":"live+a"}"#)));
        assert_eq!(s, StreamState::default());
    }
}
