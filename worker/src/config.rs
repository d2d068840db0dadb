//! A worker's configuration: a TOML file, then the environment (the variables FrameWorks' Go
//! worker used, so that a Sluice worker drops in where it ran, and the pipeline's own), then
//! validation that names the offending key. The framework's sections are `[kafka]`,
//! `[clickhouse]`, `[postgres]`, `[pipeline]`, `[health]` and `[log]`; a pipeline adds one of
//! its own ([`Settings`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sluice_sinks::Layout;

/// A configuration error, naming the key (or environment variable) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has wrong keys or types.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (it names the key).
        message: String,
    },
    /// A value is missing or invalid.
    #[error("invalid configuration `{key}`: {message}")]
    Invalid {
        /// The key or environment variable.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// An invalid value of `key`, saying why (for a pipeline's own [`Settings::validate`]).
pub fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// A value never shown in logs, metrics or `validate` output (it serialises as `***`).
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Secret(String);

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// A pipeline's own section of the configuration file, `[SECTION]`, deserialised into the
/// pipeline's type (unknown keys are refused, naming the key, with `#[serde(deny_unknown_fields)]`).
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Default, Deserialize, Serialize)]
/// #[serde(default, deny_unknown_fields)]
/// struct Shop {
///     /// Currency the totals are kept in.
///     currency: String,
/// }
///
/// impl sluice_worker::Settings for Shop {
///     const SECTION: &'static str = "shop";
///
///     fn apply_env(
///         &mut self,
///         env: &dyn Fn(&str) -> Option<String>,
///     ) -> Result<(), sluice_worker::ConfigError> {
///         if let Some(c) = env("SHOP_CURRENCY") {
///             self.currency = c;
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Settings:
    DeserializeOwned + Serialize + Default + Clone + fmt::Debug + Send + Sync + 'static
{
    /// The section's name in the file (`[shop]`); empty for a pipeline without one.
    const SECTION: &'static str;

    /// Overrides from the environment.
    fn apply_env(&mut self, _env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Checks the values, naming the first bad key (`shop.currency`).
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// The settings of a pipeline without a section of its own.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

impl Settings for NoSettings {
    const SECTION: &'static str = "";
}

/// What a pipeline names by default: its consumer group, topics and ClickHouse database
/// (each used when neither the file nor the environment sets it).
#[derive(Clone, Debug, Default)]
pub struct Identity {
    /// The pipeline's name (the migrations' scope, and the default group and database).
    pub name: String,
    /// `kafka.group_id`; default: the name.
    pub group_id: Option<String>,
    /// `kafka.topics`; none: the configuration must name them.
    pub topics: Vec<String>,
    /// `clickhouse.database`; default: the name.
    pub database: Option<String>,
}

/// The whole configuration: the framework's sections and the pipeline's own.
#[derive(Clone, Debug, Default)]
pub struct Config<S = NoSettings> {
    /// Kafka source (and dead-letter producer).
    pub kafka: KafkaConfig,
    /// ClickHouse sinks.
    pub clickhouse: ClickHouseConfig,
    /// PostgreSQL reducers (on when `url` is set).
    pub postgres: PostgresConfig,
    /// Runtime settings.
    pub pipeline: PipelineSettings,
    /// HTTP endpoints.
    pub health: HealthConfig,
    /// Logging.
    pub log: LogConfig,
    /// Lookups the shell provides to enrich stages.
    pub enrich: EnrichConfig,
    /// The pipeline's own section.
    pub settings: S,
}

/// The file as the framework reads it: its sections, and the rest for the pipeline.
#[derive(Default, Deserialize)]
#[serde(default)]
struct File {
    kafka: KafkaConfig,
    clickhouse: ClickHouseConfig,
    postgres: PostgresConfig,
    pipeline: PipelineSettings,
    health: HealthConfig,
    log: LogConfig,
    enrich: EnrichConfig,
    #[serde(flatten)]
    rest: BTreeMap<String, toml::Value>,
}

/// `[kafka]`: Sluice's own keys; every other key is a librdkafka property, passed verbatim
/// (`"security.protocol" = "SASL_SSL"`, `"sasl.password" = "…"`, `"fetch.max.bytes" = 1048576`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct KafkaConfig {
    /// `KAFKA_BROKERS`: comma-separated bootstrap servers.
    pub brokers: String,
    /// `KAFKA_GROUP_ID`.
    pub group_id: String,
    /// `KAFKA_TOPICS`.
    pub topics: Vec<String>,
    /// `KAFKA_CLIENT_ID`.
    pub client_id: String,
    /// Dead-letter topic; default `<first topic>.dlq`.
    pub dlq_topic: Option<String>,
    /// How often acknowledged offsets are committed, milliseconds.
    pub commit_interval_ms: u64,
    /// librdkafka properties.
    #[serde(flatten)]
    pub options: BTreeMap<String, toml::Value>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            // Empty: the pipeline's default (see `Identity`).
            group_id: String::new(),
            topics: Vec::new(),
            client_id: "sluice".into(),
            dlq_topic: None,
            commit_interval_ms: 1000,
            options: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// A librdkafka client of the brokers with every configured property a producer or admin
    /// client accepts (TLS, SASL, …), for `generate`, topic creation and the bench's probe.
    pub fn producer_client(&self) -> Result<rdkafka::ClientConfig, ConfigError> {
        let mut client = rdkafka::ClientConfig::new();
        client.set("bootstrap.servers", &self.brokers);
        client.set("client.id", &self.client_id);
        let options = self.librdkafka_options()?;
        for (k, v) in sluice_pipeline::producer_properties(&options) {
            client.set(k, v);
        }
        Ok(client)
    }

    /// librdkafka properties as strings (TOML numbers and booleans are accepted).
    pub fn librdkafka_options(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        self.options
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    _ => {
                        return Err(invalid(
                            &format!("kafka.{k}"),
                            "librdkafka properties must be strings, numbers or booleans",
                        ));
                    }
                };
                Ok((k.clone(), s))
            })
            .collect()
    }

    /// The dead-letter topic.
    pub fn dlq_topic(&self) -> String {
        self.dlq_topic.clone().unwrap_or_else(|| {
            format!(
                "{}.dlq",
                self.topics.first().map_or("sluice", String::as_str)
            )
        })
    }
}

/// `[clickhouse]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// `CLICKHOUSE_HOST`: `host`, `host:port` or an `http(s)://` URL (HTTP, default port 8123).
    pub host: String,
    /// `CLICKHOUSE_DB`.
    pub database: String,
    /// `CLICKHOUSE_USER`.
    pub user: String,
    /// `CLICKHOUSE_PASSWORD`.
    pub password: Secret,
    /// CA certificate file for `https://` with a private CA.
    pub ca_file: Option<PathBuf>,
    /// Compression of insert bodies: `lz4` (default) or `none` (a ClickHouse on the same
    /// host or a fast link, where lz4 costs both sides CPU and saves no time).
    pub compression: InsertCompression,
    /// `CLICKHOUSE_CLUSTER`: a cluster of the servers' `remote_servers`. Set, the tables are
    /// `Distributed` tables on it (`migrate` makes them so) and inserts wait for every shard.
    pub cluster: Option<String>,
    /// `CLICKHOUSE_LAYOUT`: `replicated` (the default: `Replicated…MergeTree` tables, DDL
    /// `ON CLUSTER`) or `sharded` (plain `…MergeTree` tables that the `Distributed` tables
    /// write replica by replica, DDL run on each of `nodes`).
    pub layout: Layout,
    /// `CLICKHOUSE_NODES` (comma-separated): every node's HTTP URL, where `migrate` runs the
    /// DDL of the sharded layout.
    pub nodes: Vec<String>,
}

/// `clickhouse.compression`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InsertCompression {
    /// LZ4 blocks, as the `clickhouse` crate sends by default.
    #[default]
    Lz4,
    /// Plain RowBinary.
    None,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1:8123".into(),
            // Empty: the pipeline's default (see `Identity`).
            database: String::new(),
            user: "default".into(),
            password: Secret::default(),
            ca_file: None,
            compression: InsertCompression::Lz4,
            cluster: None,
            layout: Layout::Replicated,
            nodes: Vec::new(),
        }
    }
}

impl ClickHouseConfig {
    /// The HTTP(S) URL of the server. Port 9000 (the native protocol, which the Go worker
    /// used) is refused with an explanation.
    pub fn url(&self) -> Result<String, ConfigError> {
        let raw = self.host.trim();
        if raw.is_empty() {
            return Err(invalid("clickhouse.host", "is empty"));
        }
        let (scheme, rest) = match raw.split_once("://") {
            Some((s @ ("http" | "https"), rest)) => (s, rest),
            Some((s, _)) => {
                return Err(invalid(
                    "clickhouse.host",
                    format!("scheme `{s}` is not supported: use http:// or https://"),
                ));
            }
            None => ("http", raw),
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port: u16 = p.parse().map_err(|_| {
                    invalid("clickhouse.host", format!("`{p}` is not a port number"))
                })?;
                (h, port)
            }
            _ => (authority, if scheme == "https" { 8443 } else { 8123 }),
        };
        if host.is_empty() {
            return Err(invalid("clickhouse.host", format!("`{raw}` has no host")));
        }
        if port == 9000 || port == 9440 {
            return Err(invalid(
                "clickhouse.host",
                format!(
                    "port {port} is ClickHouse's native TCP protocol; Sluice talks HTTP: use port 8123 (or 8443 for https)"
                ),
            ));
        }
        Ok(format!("{scheme}://{host}:{port}"))
    }
}

/// `[postgres]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `DATABASE_URL`; the reducer runs only when it is set.
    pub url: Option<Secret>,
}

/// `[pipeline]`: batching, concurrency, queues, retries, shutdown (for every table a pipeline
/// writes).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSettings {
    /// Batches per queue between stages.
    pub queue_capacity: usize,
    /// Rows per insert at most.
    pub batch_max_rows: usize,
    /// Bytes per insert at most, counted as the rows take in memory.
    pub batch_max_bytes: usize,
    /// How long a batch may wait to fill, milliseconds.
    pub batch_linger_ms: u64,
    /// Concurrent inserts per ClickHouse table.
    pub insert_concurrency: usize,
    /// One batch per table holds the rows of all partitions (one insert per linger or per
    /// `batch_max_rows`, however many partitions); `false` cuts one batch per partition,
    /// which crash replays can cut again identically.
    pub batch_across_partitions: bool,
    /// Retries of a failing write before the worker gives up; unset: retry without limit.
    pub max_retries: Option<u32>,
    /// Longest wait between retries, milliseconds.
    pub max_backoff_ms: u64,
    /// How long a graceful shutdown may take, seconds.
    pub drain_deadline_secs: u64,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            queue_capacity: 8,
            batch_max_rows: 50_000,
            batch_max_bytes: 8 << 20,
            batch_linger_ms: 500,
            insert_concurrency: 2,
            batch_across_partitions: true,
            max_retries: None,
            max_backoff_ms: 10_000,
            drain_deadline_secs: 30,
        }
    }
}

/// `[health]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// `ENABLE_HEALTH_ENDPOINT`.
    pub enabled: bool,
    /// `HEALTH_PORT`.
    pub port: u16,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            port: 18005,
        }
    }
}

/// `[enrich]`: lookups the shell opens for a pipeline's enrich stages, and their caches.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrichConfig {
    /// `GEOIP_DATABASE`: a MaxMind City database (`GeoLite2-City.mmdb`); unset, no GeoIP.
    pub geoip_database: Option<PathBuf>,
    /// Entries each enrich stage's cache keeps at most.
    pub cache_capacity: usize,
    /// Seconds a cached answer is used before its key is looked up again.
    pub cache_ttl_secs: u64,
}

impl Default for EnrichConfig {
    fn default() -> Self {
        Self {
            geoip_database: None,
            cache_capacity: 100_000,
            cache_ttl_secs: 3600,
        }
    }
}

impl EnrichConfig {
    /// The cache an enrich stage gets.
    pub fn cache(&self) -> sluice_enrich::CacheConfig {
        sluice_enrich::CacheConfig {
            capacity: self.cache_capacity,
            ttl: std::time::Duration::from_secs(self.cache_ttl_secs),
        }
    }
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `LOG_LEVEL`: a level (`info`) or a filter (`info,sluice_pipeline=debug`).
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl<S: Settings> Config<S> {
    /// Reads `path` (if given), applies the environment, fills in what the pipeline names by
    /// default (`identity`), validates.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        identity: &Identity,
    ) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse {
                    path: path.into(),
                    message,
                })?
            }
            None => Self::default(),
        };
        config.apply_env(&env)?;
        config.settings.apply_env(&env)?;
        config.fill_in(identity);
        config.validate()?;
        Ok(config)
    }

    /// The configuration a file's text holds (nothing filled in, nothing validated).
    fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut settings = S::default();
        for (key, value) in file.rest {
            if !S::SECTION.is_empty() && key == S::SECTION {
                settings = value
                    .try_into()
                    .map_err(|e: toml::de::Error| format!("[{key}]: {}", e.message()))?;
            } else {
                let mut known = vec![
                    "kafka",
                    "clickhouse",
                    "postgres",
                    "pipeline",
                    "health",
                    "log",
                    "enrich",
                ];
                if !S::SECTION.is_empty() {
                    known.push(S::SECTION);
                }
                return Err(format!(
                    "unknown section `{key}` (known: {})",
                    known.join(", ")
                ));
            }
        }
        Ok(Self {
            kafka: file.kafka,
            clickhouse: file.clickhouse,
            postgres: file.postgres,
            pipeline: file.pipeline,
            health: file.health,
            log: file.log,
            enrich: file.enrich,
            settings,
        })
    }

    /// Where neither the file nor the environment named them: the pipeline's group, topics
    /// and database.
    fn fill_in(&mut self, identity: &Identity) {
        if self.kafka.group_id.trim().is_empty() {
            self.kafka.group_id = identity
                .group_id
                .clone()
                .unwrap_or_else(|| identity.name.clone());
        }
        if self.kafka.topics.is_empty() {
            self.kafka.topics = identity.topics.clone();
        }
        if self.clickhouse.database.trim().is_empty() {
            self.clickhouse.database = identity
                .database
                .clone()
                .unwrap_or_else(|| identity.name.clone());
        }
    }

    /// Overrides from the environment variables FrameWorks' Go worker used.
    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let list = |v: String| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        };
        if let Some(v) = env("KAFKA_BROKERS") {
            self.kafka.brokers = list(v).join(",");
        }
        if let Some(v) = env("KAFKA_GROUP_ID") {
            self.kafka.group_id = v;
        }
        if let Some(v) = env("KAFKA_TOPICS") {
            self.kafka.topics = list(v);
            if self.kafka.topics.is_empty() {
                return Err(invalid("KAFKA_TOPICS", "names no topic"));
            }
        }
        if let Some(v) = env("KAFKA_CLIENT_ID") {
            self.kafka.client_id = v;
        }
        if let Some(v) = env("CLICKHOUSE_HOST") {
            self.clickhouse.host = v;
        }
        if let Some(v) = env("CLICKHOUSE_DB") {
            self.clickhouse.database = v;
        }
        if let Some(v) = env("CLICKHOUSE_USER") {
            self.clickhouse.user = v;
        }
        if let Some(v) = env("CLICKHOUSE_PASSWORD") {
            self.clickhouse.password = Secret(v);
        }
        if let Some(v) = env("CLICKHOUSE_CLUSTER") {
            self.clickhouse.cluster = (!v.trim().is_empty()).then(|| v.trim().to_owned());
        }
        if let Some(v) = env("CLICKHOUSE_LAYOUT") {
            self.clickhouse.layout = v
                .parse()
                .map_err(|e| invalid("clickhouse.layout (CLICKHOUSE_LAYOUT)", e))?;
        }
        if let Some(v) = env("CLICKHOUSE_NODES") {
            self.clickhouse.nodes = list(v);
        }
        if let Some(v) = env("DATABASE_URL") {
            self.postgres.url = (!v.trim().is_empty()).then_some(Secret(v));
        }
        if let Some(v) = env("GEOIP_DATABASE") {
            self.enrich.geoip_database = (!v.trim().is_empty()).then(|| PathBuf::from(v));
        }
        if let Some(v) = env("LOG_LEVEL") {
            self.log.level = v;
        }
        if let Some(v) = env("ENABLE_HEALTH_ENDPOINT") {
            self.health.enabled = parse_bool(&v).ok_or_else(|| {
                invalid(
                    "ENABLE_HEALTH_ENDPOINT",
                    format!("expected true or false, got `{v}`"),
                )
            })?;
        }
        if let Some(v) = env("HEALTH_PORT") {
            self.health.port = v.trim().parse().map_err(|_| {
                invalid("HEALTH_PORT", format!("expected a port number, got `{v}`"))
            })?;
        }
        Ok(())
    }

    /// Checks every value, naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers (KAFKA_BROKERS)", "is empty"));
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id (KAFKA_GROUP_ID)", "is empty"));
        }
        if self.kafka.topics.is_empty() {
            return Err(invalid("kafka.topics (KAFKA_TOPICS)", "names no topic"));
        }
        if self.kafka.topics.contains(&self.kafka.dlq_topic()) {
            return Err(invalid(
                "kafka.dlq_topic",
                "must differ from the topics consumed",
            ));
        }
        self.kafka.librdkafka_options()?;
        self.clickhouse.url().map_err(|e| match e {
            ConfigError::Invalid { message, .. } => {
                invalid("clickhouse.host (CLICKHOUSE_HOST)", message)
            }
            other => other,
        })?;
        if self.clickhouse.database.trim().is_empty() {
            return Err(invalid("clickhouse.database (CLICKHOUSE_DB)", "is empty"));
        }
        if self
            .clickhouse
            .cluster
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return Err(invalid(
                "clickhouse.cluster (CLICKHOUSE_CLUSTER)",
                "is empty",
            ));
        }
        for node in &self.clickhouse.nodes {
            let as_host = ClickHouseConfig {
                host: node.clone(),
                ..ClickHouseConfig::default()
            };
            if let Err(e) = as_host.url() {
                let why = match e {
                    ConfigError::Invalid { message, .. } => message,
                    other => other.to_string(),
                };
                return Err(invalid(
                    "clickhouse.nodes (CLICKHOUSE_NODES)",
                    format!("`{node}`: {why}"),
                ));
            }
        }
        if let Some(url) = &self.postgres.url
            && !(url.expose().starts_with("postgres://")
                || url.expose().starts_with("postgresql://"))
        {
            return Err(invalid(
                "postgres.url (DATABASE_URL)",
                "must start with postgres:// or postgresql://",
            ));
        }
        let p = &self.pipeline;
        for (key, v) in [
            ("pipeline.queue_capacity", p.queue_capacity),
            ("pipeline.batch_max_rows", p.batch_max_rows),
            ("pipeline.batch_max_bytes", p.batch_max_bytes),
            ("pipeline.insert_concurrency", p.insert_concurrency),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let e = &self.enrich;
        if e.cache_capacity == 0 {
            return Err(invalid("enrich.cache_capacity", "must be at least 1"));
        }
        if e.cache_ttl_secs == 0 {
            return Err(invalid("enrich.cache_ttl_secs", "must be at least 1"));
        }
        if let Some(path) = &e.geoip_database
            && let Err(err) = sluice_enrich::MaxMind::open(path)
        {
            return Err(invalid(
                "enrich.geoip_database (GEOIP_DATABASE)",
                format!("not a readable MaxMind database: {err}"),
            ));
        }
        if self.health.enabled && self.health.port == 0 {
            return Err(invalid("health.port (HEALTH_PORT)", "must not be 0"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            invalid(
                "log.level (LOG_LEVEL)",
                format!("`{}` is not a level or filter: {e}", self.log.level),
            )
        })?;
        self.settings.validate()
    }

    /// The effective settings as TOML, with every secret replaced by `***`.
    pub fn redacted(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        line("kafka.brokers", quote(&self.kafka.brokers));
        line("kafka.group_id", quote(&self.kafka.group_id));
        line("kafka.topics", format!("{:?}", self.kafka.topics));
        line("kafka.client_id", quote(&self.kafka.client_id));
        line("kafka.dlq_topic", quote(&self.kafka.dlq_topic()));
        line(
            "kafka.commit_interval_ms",
            self.kafka.commit_interval_ms.to_string(),
        );
        for (k, v) in self.kafka.librdkafka_options().unwrap_or_default() {
            let shown = if is_secret_key(&k) {
                "***".to_owned()
            } else {
                v
            };
            line(&format!("kafka.\"{k}\""), quote(&shown));
        }
        line(
            "clickhouse.url",
            quote(&self.clickhouse.url().unwrap_or_else(|e| e.to_string())),
        );
        line("clickhouse.database", quote(&self.clickhouse.database));
        line("clickhouse.user", quote(&self.clickhouse.user));
        line(
            "clickhouse.password",
            quote(if self.clickhouse.password.expose().is_empty() {
                ""
            } else {
                "***"
            }),
        );
        if let Some(ca) = &self.clickhouse.ca_file {
            line("clickhouse.ca_file", quote(&ca.display().to_string()));
        }
        line(
            "clickhouse.compression",
            quote(match self.clickhouse.compression {
                InsertCompression::Lz4 => "lz4",
                InsertCompression::None => "none",
            }),
        );
        if let Some(cluster) = &self.clickhouse.cluster {
            line("clickhouse.cluster", quote(cluster));
            line("clickhouse.layout", quote(self.clickhouse.layout.name()));
        }
        if !self.clickhouse.nodes.is_empty() {
            line("clickhouse.nodes", format!("{:?}", self.clickhouse.nodes));
        }
        line(
            "postgres.url",
            self.postgres
                .url
                .as_ref()
                .map_or("\"\" # reducer off".to_owned(), |u| {
                    quote(&redact_url(u.expose()))
                }),
        );
        let p = &self.pipeline;
        line("pipeline.queue_capacity", p.queue_capacity.to_string());
        line("pipeline.batch_max_rows", p.batch_max_rows.to_string());
        line("pipeline.batch_max_bytes", p.batch_max_bytes.to_string());
        line("pipeline.batch_linger_ms", p.batch_linger_ms.to_string());
        line(
            "pipeline.insert_concurrency",
            p.insert_concurrency.to_string(),
        );
        line(
            "pipeline.batch_across_partitions",
            p.batch_across_partitions.to_string(),
        );
        line(
            "pipeline.max_retries",
            p.max_retries
                .map_or("\"unlimited\"".to_owned(), |r| r.to_string()),
        );
        line("pipeline.max_backoff_ms", p.max_backoff_ms.to_string());
        line(
            "pipeline.drain_deadline_secs",
            p.drain_deadline_secs.to_string(),
        );
        line(
            "enrich.geoip_database",
            self.enrich
                .geoip_database
                .as_ref()
                .map_or("\"\" # off".to_owned(), |p| quote(&p.display().to_string())),
        );
        line(
            "enrich.cache_capacity",
            self.enrich.cache_capacity.to_string(),
        );
        line(
            "enrich.cache_ttl_secs",
            self.enrich.cache_ttl_secs.to_string(),
        );
        line("health.enabled", self.health.enabled.to_string());
        line("health.port", self.health.port.to_string());
        line("log.level", quote(&self.log.level));
        line(
            "log.format",
            quote(if self.log.format == LogFormat::Json {
                "json"
            } else {
                "text"
            }),
        );
        if !S::SECTION.is_empty()
            && let Ok(toml::Value::Table(table)) = toml::Value::try_from(&self.settings)
        {
            flatten(S::SECTION, &table, &mut line);
        }
        out
    }
}

/// `table`'s values as `prefix.key = value` lines (secrets already `***`).
fn flatten(prefix: &str, table: &toml::Table, line: &mut impl FnMut(&str, String)) {
    for (k, v) in table {
        let key = format!("{prefix}.{k}");
        match v {
            toml::Value::Table(t) => flatten(&key, t, line),
            v => line(&key, v.to_string()),
        }
    }
}

fn quote(s: &str) -> String {
    format!("{s:?}")
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// librdkafka properties whose values are secrets.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.ends_with(".key.pem") || k.contains("token")
}

/// A URL with its password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn err_of<S: Settings>(r: Result<Config<S>, ConfigError>) -> String {
        r.expect_err("must fail").to_string()
    }

    fn identity() -> Identity {
        Identity {
            name: "frameworks".into(),
            group_id: Some("periscope-ingest".into()),
            topics: vec!["analytics_events".into()],
            database: None,
        }
    }

    fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::load(path, env, &identity())
    }

    #[test]
    fn geoip_database_comes_from_the_environment_and_a_bad_one_fails_naming_the_key() {
        let c = load(None, env_of(&[])).unwrap();
        assert_eq!(c.enrich.geoip_database, None);
        assert_eq!(c.enrich.cache().capacity, 100_000);
        let missing = err_of(load(
            None,
            env_of(&[("GEOIP_DATABASE", "/nonexistent/GeoLite2-City.mmdb")]),
        ));
        assert!(
            missing.contains("enrich.geoip_database (GEOIP_DATABASE)")
                && missing.contains("/nonexistent/GeoLite2-City.mmdb"),
            "{missing}"
        );
        let not_a_database = std::env::temp_dir().join("sluice-not-a-geoip.mmdb");
        std::fs::write(&not_a_database, "not a database").unwrap();
        let e = err_of(load(
            None,
            env_of(&[("GEOIP_DATABASE", not_a_database.to_str().unwrap())]),
        ));
        assert!(e.contains("enrich.geoip_database"), "{e}");
        let file = std::env::temp_dir().join("sluice-enrich-config.toml");
        std::fs::write(&file, "[enrich]\ncache_ttl_secs = 0\n").unwrap();
        let e = err_of(load(Some(&file), env_of(&[])));
        assert!(e.contains("enrich.cache_ttl_secs"), "{e}");
        std::fs::write(&file, "[enrich]\ngeoip = \"x\"\n").unwrap();
        let e = err_of(load(Some(&file), env_of(&[])));
        assert!(e.contains("geoip"), "{e}");
    }

    #[test]
    fn environment_overrides_defaults_with_the_go_worker_names() {
        let c = load(
            None,
            env_of(&[
                ("KAFKA_BROKERS", "a:9092, b:9092"),
                ("KAFKA_TOPICS", "t1,t2"),
                ("KAFKA_GROUP_ID", "g"),
                ("CLICKHOUSE_HOST", "ch.internal"),
                ("CLICKHOUSE_PASSWORD", "hunter2"),
                ("DATABASE_URL", "postgres://u:pw@db/x"),
                ("HEALTH_PORT", "19000"),
                ("ENABLE_HEALTH_ENDPOINT", "false"),
                ("LOG_LEVEL", "debug"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.kafka.brokers, "a:9092,b:9092");
        assert_eq!(c.kafka.topics, vec!["t1", "t2"]);
        assert_eq!(c.kafka.dlq_topic(), "t1.dlq");
        assert_eq!(c.clickhouse.url().unwrap(), "http://ch.internal:8123");
        assert_eq!((c.health.port, c.health.enabled), (19000, false));
        let shown = c.redacted();
        assert!(
            !shown.contains("hunter2") && !shown.contains("pw@"),
            "{shown}"
        );
        assert!(shown.contains("postgres://u:***@db/x"), "{shown}");
    }

    #[test]
    fn clickhouse_host_forms() {
        let url = |h: &str| {
            ClickHouseConfig {
                host: h.into(),
                ..Default::default()
            }
            .url()
        };
        assert_eq!(url("ch").unwrap(), "http://ch:8123");
        assert_eq!(url("ch:18123").unwrap(), "http://ch:18123");
        assert_eq!(
            url("https://ch.example.com").unwrap(),
            "https://ch.example.com:8443"
        );
        assert_eq!(
            url("http://10.0.0.1:8123/").unwrap(),
            "http://10.0.0.1:8123"
        );
        let native = url("clickhouse:9000").unwrap_err().to_string();
        assert!(
            native.contains("native") && native.contains("8123"),
            "{native}"
        );
        assert!(url("tcp://ch").is_err());
        assert!(url("ch:port").is_err());
    }

    #[test]
    fn bad_values_name_their_key() {
        assert!(err_of(load(None, env_of(&[("KAFKA_TOPICS", " , ")]))).contains("KAFKA_TOPICS"));
        assert!(err_of(load(None, env_of(&[("HEALTH_PORT", "http")]))).contains("HEALTH_PORT"));
        assert!(err_of(load(None, env_of(&[("LOG_LEVEL", "loud=[")]))).contains("LOG_LEVEL"));
        assert!(
            err_of(load(None, env_of(&[("DATABASE_URL", "mysql://x")]))).contains("DATABASE_URL")
        );
        assert!(
            err_of(load(None, env_of(&[("CLICKHOUSE_HOST", "ch:9000")])))
                .contains("CLICKHOUSE_HOST")
        );
    }

    #[test]
    fn cluster_keys_come_from_the_file_or_the_environment_and_bad_ones_name_their_key() {
        let dir = std::env::temp_dir().join(format!("sluice-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.toml");
        std::fs::write(
            &path,
            "[clickhouse]\ncluster = \"analytics\"\nlayout = \"sharded\"\nnodes = [\"http://n1:8123\", \"n2\"]\n",
        )
        .unwrap();
        let c = load(Some(&path), env_of(&[])).expect("valid");
        assert_eq!(c.clickhouse.cluster.as_deref(), Some("analytics"));
        assert_eq!(c.clickhouse.layout, Layout::Sharded);
        assert_eq!(c.clickhouse.nodes, ["http://n1:8123", "n2"]);
        assert!(c.redacted().contains("clickhouse.layout = \"sharded\""));

        let c = load(
            None,
            env_of(&[
                ("CLICKHOUSE_CLUSTER", "c2"),
                ("CLICKHOUSE_NODES", "a:8201, b:8202"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.clickhouse.cluster.as_deref(), Some("c2"));
        assert_eq!(c.clickhouse.layout, Layout::Replicated, "the default");
        assert_eq!(c.clickhouse.nodes, ["a:8201", "b:8202"]);

        let e = err_of(load(None, env_of(&[("CLICKHOUSE_LAYOUT", "ring")])));
        assert!(e.contains("CLICKHOUSE_LAYOUT") && e.contains("ring"), "{e}");
        let e = err_of(load(None, env_of(&[("CLICKHOUSE_NODES", "n1:9000")])));
        assert!(e.contains("clickhouse.nodes (CLICKHOUSE_NODES)"), "{e}");
        std::fs::write(&path, "[clickhouse]\nlayout = \"ring\"\n").unwrap();
        assert!(err_of(load(Some(&path), env_of(&[]))).contains("layout"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn file_keys_and_librdkafka_passthrough() {
        let dir = std::env::temp_dir().join(format!("sluice-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ok.toml");
        std::fs::write(
            &path,
            "[kafka]\nbrokers = \"k:9092\"\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.password\" = \"s3cret\"\n\"fetch.max.bytes\" = 1048576\n[pipeline]\nbatch_max_rows = 1000\n",
        )
        .unwrap();
        let c = load(Some(&path), env_of(&[])).expect("valid");
        let opts = c.kafka.librdkafka_options().unwrap();
        assert_eq!(opts["security.protocol"], "SASL_SSL");
        assert_eq!(opts["fetch.max.bytes"], "1048576");
        assert_eq!(c.pipeline.batch_max_rows, 1000);
        assert!(!c.redacted().contains("s3cret"));

        std::fs::write(&path, "[pipeline]\nbatch_max_rowz = 5\n").unwrap();
        assert!(err_of(load(Some(&path), env_of(&[]))).contains("batch_max_rowz"));
        std::fs::write(&path, "[pipeline]\nqueue_capacity = 0\n").unwrap();
        assert!(err_of(load(Some(&path), env_of(&[]))).contains("pipeline.queue_capacity"));
        std::fs::write(&path, "[health]\nport = \"x\"\n").unwrap();
        assert!(err_of(load(Some(&path), env_of(&[]))).contains("port"));
        std::fs::write(&path, "[clickhouse]\ncompression = \"none\"\n").unwrap();
        let c = load(Some(&path), env_of(&[])).expect("valid");
        assert_eq!(c.clickhouse.compression, InsertCompression::None);
        assert!(c.redacted().contains("clickhouse.compression = \"none\""));
        std::fs::write(&path, "[clickhouse]\ncompression = \"zstd\"\n").unwrap();
        let e = err_of(load(Some(&path), env_of(&[])));
        assert!(e.contains("compression") && e.contains("zstd"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[derive(Clone, Debug, Default, Deserialize, Serialize)]
    #[serde(default, deny_unknown_fields)]
    struct Shop {
        currency: String,
        api_key: Secret,
        retention_days: u32,
    }

    impl Settings for Shop {
        const SECTION: &'static str = "shop";

        fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
            if let Some(c) = env("SHOP_CURRENCY") {
                self.currency = c;
            }
            Ok(())
        }

        fn validate(&self) -> Result<(), ConfigError> {
            if self.retention_days == 0 {
                return Err(invalid("shop.retention_days", "must be at least 1"));
            }
            Ok(())
        }
    }

    #[test]
    fn a_pipeline_section_is_read_checked_overridden_and_shown_redacted() {
        let dir = std::env::temp_dir().join(format!("sluice-shop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shop.toml");
        let shop = |text: &str, env: &[(&str, &str)]| {
            std::fs::write(&path, text).unwrap();
            Config::<Shop>::load(
                Some(&path),
                env_of(env),
                &Identity {
                    name: "webshop".into(),
                    topics: vec!["shop_events".into()],
                    ..Identity::default()
                },
            )
        };
        let c = shop(
            "[shop]\ncurrency = \"EUR\"\napi_key = \"k3y\"\nretention_days = 7\n",
            &[("SHOP_CURRENCY", "CHF")],
        )
        .expect("valid");
        assert_eq!(
            (c.settings.currency.as_str(), c.settings.retention_days),
            ("CHF", 7)
        );
        assert_eq!(c.settings.api_key.expose(), "k3y");
        assert_eq!(
            (c.kafka.group_id.as_str(), c.clickhouse.database.as_str()),
            ("webshop", "webshop"),
            "the pipeline's name, where nothing else names them"
        );
        let shown = c.redacted();
        assert!(shown.contains("shop.currency = \"CHF\""), "{shown}");
        assert!(
            shown.contains("shop.api_key = \"***\"") && !shown.contains("k3y"),
            "{shown}"
        );
        let e = err_of(shop("[shop]\ncurency = \"EUR\"\n", &[]));
        assert!(e.contains("[shop]") && e.contains("curency"), "{e}");
        let e = err_of(shop("[shop]\nretention_days = 0\n", &[]));
        assert!(e.contains("shop.retention_days"), "{e}");
        let e = err_of(shop("[shoop]\nretention_days = 1\n", &[]));
        assert!(e.contains("`shoop`") && e.contains("shop"), "{e}");
        let e = err_of(Config::<NoSettings>::load(
            None,
            env_of(&[]),
            &Identity {
                name: "x".into(),
                ..Identity::default()
            },
        ));
        assert!(e.contains("kafka.topics"), "no topic named anywhere: {e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
