//! A `TableReducer` against the real PostgreSQL: its start-up check names a table a new key's
//! row cannot be inserted into (a NOT NULL column without a default, a missing column, a key
//! that is not unique), and a sound table folds events exactly as their keys' states say.

use serde::{Deserialize, Serialize};
use sluice_sinks::{Reducer, TableReducer};
use sqlx::Connection;

#[derive(Clone, Default, Serialize, Deserialize)]
struct Totals {
    views: i64,
    bytes: i64,
}

struct Pages;

impl TableReducer for Pages {
    type Event = (String, i64);
    type Key = String;
    type State = Totals;
    const TABLE: &'static str = "page_totals";
    const KEY: &'static str = "url";

    fn key(&self, e: &(String, i64)) -> String {
        e.0.clone()
    }

    fn fold(&self, t: &mut Totals, e: &(String, i64)) {
        t.views += 1;
        t.bytes += e.1;
    }
}

async fn check(conn: &mut sqlx::PgConnection, ddl: &str) -> Result<(), String> {
    sqlx::raw_sql(&format!("DROP TABLE IF EXISTS page_totals; {ddl}"))
        .execute(&mut *conn)
        .await
        .expect("ddl");
    Reducer::check(&Pages, conn)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_check_names_what_a_new_row_needs_and_a_sound_table_folds() {
    let url = sluice_testkit::create_pg_database("sluice_table_reducer").await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let e = check(&mut conn, "SELECT 1").await.expect_err("no table");
    assert!(e.contains("does not exist"), "{e}");
    let e = check(
        &mut conn,
        "CREATE TABLE page_totals (url TEXT PRIMARY KEY, views BIGINT NOT NULL, bytes BIGINT DEFAULT 0)",
    )
    .await
    .expect_err("views has no default");
    assert!(e.contains("`views` is NOT NULL without a DEFAULT"), "{e}");
    let e = check(
        &mut conn,
        "CREATE TABLE page_totals (url TEXT PRIMARY KEY, views BIGINT)",
    )
    .await
    .expect_err("no bytes");
    assert!(e.contains("no column `bytes`"), "{e}");
    let e = check(
        &mut conn,
        "CREATE TABLE page_totals (url TEXT, views BIGINT, bytes BIGINT)",
    )
    .await
    .expect_err("url not unique");
    assert!(e.contains("`url` is not its primary key or unique"), "{e}");

    check(
        &mut conn,
        "CREATE TABLE page_totals (url TEXT PRIMARY KEY, views BIGINT NOT NULL DEFAULT 0, bytes BIGINT)",
    )
    .await
    .expect("sound");
    // Two batches: the second loads what the first stored.
    for batch in [
        vec![("/a", 10), ("/b", 5), ("/a", 1)],
        vec![("/a", 100), ("/c", 7)],
    ] {
        let events: Vec<(String, i64)> = batch.iter().map(|(u, b)| (u.to_string(), *b)).collect();
        let mut keys: Vec<String> = events.iter().map(|e| e.0.clone()).collect();
        keys.sort();
        keys.dedup();
        let mut tx = conn.begin().await.expect("begin");
        let loaded = Reducer::load(&Pages, &mut tx, &keys).await.expect("load");
        let mut states: std::collections::BTreeMap<String, Totals> = loaded.into_iter().collect();
        sluice_sinks::coalesce(&Pages, &mut states, &events);
        let states: Vec<(String, Totals)> = states.into_iter().collect();
        Reducer::store(&Pages, &mut tx, &states)
            .await
            .expect("store");
        tx.commit().await.expect("commit");
    }
    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT url, views, bytes FROM page_totals ORDER BY url")
            .fetch_all(&mut conn)
            .await
            .expect("rows");
    assert_eq!(
        rows,
        [
            ("/a".to_owned(), 3, 111),
            ("/b".to_owned(), 1, 5),
            ("/c".to_owned(), 1, 7)
        ]
    );
    conn.close().await.expect("close");
    sluice_testkit::drop_pg_database(&url).await;
}
