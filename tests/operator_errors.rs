//! Operators' mistakes: bad configuration stops the worker at start naming the key; services
//! that are not reachable at start are waited for (clear logs, `/ready` false naming them);
//! a ClickHouse table with a wrong column type is refused naming the column; and secrets never
//! reach logs (even at debug level), `/metrics`, `/ready` or error messages.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{as_refs, assert_ok, command, config_path, sigterm, sluice, total_rows, write_config};
use sluice_testkit::net::{TcpProxy, free_addr};
use sluice_testkit::{
    committed_offsets, create_pg_database, create_topic, drop_pg_database, try_http_get, unique,
};

fn stderr_of(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn bad_configuration_stops_the_worker_at_start_naming_the_key() {
    let cases: [(&str, &str, &str); 6] = [
        (
            "[pipeline]\nbatch_max_rows = 0",
            "",
            "pipeline.batch_max_rows",
        ),
        ("[pipeline]\nbatch_max_rowz = 5", "", "batch_max_rowz"),
        (
            "[pipeline]\nbatch_linger_ms = \"soon\"",
            "",
            "batch_linger_ms",
        ),
        (
            "[clickhouse]\nca_file = \"/nonexistent/ca.pem\"",
            "",
            "clickhouse.ca_file",
        ),
        ("", "DATABASE_URL=mysql://u:p@h/db", "DATABASE_URL"),
        ("", "ENABLE_HEALTH_ENDPOINT=maybe", "ENABLE_HEALTH_ENDPOINT"),
    ];
    for (toml, env, key) in cases {
        let path = config_path("sluice_bad");
        std::fs::write(
            &path,
            format!("[kafka]\nbrokers = \"127.0.0.1:9\"\n{toml}\n"),
        )
        .expect("write");
        let env: Vec<(&str, &str)> = env.split_once('=').into_iter().collect();
        let started = Instant::now();
        let out = sluice(&path, &env, &["run"]);
        let text = stderr_of(&out);
        assert!(!out.status.success(), "{key}: must not start: {text}");
        assert!(text.contains(key), "the message names {key}: {text}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{key}: fails at once"
        );
        let _ = std::fs::remove_file(path);
    }
    let out = sluice(
        std::path::Path::new("/nonexistent/sluice.toml"),
        &[],
        &["run"],
    );
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("/nonexistent/sluice.toml"));
}

#[tokio::test]
async fn a_clickhouse_column_of_the_wrong_type_is_refused_at_start() {
    let db = unique("wrong_type_db");
    let config = config_path("sluice_wrong");
    write_config(&config, 6000, "", "");
    let env = [
        ("CLICKHOUSE_DB", db.as_str()),
        ("KAFKA_TOPICS", "wrong_type_unused"),
        ("DATABASE_URL", ""),
    ];
    assert_ok("migrate", &sluice(&config, &env, &["migrate"]));
    common::clickhouse(&db)
        .query("ALTER TABLE node_metrics MODIFY COLUMN stream_count String")
        .execute()
        .await
        .expect("alter");
    let out = sluice(&config, &env, &["run", "--drain"]);
    let text = stderr_of(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("node_metrics") && text.contains("stream_count"),
        "{text}"
    );
    let _ = std::fs::remove_file(config);
}

/// Waits until `/ready` is false naming `service` and the log says the worker retries it;
/// returns the `/ready` body.
async fn waiting_for(
    worker: &mut std::process::Child,
    health: SocketAddr,
    log: &std::path::Path,
    service: &str,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            worker.try_wait().expect("status").is_none(),
            "the worker waits"
        );
        let log_text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some((503, body)) = try_http_get(health, "/ready").await
            && body.contains(&format!("{service} failing"))
            && log_text.contains(&format!(
                "not reachable at start; retrying service=\"{service}\""
            ))
        {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {service}: {log_text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const PG_SECRET: &str = "pg-Secret-93f1";
const KAFKA_SECRET: &str = "kafka-Secret-4e2a";
const CH_SECRET: &str = "ch-Secret-77c0";

fn assert_no_secret(what: &str, text: &str) {
    for secret in [PG_SECRET, KAFKA_SECRET, CH_SECRET] {
        assert!(!text.contains(secret), "{what} shows a secret: {text}");
    }
}

/// ClickHouse, PostgreSQL and the broker all unreachable when the worker starts (their
/// addresses point at proxies that are not running yet): it waits for each with `/ready`
/// false naming it and a log line per retry, then works once they come up. The run is at
/// debug level (librdkafka's config dump too) with passwords set, and no output shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_services_at_start_are_waited_for_and_secrets_stay_hidden() {
    let (clickhouse, postgres, kafka, health) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let topic = unique("late_services");
    create_topic(&topic, 2).await;
    let pg = create_pg_database("sluice_late").await;
    let db = unique("late_db");
    let group = unique("late_group");
    // The local PostgreSQL trusts loopback, so the password is carried but not needed.
    let pg_via_proxy = pg
        .replacen("sluice:sluice@", &format!("sluice:{PG_SECRET}@"), 1)
        .replacen("127.0.0.1:5432", &postgres.to_string(), 1);
    assert_ne!(pg_via_proxy, pg, "the URL was rewritten");
    let config = config_path("sluice_late");
    write_config(
        &config,
        6000,
        &format!(
            "\"sasl.password\" = \"{KAFKA_SECRET}\"\n\"sasl.username\" = \"u\"\n\"debug\" = \"conf,generic\""
        ),
        "batch_linger_ms = 100\n[frameworks]\nusage_max_open_secs = 5",
    );
    let env = [
        ("KAFKA_BROKERS", kafka.to_string()),
        ("KAFKA_TOPICS", topic.clone()),
        ("KAFKA_GROUP_ID", group.clone()),
        ("CLICKHOUSE_HOST", clickhouse.to_string()),
        ("CLICKHOUSE_DB", db.clone()),
        ("DATABASE_URL", pg_via_proxy.clone()),
        ("HEALTH_PORT", health.port().to_string()),
    ];
    let env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let log = std::env::temp_dir().join(format!("{}.log", unique("late_worker")));
    let mut worker = command(&config, &as_refs(&env), &["run"], "debug")
        .env("ENABLE_HEALTH_ENDPOINT", "true")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("worker");
    let mut texts = Vec::new();

    texts.push(waiting_for(&mut worker, health, &log, "clickhouse").await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        worker.try_wait().expect("status").is_none(),
        "still waiting after 3 s"
    );
    let _clickhouse = TcpProxy::start(clickhouse, "127.0.0.1:8123".parse().expect("addr"));
    // Nothing migrated the ClickHouse database: the worker says so and stops.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = worker.try_wait().expect("status") {
            break status;
        }
        assert!(Instant::now() < deadline, "refuses the unmigrated database");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!status.success());
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log_text.contains("(run `migrate`)"),
        "names the fix: {log_text}"
    );

    // Migrated, and PostgreSQL and the broker still away.
    let direct: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| match k.as_str() {
            "DATABASE_URL" => (k.clone(), pg.clone()),
            "KAFKA_BROKERS" => (k.clone(), sluice_testkit::brokers()),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    assert_ok("migrate", &sluice(&config, &as_refs(&direct), &["migrate"]));
    let mut worker2 = command(&config, &as_refs(&env), &["run"], "debug")
        .env("ENABLE_HEALTH_ENDPOINT", "true")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("worker");
    std::mem::swap(&mut worker, &mut worker2);
    let _ = worker2.wait();
    texts.push(waiting_for(&mut worker, health, &log, "postgres").await);
    let _postgres = TcpProxy::start(postgres, "127.0.0.1:5432".parse().expect("addr"));
    texts.push(waiting_for(&mut worker, health, &log, "kafka").await);
    let broker: SocketAddr = sluice_testkit::brokers().parse().expect("broker address");
    let _kafka = TcpProxy::start(kafka, broker);

    // Everything up: ready, and records flow.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, _)) = try_http_get(health, "/ready").await {
            break;
        }
        assert!(Instant::now() < deadline, "ready once every service is up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_ok(
        "generate",
        &sluice(
            &config,
            &as_refs(&direct),
            &["generate", "--events", "500", "--topic", &topic],
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed_offsets(&group, &topic, 2).values().sum::<i64>() < 500 {
        assert!(Instant::now() < deadline, "the 500 events are committed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(total_rows(&db).await > 0);
    let (_, metrics) = try_http_get(health, "/metrics").await.expect("metrics");
    texts.push(metrics);
    sigterm(worker.id());
    let status = sluice_testkit::exit_within(&mut worker, Duration::from_secs(60), "the worker");
    assert!(status.success(), "{status}");
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log_text.contains("DEBUG"),
        "the worker logged at debug level"
    );
    texts.push(log_text);
    for text in &texts {
        assert_no_secret("worker output", text);
    }

    // A wrong ClickHouse password: refused at start, and the message does not repeat it.
    let mut wrong = direct.clone();
    wrong.push(("CLICKHOUSE_PASSWORD".into(), CH_SECRET.into()));
    let out = sluice(&config, &as_refs(&wrong), &["run", "--drain"]);
    let text = stderr_of(&out);
    assert!(!out.status.success(), "{text}");
    assert_no_secret("the error", &text);
    let out = sluice(&config, &as_refs(&wrong), &["validate"]);
    assert_no_secret("validate", &stderr_of(&out));

    drop_pg_database(&pg).await;
    let _ = std::fs::remove_file(config);
    let _ = std::fs::remove_file(log);
}
