//! `sluice`: the FrameWorks analytics ingest worker, a Sluice pipeline on the worker shell
//! (`sluice_worker`). This binary holds only what is FrameWorks': the graph
//! ([`frameworks::build`]), its `[frameworks]` settings, its migrations, its event generator
//! (the `generate` command and `bench`'s workload).

mod frameworks;
mod generate;

use std::process::ExitCode;

use sluice_worker::Worker;

fn main() -> ExitCode {
    Worker::<frameworks::FrameWorks>::new("sluice")
        .about(
            "The FrameWorks analytics ingest worker: Kafka → ClickHouse time series (and \
             PostgreSQL stream state when DATABASE_URL is set), exactly once. Configuration from \
             a TOML file (--config), overridden by the variables the FrameWorks Go worker used: \
             KAFKA_BROKERS, KAFKA_GROUP_ID, KAFKA_TOPICS, KAFKA_CLIENT_ID, CLICKHOUSE_HOST, \
             CLICKHOUSE_DB, CLICKHOUSE_USER, CLICKHOUSE_PASSWORD, DATABASE_URL, LOG_LEVEL, \
             ENABLE_HEALTH_ENDPOINT, HEALTH_PORT.",
        )
        .scope("frameworks")
        .group_id("periscope-ingest")
        .topics(["analytics_events"])
        .database("frameworks")
        .clickhouse_migrations(sluice_schemas::CLICKHOUSE_MIGRATIONS)
        .postgres_migrations(sluice_schemas::POSTGRES_MIGRATIONS)
        .workload(generate::Workload)
        .run_with(frameworks::build, generate::command)
}
