//! The four-node ClickHouse cluster of `scripts/services.sh up cluster` (2 shards x 2
//! replicas of plain MergeTree tables behind a Distributed table) does what the cluster layout
//! relies on: a foreground Distributed insert splits rows by the sharding key and writes both
//! replicas of each shard; the same `insert_deduplication_token` sent again stores nothing
//! more on any node; with one replica down the insert fails, and its retry with the same token
//! after the replica is back writes the rows once everywhere.
//!
//! Runs only when `SLUICE_CLUSTER=up` (`scripts/test.sh` starts the cluster and sets it when the
//! machine has the memory, and says so when it does not). Its own test binary: it kills a node.

use std::process::Command;

use sluice_testkit::services;

const NODES: [u16; 4] = [8201, 8202, 8203, 8204];

fn cluster_up() -> bool {
    let up = std::env::var("SLUICE_CLUSTER").is_ok_and(|v| v == "up");
    if !up {
        eprintln!(
            "skipped: the ClickHouse cluster is not up (scripts/services.sh up cluster; SLUICE_CLUSTER=up)"
        );
    }
    up
}

/// Starts every node again even when the test fails half-way.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        services(&["up", "cluster"]);
    }
}

/// `sql` on the node at `port` (`params` as URL settings); the body, or the error text.
fn query(port: u16, params: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}/?{params}"))
        .args(["--data-binary", sql])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    if out.status.success() && code == "200" {
        Ok(body.trim().to_owned())
    } else {
        Err(format!(
            "{code} {body} {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn counts(db: &str) -> Vec<u64> {
    NODES
        .iter()
        .map(|&p| {
            query(p, &format!("database={db}"), "SELECT count() FROM t_local")
                .expect("count")
                .parse()
                .expect("number")
        })
        .collect()
}

#[test]
fn distributed_inserts_split_by_key_write_both_replicas_and_deduplicate_by_token() {
    if !cluster_up() {
        return;
    }
    let _restart = Restart;
    let db = format!("cluster_{}", std::process::id());
    for &p in &NODES {
        query(p, "", &format!("CREATE DATABASE {db}")).expect("database");
        query(
            p,
            &format!("database={db}"),
            "CREATE TABLE t_local (k UInt64, v String) ENGINE = MergeTree ORDER BY k \
             SETTINGS non_replicated_deduplication_window = 1000",
        )
        .expect("local table");
        query(
            p,
            &format!("database={db}"),
            &format!(
                "CREATE TABLE t AS t_local ENGINE = Distributed(sluice_cluster, {db}, t_local, cityHash64(k))"
            ),
        )
        .expect("distributed table");
    }
    let insert = |token: &str, from: u64| {
        query(
            8201,
            &format!(
                "database={db}&distributed_foreground_insert=1&insert_deduplication_token={token}"
            ),
            &format!("INSERT INTO t SELECT number, toString(number) FROM numbers({from}, 1000)"),
        )
    };
    insert("first", 0).expect("insert");
    insert("first", 0).expect("the same insert again");
    let after_first = counts(&db);
    assert_eq!(after_first[0], after_first[1], "both replicas of shard 1");
    assert_eq!(after_first[2], after_first[3], "both replicas of shard 2");
    assert_eq!(
        after_first[0] + after_first[2],
        1000,
        "each row on one shard, once"
    );
    assert!(
        after_first[0] > 300 && after_first[2] > 300,
        "split by the key: {after_first:?}"
    );
    let shard_of =
        |k: u64| query(8201, "", &format!("SELECT cityHash64(toUInt64({k})) % 2")).expect("hash");
    let on_node3: u64 = query(
        8203,
        &format!("database={db}"),
        "SELECT min(k) FROM t_local",
    )
    .expect("min")
    .parse()
    .expect("number");
    assert_eq!(
        shard_of(on_node3),
        "1",
        "shard 2 holds the keys whose hash is odd"
    );

    // A replica down: the insert fails; its retry with the same token, after the replica is
    // back, writes the rows once on every node.
    services(&["kill", "cluster-2"]);
    assert!(
        insert("second", 1000).is_err(),
        "an insert with a replica down fails"
    );
    services(&["up", "cluster-2"]);
    insert("second", 1000).expect("the retry");
    insert("second", 1000).expect("and once more");
    let after = counts(&db);
    assert_eq!(after[0], after[1], "shard 1's replicas agree: {after:?}");
    assert_eq!(after[2], after[3], "shard 2's replicas agree: {after:?}");
    assert_eq!(after[0] + after[2], 2000, "every row once: {after:?}");
    let total: String = query(
        8204,
        &format!("database={db}"),
        "SELECT count(), uniqExact(k) FROM t",
    )
    .expect("through Distributed");
    assert_eq!(total, "2000\t2000");
    for &p in &NODES {
        query(p, "", &format!("DROP DATABASE {db}")).expect("drop");
    }
}
