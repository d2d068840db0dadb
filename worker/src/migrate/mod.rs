//! `migrate`: the framework's own tables (the span log and landings in ClickHouse, the
//! applied-offsets ledger in PostgreSQL), then the pipeline's, each migration applied once
//! and recorded with its scope in `sluice_schema_migrations` (in each store), and a landing
//! view for every ClickHouse table the pipeline writes. Every statement is idempotent, so a
//! `migrate` that stopped half way is simply run again.

pub mod cluster;

use sluice_sinks::{Layout, landing_view_ddl};

use crate::Error;
use crate::config::{ClickHouseConfig, redact_url};
use crate::services;
use cluster::{ClusterTarget, quote};

/// A migration: version (per scope, increasing), name, SQL of `;`-separated statements.
pub type Migration = (u32, &'static str, &'static str);

/// The scope the framework's own migrations are recorded under.
pub const FRAMEWORK_SCOPE: &str = "sluice";

/// The ledger table, in ClickHouse and in PostgreSQL.
pub const LEDGER: &str = "sluice_schema_migrations";

/// The framework's ClickHouse migrations: the span log and the landings table.
pub const FRAMEWORK_CLICKHOUSE: &[Migration] = &[
    (
        1,
        "batch_spans",
        include_str!("../../sql/clickhouse/0001_batch_spans.sql"),
    ),
    (
        2,
        "batch_landings",
        include_str!("../../sql/clickhouse/0002_batch_landings.sql"),
    ),
];

/// The framework's PostgreSQL migrations: the reducers' applied-offsets ledger.
pub const FRAMEWORK_POSTGRES: &[Migration] = &[(
    1,
    "applied_offsets",
    include_str!("../../sql/postgres/0001_applied_offsets.sql"),
)];

/// The statements of a migration: comment lines dropped, split at `;`.
pub fn sql_statements(sql: &str) -> Vec<String> {
    let code: Vec<&str> = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect();
    code.join("\n")
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// What one `migrate` applies to ClickHouse.
pub struct ClickHousePlan<'a> {
    /// The pipeline's scope (its name).
    pub scope: &'a str,
    /// The pipeline's migrations.
    pub migrations: &'a [Migration],
    /// The tables it writes (each gets a landing view).
    pub tables: &'a [String],
    /// A cluster of the servers' `remote_servers`: local tables behind Distributed ones.
    pub cluster: Option<&'a str>,
    /// How the cluster's local tables keep their replicas.
    pub layout: Layout,
}

/// The migration ledger of one server.
pub(crate) fn single_server_ledger(database: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {}.{LEDGER} (scope LowCardinality(String), version UInt32, \
         name String, applied_at DateTime DEFAULT now()) \
         ENGINE = ReplacingMergeTree ORDER BY (scope, version)",
        quote(database)
    )
}

/// One step of a ClickHouse migration: a versioned migration of a scope, or the landing
/// views (applied every time: they follow the tables the pipeline writes now).
pub struct Step {
    /// Scope and version, for a versioned migration.
    pub version: Option<(String, u32)>,
    /// What it is.
    pub name: String,
    /// Its statements.
    pub statements: Vec<String>,
}

impl ClickHousePlan<'_> {
    /// The database and the ledger, then every step.
    pub fn ddl(&self, database: &str) -> Result<(Vec<String>, Vec<Step>), Error> {
        let target = self.cluster.map(|cluster| ClusterTarget {
            cluster,
            database,
            layout: self.layout,
        });
        let rewrite = |statements: Vec<String>| match &target {
            None => Ok(statements),
            Some(t) => t
                .rewrite_all(&statements)
                .map_err(|e| Error::Migrate(e.to_string())),
        };
        let setup = match &target {
            Some(t) => vec![t.create_database(), t.migrations_table()],
            None => vec![
                format!("CREATE DATABASE IF NOT EXISTS {}", quote(database)),
                single_server_ledger(database),
            ],
        };
        let mut steps = Vec::new();
        for (scope, migrations) in [
            (FRAMEWORK_SCOPE, FRAMEWORK_CLICKHOUSE),
            (self.scope, self.migrations),
        ] {
            for (version, name, sql) in migrations {
                steps.push(Step {
                    version: Some((scope.to_owned(), *version)),
                    name: (*name).to_owned(),
                    statements: rewrite(sql_statements(sql))?,
                });
            }
        }
        steps.push(Step {
            version: None,
            name: "landing views".into(),
            statements: rewrite(self.tables.iter().map(|t| landing_view_ddl(t)).collect())?,
        });
        Ok((setup, steps))
    }

    /// The statements as `--dry-run` prints them.
    pub fn text(&self, database: &str) -> Result<String, Error> {
        use std::fmt::Write as _;
        let (setup, steps) = self.ddl(database)?;
        let mut text = String::new();
        if let (Some(c), Layout::Sharded) = (self.cluster, self.layout) {
            let _ = writeln!(
                text,
                "-- cluster {c}, sharded layout: every statement runs on each node of clickhouse.nodes (CLICKHOUSE_NODES) in turn\n"
            );
        }
        text.push_str("-- database and migration ledger\n");
        for stmt in setup {
            let _ = writeln!(text, "{stmt};\n");
        }
        for step in steps {
            match &step.version {
                Some((scope, version)) => {
                    let _ = writeln!(text, "-- {scope} migration {version:04} {}", step.name);
                }
                None => {
                    let _ = writeln!(text, "-- {}", step.name);
                }
            }
            for stmt in step.statements {
                let _ = writeln!(text, "{stmt};\n");
            }
        }
        Ok(text)
    }

    /// Applies every step not yet recorded in the ledger; returns what it did, a line each.
    /// In the sharded layout, on each node of `clickhouse.nodes` in turn, once each node has
    /// said which replica it is and the list leaves none out.
    pub async fn apply(&self, config: &ClickHouseConfig) -> Result<Vec<String>, Error> {
        let db = &config.database;
        match (self.cluster, self.layout) {
            (Some(cluster), Layout::Sharded) => {
                let nodes = cluster::check_nodes(config, cluster).await?;
                let mut report = Vec::new();
                for (url, node) in nodes {
                    let place = format!("clickhouse {db} on {node} ({url}) of cluster {cluster}");
                    let root = services::clickhouse_server(&ClickHouseConfig {
                        host: url,
                        ..config.clone()
                    })?;
                    report.extend(self.apply_on(root, db, &place).await?);
                }
                Ok(report)
            }
            (Some(cluster), Layout::Replicated) => {
                let place = format!("clickhouse {db} on cluster {cluster}");
                self.apply_on(services::clickhouse_server(config)?, db, &place)
                    .await
            }
            (None, _) => {
                let place = format!("clickhouse {db}");
                self.apply_on(services::clickhouse_server(config)?, db, &place)
                    .await
            }
        }
    }

    /// Applies the steps through one server (`place` names it in the report).
    async fn apply_on(
        &self,
        root: clickhouse::Client,
        db: &str,
        place: &str,
    ) -> Result<Vec<String>, Error> {
        let (setup, steps) = self.ddl(db)?;
        let failed = |what: String| {
            move |e: clickhouse::error::Error| Error::Migrate(format!("{what}: {e}"))
        };
        for stmt in &setup {
            root.query(stmt).execute().await.map_err(failed(format!(
                "{place}: cannot create the database or {LEDGER}"
            )))?;
        }
        let client = root.with_database(db);
        let applied: Vec<(String, u32)> = client
            .query(&format!("SELECT DISTINCT scope, version FROM {LEDGER}"))
            .fetch_all()
            .await
            .map_err(failed(format!("{place}: cannot read {LEDGER}")))?;
        let mut report = Vec::new();
        for step in steps {
            if let Some((scope, version)) = &step.version
                && applied.contains(&(scope.clone(), *version))
            {
                report.push(format!(
                    "{place}: {scope} migration {version:04} {} already applied",
                    step.name
                ));
                continue;
            }
            for stmt in &step.statements {
                client.query(stmt).execute().await.map_err(failed(format!(
                    "{place}: {} failed at `{}`",
                    step.name,
                    stmt.lines().next().unwrap_or_default()
                )))?;
            }
            match &step.version {
                Some((scope, version)) => {
                    client
                        .query(&format!(
                            "INSERT INTO {LEDGER} (scope, version, name) VALUES (?, ?, ?)"
                        ))
                        .bind(scope)
                        .bind(version)
                        .bind(&step.name)
                        .execute()
                        .await
                        .map_err(failed(format!("{place}: cannot record the migration")))?;
                    report.push(format!(
                        "{place}: {scope} migration {version:04} {} applied ({} statements)",
                        step.name,
                        step.statements.len()
                    ));
                }
                None if !step.statements.is_empty() => report.push(format!(
                    "{place}: {} ensured ({} tables)",
                    step.name,
                    step.statements.len()
                )),
                None => {}
            }
        }
        Ok(report)
    }
}

/// Applies the framework's PostgreSQL migrations, then `migrations` of `scope`, each in one
/// transaction with its ledger row (concurrent `migrate`s wait for each other); returns what
/// it did, a line each.
pub async fn postgres(
    url: &str,
    scope: &str,
    migrations: &[Migration],
) -> Result<Vec<String>, Error> {
    use sqlx::Connection as _;
    let shown = redact_url(url);
    let failed = |what: String| move |e: sqlx::Error| Error::Migrate(format!("{what}: {e}"));
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .map_err(failed(format!("cannot connect to {shown}")))?;
    // `ADD COLUMN IF NOT EXISTS` on a table made by the same migration is a notice, not news.
    sqlx::raw_sql("SET client_min_messages = warning")
        .execute(&mut conn)
        .await
        .map_err(failed(format!(
            "postgres {shown}: cannot set up the session"
        )))?;
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {LEDGER} (scope TEXT NOT NULL, version INTEGER NOT NULL, \
         name TEXT NOT NULL, applied_at TIMESTAMP NOT NULL DEFAULT NOW(), PRIMARY KEY (scope, version))"
    ))
    .execute(&mut conn)
    .await
    .map_err(failed(format!("postgres {shown}: cannot create {LEDGER}")))?;
    let mut report = Vec::new();
    for (scope, list) in [(FRAMEWORK_SCOPE, FRAMEWORK_POSTGRES), (scope, migrations)] {
        for (version, name, sql) in list {
            let mut tx = conn
                .begin()
                .await
                .map_err(failed(format!("postgres {shown}: cannot begin")))?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(LEDGER)
                .execute(&mut *tx)
                .await
                .map_err(failed(format!("postgres {shown}: cannot lock {LEDGER}")))?;
            let done: Option<i32> = sqlx::query_scalar(&format!(
                "SELECT version FROM {LEDGER} WHERE scope = $1 AND version = $2"
            ))
            .bind(scope)
            .bind(*version as i32)
            .fetch_optional(&mut *tx)
            .await
            .map_err(failed(format!("postgres {shown}: cannot read {LEDGER}")))?;
            if done.is_some() {
                report.push(format!(
                    "postgres {shown}: {scope} migration {version:04} {name} already applied"
                ));
                continue;
            }
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(failed(format!(
                    "postgres {shown}: {scope} migration {version:04} {name} failed"
                )))?;
            sqlx::query(&format!(
                "INSERT INTO {LEDGER} (scope, version, name) VALUES ($1, $2, $3)"
            ))
            .bind(scope)
            .bind(*version as i32)
            .bind(*name)
            .execute(&mut *tx)
            .await
            .map_err(failed(format!(
                "postgres {shown}: cannot record the migration"
            )))?;
            tx.commit()
                .await
                .map_err(failed(format!("postgres {shown}: cannot commit")))?;
            report.push(format!(
                "postgres {shown}: {scope} migration {version:04} {name} applied"
            ));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_framework_tables_come_first_and_every_written_table_gets_a_landing_view() {
        let tables = ["orders".to_owned()];
        let plan = ClickHousePlan {
            scope: "shop",
            migrations: &[(
                1,
                "orders",
                "CREATE TABLE IF NOT EXISTS orders (id UInt64) ENGINE = MergeTree ORDER BY id",
            )],
            tables: &tables,
            cluster: None,
            layout: Layout::Replicated,
        };
        let (setup, steps) = plan.ddl("shop").unwrap();
        assert!(
            setup[1].contains("ORDER BY (scope, version)"),
            "{}",
            setup[1]
        );
        let names: Vec<_> = steps
            .iter()
            .map(|s| (s.version.clone(), s.name.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                (Some(("sluice".into(), 1)), "batch_spans"),
                (Some(("sluice".into(), 2)), "batch_landings"),
                (Some(("shop".into(), 1)), "orders"),
                (None, "landing views"),
            ]
        );
        assert_eq!(
            steps[3].statements,
            vec![landing_view_ddl("orders")],
            "one landing view per written table"
        );
        let clustered = ClickHousePlan {
            cluster: Some("c"),
            ..plan
        };
        let (_, steps) = clustered.ddl("shop").unwrap();
        assert!(
            steps[3].statements[0].contains("FROM `shop`.`orders_local`"),
            "{}",
            steps[3].statements[0]
        );
    }
}
