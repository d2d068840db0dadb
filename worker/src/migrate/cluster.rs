//! The ClickHouse cluster variants of the DDL: every `MergeTree` table of a migration becomes a
//! table `<name>_local` on each node plus a `Distributed` table `<name>` in front of it; the
//! worker keeps writing and reading `<name>`. In the [`Layout::Replicated`] layout the local
//! tables are `Replicated…MergeTree` and every statement runs `ON CLUSTER`; in the
//! [`Layout::Sharded`] layout they stay plain `…MergeTree` (the `Distributed` table writes
//! each replica, which deduplicates on its own) and the statements run on each node in turn.
//!
//! The sharding key is a hash of the table's `ORDER BY` columns, never `rand()`: a retried or
//! replayed insert must split into the same per-shard blocks, so that each shard sees the same
//! block under the same `insert_deduplication_token` and drops it.

use sluice_sinks::Layout;
use thiserror::Error;

use crate::config::{ClickHouseConfig, invalid};
use crate::services;

/// A statement of a migration the cluster rewrite does not know how to replicate.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("cannot derive the cluster DDL of `{statement}`: {reason}")]
pub struct ClusterDdlError {
    /// The statement's first line.
    pub statement: String,
    /// What is missing or unexpected.
    pub reason: &'static str,
}

/// Names the cluster and database the DDL is generated for.
#[derive(Debug, Clone, Copy)]
pub struct ClusterTarget<'a> {
    /// A cluster of the servers' `remote_servers` configuration.
    pub cluster: &'a str,
    /// The database every table lives in (on every node).
    pub database: &'a str,
    /// How the local tables keep their replicas.
    pub layout: Layout,
}

/// Suffix of the per-node replicated tables behind the `Distributed` ones.
pub const LOCAL_SUFFIX: &str = "_local";

impl ClusterTarget<'_> {
    /// ` ON CLUSTER c` where the DDL is distributed by ClickHouse; empty where it runs on each
    /// node.
    fn on_cluster(&self) -> String {
        match self.layout {
            Layout::Replicated => format!(" ON CLUSTER {}", quote(self.cluster)),
            Layout::Sharded => String::new(),
        }
    }

    /// `CREATE DATABASE` (`ON CLUSTER` when replicated).
    pub fn create_database(&self) -> String {
        format!(
            "CREATE DATABASE IF NOT EXISTS {}{}",
            quote(self.database),
            self.on_cluster()
        )
    }

    /// The migrations ledger. Replicated: one replica group across the whole cluster (not per
    /// shard), so that `migrate` sees the same history whichever node it reaches. Sharded:
    /// one plain table per node, as on a single server, since each node gets the DDL on its
    /// own (a node that missed a `migrate` catches up on the next).
    pub fn migrations_table(&self) -> String {
        if self.layout == Layout::Sharded {
            return super::single_server_ledger(self.database);
        }
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{ledger} ON CLUSTER {c} \
             (scope LowCardinality(String), version UInt32, name String, applied_at DateTime DEFAULT now()) \
             ENGINE = ReplicatedReplacingMergeTree('/clickhouse/sluice/{path}/{ledger}', '{{shard}}-{{replica}}') \
             ORDER BY (scope, version)",
            db = quote(self.database),
            c = quote(self.cluster),
            path = self.database,
            ledger = super::LEDGER,
        )
    }

    /// Rewrites one statement of a single-server migration into its cluster statements.
    pub fn rewrite(&self, statement: &str) -> Result<Vec<String>, ClusterDdlError> {
        let s = statement.trim();
        let fail = |reason| ClusterDdlError {
            statement: s.lines().next().unwrap_or_default().to_owned(),
            reason,
        };
        if let Some(rest) = strip_words(s, &["CREATE", "TABLE", "IF", "NOT", "EXISTS"]) {
            self.table(rest).ok_or_else(|| {
                fail("expected `name (columns) ENGINE = [Aggregating|Replacing|Summing]MergeTree … ORDER BY …`")
            })
        } else if let Some(rest) = strip_words(
            s,
            &["CREATE", "MATERIALIZED", "VIEW", "IF", "NOT", "EXISTS"],
        ) {
            self.materialized_view(rest)
                .ok_or_else(|| fail("expected `name TO target AS SELECT … FROM one_table …`"))
        } else if let Some(rest) = strip_words(s, &["CREATE", "VIEW", "IF", "NOT", "EXISTS"]) {
            let (name, body) = split_ident(rest).ok_or_else(|| fail("expected a view name"))?;
            Ok(vec![format!(
                "CREATE VIEW IF NOT EXISTS {}{} {}",
                self.qualified(name, ""),
                self.on_cluster(),
                self.qualify_from(body, "")
                    .ok_or_else(|| fail("expected one `FROM table`"))?
            )])
        } else if let Some(rest) = strip_words(s, &["ALTER", "TABLE"]) {
            let (name, action) = split_ident(rest).ok_or_else(|| fail("expected a table name"))?;
            // The local tables hold the data; the Distributed ones must show the same columns.
            Ok([LOCAL_SUFFIX, ""]
                .iter()
                .map(|suffix| {
                    format!(
                        "ALTER TABLE {}{} {action}",
                        self.qualified(name, suffix),
                        self.on_cluster()
                    )
                })
                .collect())
        } else {
            Err(fail(
                "only CREATE TABLE, CREATE [MATERIALIZED] VIEW and ALTER TABLE are known",
            ))
        }
    }

    /// Rewrites every statement of a migration.
    pub fn rewrite_all(&self, statements: &[String]) -> Result<Vec<String>, ClusterDdlError> {
        let mut out = Vec::new();
        for s in statements {
            out.extend(self.rewrite(s)?);
        }
        Ok(out)
    }

    fn table(&self, rest: &str) -> Option<Vec<String>> {
        let (name, rest) = split_ident(rest)?;
        let engine_at = rest.find("ENGINE")?;
        let (columns, engine) = rest.split_at(engine_at);
        let engine = engine
            .strip_prefix("ENGINE")?
            .trim_start()
            .strip_prefix('=')?;
        let engine = engine.trim_start();
        let kind_len = engine.find("MergeTree")?;
        let kind = &engine[..kind_len];
        if !["", "Aggregating", "Replacing", "Summing"].contains(&kind) {
            return None;
        }
        let mut tail = engine[kind_len + "MergeTree".len()..].trim_start();
        // `MergeTree()` and `MergeTree` are the same engine; arguments would need placing
        // after the replication path, which no migration needs.
        if let Some(t) = tail.strip_prefix("()") {
            tail = t.trim_start();
        } else if tail.starts_with('(') {
            return None;
        }
        let order_by = order_by_columns(tail)?;
        let local = format!("{name}{LOCAL_SUFFIX}");
        let c = quote(self.cluster);
        let on = self.on_cluster();
        let local_table = match self.layout {
            Layout::Replicated => format!(
                "CREATE TABLE IF NOT EXISTS {}{on} {}ENGINE = Replicated{kind}MergeTree('/clickhouse/tables/{{shard}}/{}/{local}', '{{replica}}') {}",
                self.qualified(name, LOCAL_SUFFIX),
                columns.trim_start(),
                self.database,
                tail.replace(
                    "non_replicated_deduplication_window",
                    "replicated_deduplication_window",
                ),
            ),
            // Plain tables keep `non_replicated_deduplication_window`: each replica drops a
            // repeated block by its token on its own.
            Layout::Sharded => format!(
                "CREATE TABLE IF NOT EXISTS {} {}ENGINE = {kind}MergeTree {tail}",
                self.qualified(name, LOCAL_SUFFIX),
                columns.trim_start(),
            ),
        };
        Some(vec![
            local_table,
            format!(
                "CREATE TABLE IF NOT EXISTS {}{on} AS {} ENGINE = Distributed({c}, {}, {}, cityHash64({order_by}))",
                self.qualified(name, ""),
                self.qualified(name, LOCAL_SUFFIX),
                quote(self.database),
                quote(&local),
            ),
        ])
    }

    fn materialized_view(&self, rest: &str) -> Option<Vec<String>> {
        let (name, rest) = split_ident(rest)?;
        let rest = strip_words(rest, &["TO"])?;
        let (target, body) = split_ident(rest)?;
        let body = strip_words(body, &["AS"])?;
        // Inserts through a Distributed table land in the local tables: the view must watch
        // the local source and feed the local target on each node.
        Some(vec![format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {}{} TO {} AS {}",
            self.qualified(name, ""),
            self.on_cluster(),
            self.qualified(target, LOCAL_SUFFIX),
            self.qualify_from(body, LOCAL_SUFFIX)?
        )])
    }

    /// Replaces the one `FROM table` of a SELECT with the qualified (and suffixed) table.
    fn qualify_from(&self, body: &str, suffix: &str) -> Option<String> {
        let words: Vec<usize> = word_positions(body, "FROM");
        let [at] = words[..] else { return None };
        let after = &body[at + "FROM".len()..];
        let (table, tail) = split_ident(after)?;
        Some(format!(
            "{}FROM {} {tail}",
            &body[..at],
            self.qualified(table, suffix)
        ))
    }

    fn qualified(&self, name: &str, suffix: &str) -> String {
        format!(
            "{}.{}",
            quote(self.database),
            quote(&format!("{name}{suffix}"))
        )
    }
}

/// Asks each node of `clickhouse.nodes` which replica of `cluster` it is; returns each node's
/// URL and name (`shard 1 replica 2 (host:port)`). A list that leaves a replica out is
/// refused, naming it: the sharded layout creates the tables on every node itself, and a
/// `Distributed` insert fails on a replica without them.
pub async fn check_nodes(
    config: &ClickHouseConfig,
    cluster: &str,
) -> Result<Vec<(String, String)>, crate::Error> {
    const KEY: &str = "clickhouse.nodes (CLICKHOUSE_NODES)";
    if config.nodes.is_empty() {
        return Err(invalid(
            KEY,
            format!(
                "is empty: the sharded layout runs its DDL on every node of cluster `{cluster}`"
            ),
        )
        .into());
    }
    let name = |(shard, replica, host, port): &(u32, u32, String, u16)| {
        format!("shard {shard} replica {replica} ({host}:{port})")
    };
    let mut every: Vec<(u32, u32, String, u16)> = Vec::new();
    let mut nodes: Vec<(String, String)> = Vec::new();
    let mut seen = Vec::new();
    for node in &config.nodes {
        let at = ClickHouseConfig {
            host: node.clone(),
            ..config.clone()
        };
        let url = at.url()?;
        let rows: Vec<(u32, u32, String, u16, u8)> = services::clickhouse_server(&at)?
            .query("SELECT shard_num, replica_num, host_address, port, is_local FROM system.clusters WHERE cluster = ? ORDER BY shard_num, replica_num")
            .bind(cluster)
            .fetch_all()
            .await
            .map_err(|e| crate::Error::Migrate(format!("{url}: cannot read system.clusters: {e}")))?;
        if rows.is_empty() {
            return Err(crate::Error::Migrate(format!(
                "{url}: cluster `{cluster}` is not in its remote_servers"
            )));
        }
        let own: Vec<_> = rows
            .iter()
            .filter(|r| r.4 == 1)
            .map(|r| (r.0, r.1, r.2.clone(), r.3))
            .collect();
        let [me] = &own[..] else {
            return Err(invalid(
                KEY,
                format!("`{node}` is not one replica of cluster `{cluster}` (its system.clusters shows {} as itself)", own.len()),
            )
            .into());
        };
        if every.is_empty() {
            every = rows.into_iter().map(|r| (r.0, r.1, r.2, r.3)).collect();
        }
        if !seen.contains(&(me.0, me.1)) {
            seen.push((me.0, me.1));
            nodes.push((url, name(me)));
        }
    }
    if let Some(missing) = every.iter().find(|r| !seen.contains(&(r.0, r.1))) {
        return Err(invalid(
            KEY,
            format!(
                "leaves out {} of cluster `{cluster}`: the sharded layout creates the tables on every node",
                name(missing)
            ),
        )
        .into());
    }
    Ok(nodes)
}

/// Backquotes an identifier for ClickHouse.
pub fn quote(ident: &str) -> String {
    format!("`{}`", ident.replace('\\', "\\\\").replace('`', "\\`"))
}

/// `rest` after the given keywords (separated by any whitespace), or `None`.
fn strip_words<'a>(mut s: &'a str, words: &[&str]) -> Option<&'a str> {
    for w in words {
        s = s.trim_start();
        let (head, tail) = s.split_at_checked(w.len())?;
        if !head.eq_ignore_ascii_case(w) || tail.starts_with(is_ident_char) {
            return None;
        }
        s = tail;
    }
    Some(s.trim_start())
}

/// The leading bare identifier and what follows it.
fn split_ident(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    let end = s.find(|c: char| !is_ident_char(c)).unwrap_or(s.len());
    (end > 0).then(|| (&s[..end], s[end..].trim_start()))
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Byte offsets of `word` standing alone (not inside a longer identifier).
fn word_positions(s: &str, word: &str) -> Vec<usize> {
    s.match_indices(word)
        .filter(|(i, _)| {
            let before = s[..*i].chars().next_back();
            let after = s[i + word.len()..].chars().next();
            !before.is_some_and(is_ident_char) && !after.is_some_and(is_ident_char)
        })
        .map(|(i, _)| i)
        .collect()
}

/// The columns of `ORDER BY (a, b)` or `ORDER BY a`, as written.
fn order_by_columns(tail: &str) -> Option<&str> {
    let [at] = word_positions(tail, "ORDER")[..] else {
        return None;
    };
    let rest = strip_words(&tail[at..], &["ORDER", "BY"])?;
    if let Some(inner) = rest.strip_prefix('(') {
        let close = inner.find(')')?;
        Some(inner[..close].trim())
    } else {
        split_ident(rest).map(|(col, _)| col)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::{FRAMEWORK_CLICKHOUSE, sql_statements};

    /// A pipeline's tables, as FrameWorks' are: plain and aggregating tables deduplicating
    /// their inserts, a materialised view between two of them, and a view over the states.
    const PIPELINE: &str = "
        CREATE TABLE IF NOT EXISTS events (t DateTime, k String) ENGINE = MergeTree
        ORDER BY (t, k) SETTINGS non_replicated_deduplication_window = 10000;
        CREATE TABLE IF NOT EXISTS per_minute (m DateTime, n AggregateFunction(count)) ENGINE = AggregatingMergeTree
        ORDER BY m SETTINGS non_replicated_deduplication_window = 10000;
        CREATE MATERIALIZED VIEW IF NOT EXISTS per_minute_mv TO per_minute AS
        SELECT toStartOfMinute(t) AS m, countState() AS n FROM events GROUP BY m;
        CREATE VIEW IF NOT EXISTS per_minute_view AS SELECT m, countMerge(n) AS n FROM per_minute GROUP BY m";

    const TARGET: ClusterTarget<'static> = ClusterTarget {
        cluster: "analytics",
        database: "frameworks",
        layout: Layout::Replicated,
    };

    const SHARDED: ClusterTarget<'static> = ClusterTarget {
        layout: Layout::Sharded,
        ..TARGET
    };

    fn sources() -> Vec<&'static str> {
        FRAMEWORK_CLICKHOUSE
            .iter()
            .map(|(_, _, sql)| *sql)
            .chain([PIPELINE])
            .collect()
    }

    fn all() -> Vec<String> {
        sources()
            .into_iter()
            .flat_map(|sql| {
                TARGET
                    .rewrite_all(&sql_statements(sql))
                    .expect("every migration has a cluster variant")
            })
            .collect()
    }

    #[test]
    fn every_merge_tree_table_gets_a_replicated_local_table_and_a_distributed_one() {
        let ddl = all();
        let single: Vec<String> = sources().into_iter().flat_map(sql_statements).collect();
        let tables = single
            .iter()
            .filter(|s| s.contains("MergeTree"))
            .filter_map(|s| strip_words(s, &["CREATE", "TABLE", "IF", "NOT", "EXISTS"]))
            .filter_map(|s| split_ident(s).map(|(n, _)| n))
            .collect::<Vec<_>>();
        assert_eq!(tables.len(), 4, "{tables:?}");
        for t in tables {
            let local = ddl
                .iter()
                .find(|s| {
                    s.starts_with(&format!(
                        "CREATE TABLE IF NOT EXISTS `frameworks`.`{t}_local` ON CLUSTER `analytics`"
                    ))
                })
                .unwrap_or_else(|| panic!("no local table for {t}"));
            assert!(
                local.contains(&format!(
                    "MergeTree('/clickhouse/tables/{{shard}}/frameworks/{t}_local', '{{replica}}')"
                )),
                "{local}"
            );
            assert!(local.contains("ENGINE = Replicated"), "{local}");
            assert!(!local.contains("non_replicated"), "{local}");
            let dist = ddl
                .iter()
                .find(|s| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS `frameworks`.`{t}` ON CLUSTER `analytics` AS `frameworks`.`{t}_local` ENGINE = Distributed(`analytics`, `frameworks`, `{t}_local`, cityHash64(")))
                .unwrap_or_else(|| panic!("no distributed table for {t}"));
            assert!(!dist.contains("rand()"), "{dist}");
        }
        let deduplicated = ddl
            .iter()
            .filter(|s| s.contains("replicated_deduplication_window = 10000"))
            .count();
        assert_eq!(
            deduplicated, 3,
            "every table but the span ledger deduplicates, the landings included"
        );
    }

    #[test]
    fn the_materialized_view_reads_and_feeds_the_local_tables() {
        let ddl = all();
        let mv = ddl
            .iter()
            .find(|s| s.contains("MATERIALIZED VIEW"))
            .expect("the per-minute view");
        assert!(
            mv.starts_with("CREATE MATERIALIZED VIEW IF NOT EXISTS `frameworks`.`per_minute_mv` ON CLUSTER `analytics` TO `frameworks`.`per_minute_local` AS"),
            "{mv}"
        );
        assert!(mv.contains("FROM `frameworks`.`events_local`"), "{mv}");
        let view = ddl
            .iter()
            .find(|s| s.starts_with("CREATE VIEW"))
            .expect("the finished view");
        assert!(
            view.contains("FROM `frameworks`.`per_minute` "),
            "the finished view merges the states of every shard: {view}"
        );
    }

    #[test]
    fn alters_reach_both_the_local_and_the_distributed_table() {
        let out = TARGET
            .rewrite("ALTER TABLE t ADD COLUMN IF NOT EXISTS k Int64 DEFAULT 0")
            .unwrap();
        assert_eq!(
            out,
            [
                "ALTER TABLE `frameworks`.`t_local` ON CLUSTER `analytics` ADD COLUMN IF NOT EXISTS k Int64 DEFAULT 0",
                "ALTER TABLE `frameworks`.`t` ON CLUSTER `analytics` ADD COLUMN IF NOT EXISTS k Int64 DEFAULT 0",
            ]
        );
    }

    #[test]
    fn unknown_statements_and_engines_are_refused_with_the_statement() {
        let e = TARGET.rewrite("DROP TABLE x").unwrap_err();
        assert_eq!(e.statement, "DROP TABLE x");
        let e = TARGET
            .rewrite("CREATE TABLE IF NOT EXISTS x (a UInt8) ENGINE = Log")
            .unwrap_err();
        assert!(e.to_string().contains("ENGINE = Log"), "{e}");
        assert!(
            TARGET
                .rewrite("CREATE TABLE IF NOT EXISTS x (a UInt8) ENGINE = ReplacingMergeTree(v) ORDER BY a")
                .is_err(),
            "engine arguments are not placed"
        );
        assert!(
            TARGET
                .rewrite("CREATE MATERIALIZED VIEW IF NOT EXISTS m TO t AS SELECT a FROM x JOIN y USING a FROM z")
                .is_err()
        );
    }

    #[test]
    fn order_by_without_parentheses_is_the_sharding_key() {
        let out = TARGET
            .rewrite("CREATE TABLE IF NOT EXISTS x (a UInt8) ENGINE = MergeTree() ORDER BY a")
            .unwrap();
        assert!(out[0].contains("ReplicatedMergeTree("), "{}", out[0]);
        assert!(out[1].ends_with("cityHash64(a))"), "{}", out[1]);
    }

    #[test]
    fn the_sharded_layout_keeps_plain_tables_and_runs_no_ddl_on_cluster() {
        let ddl: Vec<String> = sources()
            .into_iter()
            .flat_map(|sql| SHARDED.rewrite_all(&sql_statements(sql)).unwrap())
            .collect();
        assert!(ddl.iter().all(|s| !s.contains("ON CLUSTER")), "{ddl:?}");
        assert!(ddl.iter().all(|s| !s.contains("Replicated")), "{ddl:?}");
        let local = ddl
            .iter()
            .find(|s| s.starts_with("CREATE TABLE IF NOT EXISTS `frameworks`.`events_local` "))
            .expect("events_local");
        assert!(
            local.contains("ENGINE = MergeTree ORDER BY (t, k) SETTINGS non_replicated_deduplication_window = 10000"),
            "{local}"
        );
        assert!(ddl.iter().any(|s| s
            == "CREATE TABLE IF NOT EXISTS `frameworks`.`events` AS `frameworks`.`events_local` ENGINE = Distributed(`analytics`, `frameworks`, `events_local`, cityHash64(t, k))"));
        let mv = ddl
            .iter()
            .find(|s| s.contains("MATERIALIZED VIEW"))
            .unwrap();
        assert!(
            mv.contains("TO `frameworks`.`per_minute_local` AS")
                && mv.contains("FROM `frameworks`.`events_local`"),
            "{mv}"
        );
        assert!(!SHARDED.create_database().contains("ON CLUSTER"));
        assert!(
            !SHARDED.migrations_table().contains("Replicated"),
            "one ledger per node"
        );
    }
}
