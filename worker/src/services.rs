//! Reaching the services a worker uses: clients built from the configuration, the wait at
//! start while one is not up yet (with `/ready` naming it), and the dead-letter topic.

use std::future::Future;
use std::time::Duration;

use sluice_pipeline::{Health, PipelineHandle, RetryPolicy, SinkError};

use crate::Error;
use crate::config::{
    ClickHouseConfig, Config, ConfigError, InsertCompression, KafkaConfig, invalid, redact_url,
};

/// The ClickHouse server of the configuration, on its default database: URL, credentials and
/// TLS (`https://` verifies against the system's roots and `clickhouse.ca_file`'s), with
/// TCP_NODELAY on its connections.
pub fn clickhouse_server(config: &ClickHouseConfig) -> Result<clickhouse::Client, ConfigError> {
    let connection = sluice_sinks::ClickHouseConnection {
        url: config.url()?,
        user: config.user.clone(),
        password: config.password.expose().to_owned(),
        ca_file: config.ca_file.clone(),
        compression: match config.compression {
            InsertCompression::Lz4 => clickhouse::Compression::Lz4,
            InsertCompression::None => clickhouse::Compression::None,
        },
    };
    connection.client().map_err(|e| {
        let key = match e {
            sluice_sinks::ConnectError::CaFile { .. } => "clickhouse.ca_file",
            sluice_sinks::ConnectError::Tls(_) => "clickhouse.host",
        };
        invalid(key, e.to_string())
    })
}

/// The client of the configured database: every table a worker writes lives there.
pub fn clickhouse_client(config: &ClickHouseConfig) -> Result<clickhouse::Client, ConfigError> {
    let client = clickhouse_server(config)?
        .with_database(&config.database)
        // Tables partitioned by month and tenant (say): one batch may touch many partitions.
        .with_setting("max_partitions_per_insert_block", "1000");
    Ok(match config.cluster {
        // Through a Distributed table an insert returns once every shard holds its rows, not
        // once they are queued: only then may the offsets be committed.
        Some(_) => client.with_setting("distributed_foreground_insert", "1"),
        None => client,
    })
}

/// A pool of the configured PostgreSQL database (connecting lazily), if one is configured.
pub fn postgres_pool<S>(config: &Config<S>) -> Result<Option<sqlx::PgPool>, ConfigError> {
    let Some(url) = &config.postgres.url else {
        return Ok(None);
    };
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy(url.expose())
        .map(Some)
        .map_err(|e| {
            invalid(
                "postgres.url (DATABASE_URL)",
                format!("{}: {e}", redact_url(url.expose())),
            )
        })
}

/// Runs `check` until it passes: transient failures are retried with backoff while `/ready`
/// reports `service` failing; a permanent one (a table of the wrong shape) stops the worker
/// with its message.
pub(crate) async fn wait_usable<F, Fut>(
    handle: &PipelineHandle,
    service: &str,
    mut check: F,
) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), SinkError>>,
{
    let health: Health = handle.health();
    let mut attempt = 0u32;
    loop {
        match check().await {
            Ok(()) => break,
            Err(e) if e.is_transient() && !handle.shutdown_signal().is_triggered() => {
                health.set_failing_with(service, &e);
                let wait = RetryPolicy::default().backoff(attempt);
                tracing::warn!(service, error = %e, retry_in_ms = wait.as_millis() as u64, "not reachable at start; retrying");
                tokio::time::sleep(wait).await;
                attempt = attempt.saturating_add(1);
            }
            Err(e) => {
                return Err(Error::Service {
                    service: service.into(),
                    message: e.to_string(),
                });
            }
        }
    }
    health.set_failing(service, false);
    Ok(())
}

/// Creates `topic` unless it exists (brokers need not auto-create topics).
pub async fn ensure_topic(kafka: &KafkaConfig, topic: &str, partitions: i32) -> Result<(), Error> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let kafka_error = |message: String| Error::Service {
        service: "kafka".into(),
        message,
    };
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = kafka
        .producer_client()?
        .create()
        .map_err(|e| kafka_error(format!("cannot create an admin client: {e}")))?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| kafka_error(format!("cannot create topic {topic}: {e}")))?;
    for r in results {
        if let Err((t, e)) = r
            && e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
        {
            return Err(kafka_error(format!("cannot create topic {t}: {e}")));
        }
    }
    Ok(())
}

/// A transient error for a start-up wait (the service may come up).
pub(crate) fn transient(e: impl std::fmt::Display) -> SinkError {
    SinkError::transient(e.to_string())
}

/// `validate`: the brokers answer and the topics exist.
pub(crate) async fn check_kafka(kafka: &KafkaConfig) -> Result<String, String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = kafka
        .producer_client()
        .map_err(|e| e.to_string())?
        .create()
        .map_err(|e| format!("invalid librdkafka configuration: {e}"))?;
    let topics = kafka.topics.clone();
    tokio::task::spawn_blocking(move || {
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| format!("cannot fetch metadata from the brokers: {e}"))?;
        let missing: Vec<_> = topics
            .iter()
            .filter(|t| !md.topics().iter().any(|m| m.name() == t.as_str()))
            .cloned()
            .collect();
        let found = topics.len() - missing.len();
        Ok(format!(
            "{} broker(s); {found}/{} topic(s) exist{}",
            md.brokers().len(),
            topics.len(),
            if missing.is_empty() {
                String::new()
            } else {
                format!(" (missing: {})", missing.join(", "))
            }
        ))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// `validate`: the ClickHouse server answers.
pub(crate) async fn check_clickhouse(config: &ClickHouseConfig) -> Result<String, String> {
    let client = clickhouse_server(config).map_err(|e| e.to_string())?;
    let version: String = client
        .query("SELECT version()")
        .fetch_one()
        .await
        .map_err(|e| format!("SELECT version() failed: {e}"))?;
    Ok(format!("ClickHouse {version}"))
}

/// `validate`: the PostgreSQL server answers, if one is configured.
pub(crate) async fn check_postgres<S>(config: &Config<S>) -> Result<String, String> {
    use sqlx::Connection as _;
    let Some(url) = &config.postgres.url else {
        return Ok("DATABASE_URL not set: no state reduction".into());
    };
    let mut conn = sqlx::PgConnection::connect(url.expose())
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", redact_url(url.expose())))?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!("PostgreSQL {version}"))
}
