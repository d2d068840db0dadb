//! Proves that each local service from `scripts/services.sh` is real: the Kafka-protocol
//! broker, ClickHouse and PostgreSQL, each over a real connection.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use clickhouse::Row;
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

const RECORDS: usize = 10_000;
const PARTITIONS: i32 = 3;

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn clickhouse_url() -> String {
    std::env::var("CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://sluice:sluice@127.0.0.1:5432/sluice".into())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn consumer(group: &str) -> StreamConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "30000")
        .create()
        .expect("consumer config")
}

#[tokio::test]
async fn broker_round_trip_with_consumer_group_and_committed_offsets() {
    let topic = unique("services_test");
    let group = unique("services_group");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin config");
    let created = admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    assert!(
        created.iter().all(Result::is_ok),
        "create topic: {created:?}"
    );

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .create()
        .expect("producer config");
    let sends = (0..RECORDS).map(|i| {
        let producer = &producer;
        let topic = &topic;
        async move {
            let key = format!("k{i}");
            let payload = format!("record-{i}");
            producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
        }
    });
    let results = futures::future::join_all(sends).await;
    let failures: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failures.is_empty(),
        "{} produce failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    producer.flush(Duration::from_secs(10)).expect("flush");

    let c = consumer(&group);
    c.subscribe(&[&topic]).expect("subscribe");
    let mut seen = HashSet::with_capacity(RECORDS);
    let mut next_offsets: HashMap<i32, i64> = HashMap::new();
    let mut per_partition: HashMap<i32, i64> = HashMap::new();
    let mut stream = c.stream();
    while seen.len() < RECORDS {
        let msg = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("timed out waiting for records")
            .expect("stream ended")
            .expect("consume error");
        let payload = std::str::from_utf8(msg.payload().expect("payload")).expect("utf8");
        assert!(
            seen.insert(payload.to_owned()),
            "duplicate record {payload}"
        );
        next_offsets.insert(msg.partition(), msg.offset() + 1);
        *per_partition.entry(msg.partition()).or_default() += 1;
    }
    drop(stream);
    let expected: HashSet<String> = (0..RECORDS).map(|i| format!("record-{i}")).collect();
    assert_eq!(seen, expected);

    let mut tpl = TopicPartitionList::new();
    for (p, o) in &next_offsets {
        tpl.add_partition_offset(&topic, *p, Offset::Offset(*o))
            .expect("tpl");
    }
    c.commit(&tpl, CommitMode::Sync).expect("commit");
    drop(c);

    // A fresh member of the same group reads the committed offsets back from the broker.
    let c2 = consumer(&group);
    let mut ask = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        ask.add_partition(&topic, p);
    }
    let committed = c2
        .committed_offsets(ask, Duration::from_secs(30))
        .expect("committed offsets");
    let mut total = 0i64;
    for elem in committed.elements() {
        let Offset::Offset(o) = elem.offset() else {
            panic!(
                "partition {} has no committed offset: {:?}",
                elem.partition(),
                elem.offset()
            );
        };
        assert_eq!(Some(&o), next_offsets.get(&elem.partition()));
        // Offsets are dense from 0, so the committed offset equals the partition's record count.
        // (Not checked against ListOffsets: Tansu 0.6 answers it with the last batch's base offset.)
        assert_eq!(
            o,
            per_partition[&elem.partition()],
            "partition {}",
            elem.partition()
        );
        total += o;
    }
    assert_eq!(total, RECORDS as i64);
}

#[derive(Debug, Row, Serialize, Deserialize, PartialEq)]
struct Probe {
    id: u64,
    name: String,
    value: f64,
}

#[tokio::test]
async fn clickhouse_merge_tree_insert_and_read_back() {
    let client = clickhouse::Client::default().with_url(clickhouse_url());
    client
        .query("CREATE DATABASE IF NOT EXISTS sluice_test")
        .execute()
        .await
        .expect("create database");
    let client = client.with_database("sluice_test");
    let table = unique("probe");
    client
        .query(&format!(
            "CREATE TABLE {table} (id UInt64, name LowCardinality(String), value Float64) \
             ENGINE = MergeTree ORDER BY id"
        ))
        .execute()
        .await
        .expect("create table");

    let mut insert = client.insert::<Probe>(&table).await.expect("insert");
    for id in 0..RECORDS as u64 {
        let row = Probe {
            id,
            name: format!("n{}", id % 7),
            value: id as f64 * 0.5,
        };
        insert.write(&row).await.expect("write row");
    }
    insert.end().await.expect("end insert");

    let (count, sum): (u64, u64) = client
        .query(&format!("SELECT count(), sum(id) FROM {table}"))
        .fetch_one()
        .await
        .expect("count");
    assert_eq!(count, RECORDS as u64);
    assert_eq!(sum, (0..RECORDS as u64).sum::<u64>());

    let rows: Vec<Probe> = client
        .query(&format!(
            "SELECT ?fields FROM {table} WHERE id IN (0, 4242, 9999) ORDER BY id"
        ))
        .fetch_all()
        .await
        .expect("select rows");
    assert_eq!(
        rows,
        vec![
            Probe {
                id: 0,
                name: "n0".into(),
                value: 0.0
            },
            Probe {
                id: 4242,
                name: "n0".into(),
                value: 2121.0
            },
            Probe {
                id: 9999,
                name: "n3".into(),
                value: 4999.5
            },
        ]
    );
    client
        .query(&format!("DROP TABLE {table}"))
        .execute()
        .await
        .expect("drop");
}

#[tokio::test]
async fn postgres_round_trip() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url())
        .await
        .expect("connect to PostgreSQL");
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(
        "CREATE TEMP TABLE probe (id BIGINT PRIMARY KEY, name TEXT NOT NULL) ON COMMIT DROP",
    )
    .execute(&mut *tx)
    .await
    .expect("create temp table");
    let ids: Vec<i64> = (1..=100).collect();
    let names: Vec<String> = ids
        .iter()
        .map(|i| format!("row {i} ' \"quoted\""))
        .collect();
    sqlx::query("INSERT INTO probe SELECT * FROM UNNEST($1::int8[], $2::text[])")
        .bind(&ids)
        .bind(&names)
        .execute(&mut *tx)
        .await
        .expect("insert");
    let (count, sum): (i64, i64) = sqlx::query_as("SELECT count(*), sum(id)::int8 FROM probe")
        .fetch_one(&mut *tx)
        .await
        .expect("aggregate");
    assert_eq!((count, sum), (100, 5050));
    let name: String = sqlx::query_scalar("SELECT name FROM probe WHERE id = $1")
        .bind(42i64)
        .fetch_one(&mut *tx)
        .await
        .expect("select");
    assert_eq!(name, "row 42 ' \"quoted\"");
    tx.commit().await.expect("commit");
}
