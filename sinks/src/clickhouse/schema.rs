//! The start-up checks of a target table: it takes what the encoder writes, it drops a batch
//! inserted again (a deduplication window, or replication), so do the tables its
//! materialised views write into, no column it leaves to the server gets a value made up per
//! insert (a replay would then differ from the first run), and its landing view exists. A
//! table that would silently take duplicates stops the worker at start, named.

use clickhouse::Client;
use sluice_pipeline::SinkError;

use super::client::{classify, error_code};
use super::encode::{Encoder, InsertRequest};
use super::sink::ClickHouseSink;
use super::{LANDINGS_TABLE, landing_view};

/// How deep materialised views writing into tables with views of their own are followed.
const MAX_VIEW_DEPTH: usize = 4;

impl<T, E: Encoder<Item = T>> ClickHouseSink<T, E> {
    /// Checks that the table exists and takes what the encoder writes, that it and the
    /// tables its materialised views write into deduplicate repeated inserts, that no column
    /// the encoder leaves out has a default the server makes up per insert (`now()`,
    /// `rand()`, `generateUUIDv4()`, …), and that the table has its landing view. The error
    /// names every mismatch and how to mend it. Nothing is written.
    pub async fn check(&self) -> Result<(), SinkError> {
        let request = InsertRequest::new(&self.client, &self.table, None);
        self.encoder.check(request).await.map_err(|e| match e {
            clickhouse::error::Error::SchemaMismatch(m) => SinkError::permanent(format!(
                "table `{}` does not match the row type: {m}",
                self.table
            )),
            // UNKNOWN_TABLE, UNKNOWN_DATABASE: nothing created them yet.
            clickhouse::error::Error::BadResponse(m) if matches!(error_code(&m), Some(60 | 81)) => {
                SinkError::permanent(format!(
                    "table `{}` or its database does not exist (run `migrate`): {m}",
                    self.table
                ))
            }
            other => classify(other),
        })?;
        check_table(&self.client, &self.table, self.encoder.columns()).await
    }
}

/// The checks of [`ClickHouseSink::check`] that do not depend on the row type: `written` are
/// the columns the inserts name.
pub async fn check_table(client: &Client, table: &str, written: &[&str]) -> Result<(), SinkError> {
    let mut problems = Vec::new();
    deduplication(client, table, 0, &mut problems).await?;
    made_up_defaults(client, table, written, &mut problems).await?;
    if !has_landing_view(client, table).await? {
        problems.push(format!(
            "it has no landing view `{}` into `{LANDINGS_TABLE}` (run `migrate`): without it a \
             replay after a crash cannot tell whether a batch was written",
            landing_view(table)
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(SinkError::permanent(format!(
        "table `{table}` cannot be written exactly once: {}",
        problems.join("; ")
    )))
}

/// What `system.tables` says of a table of the current database.
struct TableInfo {
    engine: String,
    engine_full: String,
    views: Vec<(String, String)>,
}

async fn table_info(client: &Client, table: &str) -> Result<Option<TableInfo>, SinkError> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Row {
        engine: String,
        engine_full: String,
        dependencies_database: Vec<String>,
        dependencies_table: Vec<String>,
    }
    let rows: Vec<Row> = client
        .query("SELECT ?fields FROM system.tables WHERE database = currentDatabase() AND name = ?")
        .bind(table)
        .fetch_all()
        .await
        .map_err(classify)?;
    Ok(rows.into_iter().next().map(|r| TableInfo {
        engine: r.engine,
        engine_full: r.engine_full,
        views: r
            .dependencies_database
            .into_iter()
            .zip(r.dependencies_table)
            .collect(),
    }))
}

/// Adds to `problems` why `table` (or a table its views write into) would keep a batch
/// inserted twice.
async fn deduplication(
    client: &Client,
    table: &str,
    depth: usize,
    problems: &mut Vec<String>,
) -> Result<(), SinkError> {
    let Some(info) = table_info(client, table).await? else {
        problems.push(format!("table `{table}` does not exist (run `migrate`)"));
        return Ok(());
    };
    let engine = info.engine.as_str();
    if engine == "Distributed" {
        // The data and its deduplication are in the local table behind it.
        match distributed_local(&info.engine_full) {
            Some(local) => Box::pin(deduplication(client, &local, depth, problems)).await?,
            None => problems.push(format!(
                "cannot tell which table `{table}` distributes to (`{}`)",
                info.engine_full
            )),
        }
    } else if engine.ends_with("MergeTree") {
        let replicated = engine.starts_with("Replicated") || engine.starts_with("Shared");
        let key = if replicated {
            "replicated_deduplication_window"
        } else {
            "non_replicated_deduplication_window"
        };
        let window = match setting(&info.engine_full, key) {
            Some(w) => w,
            None => server_default(client, key).await?,
        };
        if window == 0 {
            problems.push(format!(
                "`{table}` keeps no deduplication window ({key} = 0), so a batch inserted again \
                 after a crash lands twice (ALTER TABLE {table} MODIFY SETTING {key} = 10000)"
            ));
        }
    } else {
        problems.push(format!(
            "`{table}` has engine {engine}, which does not drop a repeated insert (use a \
             MergeTree table with non_replicated_deduplication_window, or a Replicated one)"
        ));
    }
    for (db, view) in &info.views {
        let target: Vec<(String, String)> = client
            .query("SELECT target_database, target_table FROM system.tables WHERE database = ? AND name = ?")
            .bind(db)
            .bind(view)
            .fetch_all()
            .await
            .map_err(classify)?;
        let Some((target_db, target)) = target.into_iter().next() else {
            continue;
        };
        if target.is_empty() || target == LANDINGS_TABLE {
            continue;
        }
        let own_db: String = client
            .query("SELECT currentDatabase()")
            .fetch_one()
            .await
            .map_err(classify)?;
        if target_db != own_db {
            problems.push(format!(
                "materialised view `{view}` writes into `{target_db}`.`{target}`, outside the \
                 database: its deduplication cannot be checked"
            ));
        } else if depth >= MAX_VIEW_DEPTH {
            problems.push(format!(
                "materialised views nest deeper than {MAX_VIEW_DEPTH} below `{table}`"
            ));
        } else {
            let before = problems.len();
            Box::pin(deduplication(client, &target, depth + 1, problems)).await?;
            for p in &mut problems[before..] {
                *p = format!("{p} (it is where materialised view `{view}` writes)");
            }
        }
    }
    Ok(())
}

/// The local table of a `Distributed(cluster, database, table[, key])` engine.
fn distributed_local(engine_full: &str) -> Option<String> {
    let args = super::cluster::distributed_args(engine_full)?;
    Some(super::cluster::unquote(args.get(2)?))
}

/// A numeric setting in a table's `SETTINGS` clause.
fn setting(engine_full: &str, key: &str) -> Option<u64> {
    let (_, settings) = engine_full.split_once(" SETTINGS ")?;
    settings.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().parse().ok()).flatten()
    })
}

async fn server_default(client: &Client, key: &str) -> Result<u64, SinkError> {
    let value: String = client
        .query("SELECT value FROM system.merge_tree_settings WHERE name = ?")
        .bind(key)
        .fetch_one()
        .await
        .map_err(classify)?;
    Ok(value.trim().parse().unwrap_or(0))
}

/// Adds to `problems` the columns the inserts leave out whose default calls a function that
/// gives another value each time (a replayed batch's rows would then differ from the first
/// run's, and the row check after a ClickHouse crash would take them for missing).
async fn made_up_defaults(
    client: &Client,
    table: &str,
    written: &[&str],
    problems: &mut Vec<String>,
) -> Result<(), SinkError> {
    let defaults: Vec<(String, String)> = client
        .query(
            "SELECT name, default_expression FROM system.columns \
             WHERE database = currentDatabase() AND table = ? AND default_kind = 'DEFAULT'",
        )
        .bind(table)
        .fetch_all()
        .await
        .map_err(classify)?;
    let left_out: Vec<(String, Vec<String>)> = defaults
        .into_iter()
        .filter(|(name, _)| !written.contains(&name.as_str()))
        .map(|(name, expr)| (name, called_functions(&expr)))
        .filter(|(_, calls)| !calls.is_empty())
        .collect();
    if left_out.is_empty() {
        return Ok(());
    }
    let mut called: Vec<String> = left_out.iter().flat_map(|(_, c)| c.clone()).collect();
    called.sort_unstable();
    called.dedup();
    let varying: Vec<String> = client
        .query(
            "SELECT lower(name) FROM system.functions WHERE deterministic = 0 AND lower(name) IN ?",
        )
        .bind(&called)
        .fetch_all()
        .await
        .map_err(classify)?;
    for (column, calls) in left_out {
        if let Some(f) = calls.iter().find(|f| varying.contains(f)) {
            problems.push(format!(
                "column `{column}` is left to its default, which calls {f}(): each insert makes \
                 up another value, so a replayed batch would differ from the first run (write \
                 the column from the row type, or give it a default that depends on the row only)"
            ));
        }
    }
    Ok(())
}

/// The functions an expression calls (names before a `(`, lower case).
fn called_functions(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut name = String::new();
    let mut in_string = false;
    for c in expr.chars() {
        if in_string {
            in_string = c != '\'';
            continue;
        }
        match c {
            '\'' => {
                in_string = true;
                name.clear();
            }
            c if c.is_ascii_alphanumeric() || c == '_' => name.push(c),
            '(' if !name.is_empty() => {
                out.push(name.to_ascii_lowercase());
                name.clear();
            }
            ' ' => {}
            _ => name.clear(),
        }
    }
    out
}

async fn has_landing_view(client: &Client, table: &str) -> Result<bool, SinkError> {
    let found: u64 = client
        .query(
            "SELECT count() FROM system.tables WHERE database = currentDatabase() \
             AND name = ? AND engine = 'MaterializedView'",
        )
        .bind(landing_view(table))
        .fetch_one()
        .await
        .map_err(classify)?;
    Ok(found > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_and_calls_are_read_from_the_ddl() {
        let full = "MergeTree PARTITION BY toYYYYMM(t) ORDER BY t SETTINGS non_replicated_deduplication_window = 100, index_granularity = 8192";
        assert_eq!(
            setting(full, "non_replicated_deduplication_window"),
            Some(100)
        );
        assert_eq!(setting(full, "replicated_deduplication_window"), None);
        assert_eq!(setting("MergeTree ORDER BY t", "index_granularity"), None);
        assert_eq!(
            called_functions("toDate(now()) + rand() % 2"),
            vec!["todate", "now", "rand"]
        );
        assert_eq!(called_functions("'now()'"), Vec::<String>::new());
        assert_eq!(
            called_functions("generateUUIDv4 ()"),
            vec!["generateuuidv4"]
        );
        assert_eq!(
            distributed_local("Distributed('c', 'db', 'orders_local', cityHash64(id))").as_deref(),
            Some("orders_local")
        );
    }
}
