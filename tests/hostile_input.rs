//! Hostile records (the corpus in `tests/fixtures/hostile/`, plus a 5 MB record and 10,000-deep
//! nesting) produced into the real broker among good records, through `sluice run --drain` with
//! ClickHouse and PostgreSQL: each bad record reaches the dead-letter topic, byte for byte, with a
//! reason a person understands; each odd-but-valid one lands with its strings byte for byte;
//! every good record around them lands; the worker neither panics nor stalls nor grows past its
//! memory bound.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{as_refs, assert_ok, clickhouse, command, config_path, sluice, write_config};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use sluice_pipeline::send_waiting;
use sluice_testkit::{
    brokers, committed_offsets, create_pg_database, create_topic, drop_pg_database, read_all,
    rss_of, unique,
};

struct Case {
    name: String,
    value: Vec<u8>,
    /// `Some(words)`: dead letter whose `error` contains them; `None`: lands.
    reason: Option<String>,
    event_id: String,
}

fn corpus(ts: &str) -> Vec<Case> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hostile");
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(dir).expect("fixtures") {
        let path = entry.expect("entry").path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let parts: Vec<&str> = file.split('.').collect();
        let reason = match parts[0] {
            "dlq" => Some(parts[1].replace('_', " ")),
            "lands" => None,
            _ => continue,
        };
        let event_id = uuid::Uuid::new_v4().to_string();
        let raw = std::fs::read(&path).expect("fixture");
        let value = if path.extension().is_some_and(|e| e == "json") {
            String::from_utf8(raw)
                .expect("UTF-8 fixture")
                .replace("@ID@", &event_id)
                .replace("@TS@", ts)
                .into_bytes()
        } else {
            raw
        };
        cases.push(Case {
            name: file,
            value,
            reason,
            event_id,
        });
    }
    // A 5 MB record that lacks what its type needs.
    let id = uuid::Uuid::new_v4().to_string();
    cases.push(Case {
        name: "generated.five_megabytes".into(),
        value: format!(
            r#"{{"id":"{id}","type":"stream-lifecycle","timestamp":"{ts}","data":{{"padding":"{}"}}}}"#,
            "x".repeat(5 << 20)
        )
        .into_bytes(),
        reason: Some("internal_name".into()),
        event_id: id,
    });
    let id = uuid::Uuid::new_v4().to_string();
    cases.push(Case {
        name: "generated.deep_nesting".into(),
        value: format!(
            r#"{{"id":"{id}","type":"stream-lifecycle","timestamp":"{ts}","data":{{"internal_name":"a","x":{}{}}}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        )
        .into_bytes(),
        reason: Some("not valid JSON".into()),
        event_id: id,
    });
    cases
}

fn good(i: usize, ts: &str) -> (String, Vec<u8>) {
    let id = uuid::Uuid::new_v4().to_string();
    let value = format!(
        r#"{{"id":"{id}","type":"stream-lifecycle","timestamp":"{ts}","tenant_id":"9b2f0a7c-4d3e-4b8a-8c1d-0e5f6a7b8c9d","data":{{"internal_name":"live+good{}","status":"live","n":"{i}"}}}}"#,
        i % 7
    );
    (id, value.into_bytes())
}

#[tokio::test]
async fn hostile_records_go_to_the_dead_letter_topic_and_the_rest_lands() {
    let topic = unique("hostile");
    let partitions = 3;
    create_topic(&topic, partitions).await;
    let pg_url = create_pg_database("sluice_hostile").await;
    let (db, group) = (unique("hostile_db"), unique("hostile_group"));
    let env = vec![
        ("KAFKA_TOPICS".to_owned(), topic.clone()),
        ("KAFKA_GROUP_ID".to_owned(), group.clone()),
        ("CLICKHOUSE_DB".to_owned(), db.clone()),
        ("DATABASE_URL".to_owned(), pg_url.clone()),
    ];
    let config = config_path("sluice_hostile");
    write_config(&config, 6000, "", "batch_linger_ms = 100");
    assert_ok("migrate", &sluice(&config, &as_refs(&env), &["migrate"]));

    let ts = (time::OffsetDateTime::now_utc() - time::Duration::minutes(5))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("timestamp");
    let cases = corpus(&ts);
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("message.max.bytes", "16777216")
        .create()
        .expect("producer");
    let mut sent = 0usize;
    let mut good_ids = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        // Good records before and after every bad one, on every partition.
        for j in 0..30 {
            let (id, value) = good(n * 30 + j, &ts);
            let record = BaseRecord::to(&topic)
                .key(&id)
                .payload(&value)
                .partition((j % partitions as usize) as i32);
            send_waiting(&producer, record).expect("send good");
            good_ids.push(id);
            sent += 1;
        }
        let record = BaseRecord::to(&topic)
            .key(&case.name)
            .payload(&case.value)
            .partition((n % partitions as usize) as i32);
        send_waiting(&producer, record).expect("send hostile");
        sent += 1;
        producer.flush(Duration::from_secs(30)).expect("flush");
    }

    // The worker, sampled for memory while it drains.
    let mut worker = command(&config, &as_refs(&env), &["run", "--drain"], "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("worker");
    let pid = worker.id().to_string();
    let (started, mut peak) = (Instant::now(), 0u64);
    let status = loop {
        if let Some(status) = worker.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the worker stalled"
        );
        peak = peak.max(rss_of(&pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = {
        use std::io::Read;
        let mut s = String::new();
        worker
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut s)
            .expect("read stderr");
        s
    };
    assert!(status.success(), "drain: {stderr}");
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    assert!(peak < 256 << 20, "RSS {} MiB", peak >> 20);
    let committed: i64 = committed_offsets(&group, &topic, partitions).values().sum();
    assert_eq!(committed, sent as i64, "committed to the end");

    // Every good record and every odd-but-valid one landed, strings byte for byte.
    let ch = clickhouse(&db);
    let landed: Vec<(String, String, String)> = ch
        .query("SELECT toString(event_id), internal_name, status FROM stream_events")
        .fetch_all()
        .await
        .expect("stream_events");
    let landed: HashMap<String, (String, String)> = landed
        .into_iter()
        .map(|(id, name, status)| (id, (name, status)))
        .collect();
    for id in &good_ids {
        assert!(landed.contains_key(id), "good record {id} landed");
    }
    let valid: Vec<&Case> = cases.iter().filter(|c| c.reason.is_none()).collect();
    assert_eq!(
        landed.len(),
        good_ids.len() + valid.len(),
        "nothing else landed"
    );
    for case in &valid {
        let v: serde_json::Value = serde_json::from_slice(&case.value).expect("valid case");
        let (name, status) = &landed[&case.event_id];
        assert_eq!(
            name,
            v["data"]["internal_name"].as_str().unwrap(),
            "{}",
            case.name
        );
        assert_eq!(
            status,
            v["data"]["status"].as_str().unwrap(),
            "{}",
            case.name
        );
    }
    // PostgreSQL took the SQL-looking and non-ASCII names as data (NULs removed, documented).
    let pool = sqlx::PgPool::connect(&pg_url).await.expect("connect");
    let names: Vec<String> = sqlx::query_scalar("SELECT internal_name FROM stream_analytics")
        .fetch_all(&pool)
        .await
        .expect("stream_analytics");
    pool.close().await;
    for case in &valid {
        let v: serde_json::Value = serde_json::from_slice(&case.value).expect("valid case");
        let name = v["data"]["internal_name"]
            .as_str()
            .unwrap()
            .replace('\0', "");
        assert!(
            names.contains(&name),
            "{}: {name:?} in stream_analytics",
            case.name
        );
    }
    assert!(names.contains(&"x'); DROP TABLE stream_events; --".to_owned()));

    // Every bad record is in the dead-letter topic once, byte for byte, with its reason.
    let bad: Vec<&Case> = cases.iter().filter(|c| c.reason.is_some()).collect();
    let dead = read_all(&format!("{topic}.dlq"), 3, bad.len());
    assert_eq!(dead.len(), bad.len());
    for case in bad {
        let d = dead
            .iter()
            .find(|d| d.key == case.name.as_bytes())
            .unwrap_or_else(|| panic!("{} in the dead-letter topic", case.name));
        assert!(
            d.value == case.value,
            "{}: value kept byte for byte",
            case.name
        );
        let header = |k: &str| {
            d.headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let reason = case.reason.as_deref().unwrap();
        assert!(
            header("error")
                .to_lowercase()
                .contains(&reason.to_lowercase()),
            "{}: error {:?} names {reason:?}",
            case.name,
            header("error")
        );
        assert_eq!(header("source_topic"), topic);
    }
    let _ = std::fs::remove_file(config);
    drop_pg_database(&pg_url).await;
}
