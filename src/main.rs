//! `sluice`: the command-line entry point of the Sluice pipeline worker.

use clap::Parser;

/// Sluice: typed, backpressured Kafka stream pipelines into ClickHouse and PostgreSQL.
#[derive(Parser, Debug)]
#[command(name = "sluice", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
