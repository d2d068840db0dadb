//! The start-up checks of a target table against the real ClickHouse: a table that would take
//! a batch inserted twice (no deduplication window, a materialised view into a table without
//! one, an engine that does not deduplicate) or whose rows the server makes up in part (a
//! column left to `now()`) is refused, naming what is wrong; a sound one passes.

use clickhouse::Client;
use sluice_sinks::{ClickHouseSink, LANDINGS_TABLE, landing_view_ddl};

#[derive(clickhouse::Row, serde::Serialize, Default)]
struct Order {
    id: u64,
    cents: i64,
}

/// A fresh database with the landings table and `statements` run in it.
async fn database(statements: &[&str]) -> Client {
    let url = std::env::var("CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into());
    let db = format!(
        "checks_{}",
        std::process::id() as u64 * 1000 + rand_suffix()
    );
    let root = Client::default().with_url(url);
    root.query(&format!("CREATE DATABASE {db}"))
        .execute()
        .await
        .expect("database");
    let client = root.with_database(&db);
    let landings = format!(
        "CREATE TABLE {LANDINGS_TABLE} (target_table LowCardinality(String), token String, rows UInt64) \
         ENGINE = MergeTree ORDER BY (target_table, token) SETTINGS non_replicated_deduplication_window = 1000"
    );
    for stmt in std::iter::once(landings.as_str()).chain(statements.iter().copied()) {
        client
            .query(stmt)
            .execute()
            .await
            .unwrap_or_else(|e| panic!("{stmt}: {e}"));
    }
    client
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn refusal(client: &Client) -> String {
    let sink = ClickHouseSink::<Order>::new(client.clone(), "orders");
    let e = sink.check().await.expect_err("refused");
    assert!(!e.is_transient(), "{e}");
    e.to_string()
}

#[tokio::test]
async fn a_sound_table_passes_and_each_flaw_is_refused_by_name() {
    let view = landing_view_ddl("orders");
    // A column the row leaves out keeps a constant default; the view's table deduplicates.
    let ok = database(&[
        "CREATE TABLE orders (id UInt64, cents Int64, kind String DEFAULT 'order') \
         ENGINE = MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 100",
        &view,
        "CREATE TABLE totals (id UInt64, n UInt64) ENGINE = SummingMergeTree ORDER BY id \
         SETTINGS non_replicated_deduplication_window = 100",
        "CREATE MATERIALIZED VIEW totals_mv TO totals AS SELECT id, count() AS n FROM orders GROUP BY id",
    ])
    .await;
    ClickHouseSink::<Order>::new(ok.clone(), "orders")
        .check()
        .await
        .expect("a sound table and view pass");

    // A column left to `today()` would differ between a batch and its replay.
    let made_up = refusal(
        &database(&[
            "CREATE TABLE orders (id UInt64, cents Int64, day Date DEFAULT today()) \
             ENGINE = MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 100",
            &view,
        ])
        .await,
    )
    .await;
    assert!(
        made_up.contains("`day`") && made_up.contains("today()"),
        "{made_up}"
    );

    let no_window = refusal(
        &database(&[
            "CREATE TABLE orders (id UInt64, cents Int64) ENGINE = MergeTree ORDER BY id",
            &view,
        ])
        .await,
    )
    .await;
    assert!(
        no_window.contains("non_replicated_deduplication_window = 0")
            && no_window.contains("MODIFY SETTING"),
        "{no_window}"
    );

    let view_target = refusal(
        &database(&[
            "CREATE TABLE orders (id UInt64, cents Int64) ENGINE = MergeTree ORDER BY id \
             SETTINGS non_replicated_deduplication_window = 100",
            &view,
            "CREATE TABLE totals (id UInt64, n UInt64) ENGINE = SummingMergeTree ORDER BY id",
            "CREATE MATERIALIZED VIEW totals_mv TO totals AS SELECT id, count() AS n FROM orders GROUP BY id",
        ])
        .await,
    )
    .await;
    assert!(
        view_target.contains("`totals`") && view_target.contains("`totals_mv`"),
        "{view_target}"
    );

    let log = refusal(
        &database(&[
            "CREATE TABLE orders (id UInt64, cents Int64) ENGINE = Log",
            &view,
        ])
        .await,
    )
    .await;
    assert!(log.contains("engine Log"), "{log}");

    let no_view = refusal(
        &database(&[
            "CREATE TABLE orders (id UInt64, cents Int64) ENGINE = MergeTree ORDER BY id \
             SETTINGS non_replicated_deduplication_window = 100",
        ])
        .await,
    )
    .await;
    assert!(no_view.contains("sluice_landed_orders"), "{no_view}");

    let wrong_type = refusal(
        &database(&[
            "CREATE TABLE orders (id String, cents Int64) ENGINE = MergeTree ORDER BY id \
             SETTINGS non_replicated_deduplication_window = 100",
            &view,
        ])
        .await,
    )
    .await;
    assert!(
        wrong_type.contains("does not match the row type"),
        "{wrong_type}"
    );
}
