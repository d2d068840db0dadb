//! The row check after an unanswered insert, on the live four-node cluster of
//! `scripts/services.sh up cluster` (2 shards x 2 replicas of plain `MergeTree` tables behind a
//! `Distributed` one, the sharded layout): it compares each replica with the rows the sharding
//! key sends to its shard and inserts what a replica lacks there alone, so a row lost on one
//! replica is not doubled on the other, and two equal rows of a batch stay two.
//!
//! Runs only when `SLUICE_CLUSTER=up` (`scripts/test.sh` starts the cluster when the machine has
//! the memory).

use clickhouse::Client;
use sluice_sinks::{ClickHouseSink, Layout};

const NODES: [u16; 4] = [8201, 8202, 8203, 8204];

#[derive(clickhouse::Row, serde::Serialize, Default, Clone)]
struct Item {
    k: u64,
    v: String,
}

fn node(port: u16) -> Client {
    Client::default().with_url(format!("http://127.0.0.1:{port}"))
}

/// Every node's `(rows, digest)` of `t_local`.
async fn replicas(db: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for port in NODES {
        out.push(
            node(port)
                .with_database(db)
                .query("SELECT count(), sum(cityHash64(k, v)) FROM t_local")
                .fetch_one()
                .await
                .expect("replica"),
        );
    }
    out
}

#[tokio::test]
async fn the_row_check_repairs_each_replica_alone() {
    if std::env::var("SLUICE_CLUSTER").map_or(true, |v| v != "up") {
        eprintln!("skipped: the ClickHouse cluster is not up (SLUICE_CLUSTER=up)");
        return;
    }
    let db = format!("cluster_check_{}", std::process::id());
    for port in NODES {
        let n = node(port);
        for stmt in [
            format!("DROP DATABASE IF EXISTS {db} SYNC"),
            format!("CREATE DATABASE {db}"),
            format!(
                "CREATE TABLE {db}.t_local (k UInt64, v String) ENGINE = MergeTree ORDER BY k \
                 SETTINGS non_replicated_deduplication_window = 100"
            ),
            format!(
                "CREATE TABLE {db}.t AS {db}.t_local \
                 ENGINE = Distributed(sluice_cluster, {db}, t_local, cityHash64(k))"
            ),
        ] {
            n.query(&stmt).execute().await.expect("ddl");
        }
    }
    let sink = ClickHouseSink::<Item>::new(node(NODES[0]).with_database(&db), "t")
        .cluster("sluice_cluster", Layout::Sharded);
    // 200 rows, and one of them twice: a batch's equal rows are two rows.
    let mut rows: Vec<Item> = (0..200)
        .map(|k| Item {
            k,
            v: format!("v{k}"),
        })
        .collect();
    rows.push(rows[7].clone());

    // Nothing anywhere: every replica gets its shard's rows.
    let restored = sink.restore_missing(&rows, "t|check").await.expect("check");
    assert_eq!(restored, 2 * rows.len() as u64, "each row on both replicas");
    let all = replicas(&db).await;
    assert_eq!(all[0], all[1], "shard 1's replicas agree");
    assert_eq!(all[2], all[3], "shard 2's replicas agree");
    assert_eq!(all[0].0 + all[2].0, rows.len() as u64, "{all:?}");
    assert!(all[0].0 > 50 && all[2].0 > 50, "rows split by key: {all:?}");

    // Rows lost on node 4 only.
    node(NODES[3])
        .with_database(&db)
        .query("DELETE FROM t_local WHERE k % 3 = 0")
        .execute()
        .await
        .expect("delete on node 4");
    let lost = all[3].0 - replicas(&db).await[3].0;
    assert!(lost > 10, "{lost} rows deleted on node 4");
    let restored = sink.restore_missing(&rows, "t|check").await.expect("check");
    assert_eq!(restored, lost, "only node 4's missing rows are inserted");
    assert_eq!(
        replicas(&db).await,
        all,
        "every replica as before, none doubled"
    );

    // Run again: nothing is missing.
    assert_eq!(
        sink.restore_missing(&rows, "t|check").await.expect("check"),
        0
    );
    let through: u64 = node(NODES[0])
        .with_database(&db)
        .query("SELECT count() FROM t")
        .fetch_one()
        .await
        .expect("distributed count");
    assert_eq!(through, rows.len() as u64);
    for port in NODES {
        let _ = node(port)
            .query(&format!("DROP DATABASE IF EXISTS {db} SYNC"))
            .execute()
            .await;
    }
}
