//! `stream_analytics` in PostgreSQL as a [`Reducer`]: the rules of [`StreamState`], read and
//! written with one statement per flush for all touched streams.

use sluice_sinks::Reducer;
use sqlx::{PgConnection, Row};
use time::{OffsetDateTime, PrimitiveDateTime};
use uuid::Uuid;

use crate::stream_state::{StateEvent, StreamKey, StreamState};

/// The `stream_analytics` reducer.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamAnalytics;

fn ts(t: Option<OffsetDateTime>) -> Option<PrimitiveDateTime> {
    // `TIMESTAMP` columns hold UTC wall time.
    t.map(|t| {
        let t = t.to_offset(time::UtcOffset::UTC);
        PrimitiveDateTime::new(t.date(), t.time())
    })
}

fn int4(v: i64) -> i32 {
    v.clamp(i32::MIN.into(), i32::MAX.into()) as i32
}

impl Reducer for StreamAnalytics {
    type Event = StateEvent;
    type Key = StreamKey;
    type State = StreamState;

    fn key(&self, event: &StateEvent) -> StreamKey {
        event.key.clone()
    }

    fn fold(&self, state: &mut StreamState, event: &StateEvent) {
        state.apply(event);
    }

    fn event_bytes(&self, event: &StateEvent) -> usize {
        event.bytes()
    }

    async fn check(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query(
            "SELECT tenant_id, internal_name, status, bitrate_kbps, track_details, node_id, \
             total_bandwidth_gb FROM stream_analytics LIMIT 0",
        )
        .execute(&mut *conn)
        .await
        .map(|_| ())
    }

    async fn load(
        &self,
        conn: &mut PgConnection,
        keys: &[StreamKey],
    ) -> Result<Vec<(StreamKey, StreamState)>, sqlx::Error> {
        let (tenants, names): (Vec<Uuid>, Vec<&str>) =
            keys.iter().map(|(t, n)| (*t, n.as_str())).unzip();
        sqlx::query(
            "INSERT INTO stream_analytics (tenant_id, internal_name) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[]) ORDER BY 1, 2 \
             ON CONFLICT (tenant_id, internal_name) DO NOTHING",
        )
        .bind(&tenants)
        .bind(&names)
        .execute(&mut *conn)
        .await?;
        let rows = sqlx::query(
            "SELECT s.tenant_id, s.internal_name, status, session_start_time, session_end_time, \
                    total_session_duration, current_viewers, peak_viewers, total_connections, \
                    bandwidth_in, bandwidth_out, upbytes, downbytes, last_updated, bitrate_kbps, \
                    packets_sent, packets_lost, packets_retrans, track_count, track_details, node_id \
             FROM stream_analytics s \
             JOIN UNNEST($1::uuid[], $2::text[]) AS k(tenant_id, internal_name) \
               ON s.tenant_id = k.tenant_id AND s.internal_name = k.internal_name \
             ORDER BY s.tenant_id, s.internal_name FOR UPDATE OF s",
        )
        .bind(&tenants)
        .bind(&names)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|r| {
                let t = |c: &str| -> Result<Option<OffsetDateTime>, sqlx::Error> {
                    Ok(r.try_get::<Option<PrimitiveDateTime>, _>(c)?
                        .map(|t| t.assume_utc()))
                };
                let i4 = |c: &str| -> Result<i64, sqlx::Error> {
                    Ok(r.try_get::<Option<i32>, _>(c)?.unwrap_or(0).into())
                };
                let i8 = |c: &str| -> Result<i64, sqlx::Error> {
                    Ok(r.try_get::<Option<i64>, _>(c)?.unwrap_or(0))
                };
                let state = StreamState {
                    status: r.try_get("status")?,
                    session_start_time: t("session_start_time")?,
                    session_end_time: t("session_end_time")?,
                    total_session_duration: i4("total_session_duration")?,
                    current_viewers: i4("current_viewers")?,
                    peak_viewers: i4("peak_viewers")?,
                    total_connections: i4("total_connections")?,
                    bandwidth_in: i8("bandwidth_in")?,
                    bandwidth_out: i8("bandwidth_out")?,
                    upbytes: i8("upbytes")?,
                    downbytes: i8("downbytes")?,
                    last_updated: t("last_updated")?,
                    bitrate_kbps: r.try_get::<Option<i32>, _>("bitrate_kbps")?.map(i64::from),
                    packets_sent: i8("packets_sent")?,
                    packets_lost: i8("packets_lost")?,
                    packets_retrans: i8("packets_retrans")?,
                    track_count: i4("track_count")?,
                    track_details: r.try_get("track_details")?,
                    node_id: r.try_get("node_id")?,
                };
                Ok((
                    (r.try_get("tenant_id")?, r.try_get("internal_name")?),
                    state,
                ))
            })
            .collect()
    }

    async fn store(
        &self,
        conn: &mut PgConnection,
        states: &[(StreamKey, StreamState)],
    ) -> Result<(), sqlx::Error> {
        let col =
            |f: fn(&StreamState) -> i64| -> Vec<i64> { states.iter().map(|(_, s)| f(s)).collect() };
        let col4 = |f: fn(&StreamState) -> i64| -> Vec<i32> {
            states.iter().map(|(_, s)| int4(f(s))).collect()
        };
        let time_col =
            |f: fn(&StreamState) -> Option<OffsetDateTime>| -> Vec<Option<PrimitiveDateTime>> {
                states.iter().map(|(_, s)| ts(f(s))).collect()
            };
        sqlx::query(
            "UPDATE stream_analytics s SET \
               status = v.status, session_start_time = v.session_start_time, \
               session_end_time = v.session_end_time, total_session_duration = v.total_session_duration, \
               current_viewers = v.current_viewers, peak_viewers = v.peak_viewers, \
               total_connections = v.total_connections, bandwidth_in = v.bandwidth_in, \
               bandwidth_out = v.bandwidth_out, \
               total_bandwidth_gb = (v.bandwidth_in::numeric + v.bandwidth_out::numeric) / 1000000000, \
               upbytes = v.upbytes, downbytes = v.downbytes, last_updated = v.last_updated, \
               bitrate_kbps = v.bitrate_kbps, packets_sent = v.packets_sent, \
               packets_lost = v.packets_lost, packets_retrans = v.packets_retrans, \
               track_count = v.track_count, track_details = v.track_details, node_id = v.node_id \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamp[], $5::timestamp[], \
                         $6::int4[], $7::int4[], $8::int4[], $9::int4[], $10::int8[], $11::int8[], \
                         $12::int8[], $13::int8[], $14::timestamp[], $15::int4[], $16::int8[], \
                         $17::int8[], $18::int8[], $19::int4[], $20::jsonb[], $21::text[]) \
               AS v(tenant_id, internal_name, status, session_start_time, session_end_time, \
                    total_session_duration, current_viewers, peak_viewers, total_connections, \
                    bandwidth_in, bandwidth_out, upbytes, downbytes, last_updated, bitrate_kbps, \
                    packets_sent, packets_lost, packets_retrans, track_count, track_details, node_id) \
             WHERE s.tenant_id = v.tenant_id AND s.internal_name = v.internal_name",
        )
        .bind(states.iter().map(|((t, _), _)| *t).collect::<Vec<Uuid>>())
        .bind(states.iter().map(|((_, n), _)| n.as_str()).collect::<Vec<&str>>())
        .bind(states.iter().map(|(_, s)| s.status.as_deref()).collect::<Vec<Option<&str>>>())
        .bind(time_col(|s| s.session_start_time))
        .bind(time_col(|s| s.session_end_time))
        .bind(col4(|s| s.total_session_duration))
        .bind(col4(|s| s.current_viewers))
        .bind(col4(|s| s.peak_viewers))
        .bind(col4(|s| s.total_connections))
        .bind(col(|s| s.bandwidth_in))
        .bind(col(|s| s.bandwidth_out))
        .bind(col(|s| s.upbytes))
        .bind(col(|s| s.downbytes))
        .bind(time_col(|s| s.last_updated))
        .bind(states.iter().map(|(_, s)| s.bitrate_kbps.map(int4)).collect::<Vec<Option<i32>>>())
        .bind(col(|s| s.packets_sent))
        .bind(col(|s| s.packets_lost))
        .bind(col(|s| s.packets_retrans))
        .bind(col4(|s| s.track_count))
        .bind(states.iter().map(|(_, s)| s.track_details.clone()).collect::<Vec<Option<serde_json::Value>>>())
        .bind(states.iter().map(|(_, s)| s.node_id.as_deref()).collect::<Vec<Option<&str>>>())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use sluice_sinks::coalesce;

    use super::*;
    use crate::stream_state::Change;

    fn change() -> impl Strategy<Value = Change> {
        let status = prop::option::of(prop::sample::select(vec![
            "live",
            "start",
            "offline",
            "ended",
            "ingest_start",
        ]))
        .prop_map(|s| s.map(str::to_owned));
        prop_oneof![
            status
                .clone()
                .prop_map(|status| Change::Lifecycle { status }),
            Just(Change::Connect),
            Just(Change::Connect),
            (0..100i64, 0..1_000i64, 0..1_000i64)
                .prop_map(|(seconds, up, down)| Change::Disconnect { seconds, up, down }),
            Just(Change::OtherConnection),
            status.prop_map(|status| Change::End { status }),
            (prop::option::of(0..5_000i64), prop::option::of(0..100i64)).prop_map(
                |(bitrate, sent)| Change::Client {
                    bitrate,
                    packets: [sent, None, Some(1)]
                }
            ),
            prop::option::of(0..4i64).prop_map(|count| Change::Tracks {
                count,
                details: None
            }),
        ]
    }

    fn events() -> impl Strategy<Value = Vec<StateEvent>> {
        prop::collection::vec(
            (
                0..3u8,
                change(),
                prop::option::of(prop::sample::select(vec!["n1", "n2"])),
            ),
            0..200,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (stream, change, node))| StateEvent {
                    key: (Uuid::nil(), format!("live+{stream}")),
                    at: OffsetDateTime::from_unix_timestamp(1_760_000_000 + i as i64).unwrap(),
                    node_id: node.map(str::to_owned),
                    change,
                })
                .collect()
        })
    }

    proptest! {
        /// Folding each flush's events per key onto the stored states, whatever the flush
        /// boundaries, ends where applying every event one at a time in order ends.
        #[test]
        fn coalesced_flushes_equal_sequential_application(
            events in events(),
            cuts in prop::collection::vec(0..200usize, 0..20),
        ) {
            let mut sequential: BTreeMap<StreamKey, StreamState> = BTreeMap::new();
            for e in &events {
                sequential.entry(e.key.clone()).or_default().apply(e);
            }

            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(events.len())).collect();
            bounds.push(0);
            bounds.push(events.len());
            bounds.sort_unstable();
            let mut stored: BTreeMap<StreamKey, StreamState> = BTreeMap::new();
            for w in bounds.windows(2) {
                let flush = &events[w[0]..w[1]];
                // What the sink does per flush: load the touched rows, fold, store them.
                let mut touched: BTreeMap<StreamKey, StreamState> = flush
                    .iter()
                    .filter_map(|e| stored.get(&e.key).map(|s| (e.key.clone(), s.clone())))
                    .collect();
                coalesce(&StreamAnalytics, &mut touched, flush);
                stored.extend(touched);
            }
            prop_assert_eq!(stored, sequential);
        }
    }
}
