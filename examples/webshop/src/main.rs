//! `webshop`: web-shop orders and refunds from Kafka into ClickHouse (a row of `shop_orders`
//! each, revenue per day by a materialised view) and per-customer totals into PostgreSQL,
//! exactly once; events it cannot read go to `shop_events.dlq` with the reason.

mod pipeline;
mod workload;

use std::process::ExitCode;

const CLICKHOUSE: &str = include_str!("../sql/clickhouse/0001_shop_orders.sql");
const POSTGRES: &str = include_str!("../sql/postgres/0001_shop_customers.sql");

fn main() -> ExitCode {
    sluice_worker::Worker::<pipeline::Shop>::new("webshop")
        .about("Web-shop orders into ClickHouse and customer totals into PostgreSQL, exactly once")
        .topics(["shop_events"])
        .clickhouse_migrations(&[(1, "shop_orders", CLICKHOUSE)])
        .postgres_migrations(&[(1, "shop_customers", POSTGRES)])
        .workload(workload::Orders)
        .run(pipeline::build)
}
