//! Helpers shared by Sluice's integration tests: where the local services are, unique names,
//! topics, fast producers, committed offsets and a sink that collects what it is given.
//! Everything here talks to the real services started by `scripts/services.sh`.

pub mod net;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sluice_pipeline::{Batch, Sink, SinkError};

/// Kafka bootstrap servers (`KAFKA_BROKERS`, default the local broker).
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The PostgreSQL server's URL (`DATABASE_URL`, default the local `sluice` database).
pub fn postgres_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://sluice:sluice@127.0.0.1:5432/sluice".into())
}

/// Creates a new, empty PostgreSQL database named after `prefix`; returns its URL.
pub async fn create_pg_database(prefix: &str) -> String {
    use sqlx::Connection;
    let admin_url = postgres_url();
    let db = unique(prefix);
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("connect to PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => panic!("DATABASE_URL without a database: {admin_url}"),
    }
}

/// Drops a database made by [`create_pg_database`] (its connections are closed first).
pub async fn drop_pg_database(url: &str) {
    use sqlx::Connection;
    let db = url.rsplit_once('/').expect("url with a database").1;
    let mut admin = sqlx::PgConnection::connect(&postgres_url())
        .await
        .expect("connect to PostgreSQL");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drop database");
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Creates a topic with `partitions` partitions.
pub async fn create_topic(topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let res = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// Produces `n` records to `topic`, record `i` with key `k{i}`, value `value(i)` and the
/// header `idx` = `i`, spread round-robin over `partitions`. Returns once all are acknowledged.
pub fn produce(topic: &str, partitions: i32, n: usize, value: impl Fn(usize) -> Vec<u8>) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.kbytes", "65536")
        .create()
        .expect("producer");
    for i in 0..n {
        let key = format!("k{i}");
        let payload = value(i);
        let idx = i.to_string();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "idx",
            value: Some(idx.as_bytes()),
        });
        let record = BaseRecord::to(topic)
            .key(&key)
            .payload(&payload)
            .partition((i % partitions as usize) as i32)
            .headers(headers);
        sluice_pipeline::send_waiting(&producer, record)
            .unwrap_or_else(|e| panic!("produce record {i}: {e}"));
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("flush producer");
}

/// A record read back by [`read_all`].
#[derive(Clone, Debug)]
pub struct ReadRecord {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
    /// Headers (name, value).
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Reads `n` records of `topic` from the beginning of its `partitions` (no consumer group);
/// per partition, in offset order.
pub fn read_all(topic: &str, partitions: i32, n: usize) -> Vec<ReadRecord> {
    use rdkafka::Message;
    use rdkafka::message::Headers;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(120);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "read {} of {n} records",
            out.len()
        );
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.expect("record");
        let headers = msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        out.push(ReadRecord {
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().unwrap_or_default().to_vec(),
            value: msg.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    out
}

/// The offsets `group` has committed on `topic`, per partition (partitions without a
/// committed offset are left out).
pub fn committed_offsets(group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(30))
        .expect("committed offsets");
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Where a test item came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A sink that keeps every item it is given, in memory, for the test to inspect.
#[derive(Clone)]
pub struct CollectSink<T> {
    items: Arc<Mutex<Vec<T>>>,
    delay: Duration,
}

impl<T> Default for CollectSink<T> {
    fn default() -> Self {
        Self {
            items: Arc::new(Mutex::new(Vec::new())),
            delay: Duration::ZERO,
        }
    }
}

impl<T: Clone> CollectSink<T> {
    /// A sink that collects at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sink that waits `delay` per batch (a slow database).
    pub fn slow(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    /// Everything written so far.
    pub fn items(&self) -> Vec<T> {
        self.items.lock().expect("collect sink lock").clone()
    }

    /// How many items were written so far.
    pub fn len(&self) -> usize {
        self.items.lock().expect("collect sink lock").len()
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Clone + Send + Sync + 'static> Sink for CollectSink<T> {
    type Item = T;

    async fn write(&mut self, batch: &Batch<T>) -> Result<(), SinkError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.items
            .lock()
            .expect("collect sink lock")
            .extend(batch.items.iter().cloned());
        Ok(())
    }
}

/// Runs `scripts/services.sh ARGS` (e.g. `["kill", "postgres"]`, `["up", "cluster-2"]`) and
/// panics with its error output if it fails.
pub fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("run scripts/services.sh");
    assert!(
        out.status.success(),
        "services.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until `cond` holds, polling every 20 ms; panics with `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resident set size of this process, in bytes (Linux).
pub fn rss_bytes() -> u64 {
    rss_of("self")
}

/// Resident set size of process `pid` ("self" for this one), in bytes (0 if unknown).
pub fn rss_of(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path)
        .await
        .unwrap_or_else(|| panic!("GET {path} on {addr}"))
}

/// [`http_get`], or `None` when nothing answers within 10 s (a process that is restarting).
pub async fn try_http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    // Bounded: a connection that is never answered nor closed must fail the poll, not hang
    // the test.
    tokio::time::timeout(Duration::from_secs(10), get_once(addr, path))
        .await
        .ok()
        .flatten()
}

async fn get_once(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
    let mut buf = String::new();
    stream.read_to_string(&mut buf).await.ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// One round of a crash test: starts `worker` (its stderr into a new log file), waits until
/// its log shows it owns partitions and then until `written` reports more than it did at that
/// moment (the worker writes), waits a pseudo-random pause
/// of up to `max_pause` (from `seed`, advanced), then SIGKILLs it and asserts from its log that
/// it owned partitions when killed (a worker killed before its group join tests nothing).
/// Returns the log's path.
pub async fn kill_while_writing<W, F>(
    mut worker: std::process::Command,
    round: usize,
    seed: &mut u64,
    max_pause: Duration,
    mut written: W,
) -> std::path::PathBuf
where
    W: FnMut() -> F,
    F: std::future::Future<Output = u64>,
{
    let log = std::env::temp_dir().join(format!("{}.log", unique("kill_round")));
    let mut child = worker
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("worker");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Count writes only from the moment this worker owns partitions: an insert the previous
    // (killed) worker had sent may still land after its death, and must not pass for this one's.
    while !owned_partitions(&std::fs::read_to_string(&log).unwrap_or_default()) {
        assert!(
            Instant::now() < deadline,
            "round {round}: the worker is given partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = written().await;
    while written().await == before {
        assert!(
            Instant::now() < deadline,
            "round {round}: the worker writes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let pause = *seed % (max_pause.as_millis() as u64).max(1);
    tokio::time::sleep(Duration::from_millis(pause)).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        owned_partitions(&text),
        "round {round}: the killed worker owned partitions: {text}"
    );
    log
}

/// Waits up to `within` for `child` to exit and returns its status. Past that it is killed
/// and the test fails naming `what`: a worker that does not stop must fail its test, not
/// hang it.
pub fn exit_within(
    child: &mut std::process::Child,
    within: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("status") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {within:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a worker's log ends owning partitions: its last rebalance assigned some.
pub fn owned_partitions(log: &str) -> bool {
    log.lines()
        .rfind(|l| l.contains("partitions assigned") || l.contains("partitions revoked"))
        .is_some_and(|l| l.contains("partitions assigned") && !l.contains("partitions=0"))
}
