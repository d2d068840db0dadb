//! The typed graph: a [`Pipeline`] is built from a [`Source`], then [`Flow`] adapters
//! (operators, routing, fan-out, batching, rate limiting) and sinks. Each adapter adds a stage
//! that runs as its own task(s), connected by bounded queues of [`Batch`]es; connecting stages
//! whose item types differ does not compile.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::batch::Batch;
use crate::error::PipelineError;
use crate::lifecycle::{Health, Shutdown};
use crate::operator::{AsyncOperator, FilterOp, FlatMapOp, MapOp, Operator, Sink};
use crate::retry::RetryPolicy;
use crate::stages::{self, BatchLimits, Input, Output};

type StageFuture = Pin<Box<dyn Future<Output = Result<(), PipelineError>> + Send>>;
type DepthProbe = Box<dyn Fn() -> Option<(usize, usize)> + Send + Sync>;

/// Runtime-wide settings.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Default capacity, in batches, of the queue after each stage.
    pub queue_capacity: usize,
    /// How long a shutdown may take to flush every stage before it gives up (and commits only
    /// what was written).
    pub drain_deadline: Duration,
    /// Default retry policy of sinks.
    pub retry: RetryPolicy,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 8,
            drain_deadline: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }
}

/// Name and settings of one stage.
#[derive(Clone, Debug)]
pub struct Stage {
    pub(crate) name: Arc<str>,
    pub(crate) workers: usize,
    pub(crate) capacity: Option<usize>,
    pub(crate) retry: Option<RetryPolicy>,
}

impl Stage {
    /// A stage with one worker and the pipeline's default queue capacity.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self {
            name: name.into(),
            workers: 1,
            capacity: None,
            retry: None,
        }
    }

    /// Parallel workers (at least 1). Workers share the input queue; output order across
    /// batches is then not preserved (use [`Flow::apply_keyed`] for per-key order).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// Capacity, in batches, of the queue after this stage.
    pub fn capacity(mut self, batches: usize) -> Self {
        self.capacity = Some(batches.max(1));
        self
    }

    /// Retry policy of a sink stage (or of an operator stage that retries its I/O).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// The stage name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl From<&str> for Stage {
    fn from(name: &str) -> Self {
        Stage::new(name)
    }
}

/// What an operator stage may use of the pipeline (see [`Flow::apply_async_with`]).
#[derive(Clone, Debug)]
pub struct StageContext {
    name: Arc<str>,
    health: Health,
    retry: RetryPolicy,
}

impl StageContext {
    /// A context outside a pipeline: for driving an operator by hand in its tests.
    pub fn new(name: impl Into<Arc<str>>, health: Health, retry: RetryPolicy) -> Self {
        Self {
            name: name.into(),
            health,
            retry,
        }
    }

    /// The stage name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The pipeline's readiness state: a component marked failing here is named on `/ready`.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The stage's retry policy ([`Stage::retry`]), else the pipeline's.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }
}

/// What a source gets to run: its output queue and the pipeline's control signals.
pub struct SourceContext {
    /// Stage name.
    pub name: Arc<str>,
    /// Set when the pipeline should stop; the source then stops fetching and returns after
    /// [`SourceContext::downstream_done`] and a final commit.
    pub shutdown: Shutdown,
    /// Readiness state (the source reports partition assignment).
    pub health: Health,
    flush: Arc<watch::Sender<u64>>,
    downstream_done: watch::Receiver<bool>,
}

/// Asks every batching stage to flush what it holds now (e.g. before partitions are revoked).
#[derive(Clone, Debug)]
pub struct FlushTrigger(Arc<watch::Sender<u64>>);

impl FlushTrigger {
    /// Requests the flush.
    pub fn flush(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl SourceContext {
    /// A handle that asks every batching stage to flush now.
    pub fn flush_trigger(&self) -> FlushTrigger {
        FlushTrigger(self.flush.clone())
    }

    /// Whether every stage after the source has finished (or the drain deadline passed).
    pub fn is_downstream_done(&self) -> bool {
        *self.downstream_done.borrow()
    }

    /// Resolves once every stage after the source has finished (or the drain deadline passed).
    pub async fn downstream_done(&mut self) {
        let _ = self.downstream_done.wait_for(|d| *d).await;
    }
}

/// Produces the batches a pipeline processes.
pub trait Source: Send + 'static {
    /// Item type produced.
    type Item: Send + 'static;

    /// Runs until shutdown (or until the source is exhausted), sending batches to `out`.
    fn run(
        self,
        out: Output<Self::Item>,
        ctx: SourceContext,
    ) -> impl Future<Output = Result<(), PipelineError>> + Send;
}

struct Task {
    name: Arc<str>,
    is_source: bool,
    fut: StageFuture,
}

pub(crate) struct Graph {
    config: PipelineConfig,
    pub(crate) written: Arc<std::sync::atomic::AtomicU64>,
    tasks: Mutex<Vec<Task>>,
    probes: Mutex<Vec<(Arc<str>, DepthProbe)>>,
    shutdown: Shutdown,
    health: Health,
    flush: Arc<watch::Sender<u64>>,
    downstream_done: watch::Sender<bool>,
}

impl Graph {
    pub(crate) fn add_task(
        &self,
        name: Arc<str>,
        is_source: bool,
        fut: impl Future<Output = Result<(), PipelineError>> + Send + 'static,
    ) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Task {
                name,
                is_source,
                fut: Box::pin(fut),
            });
    }

    /// A bounded queue whose depth is reported under `stage`'s name (the stage that fills it).
    pub(crate) fn queue<T: Send + 'static>(
        &self,
        stage: &Stage,
    ) -> (mpsc::Sender<Batch<T>>, mpsc::Receiver<Batch<T>>) {
        let cap = stage.capacity.unwrap_or(self.config.queue_capacity);
        let (tx, rx) = mpsc::channel(cap);
        let weak = tx.downgrade();
        let probe: DepthProbe = Box::new(move || {
            weak.upgrade()
                .map(|tx| (tx.max_capacity() - tx.capacity(), tx.max_capacity()))
        });
        self.probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((stage.name.clone(), probe));
        (tx, rx)
    }

    pub(crate) fn flush_signal(&self) -> watch::Receiver<u64> {
        self.flush.subscribe()
    }
}

/// A pipeline under construction; [`Pipeline::run`] runs it.
pub struct Pipeline {
    graph: Arc<Graph>,
}

/// A handle to observe and stop a pipeline while it runs.
#[derive(Clone)]
pub struct PipelineHandle {
    graph: Arc<Graph>,
}

impl PipelineHandle {
    /// Items written by all sinks so far.
    pub fn items_written(&self) -> u64 {
        self.graph
            .written
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests a graceful shutdown.
    pub fn shutdown(&self) {
        self.graph.shutdown.trigger();
    }

    /// The shutdown signal (to trigger it from elsewhere, e.g. on SIGTERM).
    pub fn shutdown_signal(&self) -> Shutdown {
        self.graph.shutdown.clone()
    }

    /// The readiness state.
    pub fn health(&self) -> Health {
        self.graph.health.clone()
    }

    /// Current depth and capacity of every queue, in batches, named after the stage that fills it.
    /// Queues whose stages have finished are left out.
    pub fn queue_depths(&self) -> Vec<(Arc<str>, usize, usize)> {
        let probes = self.graph.probes.lock().unwrap_or_else(|p| p.into_inner());
        probes
            .iter()
            .filter_map(|(name, probe)| probe().map(|(d, c)| (name.clone(), d, c)))
            .collect()
    }
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new(config: PipelineConfig) -> Self {
        let (done_tx, _) = watch::channel(false);
        Self {
            graph: Arc::new(Graph {
                config,
                written: Arc::new(std::sync::atomic::AtomicU64::new(0)),
                tasks: Mutex::new(Vec::new()),
                probes: Mutex::new(Vec::new()),
                shutdown: Shutdown::new(),
                health: Health::new(),
                flush: Arc::new(watch::channel(0).0),
                downstream_done: done_tx,
            }),
        }
    }

    /// A handle to observe and stop the pipeline once it runs.
    pub fn handle(&self) -> PipelineHandle {
        PipelineHandle {
            graph: self.graph.clone(),
        }
    }

    /// Adds the source; its batches enter the returned flow.
    pub fn source<S: Source>(&self, stage: impl Into<Stage>, source: S) -> Flow<S::Item> {
        let stage = stage.into();
        let (tx, rx) = self.graph.queue(&stage);
        let ctx = SourceContext {
            name: stage.name.clone(),
            shutdown: self.graph.shutdown.clone(),
            health: self.graph.health.clone(),
            flush: self.graph.flush.clone(),
            downstream_done: self.graph.downstream_done.subscribe(),
        };
        let out = Output::new(stage.name.clone(), tx);
        self.graph
            .add_task(stage.name.clone(), true, source.run(out, ctx));
        Flow {
            rx,
            graph: self.graph.clone(),
        }
    }

    /// Runs every stage until the source finishes or shutdown is requested and everything
    /// is flushed. Returns the first stage failure, if any.
    pub async fn run(self) -> Result<(), PipelineError> {
        let graph = self.graph;
        let tasks = std::mem::take(&mut *graph.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        spawn_queue_gauges(&graph);
        let mut set = JoinSet::new();
        let mut names = HashMap::new();
        let mut stages_left = 0usize;
        let mut stage_aborts = Vec::new();
        for t in tasks {
            let handle = set.spawn(t.fut);
            if !t.is_source {
                stages_left += 1;
                stage_aborts.push(handle.clone());
            }
            names.insert(handle.id(), (t.name, t.is_source));
        }
        if stages_left == 0 {
            graph.downstream_done.send_replace(true);
        }

        let mut primary: Option<PipelineError> = None;
        let mut secondary: Option<PipelineError> = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut deadline_passed = false;
        let shutdown = graph.shutdown.clone();
        let shutdown_requested = shutdown.wait();
        tokio::pin!(shutdown_requested);

        loop {
            tokio::select! {
                joined = set.join_next_with_id() => {
                    let Some(joined) = joined else { break };
                    let (id, result) = match joined {
                        Ok((id, r)) => (id, r),
                        Err(e) => {
                            let id = e.id();
                            let (name, _) = names.get(&id).cloned().unwrap_or_else(|| ("?".into(), false));
                            let message = if e.is_panic() { panic_message(e.into_panic()) } else { "cancelled".to_owned() };
                            (id, Err(PipelineError::Panicked { stage: name, message }))
                        }
                    };
                    let (name, is_source) = names.get(&id).cloned().unwrap_or_else(|| ("?".into(), false));
                    if let Err(e) = result {
                        if !deadline_passed || !matches!(e, PipelineError::Panicked { ref message, .. } if message == "cancelled") {
                            tracing::error!(stage = %name, error = %e, "stage failed; stopping the pipeline");
                        }
                        metrics::counter!(crate::metrics::STAGE_ERRORS, "stage" => name.to_string()).increment(1);
                        let slot = if e.is_secondary() { &mut secondary } else { &mut primary };
                        slot.get_or_insert(e);
                        shutdown.trigger();
                    } else {
                        tracing::debug!(stage = %name, "stage finished");
                    }
                    if !is_source {
                        stages_left -= 1;
                        if stages_left == 0 {
                            graph.downstream_done.send_replace(true);
                        }
                    }
                }
                _ = &mut shutdown_requested, if deadline.is_none() => {
                    graph.health.set_stopping();
                    deadline = Some(tokio::time::Instant::now() + graph.config.drain_deadline);
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() && !deadline_passed => {
                    deadline_passed = true;
                    if stages_left > 0 {
                        tracing::error!(deadline = ?graph.config.drain_deadline, stages_left, "drain deadline passed; aborting unflushed stages");
                        primary.get_or_insert(PipelineError::DrainDeadline(graph.config.drain_deadline));
                        for a in &stage_aborts {
                            a.abort();
                        }
                        graph.downstream_done.send_replace(true);
                    }
                }
            }
        }
        match (primary, secondary) {
            (Some(e), _) | (None, Some(e)) => Err(e),
            (None, None) => Ok(()),
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}

/// Publishes queue depths as gauges once a second while the pipeline runs.
fn spawn_queue_gauges(graph: &Arc<Graph>) {
    let weak = Arc::downgrade(graph);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(graph) = weak.upgrade() else { return };
            if *graph.downstream_done.borrow() {
                return;
            }
            let probes = graph.probes.lock().unwrap_or_else(|p| p.into_inner());
            for (name, probe) in probes.iter() {
                if let Some((depth, cap)) = probe() {
                    metrics::gauge!(crate::metrics::QUEUE_DEPTH, "stage" => name.to_string())
                        .set(depth as f64);
                    metrics::gauge!(crate::metrics::QUEUE_CAPACITY, "stage" => name.to_string())
                        .set(cap as f64);
                }
            }
        }
    });
}

/// `n` (at least one) branch queues after `stage`: the outputs it writes and the flows after them.
fn branches<T: Send + 'static>(
    graph: &Arc<Graph>,
    stage: &Stage,
    n: usize,
) -> (Vec<Output<T>>, Vec<Flow<T>>) {
    (0..n.max(1))
        .map(|i| {
            let branch = Stage {
                name: format!("{}[{i}]", stage.name).into(),
                ..stage.clone()
            };
            let (tx, rx) = graph.queue(&branch);
            (
                Output::new(stage.name.clone(), tx),
                Flow {
                    rx,
                    graph: graph.clone(),
                },
            )
        })
        .unzip()
}

/// A typed stream of batches between two stages; each adapter consumes it and adds a stage.
#[must_use = "a flow does nothing until it ends in a sink"]
pub struct Flow<T> {
    rx: mpsc::Receiver<Batch<T>>,
    graph: Arc<Graph>,
}

impl<T: Send + 'static> Flow<T> {
    pub(crate) fn from_parts(rx: mpsc::Receiver<Batch<T>>, graph: Arc<Graph>) -> Self {
        Flow { rx, graph }
    }

    pub(crate) fn graph(&self) -> &Arc<Graph> {
        &self.graph
    }

    pub(crate) fn into_inputs(self, workers: usize) -> (Vec<Input<T>>, Arc<Graph>) {
        self.input(workers)
    }

    /// Starts a typed split: one stage sending each item to outputs of different types.
    pub fn split(self, stage: impl Into<Stage>) -> crate::split::Split<T> {
        crate::split::Split::new(stage.into(), self)
    }

    fn input(self, workers: usize) -> (Vec<Input<T>>, Arc<Graph>) {
        let inputs = if workers <= 1 {
            vec![Input::One(self.rx)]
        } else {
            let shared = Arc::new(tokio::sync::Mutex::new(self.rx));
            (0..workers)
                .map(|_| Input::Shared(shared.clone()))
                .collect()
        };
        (inputs, self.graph)
    }

    /// Adds a stage of `stage.workers` tasks sharing this flow as input and one output queue;
    /// `task` builds each worker's future.
    fn workers<U, Fut>(
        self,
        stage: Stage,
        mut task: impl FnMut(Input<T>, Output<U>) -> Fut,
    ) -> Flow<U>
    where
        U: Send + 'static,
        Fut: Future<Output = Result<(), PipelineError>> + Send + 'static,
    {
        let (inputs, graph) = self.input(stage.workers);
        let (tx, rx) = graph.queue(&stage);
        for input in inputs {
            let out = Output::new(stage.name.clone(), tx.clone());
            graph.add_task(stage.name.clone(), false, task(input, out));
        }
        Flow { rx, graph }
    }

    /// Adds a synchronous operator stage; `factory` makes one operator per worker.
    pub fn apply<O, F>(self, stage: impl Into<Stage>, mut factory: F) -> Flow<O::Out>
    where
        O: Operator<In = T>,
        F: FnMut() -> O,
    {
        let stage = stage.into();
        let name = stage.name.clone();
        self.workers(stage, |input, out| {
            stages::run_operator(name.clone(), factory(), input, out)
        })
    }

    /// Adds an asynchronous operator stage; `factory` makes one operator per worker.
    pub fn apply_async<O, F>(self, stage: impl Into<Stage>, mut factory: F) -> Flow<O::Out>
    where
        O: AsyncOperator<In = T>,
        F: FnMut() -> O,
    {
        let stage = stage.into();
        let name = stage.name.clone();
        self.workers(stage, |input, out| {
            stages::run_async_operator(name.clone(), factory(), input, out)
        })
    }

    /// Adds an asynchronous operator stage whose operators see the stage's context (its name,
    /// the pipeline's health and the stage's retry policy): for operators that do I/O and
    /// must retry it and report it on `/ready`, such as lookups. `factory` makes one operator
    /// per worker.
    pub fn apply_async_with<O, F>(self, stage: impl Into<Stage>, mut factory: F) -> Flow<O::Out>
    where
        O: AsyncOperator<In = T>,
        F: FnMut(&StageContext) -> O,
    {
        let stage = stage.into();
        let ctx = StageContext {
            name: stage.name.clone(),
            health: self.graph.health.clone(),
            retry: stage
                .retry
                .clone()
                .unwrap_or_else(|| self.graph.config.retry.clone()),
        };
        self.apply_async(stage, move || factory(&ctx))
    }

    /// Maps every item.
    pub fn map<U, F>(self, stage: impl Into<Stage>, f: F) -> Flow<U>
    where
        U: Send + 'static,
        F: FnMut(T) -> U + Clone + Send + 'static,
    {
        self.apply(stage, || MapOp::new(f.clone()))
    }

    /// Keeps the items `f` accepts.
    pub fn filter<F>(self, stage: impl Into<Stage>, f: F) -> Flow<T>
    where
        F: FnMut(&T) -> bool + Clone + Send + 'static,
    {
        self.apply(stage, || FilterOp::new(f.clone()))
    }

    /// Turns every item into zero or more items.
    pub fn flat_map<U, I, F>(self, stage: impl Into<Stage>, f: F) -> Flow<U>
    where
        U: Send + 'static,
        I: IntoIterator<Item = U> + 'static,
        F: FnMut(T) -> I + Clone + Send + 'static,
    {
        self.apply(stage, || FlatMapOp::new(f.clone()))
    }

    /// Splits the stream into `n` branches by key: items with equal keys go to the same
    /// branch, in order.
    pub fn route<K, F>(self, stage: impl Into<Stage>, n: usize, key: F) -> Vec<Flow<T>>
    where
        K: Hash + 'static,
        F: Fn(&T) -> K + Send + 'static,
    {
        let stage = stage.into();
        let graph = self.graph;
        let (outs, flows) = branches(&graph, &stage, n);
        graph.add_task(
            stage.name.clone(),
            false,
            stages::run_route(stage.name.clone(), Input::One(self.rx), outs, key),
        );
        flows
    }

    /// Runs `stage.workers` instances of an operator, each fed the items of its keys, so that
    /// items with equal keys are processed in order by the same instance.
    pub fn apply_keyed<K, F, O, M>(
        self,
        stage: impl Into<Stage>,
        key: F,
        mut factory: M,
    ) -> Flow<O::Out>
    where
        K: Hash + 'static,
        F: Fn(&T) -> K + Send + 'static,
        O: Operator<In = T>,
        M: FnMut() -> O,
    {
        let stage = stage.into();
        let (inputs, graph) = self.into_keyed_inputs(&stage, key);
        let (tx, rx) = graph.queue(&stage);
        for (i, input) in inputs.into_iter().enumerate() {
            let name: Arc<str> = format!("{}[{i}]", stage.name).into();
            let out = Output::new(name.clone(), tx.clone());
            graph.add_task(
                name.clone(),
                false,
                stages::run_operator(name, factory(), input, out),
            );
        }
        Flow { rx, graph }
    }

    /// One input per worker of `stage`, each fed the items of its keys in order (through a
    /// routing stage when there are several workers).
    pub(crate) fn into_keyed_inputs<K, F>(
        self,
        stage: &Stage,
        key: F,
    ) -> (Vec<Input<T>>, Arc<Graph>)
    where
        K: Hash + 'static,
        F: Fn(&T) -> K + Send + 'static,
    {
        if stage.workers <= 1 {
            return self.input(1);
        }
        let route_stage = Stage {
            name: format!("{}.route", stage.name).into(),
            workers: 1,
            ..stage.clone()
        };
        let branches = self.route(route_stage, stage.workers, key);
        let graph = branches[0].graph.clone();
        let inputs = branches.into_iter().map(|b| Input::One(b.rx)).collect();
        (inputs, graph)
    }

    /// Sends every batch to `n` branches (e.g. several sinks of the same items).
    pub fn fan_out(self, stage: impl Into<Stage>, n: usize) -> Vec<Flow<T>>
    where
        T: Clone,
    {
        let stage = stage.into();
        let graph = self.graph;
        let (outs, flows) = branches(&graph, &stage, n);
        graph.add_task(
            stage.name.clone(),
            false,
            stages::run_fan_out(stage.name.clone(), Input::One(self.rx), outs),
        );
        flows
    }

    /// Joins several flows of the same item type into one.
    pub fn merge(stage: impl Into<Stage>, flows: Vec<Flow<T>>) -> Option<Flow<T>> {
        let stage = stage.into();
        let graph = flows.first()?.graph.clone();
        let (tx, rx) = graph.queue(&stage);
        for (i, f) in flows.into_iter().enumerate() {
            let name: Arc<str> = format!("{}[{i}]", stage.name).into();
            let out = Output::new(name.clone(), tx.clone());
            graph.add_task(
                name.clone(),
                false,
                stages::run_forward(Input::One(f.rx), out),
            );
        }
        Some(Flow { rx, graph })
    }

    /// Accumulates batches into larger ones, flushed at `limits.max_rows` items,
    /// `limits.max_bytes` (measured by `size_of`), after `limits.max_linger`, on a flush
    /// request (rebalance) and at the end of the input.
    pub fn batch<F>(self, stage: impl Into<Stage>, limits: BatchLimits, size_of: F) -> Flow<T>
    where
        F: Fn(&T) -> usize + Send + 'static,
    {
        let stage = stage.into();
        let graph = self.graph;
        let (tx, rx) = graph.queue(&stage);
        let out = Output::new(stage.name.clone(), tx);
        let flush = graph.flush_signal();
        graph.add_task(
            stage.name.clone(),
            false,
            stages::run_batcher(
                stage.name.clone(),
                Input::One(self.rx),
                out,
                limits,
                size_of,
                flush,
            ),
        );
        Flow { rx, graph }
    }

    /// Limits the flow to `per_second` items per second (governor's GCRA; bursts up to one
    /// second's worth).
    pub fn rate_limit(self, stage: impl Into<Stage>, per_second: NonZeroU32) -> Flow<T> {
        let stage = stage.into();
        let graph = self.graph;
        let (tx, rx) = graph.queue(&stage);
        let out = Output::new(stage.name.clone(), tx);
        graph.add_task(
            stage.name.clone(),
            false,
            stages::run_rate_limit(Input::One(self.rx), out, per_second),
        );
        Flow { rx, graph }
    }

    /// Ends the flow in a sink with `stage.workers` concurrent writers; `factory` makes one
    /// sink per writer.
    pub fn sink<S, F>(self, stage: impl Into<Stage>, mut factory: F)
    where
        S: Sink<Item = T>,
        F: FnMut() -> S,
    {
        let stage = stage.into();
        let retry = stage
            .retry
            .clone()
            .unwrap_or_else(|| self.graph.config.retry.clone());
        let (inputs, graph) = self.input(stage.workers);
        for input in inputs {
            graph.add_task(
                stage.name.clone(),
                false,
                stages::run_sink(
                    stage.name.clone(),
                    factory(),
                    input,
                    retry.clone(),
                    graph.health.clone(),
                    graph.written.clone(),
                ),
            );
        }
    }
}

impl<T: Send + 'static> Flow<crate::span::Sourced<T>> {
    /// Aggregates items into event-time tumbling windows per source partition: each window's
    /// rows leave as one batch whose [`Batch::spans`] names the partition, window and records
    /// it was cut from, recorded in `log` first, so a
    /// deduplicating sink writes every window row exactly once across crashes and rebalances.
    ///
    /// Needs each partition's items in offset order (a keyed split).
    pub fn window<A, L>(
        self,
        stage: impl Into<Stage>,
        spec: crate::span::WindowSpec,
        agg: A,
        log: L,
    ) -> Flow<A::Out>
    where
        A: crate::span::WindowAggregate<In = T>,
        L: crate::span::SpanLog,
    {
        self.windows(stage.into(), spec, agg, log, None)
    }

    /// As [`Flow::window`], but closed windows of every partition wait up to
    /// `limits.max_linger` (or until they hold `limits.max_rows` rows) and leave as one batch
    /// naming all their spans (each marked [`SourceSpan::across`](crate::SourceSpan::across)): one write per
    /// linger when many windows close at once (a backlog), instead of one per window and
    /// partition. Replays of such spans are rebuilt into their batch or, when the rest of it
    /// does not come, leave as [`Delivery::Recovered`](crate::Delivery::Recovered) batches
    /// (see [`Flow::batch_spans_across`]), which may be checked row by row against what the
    /// sink holds, so no two windows' rows may be identical: sums often are, so mark rows with
    /// their source ([`WindowAggregate::stamp`](crate::span::WindowAggregate::stamp)).
    pub fn window_across<A, L>(
        self,
        stage: impl Into<Stage>,
        spec: crate::span::WindowSpec,
        agg: A,
        log: L,
        limits: BatchLimits,
    ) -> Flow<A::Out>
    where
        A: crate::span::WindowAggregate<In = T>,
        L: crate::span::SpanLog,
    {
        self.windows(stage.into(), spec, agg, log, Some(limits))
    }

    fn windows<A, L>(
        self,
        stage: Stage,
        spec: crate::span::WindowSpec,
        agg: A,
        log: L,
        gather: Option<BatchLimits>,
    ) -> Flow<A::Out>
    where
        A: crate::span::WindowAggregate<In = T>,
        L: crate::span::SpanLog,
    {
        self.span_stage(stage, log, |io, input, flush| {
            let windower = crate::span::Windower {
                io,
                spec,
                agg,
                gather,
            };
            windower.run(input, flush)
        })
    }

    /// A span-cutting stage: its queue, span I/O and task, run by `run` on this flow's input
    /// and the graph's flush signal.
    fn span_stage<U, L, Fut>(
        self,
        stage: Stage,
        log: L,
        run: impl FnOnce(
            crate::span::SpanIo<U, L>,
            Input<crate::span::Sourced<T>>,
            watch::Receiver<u64>,
        ) -> Fut,
    ) -> Flow<U>
    where
        U: Send + 'static,
        Fut: Future<Output = Result<(), PipelineError>> + Send + 'static,
    {
        let graph = self.graph;
        let (tx, rx) = graph.queue(&stage);
        let io = span_io(&graph, &stage, tx, log);
        let flush = graph.flush_signal();
        graph.add_task(
            stage.name.clone(),
            false,
            run(io, Input::One(self.rx), flush),
        );
        Flow { rx, graph }
    }

    /// Cuts batches per source partition along consecutive source offsets (at
    /// `limits.max_rows` items, after `limits.max_linger`, at a flush request; `max_bytes`
    /// bounds what all partitions hold together) and records each cut in `log` before passing
    /// it on. Records redelivered after a crash or rebalance are cut again along the recorded
    /// spans, so each output batch ([`Batch::spans`]) holds the same items in every run.
    ///
    /// Needs each partition's items in offset order (a keyed split, see [`Split::keyed`](crate::Split::keyed)).
    pub fn batch_spans<F, L>(
        self,
        stage: impl Into<Stage>,
        limits: BatchLimits,
        size_of: F,
        log: L,
    ) -> Flow<T>
    where
        F: Fn(&T) -> usize + Send + Sync + 'static,
        L: crate::span::SpanLog,
    {
        self.span_batcher(stage.into(), limits, size_of, log, false)
    }

    /// As [`Flow::batch_spans`], but every cut takes the rows of all partitions together
    /// (`limits` apply to their sum), so a sink gets one batch per linger or per `max_rows`
    /// whatever the number of partitions. Each batch names one span per partition
    /// ([`Batch::spans`]), each marked [`SourceSpan::across`](crate::SourceSpan::across).
    ///
    /// After a crash, redelivered records whose span was recorded are cut along it again, and
    /// the spans of one batch wait (up to 10 s) for each other: whole again, they leave as a
    /// [`Delivery::Rebuilt`](crate::Delivery::Rebuilt) batch, written as the batch was the
    /// first time; when the rest does not come (its partitions went to other workers), as
    /// [`Delivery::Recovered`](crate::Delivery::Recovered) batches, written only if their
    /// batch did not land. When redelivery starts inside a span (its batch was acknowledged),
    /// its records are not written again.
    pub fn batch_spans_across<F, L>(
        self,
        stage: impl Into<Stage>,
        limits: BatchLimits,
        size_of: F,
        log: L,
    ) -> Flow<T>
    where
        F: Fn(&T) -> usize + Send + Sync + 'static,
        L: crate::span::SpanLog,
    {
        self.span_batcher(stage.into(), limits, size_of, log, true)
    }

    fn span_batcher<F, L>(
        self,
        stage: Stage,
        limits: BatchLimits,
        size_of: F,
        log: L,
        across: bool,
    ) -> Flow<T>
    where
        F: Fn(&T) -> usize + Send + Sync + 'static,
        L: crate::span::SpanLog,
    {
        self.span_stage(stage, log, |io, input, flush| {
            let batcher = crate::span::SpanBatcher {
                io,
                limits,
                size_of,
                across,
            };
            batcher.run(input, flush)
        })
    }
}

/// The span log, retries, health and output of a span-cutting stage.
fn span_io<T, L>(
    graph: &Arc<Graph>,
    stage: &Stage,
    tx: mpsc::Sender<Batch<T>>,
    log: L,
) -> crate::span::SpanIo<T, L> {
    crate::span::SpanIo {
        stage: stage.name.clone(),
        out: Output::new(stage.name.clone(), tx),
        log,
        retry: stage
            .retry
            .clone()
            .unwrap_or_else(|| graph.config.retry.clone()),
        health: graph.health.clone(),
        in_flight: Default::default(),
    }
}
