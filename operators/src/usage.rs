//! `usage_records` for billing: usage facts of each event, summed per tenant and usage type in
//! event-time windows (the pipeline's window stage does the windowing and exactly-once).

use sluice_pipeline::{SourceSpan, WindowAggregate};
use sluice_schemas::rows::UsageRow;
use sluice_schemas::{Event, EventType};
use uuid::Uuid;

/// What is billed.
pub const USAGE_TYPES: [&str; 4] = [
    "viewer_seconds",
    "egress_bytes",
    "ingress_bytes",
    "connections",
];

/// One usage figure of one event.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageFact {
    /// Tenant.
    pub tenant: Uuid,
    /// One of [`USAGE_TYPES`].
    pub usage_type: &'static str,
    /// Event time, seconds since the epoch.
    pub at: i64,
    /// The amount.
    pub value: f64,
}

/// The usage an event carries: a viewer connecting (`connections` 1), or disconnecting
/// (`viewer_seconds` = `seconds_connected`, `egress_bytes` = `down_bytes`, `ingress_bytes` =
/// `up_bytes`); zero amounts are left out.
pub fn usage_facts(e: &Event) -> Vec<UsageFact> {
    if e.kind != EventType::UserConnection {
        return Vec::new();
    }
    let at = e.timestamp.unix_timestamp();
    let fact = |usage_type, value: i64| UsageFact {
        tenant: e.tenant_id,
        usage_type,
        at,
        value: value as f64,
    };
    let facts = match e.str("action") {
        Some("connect") => vec![fact("connections", 1)],
        Some("disconnect") => vec![
            fact("viewer_seconds", e.i64("seconds_connected").unwrap_or(0)),
            fact("egress_bytes", e.i64("down_bytes").unwrap_or(0)),
            fact("ingress_bytes", e.i64("up_bytes").unwrap_or(0)),
        ],
        _ => Vec::new(),
    };
    facts.into_iter().filter(|f| f.value > 0.0).collect()
}

/// Sums usage per tenant and type in each window into `usage_records` rows.
#[derive(Clone, Debug)]
pub struct UsageWindows {
    /// Written to `cluster_id`.
    pub cluster_id: String,
    /// Window length, seconds (for `usage_details`).
    pub window_secs: u64,
}

impl WindowAggregate for UsageWindows {
    type In = UsageFact;
    type Key = (Uuid, &'static str);
    type Acc = f64;
    type Out = UsageRow;

    fn event_time(&self, f: &UsageFact) -> i64 {
        f.at
    }

    fn key(&self, f: &UsageFact) -> (Uuid, &'static str) {
        (f.tenant, f.usage_type)
    }

    fn add(&self, acc: &mut f64, f: &UsageFact) {
        *acc += f.value;
    }

    fn finish(
        &self,
        window: i64,
        (tenant, usage_type): (Uuid, &'static str),
        sum: f64,
    ) -> UsageRow {
        let start = time::OffsetDateTime::from_unix_timestamp(window)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        UsageRow {
            timestamp: window.clamp(0, u32::MAX as i64) as u32,
            tenant_id: tenant,
            cluster_id: self.cluster_id.clone(),
            usage_type: usage_type.to_owned(),
            usage_value: sum,
            billing_month: start.date().replace_day(1).unwrap_or(start.date()),
            usage_details: format!(r#"{{"window_seconds":{}}}"#, self.window_secs),
        }
    }

    /// `usage_details` names the records the sum came from: the window length, the topic,
    /// partition and first offset of the window's span. Two windows' sums are often equal,
    /// their sources never are.
    fn stamp(&self, row: &mut UsageRow, source: &SourceSpan) {
        row.usage_details = serde_json::json!({
            "window_seconds": self.window_secs,
            "topic": &*source.tp.topic,
            "partition": source.tp.partition,
            "first_offset": source.first,
        })
        .to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(data: &str) -> Event<'static> {
        Event::decode(
            format!(r#"{{"id":"6f1c3a52-1b8e-4f0e-9a51-2f4b8f6d1c11","type":"user-connection","timestamp":"2026-02-28T23:59:30Z","data":{data}}}"#).as_bytes(),
            None,
        )
        .unwrap()
        .into_owned()
    }

    #[test]
    fn facts_and_rows() {
        let f = usage_facts(&ev(
            r#"{"action":"disconnect","seconds_connected":"30","down_bytes":"1000","up_bytes":0}"#,
        ));
        let got: Vec<(&str, f64)> = f.iter().map(|f| (f.usage_type, f.value)).collect();
        assert_eq!(
            got,
            vec![("viewer_seconds", 30.0), ("egress_bytes", 1000.0)]
        );
        assert_eq!(usage_facts(&ev(r#"{"action":"connect"}"#)).len(), 1);
        assert!(usage_facts(&ev(r#"{"action":"reconnect"}"#)).is_empty());
        let w = UsageWindows {
            cluster_id: "c1".into(),
            window_secs: 60,
        };
        let window = f[0].at.div_euclid(60) * 60;
        let row = w.finish(window, w.key(&f[0]), 30.0);
        assert_eq!(row.billing_month.to_string(), "2026-02-01");
        assert_eq!(
            (
                row.usage_type.as_str(),
                row.usage_value,
                row.cluster_id.as_str()
            ),
            ("viewer_seconds", 30.0, "c1")
        );
        assert_eq!(row.timestamp as i64, window);

        // Equal sums of two spans make different rows, each naming its source.
        let span = |partition, first| SourceSpan {
            tp: sluice_pipeline::TopicPartition::new("analytics_events", partition),
            first,
            last: first + 9,
            items: 10,
            window: Some(window),
            across: true,
            batch: None,
        };
        let (mut a, mut b) = (row.clone(), row.clone());
        w.stamp(&mut a, &span(0, 100));
        w.stamp(&mut b, &span(1, 100));
        assert_ne!(a, b);
        assert_eq!(
            a.usage_details,
            r#"{"first_offset":100,"partition":0,"topic":"analytics_events","window_seconds":60}"#
        );
    }
}
