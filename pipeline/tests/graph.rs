//! The graph runtime without a broker: batching limits, acknowledgements through operators and
//! sinks, sink retries and failures, rate limiting, and the HTTP endpoints.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_pipeline::testing::PartitionLedger;
use sluice_pipeline::{
    Batch, BatchLimits, BatchSource, Pipeline, PipelineConfig, PipelineError, RetryPolicy, Sink,
    SinkError, Stage, TopicPartition,
};

/// Batches of `per_batch` consecutive numbers, each carrying the ledger range of its offsets.
fn numbered(ledger: &Arc<PartitionLedger>, batches: usize, per_batch: usize) -> Vec<Batch<u64>> {
    (0..batches)
        .map(|b| {
            let first = (b * per_batch) as i64;
            let last = first + per_batch as i64 - 1;
            let items = (first..=last).map(|i| i as u64).collect();
            Batch::from_handle(items, ledger.issue(first, last).expect("in order"))
        })
        .collect()
}

fn ledger() -> Arc<PartitionLedger> {
    PartitionLedger::new(TopicPartition::new("t", 0))
}

/// Decides whether attempt `n` at writing `items` fails.
type FailScript = fn(u32, &[u64]) -> Option<SinkError>;

/// Records every batch; fails as `fail` says for a given attempt number and batch.
#[derive(Clone, Default)]
struct ScriptedSink {
    batches: Arc<Mutex<Vec<Vec<u64>>>>,
    attempts: Arc<AtomicU32>,
    fail: Option<FailScript>,
}

impl ScriptedSink {
    fn failing(fail: FailScript) -> Self {
        Self {
            fail: Some(fail),
            ..Self::default()
        }
    }

    fn batches(&self) -> Vec<Vec<u64>> {
        self.batches.lock().unwrap().clone()
    }

    fn items(&self) -> Vec<u64> {
        self.batches().concat()
    }
}

impl Sink for ScriptedSink {
    type Item = u64;

    async fn write(&mut self, batch: &Batch<u64>) -> Result<(), SinkError> {
        let attempt = self.attempts.fetch_add(1, Ordering::SeqCst);
        if let Some(err) = self.fail.and_then(|f| f(attempt, &batch.items)) {
            return Err(err);
        }
        self.batches.lock().unwrap().push(batch.items.clone());
        Ok(())
    }
}

#[tokio::test]
async fn batcher_never_exceeds_max_rows_and_acknowledges_everything() {
    let l = ledger();
    let sink = ScriptedSink::default();
    let pipeline = Pipeline::new(PipelineConfig::default());
    let s = sink.clone();
    pipeline
        .source("src", BatchSource::new(numbered(&l, 3, 7)))
        .batch(
            "batch",
            BatchLimits {
                max_rows: 5,
                max_bytes: usize::MAX,
                max_linger: Duration::from_secs(60),
            },
            |_| 1,
        )
        .sink("sink", move || s.clone());
    pipeline.run().await.expect("run");
    let sizes: Vec<usize> = sink.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![5, 5, 5, 5, 1]);
    assert_eq!(sink.items(), (0..21).collect::<Vec<_>>());
    assert_eq!(l.committable(), Some(21));
    assert_eq!(l.outstanding(), 0);
}

#[tokio::test]
async fn batcher_flushes_on_bytes() {
    let l = ledger();
    let sink = ScriptedSink::default();
    let pipeline = Pipeline::new(PipelineConfig::default());
    let s = sink.clone();
    let batches = numbered(&l, 1, 10);
    pipeline
        .source("src", BatchSource::new(batches))
        .batch(
            "batch",
            BatchLimits {
                max_rows: 1000,
                max_bytes: 40,
                max_linger: Duration::from_millis(20),
            },
            |_| 8,
        )
        .sink("sink", move || s.clone());
    pipeline.run().await.expect("run");
    let sizes: Vec<usize> = sink.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![5, 5], "40 bytes at 8 bytes an item");
    assert_eq!(l.committable(), Some(10));
}

/// Sends its batches, then stays open (as a quiet topic does) until shutdown.
struct QuietAfter(Vec<Batch<u64>>);

impl sluice_pipeline::Source for QuietAfter {
    type Item = u64;

    async fn run(
        self,
        out: sluice_pipeline::Output<u64>,
        ctx: sluice_pipeline::SourceContext,
    ) -> Result<(), PipelineError> {
        for b in self.0 {
            out.send(b).await?;
        }
        ctx.shutdown.wait().await;
        Ok(())
    }
}

#[tokio::test]
async fn batcher_flushes_after_linger_while_the_source_is_quiet() {
    let l = ledger();
    let sink = ScriptedSink::default();
    let pipeline = Pipeline::new(PipelineConfig::default());
    let handle = pipeline.handle();
    let s = sink.clone();
    pipeline
        .source("src", QuietAfter(numbered(&l, 1, 3)))
        .batch(
            "batch",
            BatchLimits {
                max_rows: 1000,
                max_bytes: usize::MAX,
                max_linger: Duration::from_millis(30),
            },
            |_| 1,
        )
        .sink("sink", move || s.clone());
    let run = tokio::spawn(pipeline.run());
    let deadline = Instant::now() + Duration::from_secs(5);
    while l.committable() != Some(3) {
        assert!(Instant::now() < deadline, "linger did not flush");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(sink.batches(), vec![vec![0, 1, 2]]);
    handle.shutdown();
    run.await.expect("join").expect("run");
}

#[tokio::test]
async fn items_filtered_away_are_acknowledged_at_once() {
    let l = ledger();
    let sink = ScriptedSink::default();
    let pipeline = Pipeline::new(PipelineConfig::default());
    let s = sink.clone();
    pipeline
        .source("src", BatchSource::new(numbered(&l, 4, 10)))
        .filter("only-first-batch", |i: &u64| *i < 10)
        .flat_map("twice", |i: u64| [i, i + 1000])
        .sink("sink", move || s.clone());
    pipeline.run().await.expect("run");
    assert_eq!(sink.items().len(), 20);
    assert_eq!(
        l.committable(),
        Some(40),
        "batches that yield nothing are acknowledged too"
    );
}

#[tokio::test]
async fn transient_failures_are_retried_until_written() {
    let l = ledger();
    let sink = ScriptedSink::failing(|attempt, _| {
        (attempt < 3).then(|| SinkError::transient("connection refused"))
    });
    let retry = RetryPolicy {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        max_retries: None,
    };
    let pipeline = Pipeline::new(PipelineConfig {
        retry,
        ..Default::default()
    });
    let s = sink.clone();
    pipeline
        .source("src", BatchSource::new(numbered(&l, 2, 5)))
        .sink("sink", move || s.clone());
    pipeline.run().await.expect("run");
    assert_eq!(
        sink.items(),
        (0..10).collect::<Vec<_>>(),
        "each item written once"
    );
    assert_eq!(
        sink.attempts.load(Ordering::SeqCst),
        5,
        "3 failed attempts, then 2 writes"
    );
    assert_eq!(l.committable(), Some(10));
}

#[tokio::test]
async fn permanent_failure_stops_the_pipeline_without_acknowledging_unwritten_data() {
    let l = ledger();
    let sink = ScriptedSink::failing(|_, items| {
        items
            .contains(&12)
            .then(|| SinkError::permanent("type mismatch"))
    });
    let pipeline = Pipeline::new(PipelineConfig::default());
    let s = sink.clone();
    pipeline
        .source("src", BatchSource::new(numbered(&l, 5, 5)))
        .sink("sink", move || s.clone());
    let err = pipeline.run().await.expect_err("must fail");
    assert!(
        matches!(err, PipelineError::Sink { ref stage, attempts: 1, .. } if &**stage == "sink"),
        "{err}"
    );
    assert!(err.to_string().contains("type mismatch"), "{err}");
    assert_eq!(sink.items(), (0..10).collect::<Vec<_>>());
    assert_eq!(
        l.committable(),
        Some(10),
        "never past the batch that was not written"
    );
}

#[tokio::test]
async fn retry_limit_turns_a_long_outage_into_an_error() {
    let l = ledger();
    let sink = ScriptedSink::failing(|_, _| Some(SinkError::transient("timeout")));
    let retry = RetryPolicy {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        max_retries: Some(2),
    };
    let pipeline = Pipeline::new(PipelineConfig::default());
    let s = sink.clone();
    pipeline
        .source("src", BatchSource::new(numbered(&l, 1, 5)))
        .sink(Stage::new("sink").retry(retry), move || s.clone());
    let err = pipeline.run().await.expect_err("must fail");
    assert!(
        matches!(err, PipelineError::Sink { attempts: 3, .. }),
        "{err}"
    );
    assert_eq!(l.committable(), None);
}

#[tokio::test]
async fn rate_limit_spaces_items_out() {
    let l = ledger();
    let sink = ScriptedSink::default();
    let pipeline = Pipeline::new(PipelineConfig::default());
    let s = sink.clone();
    pipeline
        .source("src", BatchSource::new(numbered(&l, 6, 100)))
        .rate_limit("limit", std::num::NonZeroU32::new(200).expect("non-zero"))
        .sink("sink", move || s.clone());
    let started = Instant::now();
    pipeline.run().await.expect("run");
    // 600 items at 200/s with a burst of 200: at least two seconds' worth after the burst.
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "took only {:?}",
        started.elapsed()
    );
    assert_eq!(sink.items().len(), 600);
}

#[tokio::test]
async fn health_and_readiness_endpoints() {
    let health = sluice_pipeline::Health::new();
    let (addr, server) =
        sluice_pipeline::http::serve("127.0.0.1:0".parse().expect("addr"), health.clone(), None)
            .await
            .expect("serve");
    assert_eq!(sluice_testkit::http_get(addr, "/health").await.0, 200);
    let (status, body) = sluice_testkit::http_get(addr, "/ready").await;
    assert_eq!(status, 503);
    assert!(body.contains("no partitions assigned"), "{body}");
    health.set_assigned(true);
    assert_eq!(sluice_testkit::http_get(addr, "/ready").await.0, 200);
    health.set_failing("clickhouse", true);
    let (status, body) = sluice_testkit::http_get(addr, "/ready").await;
    assert_eq!(
        (status, body.contains("clickhouse failing")),
        (503, true),
        "{body}"
    );
    assert_eq!(sluice_testkit::http_get(addr, "/metrics").await.0, 200);
    server.abort();
}

#[derive(Clone, Default)]
struct Texts(Arc<Mutex<Vec<String>>>);

impl Sink for Texts {
    type Item = String;

    async fn write(&mut self, batch: &Batch<String>) -> Result<(), SinkError> {
        self.0.lock().unwrap().extend(batch.items.iter().cloned());
        Ok(())
    }
}

#[tokio::test]
async fn typed_split_sends_items_to_outputs_of_different_types() {
    let l = ledger();
    let numbers = ScriptedSink::default();
    let texts = Texts::default();
    let pipeline = Pipeline::new(PipelineConfig::default());
    let mut split = pipeline
        .source("src", BatchSource::new(numbered(&l, 4, 10)))
        .split(Stage::new("split").workers(2));
    let (even_port, evens) = split.output::<u64>("even");
    let (odd_port, odds) = split.output::<String>("odd");
    split.run(move || {
        move |i: u64, out: &mut sluice_pipeline::Emit| match i {
            i if i % 5 == 0 => {}
            i if i % 2 == 0 => out.push(&even_port, i),
            i => {
                out.push(&odd_port, format!("odd {i}"));
                out.push(&odd_port, format!("again {i}"));
            }
        }
    });
    let (n, t) = (numbers.clone(), texts.clone());
    evens.sink("numbers", move || n.clone());
    odds.sink("texts", move || t.clone());
    pipeline.run().await.expect("run");
    let mut got = numbers.items();
    got.sort_unstable();
    assert_eq!(
        got,
        (0..40)
            .filter(|i| i % 2 == 0 && i % 5 != 0)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        texts.0.lock().unwrap().len(),
        2 * (0..40).filter(|i| i % 2 == 1 && i % 5 != 0).count()
    );
    assert_eq!(l.committable(), Some(40));
}

/// Looks each number up "remotely" (an async operator standing in for an I/O enrichment).
struct Lookup;

impl sluice_pipeline::AsyncOperator for Lookup {
    type In = u64;
    type Out = u64;

    async fn process(&mut self, input: Vec<u64>) -> Result<Vec<u64>, sluice_pipeline::BoxError> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(input.into_iter().map(|i| i * 10).collect())
    }
}

#[tokio::test]
async fn async_operator_and_merge_of_branches() {
    let l = ledger();
    let sink = ScriptedSink::default();
    let pipeline = Pipeline::new(PipelineConfig::default());
    let looked_up = pipeline
        .source("src", BatchSource::new(numbered(&l, 5, 10)))
        .apply_async(Stage::new("lookup").workers(2), || Lookup);
    let branches = looked_up.route("by-parity", 2, |i: &u64| i % 20);
    let merged = sluice_pipeline::Flow::merge("merge", branches).expect("non-empty");
    let s = sink.clone();
    merged.sink("sink", move || s.clone());
    pipeline.run().await.expect("run");
    let mut got = sink.items();
    got.sort_unstable();
    assert_eq!(got, (0..50).map(|i| i * 10).collect::<Vec<_>>());
    assert_eq!(l.committable(), Some(50));
}

/// A span log in memory, preloaded with what an earlier run recorded.
#[derive(Clone, Default)]
struct MemorySpanLog(Arc<Mutex<Vec<sluice_pipeline::SourceSpan>>>);

impl sluice_pipeline::SpanLog for MemorySpanLog {
    async fn record(&self, spans: &[sluice_pipeline::SourceSpan]) -> Result<(), SinkError> {
        self.0.lock().unwrap().extend_from_slice(spans);
        Ok(())
    }

    async fn load(
        &self,
        tp: &TopicPartition,
        from: i64,
    ) -> Result<Vec<sluice_pipeline::SourceSpan>, SinkError> {
        let spans = self.0.lock().unwrap();
        Ok(spans
            .iter()
            .filter(|s| &s.tp == tp && s.last >= from)
            .cloned()
            .collect())
    }
}

/// Records each batch's span and whether it was marked as a replay.
#[derive(Clone, Default)]
struct SpanRecorder(Arc<Mutex<Vec<(i64, i64, bool)>>>);

impl Sink for SpanRecorder {
    type Item = u64;

    async fn write(&mut self, batch: &Batch<u64>) -> Result<(), SinkError> {
        let span = batch.spans().first().expect("a span batch");
        self.0.lock().unwrap().push((
            span.first,
            span.last,
            batch.delivery() == sluice_pipeline::Delivery::Redelivered,
        ));
        Ok(())
    }
}

/// Cuts the records `start..30` (batches of 10 from `start`) along a log that holds the span
/// 0..=9 of an earlier run; returns each batch's (first, last, marked as a replay).
async fn cut_after_earlier_run(start: i64) -> Vec<(i64, i64, bool)> {
    let tp = TopicPartition::new("t", 0);
    let log = MemorySpanLog::default();
    log.0.lock().unwrap().push(sluice_pipeline::SourceSpan {
        tp: tp.clone(),
        first: 0,
        last: 9,
        items: 10,
        window: None,
        across: false,
        batch: None,
    });
    let ledger = ledger();
    let mut batches = Vec::new();
    let mut first = start;
    while first < 30 {
        let last = (first + 9).min(29);
        let items = (first..=last)
            .map(|i| sluice_pipeline::Sourced::new(&tp, i, i as u64))
            .collect();
        batches.push(Batch::from_handle(
            items,
            ledger.issue(first, last).expect("in order"),
        ));
        first = last + 1;
    }
    let pipeline = Pipeline::new(PipelineConfig::default());
    let recorder = SpanRecorder::default();
    let seen = recorder.clone();
    pipeline
        .source("source", BatchSource::new(batches))
        .batch_spans(
            "batch",
            BatchLimits {
                max_rows: 20,
                max_bytes: usize::MAX,
                max_linger: Duration::from_secs(60),
            },
            |_| 1,
            log,
        )
        .sink("sink", move || recorder.clone());
    pipeline.run().await.expect("runs");
    assert_eq!(ledger.committable(), Some(30), "everything acknowledged");
    seen.0.lock().unwrap().clone()
}

#[tokio::test]
async fn spans_cut_again_whole_are_marked_as_replays_and_tails_and_fresh_ones_are_not() {
    // Redelivered from 0: the recorded span comes again whole, so it may be written in part.
    assert_eq!(
        cut_after_earlier_run(0).await,
        vec![(0, 9, true), (10, 29, false)]
    );
    // Redelivered from 5: the span's first records were committed, so it was written whole.
    assert_eq!(
        cut_after_earlier_run(5).await,
        vec![(0, 9, false), (10, 29, false)]
    );
}

/// Reverses each micro-batch: a stage that breaks the offset order of a partition.
struct Reverse;

impl sluice_pipeline::Operator for Reverse {
    type In = sluice_pipeline::Sourced<u64>;
    type Out = sluice_pipeline::Sourced<u64>;

    fn process(
        &mut self,
        mut input: Vec<Self::In>,
        out: &mut Vec<Self::Out>,
    ) -> Result<(), sluice_pipeline::BoxError> {
        input.reverse();
        out.extend(input);
        Ok(())
    }
}

#[tokio::test]
async fn a_span_batcher_refuses_items_out_of_offset_order() {
    let tp = TopicPartition::new("t", 3);
    let ledger = PartitionLedger::new(tp.clone());
    let items = (0..10)
        .map(|i| sluice_pipeline::Sourced::new(&tp, i, i as u64))
        .collect();
    let batch = Batch::from_handle(items, ledger.issue(0, 9).expect("in order"));
    let pipeline = Pipeline::new(PipelineConfig::default());
    pipeline
        .source("source", BatchSource::new([batch]))
        .apply("reorder", || Reverse)
        .batch_spans(
            "batch",
            BatchLimits::default(),
            |_| 1,
            MemorySpanLog::default(),
        )
        .sink("sink", sluice_testkit::CollectSink::<u64>::new);
    let e = pipeline.run().await.expect_err("out of order");
    let message = e.to_string();
    assert!(
        matches!(
            e,
            PipelineError::OutOfOrder {
                offset: 8,
                after: 9,
                ..
            }
        ),
        "{message}"
    );
    assert!(
        message.contains("t/3") && message.contains("batch"),
        "{message}"
    );
    assert_eq!(
        ledger.committable(),
        None,
        "nothing past the refused items is committed"
    );
}

/// Passes items on and notes what it hears of assignments.
struct Stateful(Arc<Mutex<Vec<String>>>);

impl sluice_pipeline::Operator for Stateful {
    type In = u64;
    type Out = u64;

    fn process(
        &mut self,
        input: Vec<u64>,
        out: &mut Vec<u64>,
    ) -> Result<(), sluice_pipeline::BoxError> {
        out.extend(input);
        Ok(())
    }

    fn assigned(
        &mut self,
        tp: &TopicPartition,
        from: i64,
    ) -> Result<(), sluice_pipeline::BoxError> {
        self.0
            .lock()
            .unwrap()
            .push(format!("assigned {tp} from {from}"));
        Ok(())
    }
}

#[tokio::test]
async fn an_operator_hears_where_each_assignment_starts() {
    let (a, b) = (
        PartitionLedger::new(TopicPartition::new("t", 0)),
        PartitionLedger::new(TopicPartition::new("t", 1)),
    );
    let batches = vec![
        Batch::from_handle(vec![1, 2], a.issue(7, 8).unwrap()),
        Batch::from_handle(vec![3], b.issue(0, 0).unwrap()),
        Batch::from_handle(vec![4], a.issue(9, 9).unwrap()),
    ];
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h = heard.clone();
    let pipeline = Pipeline::new(PipelineConfig::default());
    pipeline
        .source("source", BatchSource::new(batches))
        .apply("stateful", move || Stateful(h.clone()))
        .sink("sink", sluice_testkit::CollectSink::<u64>::new);
    pipeline.run().await.expect("runs");
    assert_eq!(
        *heard.lock().unwrap(),
        vec!["assigned t/0 from 7", "assigned t/1 from 0"]
    );
    assert_eq!((a.committable(), b.committable()), (Some(10), Some(1)));
}
