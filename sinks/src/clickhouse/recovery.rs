//! After a crash: whether a batch landed (its landing view says), whether an earlier owner's
//! insert of it is still running, writing the spans of batches that did not land, and the
//! row-by-row check for what only a ClickHouse crash during an insert leaves unknown.

use std::collections::HashMap;

use clickhouse::sql::Identifier;
use sluice_pipeline::{Batch, SinkError};

use super::LANDINGS_TABLE;
use super::client::classify;
use super::cluster::{Layout, Shards};
use super::encode::{Encoder, quote_identifier};
use super::sink::ClickHouseSink;
use super::token::{batch_token, group_token, recovery_token, span_token};

/// How many rows of a token landed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Landed {
    /// On every replica: per shard the least any of its replicas holds, summed over shards
    /// (on one server, simply the rows).
    pub everywhere: u64,
    /// On some replica: per shard the most any of its replicas holds, summed.
    pub anywhere: u64,
}

/// What to do with a span of a recovered batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Its batch, or the span alone, landed on every replica: skip it.
    Landed,
    /// Nothing of it landed anywhere: insert it under its recovery token.
    Nowhere,
    /// Part of it landed (a ClickHouse crash during the insert, or a replica that missed it):
    /// compare rows.
    InPart,
}

impl Verdict {
    /// `whole`: the landings of the span's batch (`items` rows); `again`: of the span alone
    /// (`rows` rows).
    fn of(whole: Landed, again: Landed, items: u64, rows: u64) -> Self {
        if whole.everywhere >= items || again.everywhere >= rows {
            Verdict::Landed
        } else if whole.anywhere == 0 && again.anywhere == 0 {
            Verdict::Nowhere
        } else {
            Verdict::InPart
        }
    }
}

/// Folds per-replica landings (`(replica, token, rows)`) into [`Landed`] per token.
fn fold_replicas(shards: &Shards, rows: Vec<(u64, String, u64)>) -> HashMap<String, Landed> {
    let mut per_token: HashMap<String, Vec<u64>> = HashMap::new();
    for (replica, token, n) in rows {
        let held = per_token
            .entry(token)
            .or_insert_with(|| vec![0; shards.replicas.len()]);
        if let Some(slot) = held.get_mut(replica as usize) {
            *slot += n;
        }
    }
    per_token
        .into_iter()
        .map(|(token, held)| {
            let mut landed = Landed::default();
            for shard in 0..shards.slots.len() {
                let of_shard = shards
                    .replicas
                    .iter()
                    .zip(&held)
                    .filter(|(r, _)| r.shard == shard)
                    .map(|(_, n)| *n);
                landed.everywhere += of_shard.clone().min().unwrap_or(0);
                landed.anywhere += of_shard.max().unwrap_or(0);
            }
            (token, landed)
        })
        .collect()
}

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
    /// table's landing view; in the sharded layout, from every replica's own landings.
    pub(crate) async fn landed(
        &self,
        tokens: &[String],
    ) -> Result<HashMap<String, Landed>, SinkError> {
        if tokens.is_empty() {
            return Ok(HashMap::new());
        }
        if let Some(cluster) = &self.cluster
            && cluster.layout == Layout::Sharded
        {
            return self.landed_per_replica(&cluster.name, tokens).await;
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
        Ok(rows
            .into_iter()
            .map(|(token, n)| {
                let landed = Landed {
                    everywhere: n,
                    anywhere: n,
                };
                (token, landed)
            })
            .collect())
    }

    /// [`Self::landed`] replica by replica: through the `Distributed` landings table a read
    /// sees one replica per shard, and a replica killed between storing a block and its
    /// landing holds rows its landings do not show.
    async fn landed_per_replica(
        &self,
        cluster: &str,
        tokens: &[String],
    ) -> Result<HashMap<String, Landed>, SinkError> {
        let shards = Shards::of(&self.client, cluster, LANDINGS_TABLE).await?;
        let each: Vec<String> = shards
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "SELECT toUInt64({i}) AS replica, token, rows FROM {} \
                     WHERE target_table = ? AND token IN ?",
                    shards.remote(r)
                )
            })
            .collect();
        let mut query = self.client.query(&format!(
            "SELECT replica, token, sum(rows) FROM ({}) GROUP BY replica, token",
            each.join(" UNION ALL ")
        ));
        for _ in &shards.replicas {
            query = query.bind(&*self.table).bind(tokens);
        }
        let rows: Vec<(u64, String, u64)> = query.fetch_all().await.map_err(classify)?;
        Ok(fold_replicas(&shards, rows))
    }

    /// How many inserts under any of `tokens` the server is running now.
    async fn running(&self, tokens: &[String]) -> Result<u64, SinkError> {
        if tokens.is_empty() {
            return Ok(0);
        }
        // On a cluster the insert may run on any node (the one its owner reached, and every
        // node the Distributed table forwards it to); a node that is down runs nothing.
        let query = match &self.cluster {
            Some(c) => self
                .client
                .query("SELECT count() FROM clusterAllReplicas(?, system.processes) WHERE Settings['insert_deduplication_token'] IN ? SETTINGS skip_unavailable_shards = 1")
                .bind(&*c.name),
            None => self
                .client
                .query("SELECT count() FROM system.processes WHERE Settings['insert_deduplication_token'] IN ?"),
        };
        query.bind(tokens).fetch_one().await.map_err(classify)
    }

    /// A transient error while an insert under any of `tokens` is running: an earlier owner
    /// killed after sending the whole body, with ClickHouse still at it. Its batch is waited
    /// for rather than taken for lost.
    async fn none_running(&self, tokens: &[String]) -> Result<(), SinkError> {
        let running = self.running(tokens).await?;
        if running > 0 {
            return Err(SinkError::transient(format!(
                "{running} insert(s) of an earlier owner into `{}` still running; waiting for them before replaying their batches",
                self.table
            )));
        }
        Ok(())
    }

    /// Whether a [`Delivery::Rebuilt`](sluice_pipeline::Delivery::Rebuilt) batch may be
    /// inserted whole under its batch's token, as it was the first time: unless a run that
    /// could not rebuild it wrote some of its spans alone, under their recovery tokens (the
    /// whole batch would hold those rows again). Whole, the table and each of its
    /// materialised views drop what they already hold of it and take what they lack.
    pub(crate) async fn may_write_whole(&self, batch: &Batch<T>) -> Result<bool, SinkError> {
        let alone: Vec<String> = batch
            .spans()
            .iter()
            .filter_map(|s| Some(recovery_token(&self.table, s.batch.as_ref()?, s)))
            .collect();
        if alone.len() != batch.spans().len() {
            return Ok(false);
        }
        let mut tokens = alone.clone();
        tokens.push(batch_token(&self.table, batch));
        self.none_running(&tokens).await?;
        let landed = self.landed(&alone).await?;
        Ok(landed.values().all(|l| l.anywhere == 0))
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
        let landed = |token: &str| landed.get(token).copied().unwrap_or_default();
        self.none_running(&tokens).await?;
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
            match Verdict::of(whole, again, b.items, n) {
                Verdict::Landed => done.landed += n,
                Verdict::Nowhere => {
                    self.insert_into(&self.table, rows, Some(&token))
                        .await
                        .map_err(classify)?;
                    done.inserted += n;
                }
                Verdict::InPart => {
                    done.checked += n;
                    done.restored += self.restore_missing(rows, &token).await?;
                }
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
        let result = match &self.cluster {
            Some(c) if c.layout == Layout::Sharded => {
                self.insert_missing_per_replica(rows, &scratch, &c.name)
                    .await
            }
            _ => self.insert_missing(rows, &scratch).await.map_err(classify),
        };
        let dropped = drop_scratch().await;
        let missing = result?;
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

    /// [`Self::insert_missing`] replica by replica: the rows the sharding key sends to each
    /// shard, compared with each of its replicas' local table, and what one lacks inserted
    /// there alone (through `Distributed`, a row missing on one replica would be written
    /// again on the other too). Returns the rows inserted, over all replicas.
    async fn insert_missing_per_replica(
        &self,
        rows: &[T],
        scratch: &str,
        cluster: &str,
    ) -> Result<u64, SinkError> {
        let shards = Shards::of(&self.client, cluster, &self.table).await?;
        self.insert_into(scratch, rows, None)
            .await
            .map_err(classify)?;
        let scratch = quote_identifier(scratch);
        let range = match &self.check_range {
            Some(c) => {
                let c = quote_identifier(c);
                format!(
                    " WHERE {c} BETWEEN (SELECT min({c}) FROM {scratch}) AND (SELECT max({c}) FROM {scratch})"
                )
            }
            None => String::new(),
        };
        // Not deduplicated: these rows are known to be absent from that replica.
        let insert = self.client.clone().with_setting("insert_deduplicate", "0");
        let mut inserted = 0;
        for replica in &shards.replicas {
            let remote = shards.remote(replica);
            let missing_rows = format!(
                "SELECT * FROM {scratch} WHERE {} EXCEPT ALL SELECT * FROM {remote}{range}",
                shards.routes_to(replica.shard)
            );
            let missing: u64 = self
                .client
                .query(&format!("SELECT count() FROM ({missing_rows})"))
                .fetch_one()
                .await
                .map_err(classify)?;
            if missing > 0 {
                insert
                    .query(&format!(
                        "INSERT INTO FUNCTION {remote} SELECT * FROM ({missing_rows})"
                    ))
                    .execute()
                    .await
                    .map_err(classify)?;
                tracing::warn!(table = %self.table, replica = %replica.address, rows = missing, "rows missing on one replica inserted there");
                inserted += missing;
            }
        }
        Ok(inserted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn landed(everywhere: u64, anywhere: u64) -> Landed {
        Landed {
            everywhere,
            anywhere,
        }
    }

    #[test]
    fn a_span_is_skipped_only_when_every_replica_holds_it() {
        let none = Landed::default();
        assert_eq!(Verdict::of(landed(10, 10), none, 10, 4), Verdict::Landed);
        assert_eq!(Verdict::of(none, landed(4, 4), 10, 4), Verdict::Landed);
        assert_eq!(Verdict::of(none, none, 10, 4), Verdict::Nowhere);
        // On one replica of a shard and not the other.
        assert_eq!(Verdict::of(landed(6, 10), none, 10, 4), Verdict::InPart);
        assert_eq!(Verdict::of(none, landed(0, 4), 10, 4), Verdict::InPart);
    }

    #[test]
    fn landings_fold_per_shard_least_and_most_over_its_replicas() {
        use super::super::cluster::Replica;
        let replica = |shard, address: &str| Replica {
            shard,
            address: address.into(),
        };
        // 2 shards x 2 replicas; the batch's 10 rows are 6 on shard 1 and 4 on shard 2.
        let shards = Shards::fixed(
            vec![(0, 1), (1, 2)],
            vec![
                replica(0, "n1:9000"),
                replica(0, "n2:9000"),
                replica(1, "n3:9000"),
                replica(1, "n4:9000"),
            ],
        );
        let t = |s: &str| s.to_owned();
        let all = fold_replicas(
            &shards,
            vec![
                (0, t("a"), 6),
                (1, t("a"), 6),
                (2, t("a"), 4),
                (3, t("a"), 4),
            ],
        );
        assert_eq!(all["a"], landed(10, 10));
        // Node 4 missed it: shard 2 counts as landed nowhere for `everywhere`.
        let part = fold_replicas(
            &shards,
            vec![(0, t("b"), 6), (1, t("b"), 6), (2, t("b"), 4)],
        );
        assert_eq!(part["b"], landed(6, 10));
        assert_eq!(
            Verdict::of(part["b"], Landed::default(), 10, 10),
            Verdict::InPart
        );
    }
}
