//! `sluice migrate`: applies the ClickHouse DDL of `schemas/`, versioned and idempotent.

use anyhow::Context;
use sluice_schemas::cluster::{ClusterTarget, quote};
use sluice_schemas::{CLICKHOUSE_MIGRATIONS, sql_statements};

use crate::config::Config;

/// The ClickHouse DDL of every migration, for one server or (with a cluster name) for a
/// ClickHouse cluster: (version, name, statements).
pub fn clickhouse_ddl(
    database: &str,
    cluster: Option<&str>,
) -> anyhow::Result<Vec<(u32, &'static str, Vec<String>)>> {
    CLICKHOUSE_MIGRATIONS
        .iter()
        .map(|(version, name, sql)| {
            let statements = sql_statements(sql);
            let statements = match cluster {
                None => statements,
                Some(cluster) => ClusterTarget { cluster, database }.rewrite_all(&statements)?,
            };
            Ok((*version, *name, statements))
        })
        .collect()
}

/// What runs before the migrations: the database and the `sluice_migrations` ledger.
pub fn setup_ddl(database: &str, cluster: Option<&str>) -> [String; 2] {
    match cluster {
        Some(cluster) => {
            let t = ClusterTarget { cluster, database };
            [t.create_database(), t.migrations_table()]
        }
        None => [
            format!("CREATE DATABASE IF NOT EXISTS {}", quote(database)),
            format!(
                "CREATE TABLE IF NOT EXISTS {}.sluice_migrations (version UInt32, name String, applied_at DateTime DEFAULT now()) \
                 ENGINE = ReplacingMergeTree ORDER BY version",
                quote(database)
            ),
        ],
    }
}

/// Applies every migration not yet recorded in `sluice_migrations`; returns what it did,
/// one line per migration. With `cluster`, every statement runs `ON CLUSTER` and the tables
/// are `ReplicatedMergeTree` behind `Distributed` ones (see `sluice_schemas::cluster`).
pub async fn clickhouse(config: &Config, cluster: Option<&str>) -> anyhow::Result<Vec<String>> {
    let db = &config.clickhouse.database;
    let ddl = clickhouse_ddl(db, cluster)?;
    let where_ = match cluster {
        Some(c) => format!("clickhouse {db} on cluster {c}"),
        None => format!("clickhouse {db}"),
    };
    let root = crate::frameworks::clickhouse_server(config)?;
    let [create_db, ledger] = setup_ddl(db, cluster);
    root.query(&create_db)
        .execute()
        .await
        .with_context(|| format!("cannot create ClickHouse database `{db}`"))?;
    let client = root.with_database(db);
    client
        .query(&ledger)
        .execute()
        .await
        .context("cannot create sluice_migrations")?;
    let applied: Vec<u32> = client
        .query("SELECT DISTINCT version FROM sluice_migrations")
        .fetch_all()
        .await
        .context("cannot read sluice_migrations")?;
    let mut report = Vec::new();
    for (version, name, statements) in ddl {
        if applied.contains(&version) {
            report.push(format!(
                "{where_}: migration {version:04} {name} already applied"
            ));
            continue;
        }
        for stmt in &statements {
            client.query(stmt).execute().await.with_context(|| {
                format!(
                    "migration {version:04} {name} failed at: {}",
                    stmt.lines().next().unwrap_or_default()
                )
            })?;
        }
        client
            .query("INSERT INTO sluice_migrations (version, name) VALUES (?, ?)")
            .bind(version)
            .bind(name)
            .execute()
            .await
            .context("cannot record the migration")?;
        report.push(format!(
            "{where_}: applied migration {version:04} {name} ({} statements)",
            statements.len()
        ));
    }
    Ok(report)
}

/// The PostgreSQL migrations of `schemas/`, embedded in the binary, as a source for sqlx's
/// migrator.
#[derive(Debug)]
struct Embedded;

impl sqlx::migrate::MigrationSource<'static> for Embedded {
    fn resolve(
        self,
    ) -> futures::future::BoxFuture<
        'static,
        Result<Vec<sqlx::migrate::Migration>, sqlx::error::BoxDynError>,
    > {
        Box::pin(async {
            Ok(sluice_schemas::POSTGRES_MIGRATIONS
                .iter()
                .map(|(version, name, sql)| {
                    sqlx::migrate::Migration::new(
                        *version,
                        std::borrow::Cow::Borrowed(*name),
                        sqlx::migrate::MigrationType::Simple,
                        std::borrow::Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Applies the PostgreSQL migrations with sqlx's migrator when `DATABASE_URL` is set; returns
/// what it did.
pub async fn postgres(config: &Config) -> anyhow::Result<Vec<String>> {
    let Some(url) = &config.postgres.url else {
        return Ok(vec![
            "postgres: DATABASE_URL not set, state reduction off: nothing to migrate".into(),
        ]);
    };
    let shown = crate::config::redact_url(url.expose());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url.expose())
        .await
        .with_context(|| format!("cannot connect to {shown}"))?;
    let applied = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default()
    };
    let before = applied(pool.clone()).await;
    let migrator = sqlx::migrate::Migrator::new(Embedded)
        .await
        .context("cannot load the PostgreSQL migrations")?;
    migrator
        .run(&pool)
        .await
        .context("PostgreSQL migration failed")?;
    let after = applied(pool.clone()).await;
    Ok(sluice_schemas::POSTGRES_MIGRATIONS
        .iter()
        .map(|(version, name, _)| {
            let state = if before.contains(version) {
                "already applied"
            } else if after.contains(version) {
                "applied"
            } else {
                "not applied"
            };
            format!("postgres {shown}: migration {version:04} {name} {state}")
        })
        .collect())
}
