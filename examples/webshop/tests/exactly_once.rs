//! The web-shop pipeline against the real broker, ClickHouse and PostgreSQL: events produced
//! at a steady rate (some published twice, as a producer's retry does; some unreadable) while
//! the worker is SIGKILLed five times, each time owning partitions with batches written past
//! the committed offset; then a drain. Every table must hold exactly what the events say,
//! computed here from the events themselves: a row per readable record in `shop_orders`, the
//! daily sums of `shop_daily_revenue`, every customer's totals in `shop_customers`, and each
//! unreadable record once in the dead-letter topic with its reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sluice_testkit::{brokers, create_pg_database, drop_pg_database, kill_while_writing, unique};

const PARTITIONS: i32 = 4;
const EVENTS: u64 = 36_000;
const RATE: u64 = 400;
const RATES: [(&str, f64); 3] = [("EUR", 1.0), ("USD", 0.92), ("GBP", 1.17)];

/// Event `i`: an order of 1 to 3 items, every tenth a refund of the order before it, every
/// 97th unreadable (not JSON) and every 89th in a currency without a rate; every 53rd is
/// published a second time three events later (same key and bytes).
fn event(i: u64) -> (String, String) {
    let customer = format!("c{}", i * 7 % 61);
    let currency = RATES[(i % 3) as usize].0;
    let at = 1_790_000_000 + i * 3;
    let value = if i % 97 == 5 {
        format!("{{\"type\":\"order\",\"order_id\":\"o{i}\" broken")
    } else if i % 89 == 7 {
        format!(
            r#"{{"type":"order","order_id":"o{i}","customer":"{customer}","at":{at},"items":1,"cents":100,"currency":"XAU"}}"#
        )
    } else if i % 10 == 9 {
        format!(
            r#"{{"type":"refund","order_id":"o{}","customer":"{customer}","at":{at},"cents":{},"currency":"{currency}"}}"#,
            i - 1,
            100 + i % 700
        )
    } else {
        format!(
            r#"{{"type":"order","order_id":"o{i}","customer":"{customer}","at":{at},"items":{},"cents":{},"currency":"{currency}"}}"#,
            1 + i % 3,
            199 + i % 1000
        )
    };
    (customer, value)
}

/// The records in publishing order: each event, and the copies of every 53rd three later.
fn records() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..EVENTS {
        out.push(event(i));
        if i >= 3 && (i - 3) % 53 == 0 {
            out.push(event(i - 3));
        }
    }
    out
}

/// What the tables must hold, from the records alone.
#[derive(Default, Debug, PartialEq)]
struct Expected {
    /// (order_id, kind, eur_cents) → rows.
    orders: BTreeMap<(String, String, i64), u64>,
    /// day → (orders, refunds, eur_cents).
    days: BTreeMap<String, (u64, u64, i64)>,
    /// customer → (orders, refunds, eur_cents).
    customers: BTreeMap<String, (i64, i64, i64)>,
    /// reason → dead letters.
    dead: BTreeMap<String, u64>,
}

fn expected(records: &[(String, String)]) -> Expected {
    let mut e = Expected::default();
    for (customer, value) in records {
        let v: serde_json::Value = match serde_json::from_str(value) {
            Ok(v) => v,
            Err(_) => {
                *e.dead.entry("invalid_event".into()).or_default() += 1;
                continue;
            }
        };
        let Some(rate) = RATES.iter().find(|(c, _)| *c == v["currency"]).map(|r| r.1) else {
            *e.dead.entry("unknown_currency".into()).or_default() += 1;
            continue;
        };
        let refund = v["type"] == "refund";
        let cents = v["cents"].as_i64().unwrap() * if refund { -1 } else { 1 };
        let eur = (cents as f64 * rate).round() as i64;
        let at = v["at"].as_i64().unwrap();
        let kind = if refund { "refund" } else { "order" };
        let id = v["order_id"].as_str().unwrap().to_owned();
        *e.orders.entry((id, kind.into(), eur)).or_default() += 1;
        let day = time_day(at);
        let d = e.days.entry(day).or_default();
        (d.0, d.1, d.2) = (d.0 + u64::from(!refund), d.1 + u64::from(refund), d.2 + eur);
        let c = e.customers.entry(customer.clone()).or_default();
        (c.0, c.1, c.2) = (c.0 + i64::from(!refund), c.1 + i64::from(refund), c.2 + eur);
    }
    e
}

/// `YYYY-MM-DD` of a Unix time (UTC), as ClickHouse's `toDate` gives it.
fn time_day(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn clickhouse(db: &str) -> clickhouse::Client {
    let url = std::env::var("CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into());
    clickhouse::Client::default()
        .with_url(url)
        .with_database(db)
}

async fn rows(db: &str) -> u64 {
    clickhouse(db)
        .query("SELECT count() FROM shop_orders")
        .fetch_one()
        .await
        .unwrap_or(0)
}

/// The test's environment for `webshop`: its own topic, group and databases.
struct Setup {
    config: PathBuf,
    env: Vec<(&'static str, String)>,
    topic: String,
    db: String,
    pg: String,
}

impl Setup {
    fn command(&self, args: &[&str], log: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_webshop"));
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .env("LOG_LEVEL", log)
            .env("ENABLE_HEALTH_ENDPOINT", "false");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// Produces `records` at `RATE` a second in the background.
fn produce(topic: String, records: Vec<(String, String)>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
        let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .create()
                .expect("producer");
        let started = Instant::now();
        for (n, (key, value)) in records.iter().enumerate() {
            let record = BaseRecord::to(&topic).key(key).payload(value);
            sluice_worker::pipeline::send_waiting(&producer, record).expect("produce");
            let due = Duration::from_secs_f64((n + 1) as f64 / RATE as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        producer.flush(Duration::from_secs(30)).expect("flush");
    })
}

/// The records in the dead-letter topic, read to its end (5 s without one), by reason: each record's source
/// partition and offset (dead letters are at-least-once: a record may be there twice).
fn dead_letters(topic: &str) -> BTreeMap<String, u64> {
    use rdkafka::message::Headers;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("webshop_dlq_reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    // Assigned, not subscribed: no group to form. The worker creates it with 3 partitions.
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        partitions
            .add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&partitions).expect("assign");
    let mut seen: BTreeMap<String, std::collections::BTreeSet<(String, String)>> = BTreeMap::new();
    let mut idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(5) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            idle = Instant::now();
            let header = |name: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|h| h.key == name))
                    .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                    .unwrap_or_default()
            };
            seen.entry(header("error_reason"))
                .or_default()
                .insert((header("source_partition"), header("source_offset")));
        }
    }
    seen.into_iter().map(|(r, s)| (r, s.len() as u64)).collect()
}

#[tokio::test]
async fn five_sigkills_under_load_leave_every_table_exact() {
    let topic = unique("shop_events");
    let db = unique("webshop");
    let pg = create_pg_database("webshop").await;
    sluice_testkit::create_topic(&topic, PARTITIONS).await;
    let config = std::env::temp_dir().join(format!("{}.toml", unique("webshop")));
    // Groups form in seconds (the broker waits half the session for members); batches every
    // 200 ms and commits every 5 s, so each worker is killed with written batches whose
    // offsets are not committed.
    std::fs::write(
        &config,
        "[kafka]\n\"session.timeout.ms\" = 3000\n\"heartbeat.interval.ms\" = 500\n\
         commit_interval_ms = 5000\n\
         [pipeline]\nbatch_linger_ms = 200\nbatch_max_rows = 2000\n\
         [shop]\neuros_per = { EUR = 1.0, USD = 0.92, GBP = 1.17 }\n",
    )
    .expect("config");
    let s = Setup {
        config,
        env: vec![
            ("KAFKA_BROKERS", brokers()),
            ("KAFKA_TOPICS", topic.clone()),
            ("KAFKA_GROUP_ID", unique("webshop")),
            ("CLICKHOUSE_DB", db.clone()),
            ("DATABASE_URL", pg.clone()),
        ],
        topic: topic.clone(),
        db: db.clone(),
        pg: pg.clone(),
    };
    let migrate = s.command(&["migrate"], "warn").output().expect("migrate");
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );

    let records = records();
    let want = expected(&records);
    let producer = produce(topic.clone(), records);
    let mut logs: Vec<PathBuf> = Vec::new();
    let mut seed = 0x9E37_79B9_u64;
    for round in 0..5 {
        let worker = s.command(&["run"], "info");
        let pause = Duration::from_millis(1200);
        logs.push(kill_while_writing(worker, round, &mut seed, pause, || rows(&db)).await);
    }
    producer.join().expect("producer");
    let drain = s
        .command(&["run", "--drain"], "info")
        .output()
        .expect("drain");
    let drain_log = String::from_utf8_lossy(&drain.stderr).into_owned();
    assert!(drain.status.success(), "drain: {drain_log}");
    // Each killed worker had written batches past the committed offset: the next one found
    // their spans and cut the redelivered records along them.
    let later: Vec<String> = logs[1..]
        .iter()
        .map(|l| std::fs::read_to_string(l).expect("log"))
        .chain([drain_log])
        .collect();
    for (round, text) in later.iter().enumerate() {
        assert!(
            text.contains("cutting redelivered records along recorded spans"),
            "round {round}: the killed worker left batches past the committed offset"
        );
    }

    let got = Expected {
        orders: clickhouse(&s.db)
            .query("SELECT order_id, kind, eur_cents, count() FROM shop_orders GROUP BY ALL")
            .fetch_all::<(String, String, i64, u64)>()
            .await
            .expect("orders")
            .into_iter()
            .map(|(o, k, c, n)| ((o, k, c), n))
            .collect(),
        days: clickhouse(&s.db)
            .query("SELECT toString(day), sum(orders), sum(refunds), sum(eur_cents) FROM shop_daily_revenue GROUP BY day")
            .fetch_all::<(String, u64, u64, i64)>()
            .await
            .expect("days")
            .into_iter()
            .map(|(d, o, r, c)| (d, (o, r, c)))
            .collect(),
        customers: sqlx::query_as::<_, (String, i64, i64, i64)>(
            "SELECT customer, orders, refunds, spent_eur_cents FROM shop_customers",
        )
        .fetch_all(&sqlx::PgPool::connect(&s.pg).await.expect("pg"))
        .await
        .expect("customers")
        .into_iter()
        .map(|(c, o, r, s)| (c, (o, r, s)))
        .collect(),
        dead: dead_letters(&format!("{}.dlq", s.topic)),
    };
    assert_eq!(
        got.dead, want.dead,
        "every unreadable record, with its reason"
    );
    assert_eq!(
        got.orders, want.orders,
        "a row per readable record, copies included"
    );
    assert_eq!(got.days, want.days, "shop_daily_revenue");
    assert_eq!(got.customers, want.customers, "shop_customers");
    for l in logs {
        let _ = std::fs::remove_file(l);
    }
    let _ = std::fs::remove_file(Path::new(&s.config));
    drop_pg_database(&s.pg).await;
}
