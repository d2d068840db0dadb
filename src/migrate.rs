//! `sluice migrate`: applies the ClickHouse DDL of `schemas/`, versioned and idempotent.

use anyhow::Context;
use sluice_schemas::{CLICKHOUSE_MIGRATIONS, sql_statements};

use crate::config::Config;

/// Applies every migration not yet recorded in `sluice_migrations`; returns what it did,
/// one line per migration.
pub async fn clickhouse(config: &Config) -> anyhow::Result<Vec<String>> {
    let db = &config.clickhouse.database;
    let root = clickhouse::Client::default()
        .with_url(config.clickhouse.url()?)
        .with_user(&config.clickhouse.user)
        .with_password(config.clickhouse.password.expose());
    root.query("CREATE DATABASE IF NOT EXISTS ?")
        .bind(clickhouse::sql::Identifier(db))
        .execute()
        .await
        .with_context(|| format!("cannot create ClickHouse database `{db}`"))?;
    let client = root.with_database(db);
    client
        .query(
            "CREATE TABLE IF NOT EXISTS sluice_migrations (version UInt32, name String, applied_at DateTime DEFAULT now()) \
             ENGINE = ReplacingMergeTree ORDER BY version",
        )
        .execute()
        .await
        .context("cannot create sluice_migrations")?;
    let applied: Vec<u32> = client
        .query("SELECT DISTINCT version FROM sluice_migrations")
        .fetch_all()
        .await
        .context("cannot read sluice_migrations")?;
    let mut report = Vec::new();
    for (version, name, sql) in CLICKHOUSE_MIGRATIONS {
        if applied.contains(version) {
            report.push(format!(
                "clickhouse {db}: migration {version:04} {name} already applied"
            ));
            continue;
        }
        let statements = sql_statements(sql);
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
            .bind(*version)
            .bind(*name)
            .execute()
            .await
            .context("cannot record the migration")?;
        report.push(format!(
            "clickhouse {db}: applied migration {version:04} {name} ({} statements)",
            statements.len()
        ));
    }
    Ok(report)
}
