//! Writing through a ClickHouse cluster's `Distributed` tables, and where each replica of a
//! shard keeps its rows, for the checks after a crash.
//!
//! Through a `Distributed` table a read sees one replica per shard and a write reaches them
//! all, so in the sharded layout (plain `MergeTree` tables that the `Distributed` table writes
//! replica by replica) the recovery asks every replica on its own, through `remote()`.

use std::sync::Arc;

use clickhouse::Client;
use sluice_pipeline::SinkError;

use super::client::classify;

/// How the tables behind a cluster's `Distributed` tables keep a shard's replicas alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// `Replicated…MergeTree` tables (`internal_replication = true`): ClickHouse copies each
    /// block between a shard's replicas and drops repeats across them.
    #[default]
    Replicated,
    /// Plain `…MergeTree` tables (`internal_replication = false`): the `Distributed` table
    /// writes every replica itself, each deduplicating on its own, so the recovery checks
    /// each replica.
    Sharded,
}

impl Layout {
    /// Its name in configuration and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Replicated => "replicated",
            Layout::Sharded => "sharded",
        }
    }
}

impl std::str::FromStr for Layout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "replicated" => Ok(Layout::Replicated),
            "sharded" => Ok(Layout::Sharded),
            other => Err(format!(
                "`{other}` is not a layout: expected `replicated` or `sharded`"
            )),
        }
    }
}

/// The cluster a sink writes through.
#[derive(Clone, Debug)]
pub(crate) struct Cluster {
    pub name: Arc<str>,
    pub layout: Layout,
}

/// One replica of one shard, as `remote()` reaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Replica {
    /// Index into [`Shards::slots`].
    pub shard: usize,
    /// `host:port` of its native protocol.
    pub address: String,
}

/// Where a `Distributed` table's rows live: the local table on every node, the sharding key
/// and which slots of it each shard takes, and every replica.
#[derive(Clone, Debug)]
pub(crate) struct Shards {
    database: String,
    local: String,
    key: String,
    total_weight: u64,
    /// Per shard, its slots `[from, to)` of `key % total_weight`.
    pub slots: Vec<(u64, u64)>,
    pub replicas: Vec<Replica>,
}

impl Shards {
    /// The shards of `table` (a `Distributed` table of the client's database) on `cluster`.
    pub async fn of(client: &Client, cluster: &str, table: &str) -> Result<Self, SinkError> {
        let (database, engine_full): (String, String) = client
            .query("SELECT currentDatabase(), engine_full FROM system.tables WHERE database = currentDatabase() AND name = ?")
            .bind(table)
            .fetch_optional()
            .await
            .map_err(classify)?
            .ok_or_else(|| SinkError::permanent(format!("table `{table}` does not exist")))?;
        let args = distributed_args(&engine_full).ok_or_else(|| {
            SinkError::permanent(format!(
                "`{table}` is not a Distributed table with a sharding key: {engine_full}"
            ))
        })?;
        let [_, _, local, key] = &args[..] else {
            return Err(SinkError::permanent(format!(
                "`{table}` has no sharding key (rows of a replayed batch must reach the same shard): {engine_full}"
            )));
        };
        let nodes: Vec<(u32, u32, String, u16)> = client
            .query("SELECT shard_num, shard_weight, host_address, port FROM system.clusters WHERE cluster = ? ORDER BY shard_num, replica_num")
            .bind(cluster)
            .fetch_all()
            .await
            .map_err(classify)?;
        if nodes.is_empty() {
            return Err(SinkError::permanent(format!(
                "cluster `{cluster}` is not in the server's remote_servers"
            )));
        }
        let mut slots: Vec<(u64, u64)> = Vec::new();
        let mut replicas = Vec::new();
        let mut last_shard = None;
        for (shard, weight, host, port) in nodes {
            if last_shard != Some(shard) {
                let from = slots.last().map_or(0, |s| s.1);
                slots.push((from, from + u64::from(weight)));
                last_shard = Some(shard);
            }
            replicas.push(Replica {
                shard: slots.len() - 1,
                address: if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                },
            });
        }
        Ok(Self {
            database,
            local: unquote(local),
            key: key.clone(),
            total_weight: slots.last().map_or(1, |s| s.1).max(1),
            slots,
            replicas,
        })
    }

    /// The local table as it lives on `replica`.
    pub fn remote(&self, replica: &Replica) -> String {
        format!(
            "remote({}, {}, {})",
            literal(&replica.address),
            literal(&self.database),
            literal(&self.local),
        )
    }

    /// A condition true of the rows the sharding key sends to `shard` (the key's value
    /// modulo the shards' total weight falls in the shard's slots, as `Distributed` routes).
    pub fn routes_to(&self, shard: usize) -> String {
        let (from, to) = self.slots[shard];
        format!(
            "(({key}) % {w}) >= {from} AND (({key}) % {w}) < {to}",
            key = self.key,
            w = self.total_weight
        )
    }

    /// Shards of a table `t_local` keyed by `cityHash64(k)`, for unit tests.
    #[cfg(test)]
    pub fn fixed(slots: Vec<(u64, u64)>, replicas: Vec<Replica>) -> Self {
        Self {
            database: "db".into(),
            local: "t_local".into(),
            key: "cityHash64(k)".into(),
            total_weight: slots.last().map_or(1, |s| s.1),
            slots,
            replicas,
        }
    }
}

/// The arguments of a `Distributed(cluster, database, table[, sharding_key[, policy]])`
/// engine, split at top-level commas, as written.
pub(crate) fn distributed_args(engine_full: &str) -> Option<Vec<String>> {
    let rest = engine_full.strip_prefix("Distributed(")?;
    let (mut depth, mut quote) = (0usize, None::<char>);
    let mut args = vec![String::new()];
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(_), '\\') => {
                let last = args.last_mut()?;
                last.push(c);
                last.push(chars.next()?);
                continue;
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '`' | '"') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') if depth == 0 => {
                return Some(args.into_iter().map(|a| a.trim().to_owned()).collect());
            }
            (None, ')') => depth -= 1,
            (None, ',') if depth == 0 => {
                args.push(String::new());
                continue;
            }
            _ => {}
        }
        args.last_mut()?.push(c);
    }
    None
}

/// An identifier or string argument without its quotes.
pub(crate) fn unquote(arg: &str) -> String {
    let inner = arg
        .strip_prefix(['\'', '`', '"'])
        .and_then(|a| a.strip_suffix(['\'', '`', '"']))
        .unwrap_or(arg);
    inner
        .replace("\\'", "'")
        .replace("\\`", "`")
        .replace("\\\\", "\\")
}

/// A ClickHouse string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributed_arguments_split_at_top_level_commas() {
        let args = distributed_args(
            "Distributed('c', 'db', 'events_local', cityHash64(t, k)) SETTINGS x = 1",
        )
        .unwrap();
        assert_eq!(args, ["'c'", "'db'", "'events_local'", "cityHash64(t, k)"]);
        assert_eq!(unquote(&args[2]), "events_local");
        assert_eq!(
            distributed_args("Distributed(`c`, `d`, `a,b`)").unwrap()[2],
            "`a,b`"
        );
        assert!(distributed_args("MergeTree ORDER BY k").is_none());
    }

    #[test]
    fn rows_route_by_the_key_modulo_the_total_weight() {
        let shards = Shards::fixed(
            vec![(0, 1), (1, 3)],
            vec![Replica {
                shard: 0,
                address: "n1:9000".into(),
            }],
        );
        assert_eq!(
            shards.routes_to(1),
            "((cityHash64(k)) % 3) >= 1 AND ((cityHash64(k)) % 3) < 3"
        );
        assert_eq!(
            shards.remote(&shards.replicas[0]),
            "remote('n1:9000', 'db', 't_local')"
        );
    }
}
