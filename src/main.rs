//! `sluice`: the command-line entry point of the Sluice pipeline worker.

mod config;
mod logging;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use config::Config;

/// Sluice: typed, backpressured Kafka stream pipelines into ClickHouse and PostgreSQL.
///
/// Configuration comes from a TOML file (`--config`), overridden by the environment variables
/// the FrameWorks Go worker used: KAFKA_BROKERS, KAFKA_GROUP_ID, KAFKA_TOPICS, KAFKA_CLIENT_ID,
/// CLICKHOUSE_HOST, CLICKHOUSE_DB, CLICKHOUSE_USER, CLICKHOUSE_PASSWORD, DATABASE_URL, LOG_LEVEL,
/// ENABLE_HEALTH_ENDPOINT, HEALTH_PORT.
#[derive(Parser, Debug)]
#[command(name = "sluice", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the configuration and reach every service; print the effective settings with
    /// secrets redacted. Exits non-zero if anything is wrong.
    Validate {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { config } => validate(config).await,
    }
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let config = Config::load(path.as_deref(), |k| std::env::var(k).ok())?;
    logging::init(&config.log);
    Ok(config)
}

async fn validate(path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = load(path)?;
    println!(
        "# effective configuration (secrets redacted)\n{}",
        config.redacted()
    );
    let mut ok = true;
    for (service, result) in [
        ("kafka", check_kafka(&config).await),
        ("clickhouse", check_clickhouse(&config).await),
        ("postgres", check_postgres(&config).await),
    ] {
        match result {
            Ok(detail) => println!("{service:<10} ok    {detail}"),
            Err(e) => {
                ok = false;
                println!("{service:<10} FAIL  {e:#}");
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn check_kafka(config: &Config) -> anyhow::Result<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut client = rdkafka::ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("client.id", &config.kafka.client_id);
    for (k, v) in config.kafka.librdkafka_options()? {
        client.set(k, v);
    }
    let consumer: BaseConsumer = client
        .create()
        .context("invalid librdkafka configuration")?;
    let topics = config.kafka.topics.clone();
    tokio::task::spawn_blocking(move || {
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .context("cannot fetch metadata from the brokers")?;
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
    .await?
}

async fn check_clickhouse(config: &Config) -> anyhow::Result<String> {
    let client = clickhouse::Client::default()
        .with_url(config.clickhouse.url()?)
        .with_user(&config.clickhouse.user)
        .with_password(config.clickhouse.password.expose());
    let version: String = client
        .query("SELECT version()")
        .fetch_one()
        .await
        .context("SELECT version() failed")?;
    Ok(format!("ClickHouse {version}"))
}

async fn check_postgres(config: &Config) -> anyhow::Result<String> {
    let Some(url) = &config.postgres.url else {
        return Ok("DATABASE_URL not set: state reduction off".into());
    };
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url.expose())
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to {}: {e}",
                config::redact_url(url.expose())
            )
        })?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await?;
    Ok(format!("PostgreSQL {version}"))
}
