//! `sluice migrate` and `sluice run --drain` as processes against the real broker and
//! ClickHouse: good records land in their tables, bad ones reach the dead-letter topic with
//! their original key, value and headers plus the reason, and offsets are committed to the end.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message};
use sluice_testkit::{brokers, committed_offsets, create_topic, unique};

mod common;
use common::{as_refs, sluice, table_digests};

const TENANT: &str = "9b2f0a7c-4d3e-4b8a-8c1d-0e5f6a7b8c9d";

fn good(i: usize, kind: &str, data: &str) -> String {
    let ts = time::OffsetDateTime::now_utc() - time::Duration::seconds(600 - i as i64);
    let ts = ts
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    format!(
        r#"{{"id":"00000000-0000-4000-8000-{i:012}","type":"{kind}","timestamp":"{ts}","tenant_id":"{TENANT}","data":{data}}}"#
    )
}

#[tokio::test]
async fn run_drains_good_records_into_tables_and_bad_ones_into_the_dead_letter_topic() {
    let topic = unique("fw_run");
    let group = unique("fw_run_group");
    let db = unique("fw_run_db");
    create_topic(&topic, 3).await;
    let config = std::env::temp_dir().join(format!("{}.toml", unique("sluice_run")));
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n\"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 1000\n[pipeline]\nbatch_linger_ms = 100\n",
            brokers()
        ),
    )
    .expect("write config");
    let env = [
        ("KAFKA_TOPICS", topic.as_str()),
        ("KAFKA_GROUP_ID", group.as_str()),
        ("CLICKHOUSE_DB", db.as_str()),
    ];

    let kinds = [
        (
            "stream-lifecycle",
            r#"{"internal_name":"live+a","status":"live"}"#,
            "stream_events",
            1,
        ),
        (
            "user-connection",
            r#"{"internal_name":"live+a","action":"connect","up_bytes":"10"}"#,
            "connection_events",
            1,
        ),
        (
            "client-lifecycle",
            r#"{"internal_name":"live+a","packets_sent":"10"}"#,
            "stream_health_metrics",
            1,
        ),
        (
            "node-lifecycle",
            r#"{"node_id":"edge-1","cpu_usage":"5"}"#,
            "node_metrics",
            1,
        ),
        (
            "load-balancing",
            r#"{"stream_name":"live+a","score":3}"#,
            "routing_events",
            1,
        ),
        (
            "track-list",
            r#"{"internal_name":"live+a","track_list":"[]"}"#,
            "track_list_events",
            1,
        ),
    ];
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    let mut expected: HashMap<&str, u64> = HashMap::new();
    for i in 0..600 {
        let (kind, data, table, rows) = kinds[i % kinds.len()];
        records.push((format!("good-{i}"), good(i, kind, data).into_bytes()));
        *expected.entry(table).or_default() += rows;
        if kind == "client-lifecycle" {
            *expected.entry("viewer_metrics").or_default() += 1;
        }
    }
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad-json", b"{\"id\": ".to_vec(), "not valid JSON"),
        ("bad-array", b"[1, 2, 3]".to_vec(), "JSON array"),
        (
            "bad-type",
            good(9001, "stream-teleport", "{}").into_bytes(),
            "unknown event type",
        ),
        (
            "bad-missing",
            good(9002, "stream-end", r#"{"status":"ended"}"#).into_bytes(),
            "lacks `data.internal_name`",
        ),
        ("bad-utf8", b"\xff\xfe\xfd".to_vec(), "not valid JSON"),
    ];
    for (i, (key, value, _)) in bad.iter().enumerate() {
        records.insert(100 * i + 7, (key.to_string(), value.clone()));
    }
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer");
    for (n, (key, value)) in records.iter().enumerate() {
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "batch_id",
            value: Some("b-1"),
        });
        producer
            .send(
                BaseRecord::to(&topic)
                    .key(key)
                    .payload(value)
                    .partition((n % 3) as i32)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .expect("send");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");

    let out = sluice(&config, &env, &["migrate"]);
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sluice(&config, &env, &["run", "--drain", "--progress"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run: {stderr}");
    // The progress (a last line where stderr is no terminal) counts the records to drain: every
    // record of the topic, good and bad.
    let n = records.len();
    assert!(
        stderr.contains(&format!("drain: {n}/{n} records in ")),
        "progress: {stderr}"
    );

    let client = clickhouse::Client::default()
        .with_url(
            std::env::var("CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into()),
        )
        .with_database(&db);
    for (table, n) in &expected {
        let got: u64 = client
            .query(&format!("SELECT count() FROM {table}"))
            .fetch_one()
            .await
            .expect("count");
        assert_eq!(got, *n, "{table}");
    }
    let total = records.len() as i64;
    let committed: i64 = committed_offsets(&group, &topic, 3).values().sum();
    assert_eq!(committed, total, "committed to the end of every partition");

    // The dead-letter topic holds each bad record once, with the reason and its origin.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("dlq_reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer
        .subscribe(&[&format!("{topic}.dlq")])
        .expect("subscribe");
    let mut dead: HashMap<String, HashMap<String, String>> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while dead.len() < bad.len() && std::time::Instant::now() < deadline {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.expect("dead letter");
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        let mut headers = HashMap::new();
        if let Some(hs) = msg.headers() {
            for h in hs.iter() {
                headers.insert(
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        let original = bad
            .iter()
            .find(|(k, _, _)| *k == key)
            .unwrap_or_else(|| panic!("unexpected dead letter {key}"));
        assert_eq!(
            msg.payload().unwrap_or_default(),
            original.1.as_slice(),
            "{key}: original value kept"
        );
        assert!(dead.insert(key, headers).is_none(), "dead letter twice");
    }
    assert_eq!(
        dead.len(),
        bad.len(),
        "every bad record is in the dead-letter topic"
    );
    for (key, _, reason) in &bad {
        let h = &dead[*key];
        assert!(h["error"].contains(reason), "{key}: {:?}", h["error"]);
        assert!(
            ["decode", "route"].contains(&h["error_stage"].as_str()),
            "{key}"
        );
        assert_eq!(h["source_topic"], topic);
        assert_eq!(h["batch_id"], "b-1", "{key}: original headers kept");
        let (p, o): (i32, i64) = (
            h["source_partition"].parse().expect("partition"),
            h["source_offset"].parse().expect("offset"),
        );
        let n = records
            .iter()
            .position(|(k, _)| k == key)
            .expect("produced");
        assert_eq!(p, (n % 3) as i32, "{key}");
        assert!(o >= 0);
    }
    // `dead-letters` shows the same: each with its reason and source.
    let out = sluice(&config, &env, &["dead-letters"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("{} dead letter(s) shown", bad.len())),
        "{shown}"
    );
    for (key, _, _) in &bad {
        let h = &dead[*key];
        let from = format!(
            "({}) from {topic}/{}@{}: ",
            h["error_stage"], h["source_partition"], h["source_offset"]
        );
        assert!(shown.contains(&from), "{key}: {from} in {shown}");
    }
    assert!(shown.contains(": invalid_json (decode) from "), "{shown}");
    let _ = std::fs::remove_file(config);
}

#[test]
fn validate_redacts_secrets_and_bad_config_names_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("validate")
        .env("CLICKHOUSE_PASSWORD", "ch-pass-0f5e")
        .env(
            "DATABASE_URL",
            "postgres://sluice:pg-pass-77aa@127.0.0.1:5432/sluice",
        )
        .env("KAFKA_BROKERS", brokers())
        .env("LOG_LEVEL", "warn")
        .output()
        .expect("run validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("ch-pass-0f5e") && !text.contains("pg-pass-77aa"),
        "{text}"
    );
    assert!(text.contains("clickhouse.password = \"***\""), "{text}");
    assert!(
        text.contains("postgres://sluice:***@127.0.0.1:5432/sluice"),
        "{text}"
    );
    assert!(text.contains("postgres   ok"), "PostgreSQL reached: {text}");
    // The local ClickHouse user has no password: the wrong one is reported, and validate fails.
    assert!(text.contains("clickhouse FAIL"), "{text}");
    assert!(!out.status.success());

    for (var, value) in [
        ("CLICKHOUSE_HOST", "clickhouse:9000"),
        ("HEALTH_PORT", "eighteen"),
        ("KAFKA_TOPICS", ","),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--drain"])
            .env(var, value)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{var}={value} must stop the worker at start"
        );
        assert!(err.contains(var), "{var}={value}: {err}");
    }
}

#[tokio::test]
async fn migrate_creates_the_postgres_tables_once() {
    let url = sluice_testkit::create_pg_database("sluice_mig").await;
    let db = url
        .rsplit_once('/')
        .expect("url with a database")
        .1
        .to_owned();
    let migrate = || {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .env("CLICKHOUSE_DB", &db)
            .env("LOG_LEVEL", "warn")
            .output()
            .expect("run migrate")
    };
    let first = migrate();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let out = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(
        out.contains("migration 0001 stream_analytics applied"),
        "{out}"
    );
    assert!(
        !out.contains(":sluice@") || out.contains(":***@"),
        "password redacted: {out}"
    );
    let second = migrate();
    assert!(
        String::from_utf8_lossy(&second.stdout)
            .contains("migration 0001 stream_analytics already applied")
    );

    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    let columns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'stream_analytics'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("columns");
    assert_eq!(columns, 34);
    let unique_key: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_indexes WHERE tablename = 'stream_analytics' AND indexdef LIKE '%UNIQUE%(tenant_id, internal_name)%'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("index");
    assert_eq!(unique_key, 1);
    drop(conn);
    sluice_testkit::drop_pg_database(&url).await;
}

#[tokio::test]
async fn sigkill_between_insert_and_commit_then_restart_lands_each_event_once() {
    crash_and_restart(true).await;
}

#[tokio::test]
async fn sigkill_then_restart_lands_each_event_once_with_one_batch_per_partition() {
    crash_and_restart(false).await;
}

/// Drains a reference; then a worker (batches across partitions or not) inserts everything,
/// commits nothing and is killed; its restart must end with the reference's rows exactly.
async fn crash_and_restart(across: bool) {
    let topic = unique("fw_crash");
    let (db_ref, db) = (unique("fw_crash_ref"), unique("fw_crash_db"));
    let (group_ref, group) = (unique("fw_crash_ref"), unique("fw_crash_group"));
    let partitions = 3;
    create_topic(&topic, partitions).await;
    let config = std::env::temp_dir().join(format!("{}.toml", unique("sluice_crash")));
    // Small batches and no periodic commit: the first worker inserts many batches and
    // commits nothing before it is killed.
    let write_config = |max_rows: usize, commit_ms: u64| {
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"{}\"\ncommit_interval_ms = {commit_ms}\n\"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 1000\n[pipeline]\nbatch_max_rows = {max_rows}\nbatch_linger_ms = 50\nbatch_across_partitions = {across}\n",
                brokers()
            ),
        )
        .expect("write config");
    };
    write_config(5_000, 1_000);
    let env_of = |db: &str, group: &str| -> Vec<(String, String)> {
        vec![
            ("KAFKA_TOPICS".into(), topic.clone()),
            ("KAFKA_GROUP_ID".into(), group.into()),
            ("CLICKHOUSE_DB".into(), db.into()),
        ]
    };
    let (env_ref, env_crash) = (env_of(&db_ref, &group_ref), env_of(&db, &group));

    let events = 20_000usize;
    let out = sluice(
        &config,
        &as_refs(&env_ref),
        &[
            "generate",
            "--events",
            &events.to_string(),
            "--partitions",
            &partitions.to_string(),
            "--topic",
            &topic,
            "--seed",
            "11",
        ],
    );
    assert!(
        out.status.success(),
        "generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for env in [&env_ref, &env_crash] {
        let out = sluice(&config, &as_refs(env), &["migrate"]);
        assert!(
            out.status.success(),
            "migrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The reference: one clean drain into its own database.
    let out = sluice(&config, &as_refs(&env_ref), &["run", "--drain"]);
    assert!(
        out.status.success(),
        "reference run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = table_digests(&db_ref).await;
    let total_rows: u64 = reference.iter().map(|(_, n, _)| n).sum();
    assert!(
        total_rows as usize > events,
        "client-lifecycle writes two rows"
    );

    // The first worker: batches of at most 700 rows, commits only every hour.
    write_config(700, 3_600_000);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("LOG_LEVEL", "warn")
        .env("ENABLE_HEALTH_ENDPOINT", "false")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in &env_crash {
        cmd.env(k, v);
    }
    let mut worker = cmd.spawn().expect("spawn worker");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let rows: u64 = table_digests(&db).await.iter().map(|(_, n, _)| n).sum();
        if rows >= total_rows {
            assert_eq!(rows, total_rows, "no row twice before the crash");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "first worker inserted only {rows} of {total_rows} rows"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SIGKILL: no flush, no commit.
    worker.kill().expect("kill");
    worker.wait().expect("reap");
    assert!(
        committed_offsets(&group, &topic, partitions)
            .values()
            .all(|&o| o <= 0),
        "nothing was committed before the crash"
    );

    // The restart re-reads everything, polls and batches differently (larger batches), and
    // must cut the already-inserted batches along the recorded spans.
    write_config(5_000, 1_000);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["run", "--drain", "--config"])
        .arg(&config)
        .env("LOG_LEVEL", "info")
        .env("ENABLE_HEALTH_ENDPOINT", "false");
    for (k, v) in &env_crash {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("restart");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restart: {log}");
    assert_eq!(
        table_digests(&db).await,
        reference,
        "each event exactly once"
    );
    assert!(
        log.contains("cutting redelivered records along recorded spans"),
        "the restart replayed recorded spans: {log}"
    );
    // Batches across partitions are not cut again: the one worker gets all their spans back
    // and rebuilds each batch whole, inserted under its token again.
    assert_eq!(
        log.contains("rebuilt a batch cut across partitions from its redelivered spans"),
        across,
        "rebuilt batches only when batches were cut across partitions: {log}"
    );
    assert!(
        !log.contains("wrote the rows of batches that had not landed"),
        "no batch's spans went on their own: {log}"
    );
    let committed: i64 = committed_offsets(&group, &topic, partitions).values().sum();
    assert_eq!(committed, events as i64, "committed to the end");
    let _ = std::fs::remove_file(&config);
}

/// No ClickHouse cluster (nor Keeper) runs here: the cluster DDL is checked by the real
/// server's parser (`formatQuery`), and its use against a server without that cluster must
/// fail at once, naming the cluster, before creating anything.
#[tokio::test]
async fn migrate_cluster_ddl_is_valid_clickhouse_and_a_missing_cluster_fails_naming_it() {
    let db = unique("fw_cluster_db");
    let config = common::config_path("sluice_cluster");
    common::write_config(&config, 6000, "", "");
    let env = [("CLICKHOUSE_DB", db.as_str())];
    let out = sluice(
        &config,
        &env,
        &["migrate", "--cluster", "analytics", "--dry-run"],
    );
    common::assert_ok("migrate --dry-run", &out);
    let ddl = String::from_utf8_lossy(&out.stdout).into_owned();
    let statements: Vec<String> = ddl
        .split(";\n")
        .map(|s| {
            s.lines()
                .filter(|l| !l.starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|s| !s.trim().is_empty())
        .collect();
    let client = common::clickhouse("default");
    let (mut replicated, mut distributed) = (0, 0);
    for stmt in &statements {
        let formatted: String = client
            .query("SELECT formatQuery(?)")
            .bind(stmt)
            .fetch_one()
            .await
            .unwrap_or_else(|e| panic!("ClickHouse refuses {stmt}: {e}"));
        assert!(
            formatted.contains(&db) && formatted.contains("ON CLUSTER analytics"),
            "{formatted}"
        );
        replicated += formatted.contains("ENGINE = Replicated") as usize;
        distributed += formatted.contains("ENGINE = Distributed(analytics") as usize;
    }
    // Eleven tables (the landings among them), each local and distributed, and the migration
    // ledger.
    assert_eq!((replicated, distributed), (12, 11), "{ddl}");

    let out = sluice(&config, &env, &["migrate", "--cluster", "nosuch"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'nosuch'") && err.contains("CLUSTER_DOESNT_EXIST"),
        "{err}"
    );
    let created: u64 = client
        .query("SELECT count() FROM system.databases WHERE name = ?")
        .bind(&db)
        .fetch_one()
        .await
        .expect("databases");
    assert_eq!(created, 0, "nothing is created without the cluster");
}
