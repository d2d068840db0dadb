//! The Kafka source: a consumer-group member that turns polls into per-partition micro-batches,
//! pauses fetching under backpressure, commits acknowledged offsets, and flushes and commits a
//! partition's in-flight data before giving it up in a rebalance.
//!
//! librdkafka is polled on a dedicated thread, so a rebalance callback can wait for in-flight
//! batches to be written without blocking the async stages that write them. The thread polls
//! at least every 50 ms even while the output queue is full (it pauses the partitions instead
//! of not polling), so `max.poll.interval.ms` never expires because a sink is slow.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::CString;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc::error::TrySendError;

use crate::ack::{PartitionLedger, TopicPartition};
use crate::batch::Batch;
use crate::error::PipelineError;
use crate::graph::{FlushTrigger, Source, SourceContext};
use crate::lifecycle::Health;
use crate::metrics as m;
use crate::stages::Output;

/// One Kafka record, owned. Key, value and header values share one buffer per micro-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaRecord {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Producer or log-append timestamp, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers in order; a header without a value has an empty one.
    pub headers: Vec<(Arc<str>, Bytes)>,
}

impl KafkaRecord {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers
            .iter()
            .find(|(k, _)| &**k == name)
            .map(|(_, v)| v)
    }

    /// Bytes held by this record (key, value, header values), for batch size limits.
    pub fn byte_size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.value.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// Settings of the Kafka source.
#[derive(Clone, Debug)]
pub struct KafkaSourceConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group.
    pub group_id: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Extra librdkafka properties (`kafka.*` keys without the prefix); they override the
    /// source's defaults.
    pub client: BTreeMap<String, String>,
    /// Most records in one micro-batch of one partition.
    pub max_batch_records: usize,
    /// Most bytes polled into one round of micro-batches.
    pub max_batch_bytes: usize,
    /// How often acknowledged offsets are committed.
    pub commit_interval: Duration,
    /// How long a revocation waits for the partition's in-flight batches to be written before
    /// it commits what is written and lets the partition go.
    pub revoke_timeout: Duration,
    /// Stop (and trigger shutdown) once every partition of the subscribed topics has the
    /// group's committed offset at the end offset it had when the source started, whichever
    /// member processed it; until then the source stays in the group through rebalances.
    pub drain: bool,
    /// Drain mode: give up after this long, committing what is written, with an error that
    /// names the partitions left.
    pub drain_timeout: Option<Duration>,
}

impl KafkaSourceConfig {
    /// Settings with defaults for everything but where to connect and what to read.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics,
            client: BTreeMap::new(),
            max_batch_records: 2_000,
            max_batch_bytes: 4 << 20,
            commit_interval: Duration::from_secs(1),
            revoke_timeout: Duration::from_secs(20),
            drain: false,
            drain_timeout: None,
        }
    }

    /// The librdkafka configuration: the source's defaults, then every `client` property.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Bound what librdkafka pre-fetches (part of the documented memory bound).
            .set("queued.max.messages.kbytes", "8192")
            .set("queued.min.messages", "20000")
            .set("fetch.max.bytes", "8388608")
            .set("receive.message.max.bytes", "9437184")
            // Once the pre-fetch queue reaches those bounds librdkafka stops fetching for this
            // long (1 s by default): a source that empties its queue faster than that would
            // receive in one-second pulses (about 33,000 records/s here instead of 300,000).
            .set("fetch.queue.backoff.ms", "10")
            // How long the broker may hold a fetch before answering. Tansu holds it that long
            // even with records to return, so librdkafka's 500 ms was in every record's
            // latency: p99 1,253 → 971 ms at 100 (`sluice bench`, docs/tuning.md).
            .set("fetch.wait.max.ms", "100");
        for (k, v) in &self.client {
            c.set(k, v);
        }
        c
    }
}

/// A Kafka consumer-group member as a pipeline source.
pub struct KafkaSource {
    config: KafkaSourceConfig,
    progress: DrainProgress,
}

impl KafkaSource {
    /// A source with these settings (the consumer is created when the pipeline runs).
    pub fn new(config: KafkaSourceConfig) -> Self {
        Self {
            config,
            progress: DrainProgress::default(),
        }
    }

    /// How far its drain has got, while the pipeline runs (drain mode only).
    pub fn drain_progress(&self) -> DrainProgress {
        self.progress.clone()
    }
}

/// How far a drain has got: records processed since it started, of those it has to
/// process (every partition of the topics from where the group was to the end offset it had
/// when the drain started, whichever member processes them).
#[derive(Clone, Debug, Default)]
pub struct DrainProgress(Arc<Mutex<Option<(u64, u64)>>>);

impl DrainProgress {
    /// `(done, total)` records, once the end offsets are known.
    pub fn get(&self) -> Option<(u64, u64)> {
        *lock(&self.0)
    }

    fn set(&self, done: u64, total: u64) {
        *lock(&self.0) = Some((done.min(total), total));
    }
}

impl Source for KafkaSource {
    type Item = KafkaRecord;

    async fn run(self, out: Output<KafkaRecord>, ctx: SourceContext) -> Result<(), PipelineError> {
        let name = ctx.name.clone();
        let shared = Arc::new(Shared {
            ledgers: Mutex::new(HashMap::new()),
            paused: std::sync::atomic::AtomicBool::new(false),
            brokers_down: std::sync::atomic::AtomicBool::new(false),
            joined: std::sync::atomic::AtomicBool::new(false),
            stash: Mutex::new(VecDeque::new()),
            committed: Mutex::new(HashMap::new()),
            drain: Mutex::new(HashMap::new()),
            generation: Mutex::new(0),
            flush: ctx.flush_trigger(),
            health: ctx.health.clone(),
            revoke_timeout: self.config.revoke_timeout,
            name: name.clone(),
        });
        let consumer: BaseConsumer<SourceCallbacks> = self
            .config
            .client_config()
            .create_with_context(SourceCallbacks {
                shared: shared.clone(),
            })
            .map_err(|e| PipelineError::Source {
                stage: name.clone(),
                message: format!("cannot create Kafka consumer: {e}"),
            })?;
        let topics: Vec<&str> = self.config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| PipelineError::Source {
                stage: name.clone(),
                message: format!("cannot subscribe to {topics:?}: {e}"),
            })?;

        let handle = tokio::runtime::Handle::current();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        let config = self.config;
        std::thread::Builder::new()
            .name("sluice-kafka".into())
            .spawn(move || {
                let mut worker = Worker {
                    consumer,
                    shared,
                    out: Some(out),
                    ctx,
                    config,
                    handle,
                    paused: false,
                    interned: HashMap::new(),
                    drain_flushed: std::cell::Cell::new(None),
                    drain: Drain::default(),
                    progress: self.progress,
                };
                let result = worker.run();
                let _ = done_tx.send(result);
                // Dropping the consumer closes it: the revoke, and the LeaveGroup that tells
                // the broker to rebalance now rather than at this member's session timeout.
                let name = worker.shared.name.clone();
                let joined = worker.shared.joined.load(std::sync::atomic::Ordering::Relaxed);
                drop(worker);
                if joined {
                    tracing::info!(source = %name, "consumer closed: it left the group");
                } else {
                    tracing::info!(source = %name, "consumer closed; it had never joined the group");
                }
                let _ = closed_tx.send(());
            })
            .map_err(|e| PipelineError::Source {
                stage: name.clone(),
                message: format!("cannot start consumer thread: {e}"),
            })?;
        let result = done_rx.await.unwrap_or_else(|_| {
            Err(PipelineError::Source {
                stage: name.clone(),
                message: "consumer thread panicked".into(),
            })
        });
        // The process may exit as soon as the source returns, killing the thread mid-close: a
        // member that never sent its LeaveGroup stays in the group until its session times
        // out (45 s by default), and the next member waits that long for any partition.
        if tokio::time::timeout(CLOSE_WAIT, closed_rx).await.is_err() {
            tracing::warn!(source = %name, wait = ?CLOSE_WAIT, "the consumer did not close in time; the group sees this member leave only at its session timeout");
        }
        result
    }
}

/// State shared between the polling thread and librdkafka's callbacks (which run inside
/// `poll` on that same thread, so the locks are never contended).
struct Shared {
    ledgers: Mutex<HashMap<TopicPartition, Arc<PartitionLedger>>>,
    /// Batches polled but not yet accepted by the full output queue.
    stash: Mutex<VecDeque<Batch<KafkaRecord>>>,
    /// Last offset committed per partition: confirmed for synchronous commits, requested for
    /// asynchronous ones (a failure reported by the commit callback removes the entry, so the
    /// next interval commits it again).
    committed: Mutex<HashMap<TopicPartition, i64>>,
    /// Per assigned partition: where it started and its watermarks at assignment.
    drain: Mutex<HashMap<TopicPartition, DrainTarget>>,
    /// Bumped on every rebalance: messages polled across one are discarded, not issued.
    generation: Mutex<u64>,
    /// Whether fetching is paused for backpressure. librdkafka keeps a partition's pause
    /// across rebalances, so partitions assigned later are set to match it.
    paused: std::sync::atomic::AtomicBool,
    /// Set when librdkafka reports every broker down; cleared once a broker answers again.
    brokers_down: std::sync::atomic::AtomicBool,
    /// Set once the group join completed (the first assignment, even an empty one).
    joined: std::sync::atomic::AtomicBool,
    flush: FlushTrigger,
    health: Health,
    revoke_timeout: Duration,
    name: Arc<str>,
}

/// What an assigned partition looked like when it was assigned.
#[derive(Clone, Copy, Debug, Default)]
struct DrainTarget {
    /// The group's committed offset when the partition was assigned.
    start: Option<i64>,
}

/// Sets the committed-offset and lag gauges of `tp`.
fn set_position_gauges(tp: &TopicPartition, committed: i64, high: Option<i64>) {
    let (topic, partition) = (tp.topic.to_string(), tp.partition.to_string());
    metrics::gauge!(m::COMMITTED_OFFSET, "topic" => topic.clone(), "partition" => partition.clone())
        .set(committed as f64);
    if let Some(high) = high {
        metrics::gauge!(m::CONSUMER_LAG, "topic" => topic, "partition" => partition)
            .set((high - committed).max(0) as f64);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tpl_partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

impl Shared {
    /// Commits every partition whose acknowledged position moved past what is committed.
    fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        mode: CommitMode,
        only: Option<&[TopicPartition]>,
    ) {
        let ledgers = lock(&self.ledgers);
        let committed = lock(&self.committed).clone();
        let mut tpl = TopicPartitionList::new();
        let mut positions = Vec::new();
        for (tp, ledger) in ledgers.iter() {
            if only.is_some_and(|o| !o.contains(tp)) {
                continue;
            }
            if let Some(pos) = ledger.committable()
                && committed.get(tp) != Some(&pos)
                && tpl
                    .add_partition_offset(&tp.topic, tp.partition, Offset::Offset(pos))
                    .is_ok()
            {
                positions.push((tp.clone(), pos));
            }
        }
        drop(ledgers);
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => self.record_committed(&positions),
            Err(e) => {
                tracing::warn!(source = %self.name, error = %e, "offset commit failed; will retry")
            }
        }
    }

    fn record_committed(&self, positions: &[(TopicPartition, i64)]) {
        let mut committed = lock(&self.committed);
        for (tp, pos) in positions {
            committed.insert(tp.clone(), *pos);
            metrics::gauge!(m::COMMITTED_OFFSET, "topic" => tp.topic.to_string(), "partition" => tp.partition.to_string())
                .set(*pos as f64);
        }
    }

    /// Revocation: drop what was not sent, flush what is in flight, wait until the revoked
    /// partitions' batches are written (or the timeout passes), commit them, let them go.
    fn revoke<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, revoked: &[TopicPartition]) {
        *lock(&self.generation) += 1;
        lock(&self.stash).retain(|b| b.acks().ranges().all(|(tp, _, _)| !revoked.contains(tp)));
        let lost = consumer.assignment_lost();
        if !lost {
            self.flush.flush();
            let deadline = Instant::now() + self.revoke_timeout;
            let settled = || {
                let ledgers = lock(&self.ledgers);
                revoked
                    .iter()
                    .all(|tp| ledgers.get(tp).is_none_or(|l| l.settled()))
            };
            let mut flushed = Instant::now();
            while !settled() && Instant::now() < deadline {
                // Records still on their way reach stages after the first flush: ask again.
                if flushed.elapsed() >= Duration::from_millis(250) {
                    self.flush.flush();
                    flushed = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if !settled() {
                tracing::warn!(source = %self.name, timeout = ?self.revoke_timeout, "revoked partitions still had unwritten batches; they will be redelivered to the next owner");
            }
            self.commit(consumer, CommitMode::Sync, Some(revoked));
        }
        let mut ledgers = lock(&self.ledgers);
        let mut drain = lock(&self.drain);
        let mut committed = lock(&self.committed);
        for tp in revoked {
            // From here on the partition is the next owner's: stages drop what they still
            // hold of it instead of writing it (it would be written twice).
            if let Some(l) = ledgers.remove(tp) {
                l.revoke();
            }
            drain.remove(tp);
            committed.remove(tp);
        }
        tracing::info!(source = %self.name, partitions = revoked.len(), lost, "partitions revoked");
    }

    fn assign<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, assigned: &[TopicPartition]) {
        *lock(&self.generation) += 1;
        let mut tpl = TopicPartitionList::new();
        {
            let mut ledgers = lock(&self.ledgers);
            for tp in assigned {
                ledgers
                    .entry(tp.clone())
                    .or_insert_with(|| PartitionLedger::new(tp.clone()));
                tpl.add_partition(&tp.topic, tp.partition);
            }
        }
        let paused = self.paused.load(std::sync::atomic::Ordering::Relaxed);
        let r = if paused {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        };
        if let Err(e) = r {
            tracing::warn!(source = %self.name, error = %e, paused, "cannot set the pause state of assigned partitions");
        }
        // Where each partition starts (its committed offset), for drain mode and lag.
        let starts = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .ok();
        let mut drain = lock(&self.drain);
        for tp in assigned {
            let start = starts
                .as_ref()
                .and_then(|s| s.find_partition(&tp.topic, tp.partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            let target = DrainTarget { start };
            // From the assignment on; lag follows with the first fetch response's watermark.
            if let Some(c) = target.start {
                set_position_gauges(tp, c, None);
            }
            drain.insert(tp.clone(), target);
        }
        self.health.set_assigned(!lock(&self.ledgers).is_empty());
        tracing::info!(source = %self.name, partitions = assigned.len(), "partitions assigned");
    }
}

/// librdkafka callbacks of the source's consumer.
struct SourceCallbacks {
    shared: Arc<Shared>,
}

/// What `/ready` names while no broker is reachable.
const BROKERS_COMPONENT: &str = "kafka brokers";

impl Shared {
    /// Records whether every broker is down: `/ready` turns false, and a log line says so
    /// once per change (librdkafka keeps reconnecting by itself).
    fn set_brokers_down(&self, down: bool) {
        use std::sync::atomic::Ordering;
        if self.brokers_down.swap(down, Ordering::Relaxed) == down {
            return;
        }
        if down {
            tracing::warn!(source = %self.name, "every Kafka broker is unreachable; reconnecting");
        } else {
            tracing::info!(source = %self.name, "Kafka brokers reachable again");
        }
        self.health.set_failing(BROKERS_COMPONENT, down);
        metrics::gauge!(m::BROKERS_DOWN).set(if down { 1.0 } else { 0.0 });
    }
}

impl ClientContext for SourceCallbacks {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            self.shared.set_brokers_down(true);
        } else {
            tracing::warn!(source = %self.shared.name, %error, reason, "librdkafka error");
        }
    }
}

impl ConsumerContext for SourceCallbacks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.shared.revoke(consumer, &tpl_partitions(tpl));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.shared
                    .joined
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.shared.assign(consumer, &tpl_partitions(tpl))
            }
            Rebalance::Revoke(_) => self
                .shared
                .health
                .set_assigned(!lock(&self.shared.ledgers).is_empty()),
            Rebalance::Error(e) => {
                tracing::error!(source = %self.shared.name, error = %e, "rebalance error")
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let failed: Vec<TopicPartition> = offsets
            .elements()
            .iter()
            .filter(|e| result.is_err() || e.error().is_err())
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect();
        if !failed.is_empty() {
            tracing::warn!(source = %self.shared.name, error = ?result.err(), partitions = failed.len(), "asynchronous offset commit failed; will retry");
            let mut committed = lock(&self.shared.committed);
            for tp in &failed {
                committed.remove(tp);
            }
        }
    }
}

struct Worker {
    consumer: BaseConsumer<SourceCallbacks>,
    shared: Arc<Shared>,
    out: Option<Output<KafkaRecord>>,
    ctx: SourceContext,
    config: KafkaSourceConfig,
    handle: tokio::runtime::Handle,
    paused: bool,
    interned: HashMap<String, Arc<str>>,
    /// Drain mode: when the stages were last asked to flush, everything being handed out.
    drain_flushed: std::cell::Cell<Option<Instant>>,
    drain: Drain,
    progress: DrainProgress,
}

/// Drain mode: what to reach and what is left.
#[derive(Default)]
struct Drain {
    /// Every partition of the subscribed topics with its low watermark and the end offset it
    /// had when the drain started (read once the broker answers).
    ends: Option<BTreeMap<TopicPartition, (i64, i64)>>,
    /// The group's committed offsets of partitions other members hold (or nobody yet).
    group: HashMap<TopicPartition, i64>,
    /// When `group` and `ends` were last asked for.
    asked: Option<Instant>,
    /// Partitions not yet done: (partition, where the group is, end).
    left: Vec<(TopicPartition, Option<i64>, i64)>,
    /// Where the group stood on each partition when the drain started (for the progress).
    base: HashMap<TopicPartition, i64>,
}

/// How long a stopping source waits for its consumer to close (revoke, leave the group);
/// it takes milliseconds with a broker that answers.
const CLOSE_WAIT: Duration = Duration::from_secs(15);
/// How often a drain asks the broker for what it cannot see itself.
const DRAIN_ASK: Duration = Duration::from_secs(1);

const BACKPRESSURE_POLL: Duration = Duration::from_millis(50);
const IDLE_POLL: Duration = Duration::from_millis(100);

impl Worker {
    fn run(&mut self) -> Result<(), PipelineError> {
        let started = Instant::now();
        let mut last_commit = Instant::now();
        let result = loop {
            if self.ctx.shutdown.is_triggered() {
                break Ok(());
            }
            let Some(out) = self.out.as_ref() else {
                break Ok(());
            };
            let tx = out.sender().clone();
            if tx.is_closed() {
                break Err(PipelineError::DownstreamClosed {
                    stage: self.shared.name.clone(),
                });
            }
            self.push_stash(&tx);
            let (backlogged, stashed) = {
                let stash = lock(&self.shared.stash);
                let bytes = stash
                    .iter()
                    .flat_map(|b| &b.items)
                    .map(KafkaRecord::byte_size);
                (!stash.is_empty(), bytes.sum::<usize>())
            };
            // Pausing drops what librdkafka has pre-fetched (it is fetched again on resume), so
            // a queue that is full for a moment only stashes up to `max_batch_bytes`; fetching
            // pauses once more waits. Resume only once the queue is at least half empty, so
            // that a steadily slow sink does not make the consumer pause and resume for every
            // batch.
            if stashed >= self.config.max_batch_bytes {
                self.set_paused(true);
            } else if !backlogged && self.paused && tx.capacity() * 2 >= tx.max_capacity() {
                self.set_paused(false);
            }
            if backlogged {
                // Wait briefly for room downstream, then poll without blocking so that
                // librdkafka keeps serving the group while we are paused.
                let permit = self.handle.block_on(async {
                    tokio::time::timeout(BACKPRESSURE_POLL, tx.reserve()).await
                });
                if let Ok(Ok(permit)) = permit
                    && let Some(batch) = lock(&self.shared.stash).pop_front()
                {
                    permit.send(batch);
                }
                self.poll_round(Duration::ZERO, &tx);
            } else {
                self.poll_round(IDLE_POLL, &tx);
            }
            if last_commit.elapsed() >= self.config.commit_interval {
                self.shared.commit(&self.consumer, CommitMode::Async, None);
                self.update_lag();
                self.check_brokers();
                last_commit = Instant::now();
            }
            if self.config.drain && self.drained() {
                tracing::info!(source = %self.shared.name, "every partition is processed to the end offset it had when the drain started; draining");
                self.ctx.shutdown.trigger();
                break Ok(());
            }
            if let Some(timeout) = self.config.drain_timeout
                && self.config.drain
                && started.elapsed() >= timeout
            {
                let left: Vec<String> = self
                    .drain
                    .left
                    .iter()
                    .map(|(tp, at, end)| match at {
                        Some(at) => format!("{tp} (committed {at} of {end})"),
                        None => format!("{tp} (nothing committed of {end})"),
                    })
                    .collect();
                let left = match self.drain.ends {
                    None => "the topics' partitions are unknown (no broker answered)".to_owned(),
                    Some(_) => format!("{} partitions left: {}", left.len(), left.join(", ")),
                };
                break Err(PipelineError::Source {
                    stage: self.shared.name.clone(),
                    message: format!("drain incomplete after {timeout:?}: {left}"),
                });
            }
        };
        self.finish();
        result
    }

    /// Stop fetching, let the stages flush, then commit everything written.
    fn finish(&mut self) {
        self.set_paused(true);
        lock(&self.shared.stash).clear();
        self.out = None; // closes the queue: the stages drain and finish
        let mut last_commit = Instant::now();
        while !self.ctx.is_downstream_done() {
            // Keep serving group membership; nothing is fetched while paused, and anything
            // that still arrives was never handed out, so it is simply redelivered later.
            let _ = self.consumer.poll(BACKPRESSURE_POLL);
            if last_commit.elapsed() >= self.config.commit_interval {
                self.shared.commit(&self.consumer, CommitMode::Async, None);
                last_commit = Instant::now();
            }
        }
        self.shared.commit(&self.consumer, CommitMode::Sync, None);
        self.update_lag();
        self.finish_join();
        self.consumer.unsubscribe();
        self.shared.health.set_assigned(false);
    }

    /// A member stopped while its join is pending has no member id yet, so it cannot leave
    /// the group: the broker keeps it, and the group waits for it (seen with Tansu: a worker
    /// started after one that was stopped 3 s into its join got no partitions for over a
    /// minute). So the join is let complete first, nothing being fetched (the partitions are
    /// paused), and the worker then leaves the group like any member. Bounded by half the
    /// session timeout, when the broker forms a group, plus 5 s; a second signal exits at once.
    fn finish_join(&mut self) {
        use std::sync::atomic::Ordering;
        if self.shared.joined.load(Ordering::Relaxed)
            || self.shared.brokers_down.load(Ordering::Relaxed)
        {
            return;
        }
        let session = self
            .config
            .client
            .get("session.timeout.ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(45_000u64);
        let wait = Duration::from_millis(session / 2) + Duration::from_secs(5);
        tracing::info!(source = %self.shared.name, ?wait, "stopping before the group join completed: letting it complete, so that the worker leaves the group instead of staying a member that never answers");
        let deadline = Instant::now() + wait;
        while !self.shared.joined.load(Ordering::Relaxed) && Instant::now() < deadline {
            let _ = self.consumer.poll(BACKPRESSURE_POLL);
        }
    }

    fn set_paused(&mut self, pause: bool) {
        if pause == self.paused {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let r = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        match r {
            Ok(()) => {
                self.paused = pause;
                self.shared
                    .paused
                    .store(pause, std::sync::atomic::Ordering::Relaxed);
                metrics::gauge!(m::SOURCE_PAUSED).set(if pause { 1.0 } else { 0.0 });
                tracing::debug!(source = %self.shared.name, pause, "fetching paused/resumed for backpressure");
            }
            Err(e) => {
                tracing::warn!(source = %self.shared.name, error = %e, "cannot pause/resume partitions")
            }
        }
    }

    fn push_stash(&self, tx: &tokio::sync::mpsc::Sender<Batch<KafkaRecord>>) {
        let mut stash = lock(&self.shared.stash);
        while let Some(batch) = stash.pop_front() {
            match tx.try_send(batch) {
                Ok(()) => {}
                Err(TrySendError::Full(batch)) | Err(TrySendError::Closed(batch)) => {
                    stash.push_front(batch);
                    break;
                }
            }
        }
    }

    /// Polls one round of messages (up to the batch limits) and hands them on as
    /// per-partition batches.
    fn poll_round(
        &mut self,
        first_timeout: Duration,
        tx: &tokio::sync::mpsc::Sender<Batch<KafkaRecord>>,
    ) {
        let generation = *lock(&self.shared.generation);
        let consumer = &self.consumer;
        let mut msgs: Vec<BorrowedMessage<'_>> = Vec::new();
        let mut bytes = 0usize;
        let mut timeout = first_timeout;
        while bytes < self.config.max_batch_bytes && msgs.len() < self.config.max_batch_records * 4
        {
            match consumer.poll(timeout) {
                None => break,
                Some(Ok(msg)) => {
                    self.shared.set_brokers_down(false);
                    bytes += msg.payload_len() + msg.key_len();
                    msgs.push(msg);
                }
                Some(Err(e)) => {
                    tracing::warn!(source = %self.shared.name, error = %e, "consumer error")
                }
            }
            timeout = Duration::ZERO;
        }
        if msgs.is_empty() || *lock(&self.shared.generation) != generation {
            // Polled across a rebalance: these were never handed out; they are fetched again.
            return;
        }
        // Group by partition, keeping each partition's order.
        let mut groups: Vec<(TopicPartition, Vec<&BorrowedMessage<'_>>)> = Vec::new();
        for msg in &msgs {
            let topic = intern(&mut self.interned, msg.topic());
            match groups
                .iter_mut()
                .find(|(tp, _)| tp.partition == msg.partition() && tp.topic == topic)
            {
                Some((_, v)) => v.push(msg),
                None => groups.push((
                    TopicPartition {
                        topic,
                        partition: msg.partition(),
                    },
                    vec![msg],
                )),
            }
        }
        let ledgers = lock(&self.shared.ledgers).clone();
        for (tp, group) in groups {
            let Some(ledger) = ledgers.get(&tp) else {
                continue;
            };
            metrics::counter!(m::SOURCE_RECORDS, "topic" => tp.topic.to_string(), "partition" => tp.partition.to_string())
                .increment(group.len() as u64);
            for chunk in group.chunks(self.config.max_batch_records.max(1)) {
                let first = chunk[0].offset();
                let last = chunk[chunk.len() - 1].offset();
                let created = chunk.iter().filter_map(|m| m.timestamp().to_millis()).min();
                let Some(handle) = ledger.issue_at(first, last, created) else {
                    tracing::debug!(source = %self.shared.name, %tp, first, "skipping redelivered offsets already handed out");
                    continue;
                };
                let records = to_records(&tp, chunk, &mut self.interned);
                let batch = Batch::from_handle(records, handle);
                let mut stash = lock(&self.shared.stash);
                if !stash.is_empty() {
                    stash.push_back(batch);
                } else if let Err(TrySendError::Full(batch)) | Err(TrySendError::Closed(batch)) =
                    tx.try_send(batch)
                {
                    stash.push_back(batch);
                }
            }
        }
    }

    /// While every broker was reported down, asks for metadata: an answer means a broker is
    /// reachable again even if no record arrives (an idle topic).
    fn check_brokers(&self) {
        if self
            .shared
            .brokers_down
            .load(std::sync::atomic::Ordering::Relaxed)
            && self
                .consumer
                .fetch_metadata(None, Duration::from_millis(500))
                .is_ok()
        {
            self.shared.set_brokers_down(false);
        }
    }

    fn update_lag(&self) {
        let ledgers = lock(&self.shared.ledgers).clone();
        let committed = lock(&self.shared.committed).clone();
        let drain = lock(&self.shared.drain).clone();
        for tp in ledgers.keys() {
            let Some((low, high)) = watermarks(&self.consumer, tp) else {
                continue;
            };
            // Where the group stands: its last commit, or (none yet) where it starts reading.
            let pos = committed
                .get(tp)
                .copied()
                .or(drain.get(tp).and_then(|d| d.start))
                .unwrap_or(low);
            set_position_gauges(tp, pos, Some(high));
        }
    }

    /// Every partition of the subscribed topics with its low watermark and end offset now,
    /// read from fetch responses of a probe consumer assigned to all of them (see
    /// [`watermarks`]); `None` until the broker answers.
    fn drain_ends(&self) -> Option<BTreeMap<TopicPartition, (i64, i64)>> {
        let mut tpl = TopicPartitionList::new();
        let mut tps = Vec::new();
        for topic in &self.config.topics {
            let metadata = self
                .consumer
                .fetch_metadata(Some(topic), Duration::from_secs(2))
                .ok()?;
            let t = metadata.topics().iter().find(|t| t.name() == topic)?;
            if t.error().is_some() || t.partitions().is_empty() {
                return None;
            }
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .ok()?;
                tps.push(TopicPartition::new(topic.as_str(), p.id()));
            }
        }
        // Assigned, not subscribed: the probe joins no group and commits nothing. It only
        // needs one fetch response per partition, so it pre-fetches as little as it may.
        let probe: Result<BaseConsumer, _> = self
            .config
            .client_config()
            .set("queued.min.messages", "1")
            .set("queued.max.messages.kbytes", "1")
            .set("max.partition.fetch.bytes", "1024")
            .create();
        let probe = match probe.and_then(|p| p.assign(&tpl).map(|()| p)) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(source = %self.shared.name, error = %e, "cannot start the consumer that reads the partitions' end offsets; trying again");
                return None;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ends = BTreeMap::new();
        while Instant::now() < deadline {
            let _ = probe.poll(Duration::from_millis(50));
            ends = tps
                .iter()
                .filter_map(|tp| Some((tp.clone(), watermarks(&probe, tp)?)))
                .collect();
            if ends.len() == tps.len() {
                tracing::info!(source = %self.shared.name, partitions = ends.len(), records = ends.values().map(|(l, h)| h - l).sum::<i64>(), "draining every partition to its end offset now");
                return Some(ends);
            }
        }
        tracing::warn!(source = %self.shared.name, known = ends.len(), partitions = tps.len(), "cannot read every partition's end offset yet; asking again");
        None
    }

    /// Where the group stood on each partition when the drain started (its committed offset,
    /// else the low watermark): where the drain's progress counts from.
    fn group_positions(
        &self,
        ends: &BTreeMap<TopicPartition, (i64, i64)>,
    ) -> HashMap<TopicPartition, i64> {
        let mut tpl = TopicPartitionList::new();
        for tp in ends.keys() {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(2))
            .map(|c| {
                c.elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => {
                            Some((TopicPartition::new(e.topic(), e.partition()), o))
                        }
                        _ => None,
                    })
                    .collect::<HashMap<_, _>>()
            })
            .unwrap_or_default();
        ends.iter()
            .map(|(tp, &(low, _))| {
                (
                    tp.clone(),
                    committed.get(tp).copied().unwrap_or(low).max(low),
                )
            })
            .collect()
    }

    /// Publishes how many records the drain has done and has to do: per partition, from
    /// where the group stood when the drain started to its end.
    fn report_progress(
        &mut self,
        ends: &BTreeMap<TopicPartition, (i64, i64)>,
        left: &[(TopicPartition, Option<i64>, i64)],
    ) {
        let (mut done, mut total) = (0u64, 0u64);
        for (tp, &(low, end)) in ends {
            let at = left
                .iter()
                .find(|(t, _, _)| t == tp)
                .map_or(end, |(_, at, _)| at.unwrap_or(low).max(low));
            let base = *self.drain.base.entry(tp.clone()).or_insert(low);
            total += (end - base).max(0) as u64;
            done += (at.min(end) - base).max(0) as u64;
        }
        self.progress.set(done, total);
    }

    /// Drain mode: whether every partition of the subscribed topics has reached the end
    /// offset it had when the drain started: the ones assigned here acknowledged up to it,
    /// the others committed up to it by the group (whichever member did it). Partitions
    /// assigned here and handed out to their end have their stages flushed (windows waiting
    /// for their watermark).
    fn drained(&mut self) -> bool {
        let ask = self.drain.asked.is_none_or(|t| t.elapsed() >= DRAIN_ASK);
        if self.drain.ends.is_none() && ask {
            self.drain.asked = Some(Instant::now());
            self.drain.ends = self.drain_ends();
            if let Some(ends) = &self.drain.ends {
                self.drain.base = self.group_positions(ends);
            }
        }
        let Some(ends) = self.drain.ends.clone() else {
            return false;
        };
        let ledgers = lock(&self.shared.ledgers).clone();
        let starts = lock(&self.shared.drain).clone();
        let mut fetched = true;
        let mut mine_left = false;
        let mut others = Vec::new();
        let mut left = Vec::new();
        for (tp, &(low, end)) in &ends {
            if end <= low {
                continue;
            }
            let Some(ledger) = ledgers.get(tp) else {
                others.push(tp.clone());
                continue;
            };
            let start = starts.get(tp).and_then(|d| d.start).unwrap_or(low);
            fetched &= ledger.issued_until().unwrap_or(start) >= end;
            let pos = ledger.committable().unwrap_or(start);
            if ledger.outstanding() > 0 || pos < end {
                mine_left = true;
                left.push((tp.clone(), Some(pos), end));
            }
        }
        if !others.is_empty() && ask {
            self.drain.asked = Some(Instant::now());
            let mut tpl = TopicPartitionList::new();
            for tp in &others {
                tpl.add_partition(&tp.topic, tp.partition);
            }
            if let Ok(committed) = self.consumer.committed_offsets(tpl, Duration::from_secs(2)) {
                for e in committed.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        self.drain
                            .group
                            .insert(TopicPartition::new(e.topic(), e.partition()), o);
                    }
                }
            }
        }
        for tp in others {
            let end = ends[&tp].1;
            let at = self.drain.group.get(&tp).copied();
            if at.is_none_or(|at| at < end) {
                left.push((tp, at, end));
            }
        }
        self.report_progress(&ends, &left);
        // Everything to drain here is handed out: stages that hold items until more arrive
        // (windows waiting for their watermark) are asked to flush, again every 250 ms while
        // the last items are still on their way to them.
        if fetched
            && mine_left
            && self
                .drain_flushed
                .get()
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(250))
        {
            self.drain_flushed.set(Some(Instant::now()));
            self.shared.flush.flush();
        }
        let done = left.is_empty();
        self.drain.left = left;
        done
    }
}

/// The low and high watermarks of `tp` cached from `consumer`'s fetch responses (no broker
/// request): ListOffsets answers can lag behind the log, or be wrong on some brokers (Tansu
/// 0.6 answers 1 for a partition of hundreds of records), fetch responses are not.
fn watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tp: &TopicPartition,
) -> Option<(i64, i64)> {
    let topic = CString::new(tp.topic.as_bytes()).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; `topic` is a valid
    // NUL-terminated string; librdkafka writes only to the two out-parameters.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            tp.partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((low.max(0), high))
}

fn intern(cache: &mut HashMap<String, Arc<str>>, s: &str) -> Arc<str> {
    if let Some(v) = cache.get(s) {
        return v.clone();
    }
    let v: Arc<str> = s.into();
    cache.insert(s.to_owned(), v.clone());
    v
}

/// Copies messages into owned records whose bytes share one buffer.
fn to_records(
    tp: &TopicPartition,
    msgs: &[&BorrowedMessage<'_>],
    interned: &mut HashMap<String, Arc<str>>,
) -> Vec<KafkaRecord> {
    let total: usize = msgs
        .iter()
        .map(|m| {
            m.payload_len()
                + m.key_len()
                + m.headers().map_or(0, |h| {
                    h.iter().map(|h| h.value.map_or(0, <[u8]>::len)).sum()
                })
        })
        .sum();
    let mut buf = BytesMut::with_capacity(total);
    // Key, value and headers of each record as ranges into `buf`.
    struct Spans {
        key: Option<(usize, usize)>,
        value: Option<(usize, usize)>,
        headers: Vec<(Arc<str>, (usize, usize))>,
    }
    let mut spans: Vec<Spans> = Vec::with_capacity(msgs.len());
    let put = |buf: &mut BytesMut, data: &[u8]| {
        let start = buf.len();
        buf.extend_from_slice(data);
        (start, buf.len())
    };
    for m in msgs {
        let key = m.key().map(|k| put(&mut buf, k));
        let value = m.payload().map(|v| put(&mut buf, v));
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            intern(interned, h.key),
                            put(&mut buf, h.value.unwrap_or_default()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        spans.push(Spans {
            key,
            value,
            headers,
        });
    }
    let buf = buf.freeze();
    msgs.iter()
        .zip(spans)
        .map(
            |(
                m,
                Spans {
                    key,
                    value,
                    headers,
                },
            )| KafkaRecord {
                topic: tp.topic.clone(),
                partition: tp.partition,
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                key: key.map(|(a, b)| buf.slice(a..b)),
                value: value.map(|(a, b)| buf.slice(a..b)),
                headers: headers
                    .into_iter()
                    .map(|(k, (a, b))| (k, buf.slice(a..b)))
                    .collect(),
            },
        )
        .collect()
}

/// Sends `record` through `producer`, waiting while the producer's queue is full (a fast
/// producer outruns the network); any other error is returned.
pub fn send_waiting<'a, K, P, C>(
    producer: &rdkafka::producer::ThreadedProducer<C>,
    mut record: rdkafka::producer::BaseRecord<'a, K, P, C::DeliveryOpaque>,
) -> Result<(), rdkafka::error::KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
    C: rdkafka::producer::ProducerContext + 'static,
{
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => return Err(e),
        }
    }
}
