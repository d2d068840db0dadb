//! FrameWorks rows into the real ClickHouse through the generic sink, encoded from the record
//! as the worker encodes them (`RowEncoder`, `RowBinary`): every event type lands in its table
//! with the DDL of `schemas/`, every column as the contract says, a retried batch lands once, `viewer_metrics_5m` is
//! right however the rows are batched, and a table of the wrong shape is refused.

use clickhouse::{Client, Row, RowWrite};
use sluice_operators::{EncodedRow, RowEncoders, route};
use sluice_pipeline::testing::PartitionLedger;
use sluice_pipeline::{Batch, Delivery, Sink, SourceSpan, TopicPartition};
use sluice_schemas::rows::{StreamEventRow, TrackListRow, ViewerMetricRow};
use sluice_schemas::{CLICKHOUSE_MIGRATIONS, EVENT_TABLES, Event, TableRow};
use sluice_sinks::{ClickHouseSink, Encoded, Native, RowBinary, RowEncoder};
use sluice_testkit::unique;

const TENANT: &str = "9b2f0a7c-4d3e-4b8a-8c1d-0e5f6a7b8c9d";

fn clickhouse_url() -> String {
    std::env::var("CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

/// A fresh database with the FrameWorks tables, as `sluice migrate` makes it: the framework's
/// tables, FrameWorks', and a landing view per table the worker writes.
async fn fresh_database() -> Client {
    let db = unique("fw_test");
    let config = sluice_worker::ClickHouseConfig {
        host: clickhouse_url(),
        database: db.clone(),
        ..Default::default()
    };
    let tables: Vec<String> = EVENT_TABLES
        .iter()
        .chain(&["usage_records"])
        .map(|t| t.to_string())
        .collect();
    sluice_worker::migrate::ClickHousePlan {
        scope: "frameworks",
        migrations: CLICKHOUSE_MIGRATIONS,
        tables: &tables,
        cluster: None,
        layout: sluice_sinks::Layout::Replicated,
    }
    .apply(&config)
    .await
    .expect("migrate");
    Client::default()
        .with_url(clickhouse_url())
        .with_database(&db)
}

/// Event `i`, `i` seconds after a recent fixed point (older rows would fall to the TTLs).
fn event(i: usize, kind: &str, data: &str) -> Event<'static> {
    let base = time::OffsetDateTime::now_utc().unix_timestamp() / 3600 * 3600 - 7200;
    let ts = time::OffsetDateTime::from_unix_timestamp(base + i as i64).expect("time");
    let ts = ts
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    let json = format!(
        r#"{{"id":"00000000-0000-4000-8000-{i:012}","type":"{kind}","timestamp":"{ts}","tenant_id":"{TENANT}","data":{data}}}"#
    );
    Event::decode(json.as_bytes(), None)
        .expect("valid event")
        .into_owned()
}

/// A batch with its own source range, as the Kafka source would hand out.
fn batch<T>(ledger: &std::sync::Arc<PartitionLedger>, first: i64, items: Vec<T>) -> Batch<T> {
    let last = first + items.len().max(1) as i64 - 1;
    Batch::from_handle(items, ledger.issue(first, last).expect("in order"))
}

/// Row `index` of event `i` of type `kind` with `data`, as routing makes it.
fn routed(i: usize, kind: &str, data: &str, index: usize) -> TableRow<'static> {
    route(&event(i, kind, data))
        .expect("routes")
        .remove(index)
        .into_owned()
}

/// `rows` encoded as the worker's decode stage encodes them.
fn encoded<R: Row + RowWrite>(rows: &[R::Value<'_>]) -> Vec<Encoded<R>> {
    let mut encoder = RowEncoder::<R>::default();
    rows.iter()
        .map(|r| encoder.encode(r).expect("encodes"))
        .collect()
}

/// The worker's sink of encoded `R` rows into `table` (Native blocks).
fn sink<R>(client: &Client, table: &str) -> ClickHouseSink<Encoded<R>, Native<R>>
where
    R: Row + RowWrite + 'static,
    R::Value<'static>: Default,
    for<'r> R::Value<'r>: Send + Sync,
{
    ClickHouseSink::with_encoder(client.clone(), table, Native::default())
}

/// The rows `sql` selects, owning their strings.
macro_rules! fetch_rows {
    ($client:expr, $sql:expr, $row:ident) => {{
        let mut cursor = $client
            .query($sql)
            .fetch::<$row<'static>>()
            .expect("select");
        let mut rows = Vec::new();
        while let Some(r) = cursor.next().await.expect("row") {
            rows.push(r.into_owned());
        }
        rows
    }};
}

/// `n` `stream_events` rows of distinct live events.
fn stream_events(n: usize) -> Vec<StreamEventRow<'static>> {
    (0..n)
        .map(|i| {
            match routed(
                i,
                "stream-lifecycle",
                r#"{"internal_name":"s","status":"live"}"#,
                0,
            ) {
                TableRow::StreamEvent(r) => r,
                other => panic!("{other:?}"),
            }
        })
        .collect()
}

/// Writes `b` until the sink succeeds (a path that is coming back), at most 5 s.
async fn write_until_ok<R>(
    sink: &mut ClickHouseSink<Encoded<R>, Native<R>>,
    b: &Batch<Encoded<R>>,
    what: &str,
) where
    R: Row + RowWrite + 'static,
    R::Value<'static>: Default,
    for<'r> R::Value<'r>: Send + Sync,
{
    let mut attempts = 0;
    while let Err(e) = sink.write(b).await {
        attempts += 1;
        assert!(attempts < 50, "{what}: {e}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn count(client: &Client, table: &str) -> u64 {
    client
        .query(&format!("SELECT count() FROM {table}"))
        .fetch_one()
        .await
        .expect("count")
}

#[tokio::test]
async fn every_event_type_lands_in_its_table() {
    let client = fresh_database().await;
    let samples = [
        (
            "stream-lifecycle",
            r#"{"internal_name":"live+a","status":"live","node_id":"edge-1"}"#,
        ),
        (
            "stream-buffer",
            r#"{"internal_name":"live+a","status":"FULL"}"#,
        ),
        (
            "stream-end",
            r#"{"internal_name":"live+a","status":"ended"}"#,
        ),
        ("stream-view", r#"{"internal_name":"live+a"}"#),
        (
            "stream-ingest",
            r#"{"internal_name":"live+a","ingest_type":"push","protocol":"rtmp"}"#,
        ),
        (
            "push-lifecycle",
            r#"{"internal_name":"live+a","target":"rtmp://x/y","protocol":"rtmp"}"#,
        ),
        (
            "recording-lifecycle",
            r#"{"internal_name":"live+a","file_size":"1048576","duration":"60"}"#,
        ),
        (
            "user-connection",
            r#"{"internal_name":"live+a","action":"disconnect","seconds_connected":"30","up_bytes":"100","down_bytes":200,"session_id":"s1"}"#,
        ),
        (
            "client-lifecycle",
            r#"{"internal_name":"live+a","node_id":"edge-1","packets_sent":"100","packets_lost":"10","buffer_health":0.5,"protocol":"hls","bitrate":"2500"}"#,
        ),
        (
            "node-lifecycle",
            r#"{"node_id":"edge-1","cpu_usage":"12.5","is_healthy":true,"ram_max":"1024"}"#,
        ),
        (
            "load-balancing",
            r#"{"stream_name":"live+a","selected_node":"edge-1","country_code":"NL","score":7,"node_scores":{"edge-1":7}}"#,
        ),
        (
            "track-list",
            r#"{"internal_name":"live+a","node_id":"edge-1","track_list":[{"codec":"H264"}]}"#,
        ),
    ];
    let events: Vec<Event> = samples
        .iter()
        .enumerate()
        .map(|(i, (k, d))| event(i, k, d))
        .collect();
    let mut encoders = RowEncoders::default();
    let rows: Vec<EncodedRow> = events
        .iter()
        .flat_map(|e| route(e).expect("routes"))
        .map(|r| encoders.encode(&r).expect("encodes"))
        .collect();
    let ledger = PartitionLedger::new(TopicPartition::new("analytics_events", 0));
    let mut next = 0i64;
    macro_rules! write_table {
        ($variant:ident, $ty:ty, $table:literal) => {{
            let items: Vec<Encoded<$ty>> = rows
                .iter()
                .filter_map(|r| match r {
                    EncodedRow::$variant(x) => Some(x.clone()),
                    _ => None,
                })
                .collect();
            let n = items.len();
            let mut sink = sink::<$ty>(&client, $table);
            sink.check().await.expect("schema matches");
            let b = batch(&ledger, next, items);
            next += n.max(1) as i64;
            sink.write(&b).await.expect("insert");
            b.ack();
            n
        }};
    }
    use sluice_schemas::rows::*;
    macro_rules! write_all {
        ($($variant:ident: $row:ident = $table:literal,)*) => {
            [$(($table, write_table!($variant, $row<'static>, $table)),)*]
        };
    }
    let expected = sluice_schemas::with_event_tables!(write_all);
    assert_eq!(
        expected.iter().map(|(_, n)| n).sum::<usize>(),
        13,
        "12 events, client-lifecycle twice"
    );
    assert_eq!(next, 13, "one offset per row here");
    for (table, n) in expected {
        assert_eq!(count(&client, table).await, n as u64, "{table}");
    }
    let back = fetch_rows!(
        client,
        "SELECT ?fields FROM stream_events WHERE event_type = 'recording-lifecycle'",
        StreamEventRow
    );
    assert_eq!(
        (
            back[0].file_size,
            back[0].duration,
            back[0].protocol.clone()
        ),
        (Some(1_048_576), Some(60), None)
    );
    assert_eq!(back[0].tenant_id.to_string(), TENANT);
    let conn = fetch_rows!(
        client,
        "SELECT ?fields FROM connection_events",
        ConnectionEventRow
    )
    .remove(0);
    assert_eq!(
        (
            conn.bytes_transferred,
            conn.session_duration,
            &*conn.event_type
        ),
        (300, 30, "disconnect")
    );
    let tracks = fetch_rows!(
        client,
        "SELECT ?fields FROM track_list_events",
        TrackListRow
    )
    .remove(0);
    assert_eq!(
        (tracks.track_count, &*tracks.track_list),
        (1, r#"[{"codec":"H264"}]"#)
    );
}

#[tokio::test]
async fn a_retried_batch_lands_once_and_distinct_batches_with_equal_rows_both_land() {
    let client = fresh_database().await;
    let ledger = PartitionLedger::new(TopicPartition::new("analytics_events", 3));
    let rows: Vec<ViewerMetricRow<'static>> = (0..100)
        .map(|i| {
            match routed(
                i,
                "client-lifecycle",
                r#"{"internal_name":"s","packets_sent":"10"}"#,
                1,
            ) {
                TableRow::ViewerMetric(v) => v,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    let rows = encoded::<ViewerMetricRow<'static>>(&rows);
    let mut sink = sink::<ViewerMetricRow<'static>>(&client, "viewer_metrics");
    let first = batch(&ledger, 0, rows.clone());
    sink.write(&first).await.expect("insert");
    sink.write(&first)
        .await
        .expect("retry of an insert that landed");
    sink.write(&first).await.expect("and again");
    assert_eq!(count(&client, "viewer_metrics").await, 100);
    // The same rows from other offsets are other events: they must not be dropped as duplicates.
    let second = batch(&ledger, 100, rows);
    sink.write(&second).await.expect("insert");
    assert_eq!(count(&client, "viewer_metrics").await, 200);
    assert_eq!(count(&client, "track_list_events").await, 0);
    first.ack();
    second.ack();
}

/// The state a plain `MergeTree` can be left in when it is killed during an insert: the
/// deduplication record of a block kept, its rows gone (simulated with a lightweight delete,
/// which keeps the record too). A retry with the same token skips the block; the check that
/// follows an unanswered insert finds the missing rows and inserts them, once.
#[tokio::test]
async fn rows_lost_behind_a_kept_deduplication_record_are_restored() {
    let client = fresh_database().await;
    let ledger = PartitionLedger::new(TopicPartition::new("analytics_events", 5));
    let rows = encoded::<StreamEventRow<'static>>(&stream_events(100));
    let b = batch(&ledger, 0, rows);
    let ch: std::net::SocketAddr = clickhouse_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("CLICKHOUSE_URL is http://IP:PORT");
    let proxy_addr = sluice_testkit::net::free_addr();
    let proxy = sluice_testkit::net::TcpProxy::start(proxy_addr, ch);
    let via_proxy = client.clone().with_url(format!("http://{proxy_addr}"));
    let mut sink =
        sink::<StreamEventRow<'static>>(&via_proxy, "stream_events").check_range("timestamp");
    // The proxy listens in a moment.
    write_until_ok(&mut sink, &b, "the proxy listens").await;
    client
        .query(
            "DELETE FROM stream_events WHERE timestamp < \
             (SELECT min(timestamp) FROM stream_events) + 30",
        )
        .execute()
        .await
        .expect("delete");
    assert_eq!(count(&client, "stream_events").await, 70);
    // A plain retry is deduplicated: the rows stay missing.
    sink.write(&b).await.expect("retry");
    assert_eq!(count(&client, "stream_events").await, 70);

    // An insert that gets no answer is checked once its retry succeeds.
    proxy.cut();
    let err = sink.write(&b).await.expect_err("the path is cut");
    assert!(err.is_transient(), "{err}");
    proxy.restore();
    write_until_ok(&mut sink, &b, "the path came back").await;
    assert_eq!(count(&client, "stream_events").await, 100);
    let distinct: u64 = client
        .query("SELECT uniqExact(timestamp) FROM stream_events")
        .fetch_one()
        .await
        .expect("distinct");
    assert_eq!(distinct, 100, "each row once");
    let token = sluice_sinks::batch_token("stream_events", &b);
    assert_eq!(
        sink.restore_missing(&b.items, &token).await.expect("check"),
        0
    );
    assert_eq!(count(&client, "stream_events").await, 100);
    let scratch: u64 = client
        .query("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name LIKE 'sluice_check_%'")
        .fetch_one()
        .await
        .expect("tables");
    assert_eq!(scratch, 0, "scratch tables are dropped");
    b.ack();
}

/// Rows `from..from + n` of a `viewer_metrics` series over three streams, two nodes and
/// several five-minute windows.
fn viewer_rows(from: usize, n: usize) -> Vec<ViewerMetricRow<'static>> {
    (from..from + n)
        .map(|i| {
            let mut v = match routed(i % 900, "client-lifecycle", &format!(
                r#"{{"internal_name":"s{}","node_id":"n{}","packets_sent":"{}","packets_lost":"{}","buffer_health":"0.{}"}}"#,
                i % 3, i % 2, 100 + i, i % 17, i % 10
            ), 1)
            {
                TableRow::ViewerMetric(v) => v,
                other => panic!("{other:?}"),
            };
            v.viewer_count = (i % 7) as u32 + 1;
            v
        })
        .collect()
}

/// `viewer_metrics_5m` as text, and the same figures aggregated straight from
/// `viewer_metrics`: equal when the view holds every row of the table once.
async fn five_minute_figures(client: &Client) -> (String, String) {
    let cols = "toString(timestamp_5m), toString(tenant_id), internal_name, toString(node_id), peak_viewers, round(avg_viewers, 3), unique_countries, unique_cities, round(avg_connection_quality, 3), round(avg_buffer_health, 3)";
    let tsv = |sql: String| {
        let client = client.clone();
        async move {
            let bytes = client
                .query(&sql)
                .fetch_bytes("TabSeparated")
                .expect("query")
                .collect()
                .await
                .expect("rows");
            String::from_utf8(bytes.to_vec()).expect("utf8")
        }
    };
    let view = tsv(format!(
        "SELECT {cols} FROM viewer_metrics_5m ORDER BY 1, 2, 3, 4"
    ))
    .await;
    let direct = tsv(format!(
        "SELECT {cols} FROM (SELECT toStartOfInterval(timestamp, INTERVAL 5 MINUTE) AS timestamp_5m, tenant_id, internal_name, node_id, \
             max(viewer_count) AS peak_viewers, toFloat32(avg(viewer_count)) AS avg_viewers, toUInt32(uniq(country_code)) AS unique_countries, \
             toUInt32(uniq(city)) AS unique_cities, toFloat32(avg(connection_quality)) AS avg_connection_quality, \
             toFloat32(avg(buffer_health)) AS avg_buffer_health FROM viewer_metrics GROUP BY timestamp_5m, tenant_id, internal_name, node_id) ORDER BY 1, 2, 3, 4"
    ))
    .await;
    (view, direct)
}

#[tokio::test]
async fn viewer_metrics_5m_is_exact_under_many_small_inserts() {
    let client = fresh_database().await;
    let ledger = PartitionLedger::new(TopicPartition::new("analytics_events", 0));
    let mut sink = sink::<ViewerMetricRow<'static>>(&client, "viewer_metrics");
    let mut offset = 0i64;
    for chunk in 0..40usize {
        let rows = viewer_rows(chunk * 25, 25);
        let b = batch(&ledger, offset, encoded::<ViewerMetricRow<'static>>(&rows));
        offset += 25;
        sink.write(&b).await.expect("insert");
        b.ack();
    }
    let (view, direct) = five_minute_figures(&client).await;
    assert!(
        view.lines().count() > 6,
        "several keys and windows:\n{view}"
    );
    assert_eq!(view, direct);
}

#[tokio::test]
async fn a_table_of_the_wrong_shape_is_refused_naming_the_column() {
    let client = fresh_database().await;
    client
        .query("DROP TABLE track_list_events")
        .execute()
        .await
        .expect("drop");
    client
        .query("CREATE TABLE track_list_events (timestamp DateTime, event_id UUID, tenant_id UUID, internal_name String, node_id String, track_list String, track_count String) ENGINE = MergeTree ORDER BY timestamp")
        .execute()
        .await
        .expect("create");
    let err = sink::<TrackListRow<'static>>(&client, "track_list_events")
        .check()
        .await
        .expect_err("mismatch");
    let msg = err.to_string();
    assert!(!err.is_transient(), "{msg}");
    assert!(
        msg.contains("track_count") && msg.contains("track_list_events"),
        "{msg}"
    );
    let missing = sink::<StreamEventRow<'static>>(&client, "no_such_table")
        .check()
        .await
        .expect_err("missing");
    assert!(!missing.is_transient(), "{missing}");
}

/// Decodes with an optional `tenant_id` header, routes, writes each row to its table.
async fn ingest(
    client: &Client,
    ledger: &std::sync::Arc<PartitionLedger>,
    next: &mut i64,
    json: &str,
    header: Option<&str>,
) {
    use sluice_schemas::rows::*;
    let event = Event::decode(json.as_bytes(), header.map(str::as_bytes)).expect("decodes");
    let mut encoders = RowEncoders::default();
    for row in route(&event).expect("routes") {
        macro_rules! put {
            ($ty:ident, $table:literal, $r:expr) => {{
                let b = batch(ledger, *next, vec![$r]);
                *next += 1;
                sink::<$ty<'static>>(client, $table)
                    .write(&b)
                    .await
                    .expect("insert");
                b.ack();
            }};
        }
        match encoders.encode(&row).expect("encodes") {
            EncodedRow::StreamEvent(r) => put!(StreamEventRow, "stream_events", r),
            EncodedRow::ConnectionEvent(r) => put!(ConnectionEventRow, "connection_events", r),
            EncodedRow::StreamHealth(r) => put!(StreamHealthRow, "stream_health_metrics", r),
            EncodedRow::ViewerMetric(r) => put!(ViewerMetricRow, "viewer_metrics", r),
            EncodedRow::NodeMetric(r) => put!(NodeMetricRow, "node_metrics", r),
            EncodedRow::RoutingEvent(r) => put!(RoutingEventRow, "routing_events", r),
            EncodedRow::TrackList(r) => put!(TrackListRow, "track_list_events", r),
        }
    }
}

#[tokio::test]
async fn every_field_form_lands_with_every_column_as_the_contract_says() {
    use sluice_schemas::rows::*;
    let client = fresh_database().await;
    let ledger = PartitionLedger::new(TopicPartition::new("analytics_events", 0));
    let mut next = 0i64;
    let secs = time::OffsetDateTime::now_utc().unix_timestamp() / 60 * 60 - 600;
    let ts = |i: i64| {
        let t = time::OffsetDateTime::from_unix_timestamp(secs + i).expect("time");
        (
            t.format(&time::format_description::well_known::Rfc3339)
                .expect("format"),
            (secs + i) as u32,
        )
    };
    let (header_tenant, data_tenant) = (
        "11111111-2222-4333-8444-555555555555",
        "66666666-7777-4888-9999-aaaaaaaaaaaa",
    );
    let id =
        |i: u32| uuid::Uuid::parse_str(&format!("00000000-0000-4000-8000-{i:012}")).expect("uuid");
    let tenant = uuid::Uuid::parse_str(TENANT).expect("uuid");
    let default_tenant = sluice_schemas::DEFAULT_TENANT;

    // Envelope tenant, string fields, `event_id`/`event_type` spellings.
    let (t1, s1) = ts(1);
    ingest(&client, &ledger, &mut next, &format!(r#"{{"event_id":"{}","event_type":"stream-ingest","timestamp":"{t1}","tenant_id":"{TENANT}","data":{{"internal_name":"live+x","status":"live","node_id":"edge-2","ingest_type":"push","protocol":"srt"}}}}"#, id(1)), None).await;
    // Tenant only in data; real JSON numbers.
    let (t2, s2) = ts(2);
    ingest(&client, &ledger, &mut next, &format!(r#"{{"id":"{}","type":"recording-lifecycle","timestamp":"{t2}","data":{{"internal_name":"live+x","tenant_id":"{data_tenant}","file_size":2048,"duration":30.0}}}}"#, id(2)), None).await;
    // Tenant from the header (wins over the envelope); optional `target` missing.
    let (t3, s3) = ts(3);
    ingest(&client, &ledger, &mut next, &format!(r#"{{"id":"{}","type":"push-lifecycle","timestamp":"{t3}","tenant_id":"{TENANT}","data":{{"internal_name":"live+x","protocol":"rtmp"}}}}"#, id(3)), Some(header_tenant)).await;
    // No tenant anywhere: the default; numbers as strings and reals; down_bytes missing.
    let (t4, s4) = ts(4);
    ingest(&client, &ledger, &mut next, &format!(r#"{{"id":"{}","type":"user-connection","timestamp":"{t4}","data":{{"internal_name":"live+x","action":"disconnect","seconds_connected":12.0,"up_bytes":"5","user_agent":"Mozilla/5.0 (☃)","connection_addr":"203.0.113.9"}}}}"#, id(4)), None).await;
    // Booleans as numbers, floats as strings.
    let (t5, s5) = ts(5);
    ingest(&client, &ledger, &mut next, &format!(r#"{{"id":"{}","type":"node-lifecycle","timestamp":"{t5}","tenant_id":"{TENANT}","data":{{"node_id":"edge-9","cpu_usage":"55.5","is_healthy":1,"ram_max":"4096","ram_current":1024,"up_speed":"10","down_speed":20,"stream_count":"7"}}}}"#, id(5)), None).await;

    let stream_events = fetch_rows!(
        client,
        "SELECT ?fields FROM stream_events ORDER BY timestamp",
        StreamEventRow
    );
    assert_eq!(
        stream_events,
        vec![
            StreamEventRow {
                event_id: id(1),
                timestamp: s1,
                tenant_id: tenant,
                internal_name: "live+x".into(),
                event_type: "stream-ingest".into(),
                status: "live".into(),
                node_id: "edge-2".into(),
                ingest_type: Some("push".into()),
                protocol: Some("srt".into()),
                target: None,
                file_size: None,
                duration: None,
                event_data: r#"{"ingest_type":"push","internal_name":"live+x","node_id":"edge-2","protocol":"srt","status":"live"}"#.into(),
            },
            StreamEventRow {
                event_id: id(2),
                timestamp: s2,
                tenant_id: uuid::Uuid::parse_str(data_tenant).expect("uuid"),
                internal_name: "live+x".into(),
                event_type: "recording-lifecycle".into(),
                status: "".into(),
                node_id: "".into(),
                ingest_type: None,
                protocol: None,
                target: None,
                file_size: Some(2048),
                duration: Some(30),
                event_data: format!(r#"{{"duration":30.0,"file_size":2048,"internal_name":"live+x","tenant_id":"{data_tenant}"}}"#).into(),
            },
            StreamEventRow {
                event_id: id(3),
                timestamp: s3,
                tenant_id: uuid::Uuid::parse_str(header_tenant).expect("uuid"),
                internal_name: "live+x".into(),
                event_type: "push-lifecycle".into(),
                status: "".into(),
                node_id: "".into(),
                ingest_type: None,
                protocol: Some("rtmp".into()),
                target: None,
                file_size: None,
                duration: None,
                event_data: r#"{"internal_name":"live+x","protocol":"rtmp"}"#.into(),
            },
        ]
    );
    let conn = fetch_rows!(
        client,
        "SELECT ?fields FROM connection_events",
        ConnectionEventRow
    );
    assert_eq!(
        conn,
        vec![ConnectionEventRow {
            event_id: id(4),
            timestamp: s4,
            tenant_id: default_tenant,
            internal_name: "live+x".into(),
            connection_addr: "203.0.113.9".into(),
            user_agent: "Mozilla/5.0 (☃)".into(),
            event_type: "disconnect".into(),
            session_duration: 12,
            bytes_transferred: 5,
            ..Default::default()
        }]
    );
    let nodes = fetch_rows!(client, "SELECT ?fields FROM node_metrics", NodeMetricRow);
    assert_eq!(
        nodes,
        vec![NodeMetricRow {
            timestamp: s5,
            tenant_id: tenant,
            node_id: "edge-9".into(),
            cpu_usage: 55.5,
            ram_max: 4096,
            ram_current: 1024,
            up_speed: 10,
            down_speed: 20,
            stream_count: 7,
            is_healthy: 1,
        }]
    );
    // Columns the worker leaves out take their defaults.
    let defaults: (f32, u64) = client
        .query("SELECT memory_usage, length(tags) FROM node_metrics")
        .fetch_one()
        .await
        .expect("defaults");
    assert_eq!(defaults, (0.0, 0));
}

/// A span of partition `p` with `items` rows, cut in `batch`.
fn span(p: i32, first: i64, items: u64, batch: Option<sluice_pipeline::BatchRef>) -> SourceSpan {
    SourceSpan {
        tp: TopicPartition::new("analytics_events", p),
        first,
        last: first + items as i64 - 1,
        items,
        window: None,
        across: true,
        batch,
    }
}

/// A worker crashed after recording the spans of a batch cut across partitions and before
/// its insert was answered; the table already holds a row equal to one of that batch's (the
/// same event published twice, at another offset). The replay asks the landings whether the
/// batch landed: it did not, so every row of its spans is inserted, the equal one too. A
/// second replay, and a replay of a batch that did land, write nothing.
#[tokio::test]
async fn a_replayed_batch_that_did_not_land_is_written_whole_though_the_table_holds_equal_rows() {
    let client = fresh_database().await;
    let events = stream_events(12);
    let rows = encoded::<StreamEventRow<'static>>(&events);
    let mut sink =
        sink::<StreamEventRow<'static>>(&client, "stream_events").check_range("timestamp");
    sink.check().await.expect("the table and its landing view");

    // Batch A (partitions 0 and 1) lands; it holds rows 0..6, row 3 among them.
    let a_spans = [span(0, 0, 4, None), span(1, 0, 2, None)];
    let a_ref = sluice_pipeline::BatchRef::of(&a_spans, 6);
    let a_spans: Vec<SourceSpan> = a_spans
        .into_iter()
        .map(|s| SourceSpan {
            batch: Some(a_ref),
            ..s
        })
        .collect();
    let a = Batch::unacked(rows[..6].to_vec()).with_spans(a_spans.clone());
    sink.write(&a).await.expect("batch A");
    assert_eq!(count(&client, "stream_events").await, 6);

    // Batch B (partitions 0 and 2) was recorded and never answered: it holds a second copy of
    // row 3 (a producer's retry) and rows 6..12.
    let mut b_rows = vec![rows[3].clone()];
    b_rows.extend(rows[6..].iter().cloned());
    let b_spans = [span(0, 4, 3, None), span(2, 0, 4, None)];
    let b_ref = sluice_pipeline::BatchRef::of(&b_spans, 7);
    let b_spans: Vec<SourceSpan> = b_spans
        .into_iter()
        .map(|s| SourceSpan {
            batch: Some(b_ref),
            ..s
        })
        .collect();
    let replay = || {
        Batch::unacked(b_rows.clone())
            .with_spans(b_spans.clone())
            .with_delivery(Delivery::Recovered)
    };
    // B's insert still running (its worker was killed after sending it): the replay waits.
    let b_token = sluice_sinks::batch_token(
        "stream_events",
        &Batch::unacked(b_rows.clone()).with_spans(b_spans.clone()),
    );
    let slow = client
        .query(
            "INSERT INTO stream_events SELECT * FROM stream_events \
             WHERE sleepEachRow(0.4) = 1",
        )
        .with_setting("insert_deduplication_token", &b_token);
    let slow = tokio::spawn(slow.execute());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let err = sink
        .write(&replay())
        .await
        .expect_err("an insert of B is running");
    assert!(
        err.is_transient() && err.to_string().contains("still running"),
        "{err}"
    );
    slow.await.expect("join").expect("the slow insert");
    sink.write(&replay()).await.expect("replay of B");
    assert_eq!(count(&client, "stream_events").await, 13, "every row of B");
    let copies: u64 = client
        .query("SELECT count() FROM stream_events WHERE event_id = ?")
        .bind(events[3].event_id)
        .fetch_one()
        .await
        .expect("copies");
    assert_eq!(copies, 2, "both records of the event published twice");

    // A crash before the commit replays B again, cut differently (one span per batch).
    for (span, (from, n)) in b_spans.iter().zip([(0, 3), (3, 4)]) {
        let again = Batch::unacked(b_rows[from..from + n].to_vec())
            .with_spans(vec![span.clone()])
            .with_delivery(Delivery::Recovered);
        sink.write(&again).await.expect("second replay of B");
    }
    assert_eq!(count(&client, "stream_events").await, 13, "B's spans once");

    // A replay of the batch that landed writes nothing.
    let again = Batch::unacked(rows[..6].to_vec())
        .with_spans(a_spans)
        .with_delivery(Delivery::Recovered);
    sink.write(&again).await.expect("replay of A");
    assert_eq!(count(&client, "stream_events").await, 13, "A once");

    // A table without its landing view is refused at start, naming the view.
    client
        .query("DROP VIEW sluice_landed_stream_events")
        .execute()
        .await
        .expect("drop the view");
    let err = sink.check().await.expect_err("no landing view");
    assert!(
        !err.is_transient() && err.to_string().contains("sluice_landed_stream_events"),
        "{err}"
    );
}

/// `spans` as the spans of one batch of `items` items cut across partitions.
fn one_batch(spans: Vec<SourceSpan>, items: u64) -> Vec<SourceSpan> {
    let named = sluice_pipeline::BatchRef::of(&spans, items);
    spans
        .into_iter()
        .map(|s| SourceSpan {
            batch: Some(named),
            ..s
        })
        .collect()
}

/// Rows landed under `token` in `table`, as its landing view recorded them.
async fn landed_under(client: &Client, table: &str, token: &str) -> u64 {
    client
        .query("SELECT sum(rows) FROM sluice_batch_landings WHERE target_table = ? AND token = ?")
        .bind(table)
        .bind(token)
        .fetch_one()
        .await
        .expect("landings")
}

/// ClickHouse crashed during a batch's insert after committing the table's part and before
/// its views' (the landing and `viewer_metrics_5m`'s states), and the worker died before its
/// retry: the state is made here by inserting the batch with both views detached. Rebuilt
/// from its redelivered spans, the batch is inserted whole under its token again: the table
/// drops the repeat, the views take it, once, however often it comes.
#[tokio::test]
async fn a_rebuilt_batch_fills_the_views_an_interrupted_insert_left_without_it() {
    let client = fresh_database().await;
    let mut sink = sink::<ViewerMetricRow<'static>>(&client, "viewer_metrics");
    sink.check().await.expect("the table and its landing view");
    let rows = encoded::<ViewerMetricRow<'static>>(&viewer_rows(0, 60));
    let spans = one_batch(vec![span(0, 100, 35, None), span(1, 40, 25, None)], 60);
    let first = Batch::unacked(rows.clone()).with_spans(spans.clone());
    let token = sluice_sinks::batch_token("viewer_metrics", &first);

    let views = ["viewer_metrics_5m_mv", "sluice_landed_viewer_metrics"];
    for view in views {
        client
            .query(&format!("DETACH TABLE {view}"))
            .execute()
            .await
            .expect("detach");
    }
    sink.write(&first).await.expect("the interrupted insert");
    for view in views {
        client
            .query(&format!("ATTACH TABLE {view}"))
            .execute()
            .await
            .expect("attach");
    }
    assert_eq!(count(&client, "viewer_metrics").await, 60);
    assert_eq!(count(&client, "viewer_metrics_5m_states").await, 0);
    assert_eq!(landed_under(&client, "viewer_metrics", &token).await, 0);

    let rebuilt = || {
        Batch::unacked(rows.clone())
            .with_spans(spans.clone())
            .with_delivery(Delivery::Rebuilt)
    };
    sink.write(&rebuilt()).await.expect("the rebuilt batch");
    assert_eq!(count(&client, "viewer_metrics").await, 60, "the table once");
    assert_eq!(landed_under(&client, "viewer_metrics", &token).await, 60);
    let (view, direct) = five_minute_figures(&client).await;
    assert!(view.lines().count() > 3, "several keys:\n{view}");
    assert_eq!(view, direct, "the view holds every row once");
    let states = count(&client, "viewer_metrics_5m_states").await;

    sink.write(&rebuilt()).await.expect("rebuilt again");
    assert_eq!(count(&client, "viewer_metrics").await, 60);
    assert_eq!(count(&client, "viewer_metrics_5m_states").await, states);
    assert_eq!(five_minute_figures(&client).await, (view, direct));
}

/// The nodes of `scripts/services.sh up cluster` (2 shards x 2 replicas), by HTTP URL.
const CLUSTER_NODES: [&str; 4] = [
    "http://127.0.0.1:8201",
    "http://127.0.0.1:8202",
    "http://127.0.0.1:8203",
    "http://127.0.0.1:8204",
];

/// The same on the cluster (sharded layout), where it was found: node 4 (shard 2, replica 2)
/// stopped during an insert through `Distributed` after committing its table's part and
/// before its views', and the worker died before its retry. The rebuilt batch, inserted whole
/// through `Distributed` again, fills node 4's views and doubles nothing on the other nodes.
#[tokio::test]
async fn a_rebuilt_batch_fills_the_views_one_replica_missed() {
    if std::env::var("SLUICE_CLUSTER").map_or(true, |v| v != "up") {
        eprintln!("skipped: the ClickHouse cluster is not up (SLUICE_CLUSTER=up)");
        return;
    }
    let db = unique("fw_rebuild");
    let config = sluice_worker::ClickHouseConfig {
        host: CLUSTER_NODES[0].into(),
        database: db.clone(),
        cluster: Some("sluice_cluster".into()),
        layout: sluice_sinks::Layout::Sharded,
        nodes: CLUSTER_NODES.map(String::from).to_vec(),
        ..Default::default()
    };
    let tables = ["viewer_metrics".to_string()];
    sluice_worker::migrate::ClickHousePlan {
        scope: "frameworks",
        migrations: CLICKHOUSE_MIGRATIONS,
        tables: &tables,
        cluster: Some("sluice_cluster"),
        layout: sluice_sinks::Layout::Sharded,
    }
    .apply(&config)
    .await
    .expect("migrate");
    let at = |i: usize| {
        Client::default()
            .with_url(CLUSTER_NODES[i])
            .with_database(&db)
    };
    let mut sink = sink::<ViewerMetricRow<'static>>(&at(0), "viewer_metrics")
        .cluster("sluice_cluster", sluice_sinks::Layout::Sharded);
    sink.check().await.expect("the table and its landing view");
    let rows = encoded::<ViewerMetricRow<'static>>(&viewer_rows(0, 120));
    let spans = one_batch(vec![span(0, 100, 70, None), span(1, 40, 50, None)], 120);
    let first = Batch::unacked(rows.clone()).with_spans(spans.clone());

    let views: Vec<String> = at(3)
        .query("SELECT name FROM system.tables WHERE database = currentDatabase() AND engine = 'MaterializedView' ORDER BY name")
        .fetch_all()
        .await
        .expect("views");
    assert_eq!(
        views.len(),
        2,
        "the landing and the five-minute view: {views:?}"
    );
    for view in &views {
        at(3)
            .query(&format!("DETACH TABLE `{view}`"))
            .execute()
            .await
            .expect("detach");
    }
    sink.write(&first).await.expect("the interrupted insert");
    for view in &views {
        at(3)
            .query(&format!("ATTACH TABLE `{view}`"))
            .execute()
            .await
            .expect("attach");
    }
    // Merged five-minute states and table rows of one node.
    let node = |i: usize| {
        let client = at(i);
        async move {
            let states: (u64, u64) = client
                .query(
                    "SELECT count(), sum(cityHash64(timestamp_5m, internal_name, node_id, p, round(a, 3))) \
                     FROM (SELECT timestamp_5m, internal_name, node_id, maxMerge(peak_viewers_state) AS p, \
                     avgMerge(avg_viewers_state) AS a FROM viewer_metrics_5m_states_local GROUP BY ALL)",
                )
                .fetch_one()
                .await
                .expect("states");
            let rows: u64 = client
                .query("SELECT count() FROM viewer_metrics_local")
                .fetch_one()
                .await
                .expect("rows");
            (rows, states)
        }
    };
    let (shard2, missed) = (node(2).await, node(3).await);
    assert!(
        shard2.0 > 10 && shard2.1.0 > 0,
        "shard 2 holds rows: {shard2:?}"
    );
    assert_eq!(missed.0, shard2.0, "node 4's table holds shard 2's rows");
    assert_eq!(missed.1.0, 0, "node 4's view missed them");

    let before = vec![node(0).await, node(1).await, shard2];
    let rebuilt = || {
        Batch::unacked(rows.clone())
            .with_spans(spans.clone())
            .with_delivery(Delivery::Rebuilt)
    };
    for _ in 0..2 {
        sink.write(&rebuilt()).await.expect("the rebuilt batch");
        assert_eq!(node(3).await, shard2, "node 4 as node 3, its views filled");
        let others = [node(0).await, node(1).await, node(2).await];
        assert_eq!(others.to_vec(), before, "nothing doubled elsewhere");
    }
    assert_eq!(count(&at(0), "viewer_metrics").await, 120);
    let (view, direct) = five_minute_figures(&at(0)).await;
    assert_eq!(view, direct, "viewer_metrics_5m through Distributed");
    for i in 0..CLUSTER_NODES.len() {
        let _ = at(i)
            .query(&format!("DROP DATABASE IF EXISTS `{db}` SYNC"))
            .execute()
            .await;
    }
}

/// A worker that could not rebuild a batch (its other partition was elsewhere) wrote its own
/// span alone, and died before committing; the next owner of both partitions rebuilds the
/// batch whole. The span written alone is not written again: only the other one is.
#[tokio::test]
async fn a_rebuilt_batch_whose_span_was_written_alone_writes_only_the_rest() {
    let client = fresh_database().await;
    let mut sink =
        sink::<StreamEventRow<'static>>(&client, "stream_events").check_range("timestamp");
    sink.check().await.expect("the table and its landing view");
    let rows = encoded::<StreamEventRow<'static>>(&stream_events(10));
    let spans = one_batch(vec![span(0, 0, 6, None), span(1, 0, 4, None)], 10);
    let alone = Batch::unacked(rows[..6].to_vec())
        .with_spans(vec![spans[0].clone()])
        .with_delivery(Delivery::Recovered);
    sink.write(&alone).await.expect("partition 0's span alone");
    assert_eq!(count(&client, "stream_events").await, 6);

    let rebuilt = Batch::unacked(rows.clone())
        .with_spans(spans.clone())
        .with_delivery(Delivery::Rebuilt);
    sink.write(&rebuilt).await.expect("the rebuilt batch");
    assert_eq!(count(&client, "stream_events").await, 10, "every row once");
    sink.write(&rebuilt).await.expect("again");
    assert_eq!(count(&client, "stream_events").await, 10);
}

/// The same encoded rows sent as RowBinary and as a Native block land as the same rows, every
/// column (nulls, empty strings, fixed strings, low-cardinality text) included.
#[tokio::test]
async fn rowbinary_and_native_inserts_store_the_same_rows() {
    use sluice_schemas::rows::*;
    let client = fresh_database().await;
    let ledger = PartitionLedger::new(TopicPartition::new("analytics_events", 0));
    let samples = [
        (
            "stream-ingest",
            r#"{"internal_name":"live+a","status":"live","node_id":"edge-1","ingest_type":"push","protocol":"srt"}"#,
        ),
        (
            "recording-lifecycle",
            r#"{"internal_name":"live+a","file_size":"1048576","duration":"60"}"#,
        ),
        ("stream-view", r#"{"internal_name":"live+\"q\""}"#),
        (
            "load-balancing",
            r#"{"stream_name":"s","country_code":"NL","score":-7,"node_scores":{"e":1}}"#,
        ),
    ];
    let events: Vec<Event> = samples
        .iter()
        .enumerate()
        .map(|(i, (k, d))| event(i, k, d))
        .collect();
    let mut encoders = RowEncoders::default();
    let rows: Vec<EncodedRow> = events
        .iter()
        .flat_map(|e| route(e).expect("routes"))
        .map(|r| encoders.encode(&r).expect("encodes"))
        .collect();
    let streams: Vec<Encoded<StreamEventRow<'static>>> = rows
        .iter()
        .filter_map(|r| match r {
            EncodedRow::StreamEvent(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    let routing: Vec<Encoded<RoutingEventRow<'static>>> = rows
        .iter()
        .filter_map(|r| match r {
            EncodedRow::RoutingEvent(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!((streams.len(), routing.len()), (3, 1));
    for table in ["stream_events", "routing_events"] {
        client
            .query(&format!("CREATE TABLE {table}_rb AS {table}"))
            .execute()
            .await
            .expect("create");
    }
    macro_rules! both {
        ($first:expr, $items:expr, $row:ident, $table:literal) => {{
            let b = batch(&ledger, $first, $items.clone());
            sink::<$row<'static>>(&client, $table)
                .write(&b)
                .await
                .expect("native insert");
            ClickHouseSink::with_encoder(
                client.clone(),
                concat!($table, "_rb"),
                RowBinary::<$row<'static>>::default(),
            )
            .write(&b)
            .await
            .expect("rowbinary insert");
            b.ack();
            let dump = |t: &'static str| {
                let client = client.clone();
                async move {
                    let bytes = client
                        .query(&format!("SELECT * FROM {t} ORDER BY tuple(*) FORMAT TSV"))
                        .fetch_bytes("TSV")
                        .expect("query")
                        .collect()
                        .await
                        .expect("rows");
                    String::from_utf8(bytes.to_vec()).expect("utf8")
                }
            };
            let (native, row_binary) = (dump($table).await, dump(concat!($table, "_rb")).await);
            assert_eq!(native.lines().count(), $items.len(), "{native}");
            assert_eq!(native, row_binary);
        }};
    }
    both!(0, streams, StreamEventRow, "stream_events");
    both!(3, routing, RoutingEventRow, "routing_events");
}
