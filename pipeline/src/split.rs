//! A typed split: one stage whose function sends each input to any of several outputs of
//! different item types (e.g. one event → rows of two tables, or a dead letter). Each output
//! is a [`Flow`] of its own type; a [`Port`] names it inside the function.

use std::any::Any;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ack::AckSet;
use crate::batch::Batch;
use crate::error::PipelineError;
use crate::graph::{Flow, Graph, Stage};
use crate::stages::{Input, Output};

static NEXT_SPLIT_ID: AtomicU64 = AtomicU64::new(1);

/// Names one output of a split inside its function.
pub struct Port<A> {
    split: u64,
    index: usize,
    _type: PhantomData<fn(A)>,
}

impl<A> Clone for Port<A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for Port<A> {}

/// Where a split function puts its results.
pub struct Emit {
    split: u64,
    bufs: Vec<Box<dyn Any + Send>>,
}

impl Emit {
    /// Sends `item` to the output `port`.
    ///
    /// # Panics
    /// If `port` belongs to another split (a wiring mistake, not a data error).
    pub fn push<A: Send + 'static>(&mut self, port: &Port<A>, item: A) {
        assert_eq!(
            port.split, self.split,
            "port used with a split it does not belong to"
        );
        self.bufs[port.index]
            .downcast_mut::<Vec<A>>()
            .expect("port type matches its buffer")
            .push(item);
    }
}

type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), PipelineError>> + Send + 'a>>;

/// One output with its type erased, so that outputs of different types share a list.
trait ErasedOut: Send + Sync {
    fn new_buf(&self) -> Box<dyn Any + Send>;
    fn send<'a>(&'a self, buf: &'a mut Box<dyn Any + Send>, acks: &'a AckSet) -> SendFuture<'a>;
}

struct TypedOut<A>(Output<A>);

impl<A: Send + 'static> ErasedOut for TypedOut<A> {
    fn new_buf(&self) -> Box<dyn Any + Send> {
        Box::new(Vec::<A>::new())
    }

    fn send<'a>(&'a self, buf: &'a mut Box<dyn Any + Send>, acks: &'a AckSet) -> SendFuture<'a> {
        Box::pin(async move {
            let buf = buf.downcast_mut::<Vec<A>>().expect("buffer type");
            if buf.is_empty() {
                return Ok(());
            }
            // The next batch is likely as large: one allocation for it, not a doubling series.
            let items = std::mem::replace(buf, Vec::with_capacity(buf.len()));
            self.0.send(Batch::new(items, acks.share())).await
        })
    }
}

/// A split under construction: add outputs, then [`Split::run`] with the function.
pub struct Split<T> {
    id: u64,
    stage: Stage,
    input: Flow<T>,
    outs: Vec<Box<dyn ErasedOut>>,
    keyed: Option<KeyedInputs<T>>,
}

type KeyedInputs<T> = Box<dyn FnOnce(Flow<T>, &Stage) -> (Vec<Input<T>>, Arc<Graph>)>;

impl<T: Send + 'static> Split<T> {
    pub(crate) fn new(stage: Stage, input: Flow<T>) -> Self {
        Self {
            id: NEXT_SPLIT_ID.fetch_add(1, Ordering::Relaxed),
            stage,
            input,
            outs: Vec::new(),
            keyed: None,
        }
    }

    /// Feeds each worker the items of its keys, in order: items with equal keys (e.g. one
    /// partition's records) are processed in order and their outputs keep that order.
    pub fn keyed<K, F>(mut self, key: F) -> Self
    where
        K: std::hash::Hash + 'static,
        F: Fn(&T) -> K + Send + 'static,
    {
        self.keyed = Some(Box::new(move |flow: Flow<T>, stage: &Stage| {
            flow.into_keyed_inputs(stage, key)
        }));
        self
    }

    /// Adds an output named `name` (for metrics and queue depths).
    pub fn output<A: Send + 'static>(&mut self, name: &str) -> (Port<A>, Flow<A>) {
        let out_stage = Stage {
            name: format!("{}.{name}", self.stage.name).into(),
            ..self.stage.clone()
        };
        let (tx, flow) = self.input.graph().new_flow::<A>(&out_stage);
        let port = Port {
            split: self.id,
            index: self.outs.len(),
            _type: PhantomData,
        };
        self.outs
            .push(Box::new(TypedOut(Output::new(out_stage.name.clone(), tx))));
        (port, flow)
    }

    /// Runs the split with `stage.workers` workers; `factory` makes each worker's function,
    /// called once per input item.
    pub fn run<F, M>(self, mut factory: M)
    where
        F: FnMut(T, &mut Emit) + Send + 'static,
        M: FnMut() -> F,
    {
        let outs: Arc<Vec<Box<dyn ErasedOut>>> = Arc::new(self.outs);
        let (inputs, graph) = match self.keyed {
            Some(keyed) => keyed(self.input, &self.stage),
            None => self.input.into_inputs(self.stage.workers),
        };
        for input in inputs {
            let fut = run_split(
                self.stage.name.clone(),
                self.id,
                input,
                outs.clone(),
                factory(),
            );
            graph.add_task(self.stage.name.clone(), false, fut);
        }
    }
}

async fn run_split<T, F>(
    stage: Arc<str>,
    id: u64,
    mut input: Input<T>,
    outs: Arc<Vec<Box<dyn ErasedOut>>>,
    mut f: F,
) -> Result<(), PipelineError>
where
    F: FnMut(T, &mut Emit),
{
    let items_in = metrics::counter!(crate::metrics::STAGE_ITEMS_IN, "stage" => stage.to_string());
    let mut emit = Emit {
        split: id,
        bufs: outs.iter().map(|o| o.new_buf()).collect(),
    };
    while let Some(batch) = input.recv().await {
        items_in.increment(batch.len() as u64);
        let (items, acks) = batch.into_parts();
        for item in items {
            f(item, &mut emit);
        }
        for (out, buf) in outs.iter().zip(emit.bufs.iter_mut()) {
            out.send(buf, &acks).await?;
        }
        // Outputs hold their own shares; an input that produced nothing is acknowledged here.
        acks.release();
    }
    Ok(())
}

impl Graph {
    /// A new queue and the flow reading it, for stages built outside `graph.rs`.
    pub(crate) fn new_flow<A: Send + 'static>(
        self: &Arc<Self>,
        stage: &Stage,
    ) -> (tokio::sync::mpsc::Sender<Batch<A>>, Flow<A>) {
        let (tx, rx) = self.queue(stage);
        (tx, Flow::from_parts(rx, self.clone()))
    }
}
