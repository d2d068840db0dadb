//! The PostgreSQL lookup against the real server, through a running pipeline, with the server
//! crashed (immediate shutdown) mid-run and started again: the stage retries with `/ready`
//! naming it, and every item ends up with exactly the value its key has in the table. Its own
//! test binary: it stops the shared PostgreSQL, so no other test may run meanwhile.

use std::time::Duration;

use sluice_enrich::{CacheConfig, Enrich, EnrichFlow, PgLookup};
use sluice_pipeline::{
    Batch, Output, Pipeline, PipelineConfig, PipelineError, RetryPolicy, Source, SourceContext,
    Stage,
};
use sluice_testkit::{CollectSink, create_pg_database, drop_pg_database, services, wait_until};
use sqlx::Row;
use sqlx::postgres::PgPoolOptions;

const BATCHES: u64 = 80;
const PER_BATCH: u64 = 50;

/// Starts PostgreSQL again even when the test fails half-way.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        services(&["up", "postgres"]);
    }
}

/// Sends a batch of fresh keys every 100 ms (so lookups keep coming during the outage).
struct Paced;

impl Source for Paced {
    type Item = Order;

    async fn run(self, out: Output<Order>, _ctx: SourceContext) -> Result<(), PipelineError> {
        for b in 0..BATCHES {
            let orders = (0..PER_BATCH)
                .map(|i| Order {
                    customer: (b * PER_BATCH + i) as i64,
                    name: None,
                })
                .collect();
            out.send(Batch::unacked(orders)).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Order {
    customer: i64,
    name: Option<String>,
}

/// Every customer id but multiples of 7 has a row, named after its id.
fn name_of(id: i64) -> Option<String> {
    (id % 7 != 0).then(|| format!("customer {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_ride_out_a_postgres_crash_and_every_item_gets_its_row() {
    let url = create_pg_database("sluice_enrich").await;
    let _restart = Restart;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&url)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO customers SELECT id, 'customer ' || id FROM generate_series(0, $1) id WHERE id % 7 <> 0",
    )
    .bind((BATCHES * PER_BATCH) as i64)
    .execute(&pool)
    .await
    .unwrap();

    let lookup = PgLookup::new(
        pool.clone(),
        "SELECT id, name FROM customers WHERE id = ANY($1)",
        |row| {
            Ok((
                row.try_get::<i64, _>("id")?,
                row.try_get::<String, _>("name")?,
            ))
        },
    );
    let enrich = Enrich::new(
        lookup,
        |o: &Order| Some(o.customer),
        |o, n: &String| o.name = Some(n.clone()),
    )
    .cache(CacheConfig {
        capacity: 10_000,
        ttl: Duration::from_secs(60),
    });

    let pipeline = Pipeline::new(PipelineConfig::default());
    let health = pipeline.handle().health();
    health.set_assigned(true);
    let sink = CollectSink::new();
    let s = sink.clone();
    pipeline
        .source("orders", Paced)
        .enrich(
            Stage::new("customers").retry(RetryPolicy {
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_millis(500),
                max_retries: None,
            }),
            enrich,
        )
        .sink("collect", move || s.clone());
    let run = tokio::spawn(pipeline.run());

    wait_until(
        "items enriched before the crash",
        Duration::from_secs(20),
        || sink.len() >= 500,
    )
    .await;
    services(&["kill", "postgres"]);
    wait_until(
        "the lookup named on /ready",
        Duration::from_secs(20),
        || {
            health
                .not_ready_reasons()
                .contains(&"lookup customers failing".to_owned())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = sink.len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        sink.len(),
        during,
        "nothing passes unenriched while the lookup fails"
    );
    assert!(during < (BATCHES * PER_BATCH) as usize);
    services(&["up", "postgres"]);
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("pipeline finishes")
        .unwrap()
        .expect("pipeline runs");
    assert!(health.is_ready(), "{:?}", health.not_ready_reasons());

    let mut items = sink.items();
    items.sort_by_key(|o| o.customer);
    assert_eq!(items.len() as u64, BATCHES * PER_BATCH);
    for (i, o) in items.iter().enumerate() {
        assert_eq!(o.customer, i as i64);
        assert_eq!(o.name, name_of(o.customer), "customer {}", o.customer);
    }
    pool.close().await;
    drop_pg_database(&url).await;
}
