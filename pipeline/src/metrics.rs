//! Metric names the runtime records (through the `metrics` facade; the binary installs the
//! Prometheus recorder that `/metrics` renders).

/// Items received by a stage (label `stage`).
pub const STAGE_ITEMS_IN: &str = "sluice_stage_items_in_total";
/// Items emitted by a stage, or written by a sink (label `stage`).
pub const STAGE_ITEMS_OUT: &str = "sluice_stage_items_out_total";
/// Failed attempts of a stage: retried sink writes and fatal errors (label `stage`).
pub const STAGE_ERRORS: &str = "sluice_stage_errors_total";
/// Batches in the queue a stage fills (label `stage`: the stage writing into it).
pub const QUEUE_DEPTH: &str = "sluice_queue_depth";
/// Capacity, in batches, of the queue a stage fills (label `stage`).
pub const QUEUE_CAPACITY: &str = "sluice_queue_capacity";
/// Sink writes in progress, retries included (label `stage`): 1 while a sink is flushing.
pub const SINK_WRITES_IN_FLIGHT: &str = "sluice_sink_writes_in_flight";
/// Items per batch written by a sink or emitted by a batcher (label `stage`).
pub const BATCH_SIZE: &str = "sluice_batch_size";
/// Seconds a sink took to write a batch, retries included (label `stage`).
pub const FLUSH_SECONDS: &str = "sluice_flush_seconds";
/// Seconds a span-cutting stage waited for its fresh cuts to be recorded in the span log
/// before sending them on, retries included (label `stage`).
pub const SPAN_RECORD_SECONDS: &str = "sluice_span_record_seconds";
/// How old the oldest record of each source range was when a sink finished writing what
/// derives from it (record timestamp to durable write: the end-to-end latency), seconds.
pub const RECORD_AGE_SECONDS: &str = "sluice_record_age_seconds";
/// Batches a span batcher cut again along a recorded span, after a redelivery (label `stage`).
pub const SPANS_REPLAYED: &str = "sluice_spans_replayed_total";
/// Batches cut across partitions whose redelivered spans went out again (labels `stage`,
/// `result`: `rebuilt` whole, or `alone` when the rest of the batch did not come).
pub const BATCHES_REBUILT: &str = "sluice_batches_rebuilt_total";
/// Records fetched from Kafka (labels `topic`, `partition`).
pub const SOURCE_RECORDS: &str = "sluice_source_records_total";
/// Last committed offset (labels `topic`, `partition`).
pub const COMMITTED_OFFSET: &str = "sluice_committed_offset";
/// High watermark minus committed offset (labels `topic`, `partition`).
pub const CONSUMER_LAG: &str = "sluice_consumer_lag";
/// Records that open windows hold back from the offset commit: from the first record of the
/// oldest open window to the last record seen (labels `stage`, `topic`, `partition`).
pub const WINDOW_HELD_RECORDS: &str = "sluice_window_held_records";
/// Whether the source has paused fetching because its output queue is full (0 or 1).
pub const SOURCE_PAUSED: &str = "sluice_source_paused";

/// Whether librdkafka reports every broker down for the source (0 or 1).
pub const BROKERS_DOWN: &str = "sluice_brokers_down";

/// Histogram buckets for [`FLUSH_SECONDS`] and [`SPAN_RECORD_SECONDS`].
pub const FLUSH_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Histogram buckets for [`BATCH_SIZE`].
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0, 100_000.0, 500_000.0,
];
