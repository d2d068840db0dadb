//! TLS to all three services: the worker reaches Kafka (`security.protocol = ssl`) and
//! ClickHouse (`https://` with `clickhouse.ca_file`) through TLS-terminating proxies that
//! present a test certificate, and PostgreSQL with `sslmode=verify-ca` against the server's own
//! certificate. The run lands exactly what the same records land over plain connections, and
//! `validate` refuses each service when its CA is wrong (so the handshakes are verified).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use common::{
    TABLES, as_refs, assert_ok, clickhouse, config_path, sluice, table_digests, write_config,
};
use sluice_testkit::net::{PrivateBroker, TcpProxy, free_addr};
use sluice_testkit::{create_pg_database, drop_pg_database, unique};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls")).join(name)
}

/// The certificate file PostgreSQL serves (it must have `ssl = on`).
async fn postgres_certificate(url: &str) -> String {
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    let (ssl,): (String,) = sqlx::query_as("SHOW ssl")
        .fetch_one(&pool)
        .await
        .expect("ssl");
    assert_eq!(ssl, "on", "this test needs PostgreSQL with ssl = on");
    let (file,): (String,) = sqlx::query_as("SHOW ssl_cert_file")
        .fetch_one(&pool)
        .await
        .expect("ssl_cert_file");
    pool.close().await;
    file
}

async fn stream_analytics_rows(url: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM stream_analytics")
        .fetch_one(&pool)
        .await
        .expect("count");
    pool.close().await;
    n
}

/// Generates 3,000 events (of the hour before `until`) into a new topic, migrates and drains
/// them with `env`.
fn generate_and_drain(config: &std::path::Path, env: &[(String, String)], until: &str) {
    let env = as_refs(env);
    assert_ok("migrate", &sluice(config, &env, &["migrate"]));
    let topic = env
        .iter()
        .find(|(k, _)| *k == "KAFKA_TOPICS")
        .expect("topic")
        .1;
    let args = [
        "generate",
        "--events",
        "3000",
        "--partitions",
        "2",
        "--topic",
        topic,
        "--seed",
        "11",
        "--until",
        until,
    ];
    assert_ok("generate", &sluice(config, &env, &args));
    assert_ok("run --drain", &sluice(config, &env, &["run", "--drain"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_clickhouse_and_postgres_over_verified_tls() {
    let (cert, key) = (fixture("cert.pem"), fixture("key.pem"));
    let (broker, kafka_tls, clickhouse_tls) = (free_addr(), free_addr(), free_addr());
    let _broker = PrivateBroker::start(broker, kafka_tls);
    let _kafka = TcpProxy::start_tls(kafka_tls, broker, &cert, &key);
    let clickhouse_plain: SocketAddr = "127.0.0.1:8123".parse().expect("addr");
    let _clickhouse = TcpProxy::start_tls(clickhouse_tls, clickhouse_plain, &cert, &key);

    let plain_pg = create_pg_database("sluice_tls").await;
    let pg_cert = postgres_certificate(&plain_pg).await;
    let pg_tls = |root: &str| format!("{plain_pg}?sslmode=verify-ca&sslrootcert={root}");
    let config = config_path("sluice_tls");
    let tls_kafka = format!(
        "\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"{}\"",
        cert.display()
    );
    let tls_clickhouse = format!("[clickhouse]\nca_file = \"{}\"", cert.display());
    write_config(&config, 6000, &tls_kafka, &tls_clickhouse);
    let db = unique("tls_db");
    let env = vec![
        ("KAFKA_BROKERS".to_owned(), kafka_tls.to_string()),
        ("KAFKA_TOPICS".to_owned(), unique("tls_topic")),
        ("KAFKA_GROUP_ID".to_owned(), unique("tls_group")),
        (
            "CLICKHOUSE_HOST".to_owned(),
            format!("https://{clickhouse_tls}"),
        ),
        ("CLICKHOUSE_DB".to_owned(), db.clone()),
        ("DATABASE_URL".to_owned(), pg_tls(&pg_cert)),
    ];
    // Validate checks the tables too: migrate first.
    assert_ok(
        "migrate over TLS",
        &sluice(&config, &as_refs(&env), &["migrate"]),
    );
    let out = sluice(&config, &as_refs(&env), &["validate"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_ok("validate over TLS", &out);
    assert!(
        text.contains("kafka      ok")
            && text.contains("clickhouse ok")
            && text.contains("postgres   ok")
            && text.contains("table stream_events ok"),
        "{text}"
    );
    let until = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        / 60
        * 60)
        .to_string();
    generate_and_drain(&config, &env, &until);

    // The same records over plain connections, for comparison.
    let plain_config = config_path("sluice_plain");
    write_config(&plain_config, 6000, "", "");
    let reference_pg = create_pg_database("sluice_plain").await;
    let reference_db = unique("plain_db");
    let plain_env = vec![
        ("KAFKA_TOPICS".to_owned(), unique("plain_topic")),
        ("KAFKA_GROUP_ID".to_owned(), unique("plain_group")),
        ("CLICKHOUSE_DB".to_owned(), reference_db.clone()),
        ("DATABASE_URL".to_owned(), reference_pg.clone()),
    ];
    generate_and_drain(&plain_config, &plain_env, &until);
    let got = table_digests(&db).await;
    assert_eq!(
        got,
        table_digests(&reference_db).await,
        "same rows over TLS"
    );
    assert_eq!(got.len(), TABLES.len());
    assert!(
        got.iter().all(|(_, n, _)| *n > 0),
        "every table has rows: {got:?}"
    );
    let usage = |db: String| async move {
        clickhouse(&db)
            .query("SELECT count(), sum(usage_value) FROM usage_records")
            .fetch_one::<(u64, f64)>()
            .await
            .expect("usage")
    };
    assert_eq!(usage(db.clone()).await, usage(reference_db.clone()).await);
    let states = stream_analytics_rows(&plain_pg).await;
    assert!(states > 0);
    assert_eq!(states, stream_analytics_rows(&reference_pg).await);

    // A wrong CA fails each handshake: the certificates are checked, not just accepted.
    let wrong = fixture("cert.pem");
    let mut bad = env.clone();
    bad[5].1 = pg_tls(&wrong.display().to_string());
    let unverified_config = config_path("sluice_tls_bad");
    write_config(
        &unverified_config,
        6000,
        "\"security.protocol\" = \"ssl\"",
        "",
    );
    let out = sluice(&unverified_config, &as_refs(&bad), &["validate"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    for service in ["kafka", "clickhouse", "postgres"] {
        assert!(
            text.contains(&format!("{service:<10} FAIL")),
            "{service} refused: {text}"
        );
    }

    drop_pg_database(&plain_pg).await;
    drop_pg_database(&reference_pg).await;
    for c in [config, plain_config, unverified_config] {
        let _ = std::fs::remove_file(c);
    }
}
