//! After a crash: whether a batch landed (its landing view says), whether an earlier owner's
//! insert of it is still running, writing the spans of batches that did not land, and the
//! row-by-row check for what only a ClickHouse crash during an insert leaves unknown.

use std::collections::HashMap;

use clickhouse::sql::Identifier;
use sluice_pipeline::{Batch, SinkError};

use super::LANDINGS_TABLE;
use super::client::classify;
use super::encode::Encoder;
use super::sink::ClickHouseSink;
use super::token::{batch_token, group_token, recovery_token, span_token};

/// What became of a recovered batch's rows.
#[derive(Default)]
struct Recovery {
    /// Rows of batches that had landed: not written again.
    landed: u64,
    /// Rows of batches that had not landed: inserted.
    inserted: u64,
    /// Rows compared with the table (a batch that landed in part, or a span recorded without
    /// its batch): how many of them were missing and inserted.
    checked: u64,
    restored: u64,
}

impl<T, E: Encoder<Item = T>> ClickHouseSink<T, E> {
    /// How many rows landed in the table under each of `tokens` (absent: none), from the
    /// table's landing view.
    pub(crate) async fn landed(
        &self,
        tokens: &[String],
    ) -> Result<HashMap<String, u64>, SinkError> {
        if tokens.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(String, u64)> = self
            .client
            .query("SELECT token, sum(rows) FROM ? WHERE target_table = ? AND token IN ? GROUP BY token")
            .bind(Identifier(LANDINGS_TABLE))
            .bind(&*self.table)
            .bind(tokens)
            .fetch_all()
            .await
            .map_err(classify)?;
        Ok(rows.into_iter().collect())
    }

    /// How many inserts under any of `tokens` the server is running now.
    async fn running(&self, tokens: &[String]) -> Result<u64, SinkError> {
        if tokens.is_empty() {
            return Ok(0);
        }
        self.client
            .query("SELECT count() FROM system.processes WHERE Settings['insert_deduplication_token'] IN ?")
            .bind(tokens)
            .fetch_one()
            .await
            .map_err(classify)
    }

    /// Writes the spans of a [`Delivery::Recovered`](sluice_pipeline::Delivery::Recovered)
    /// batch whose batch did not land (see [`ClickHouseSink`]).
    pub(crate) async fn write_recovered(&self, batch: &Batch<T>) -> Result<(), SinkError> {
        let mut done = Recovery::default();
        let Some(parts) = batch.span_items() else {
            // Not cut along its spans (no span batcher made it): compare every row.
            let token = batch_token(&self.table, batch);
            done.checked = batch.len() as u64;
            done.restored = self.restore_missing(&batch.items, &token).await?;
            self.report(&done);
            return Ok(());
        };
        let tokens: Vec<String> = parts
            .iter()
            .filter_map(|(s, _)| Some((s, s.batch.as_ref()?)))
            .flat_map(|(s, b)| {
                [
                    group_token(&self.table, b),
                    recovery_token(&self.table, b, s),
                ]
            })
            .collect();
        let landed = self.landed(&tokens).await?;
        let landed = |token: &str| landed.get(token).copied().unwrap_or(0);
        // An earlier owner's insert may still be running (it was killed after sending the
        // whole body, and ClickHouse is slow): wait for it rather than take its batch for lost.
        let running = self.running(&tokens).await?;
        if running > 0 {
            return Err(SinkError::transient(format!(
                "{running} insert(s) of an earlier owner into `{}` still running; waiting for them before replaying their batches",
                self.table
            )));
        }
        for (span, rows) in parts {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len() as u64;
            let Some(b) = &span.batch else {
                // Recorded by an older version, without its batch: compare rows.
                done.checked += n;
                done.restored += self
                    .restore_missing(rows, &span_token(&self.table, span))
                    .await?;
                continue;
            };
            let token = recovery_token(&self.table, b, span);
            let (whole, again) = (landed(&group_token(&self.table, b)), landed(&token));
            if whole >= b.items || again >= n {
                done.landed += n;
            } else if whole == 0 && again == 0 {
                self.insert_into(&self.table, rows, Some(&token))
                    .await
                    .map_err(classify)?;
                done.inserted += n;
            } else {
                // Landed in part: only a ClickHouse crash during its insert does that.
                done.checked += n;
                done.restored += self.restore_missing(rows, &token).await?;
            }
        }
        self.report(&done);
        Ok(())
    }

    fn report(&self, done: &Recovery) {
        tracing::info!(table = %self.table, landed = done.landed, inserted = done.inserted, checked = done.checked, restored = done.restored, "redelivered records of batches cut across partitions: wrote the rows of batches that had not landed");
    }

    /// Compares `rows` with the table's (as multisets, within the check range) and inserts
    /// the ones that are missing; returns how many were. Repeating it is harmless: a second
    /// run finds nothing missing. Limit: a missing row that equals another row of the table
    /// in every column is taken as present, so it is the fallback for what a landing cannot
    /// tell (an insert that ClickHouse crashed during).
    pub async fn restore_missing(&self, rows: &[T], token: &str) -> Result<u64, SinkError> {
        // One scratch table per batch, so concurrent writers never share one.
        let digest = twox_hash::XxHash3_128::oneshot(token.as_bytes());
        let scratch = format!("sluice_check_{digest:032x}");
        let drop_scratch = || {
            self.client
                .query("DROP TABLE IF EXISTS ?")
                .bind(Identifier(&scratch))
                .execute()
        };
        drop_scratch().await.map_err(classify)?;
        self.client
            .query("CREATE TABLE ? AS ? ENGINE = Memory")
            .bind(Identifier(&scratch))
            .bind(Identifier(&self.table))
            .execute()
            .await
            .map_err(classify)?;
        let result = self.insert_missing(rows, &scratch).await;
        let dropped = drop_scratch().await;
        let missing = result.map_err(classify)?;
        if let Err(e) = dropped {
            tracing::warn!(table = %scratch, error = %e, "cannot drop a scratch table");
        }
        Ok(missing)
    }

    async fn insert_missing(
        &self,
        rows: &[T],
        scratch: &str,
    ) -> Result<u64, clickhouse::error::Error> {
        self.insert_into(scratch, rows, None).await?;
        let missing_rows = match &self.check_range {
            Some(_) => {
                "SELECT * FROM ? EXCEPT ALL SELECT * FROM ? \
                 WHERE ? BETWEEN (SELECT min(?) FROM ?) AND (SELECT max(?) FROM ?)"
            }
            None => "SELECT * FROM ? EXCEPT ALL SELECT * FROM ?",
        };
        // `INSERT INTO ?` (the table) comes first when `insert`; then the comparison's names.
        let query = |prefix: &str, suffix: &str, insert: bool| {
            let mut q = self
                .client
                .query(&format!("{prefix}{missing_rows}{suffix}"));
            if insert {
                q = q.bind(Identifier(&self.table));
            }
            q = q.bind(Identifier(scratch)).bind(Identifier(&self.table));
            if let Some(c) = &self.check_range {
                q = q
                    .bind(Identifier(c))
                    .bind(Identifier(c))
                    .bind(Identifier(scratch))
                    .bind(Identifier(c))
                    .bind(Identifier(scratch));
            }
            q
        };
        let missing: u64 = query("SELECT count() FROM (", ")", false)
            .fetch_one()
            .await?;
        if missing > 0 {
            // Not deduplicated: these rows are known to be absent.
            query("INSERT INTO ? SETTINGS insert_deduplicate = 0 ", "", true)
                .execute()
                .await?;
        }
        Ok(missing)
    }
}
