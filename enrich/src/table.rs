//! [`StaticTable`]: a fixed mapping held in memory, built in code or read from a CSV or TOML
//! file.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::path::Path;
use std::sync::Arc;

use crate::lookup::{Lookup, LookupError};

/// A row of a table read from a file: its columns by name.
pub type Record = Arc<BTreeMap<String, String>>;

/// A lookup in a fixed in-memory map.
///
/// ```no_run
/// use sluice_enrich::{Enrich, StaticTable};
///
/// // tiers.csv:
/// //   customer,tier,region
/// //   c-1,gold,eu
/// let tiers = StaticTable::from_csv("tiers.csv", "customer")?;
/// struct Order { customer: String, tier: String }
/// let enrich = Enrich::new(
///     tiers,
///     |o: &Order| Some(o.customer.clone()),
///     |o, row| o.tier = row.get("tier").cloned().unwrap_or_default(),
/// );
/// # Ok::<(), sluice_enrich::LookupError>(())
/// ```
#[derive(Clone, Debug)]
pub struct StaticTable<K, V> {
    map: Arc<HashMap<K, V>>,
}

impl<K, V> StaticTable<K, V> {
    /// The table holding `map`.
    pub fn new(map: HashMap<K, V>) -> Self {
        Self { map: Arc::new(map) }
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl StaticTable<String, Record> {
    /// Reads a CSV file with a header row; each row is keyed by its `key_column` and holds all
    /// its columns. A missing key column, a short row or a repeated key is an error naming the
    /// line.
    pub fn from_csv(path: impl AsRef<Path>, key_column: &str) -> Result<Self, LookupError> {
        let path = path.as_ref();
        let fail = |what: String| LookupError::permanent(format!("{}: {what}", path.display()));
        let mut reader = csv::Reader::from_path(path).map_err(|e| fail(e.to_string()))?;
        let headers = reader.headers().map_err(|e| fail(e.to_string()))?.clone();
        let key_at = headers
            .iter()
            .position(|h| h == key_column)
            .ok_or_else(|| fail(format!("no column `{key_column}` in the header")))?;
        let mut map = HashMap::new();
        for row in reader.records() {
            let row = row.map_err(|e| fail(e.to_string()))?;
            let line = row.position().map_or(0, |p| p.line());
            let key = row[key_at].to_owned();
            let record: BTreeMap<String, String> = headers
                .iter()
                .zip(row.iter())
                .map(|(h, v)| (h.to_owned(), v.to_owned()))
                .collect();
            if map.insert(key.clone(), Arc::new(record)).is_some() {
                return Err(fail(format!("line {line}: key `{key}` appears twice")));
            }
        }
        Ok(Self::new(map))
    }

    /// Reads a TOML file whose top-level keys are the table's keys, each either a string
    /// (held as column `value`) or a table of scalars (its columns):
    ///
    /// ```toml
    /// "c-1" = { tier = "gold", region = "eu" }
    /// "c-2" = "silver"
    /// ```
    pub fn from_toml(path: impl AsRef<Path>) -> Result<Self, LookupError> {
        let path = path.as_ref();
        let fail = |what: String| LookupError::permanent(format!("{}: {what}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        let scalar = |key: &str, v: &toml::Value| match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(_)
            | toml::Value::Float(_)
            | toml::Value::Boolean(_)
            | toml::Value::Datetime(_) => Ok(v.to_string()),
            _ => Err(fail(format!(
                "`{key}`: values must be strings, numbers or booleans"
            ))),
        };
        let mut map = HashMap::new();
        for (key, value) in table {
            let record = match &value {
                toml::Value::Table(columns) => columns
                    .iter()
                    .map(|(c, v)| Ok((c.clone(), scalar(&key, v)?)))
                    .collect::<Result<BTreeMap<_, _>, LookupError>>()?,
                v => BTreeMap::from([("value".to_owned(), scalar(&key, v)?)]),
            };
            map.insert(key, Arc::new(record));
        }
        Ok(Self::new(map))
    }
}

impl<K, V> Lookup for StaticTable<K, V>
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    type Key = K;
    type Value = V;

    async fn lookup(&self, keys: &[K]) -> Result<Vec<Option<V>>, LookupError> {
        Ok(keys.iter().map(|k| self.map.get(k).cloned()).collect())
    }
}
