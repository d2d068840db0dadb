//! The front of an exactly-once pipeline: Kafka records turned into items of several types,
//! each partition's records by one worker in offset order, every item named after the record
//! it came from ([`Sourced`]), and records that cannot be turned into anything sent on as dead
//! letters with the reason. What follows (span batchers, windows, the reducer sink) needs
//! exactly that, so a pipeline that starts here cannot get it wrong.

use crate::ack::TopicPartition;
use crate::dead_letter::DeadLetter;
use crate::graph::{Flow, Stage};
use crate::kafka::KafkaRecord;
use crate::span::Sourced;
use crate::split::{Emit, Port, Split};

/// A decode stage under construction: add outputs, then [`Decode::run`] with the function.
///
/// ```no_run
/// use sluice_pipeline::{Flow, KafkaRecord, Stage};
///
/// # fn wire(records: Flow<KafkaRecord>) {
/// let (mut decode, dead_letters) = records.decode(Stage::new("decode").workers(2));
/// let (amounts, amount_flow) = decode.output::<u64>("amounts");
/// decode.run(move || {
///     move |record: KafkaRecord, out: &mut sluice_pipeline::Decoded| {
///         let text = record.value.as_deref().and_then(|v| std::str::from_utf8(v).ok());
///         match text.and_then(|t| t.trim().parse::<u64>().ok()) {
///             Some(amount) => out.push(&amounts, amount),
///             None => out.dead_letter(record, "decode", "not_a_number", "value is not a number"),
///         }
///     }
/// });
/// // amount_flow: Flow<Sourced<u64>> in each partition's offset order, ready for batch_spans;
/// // dead_letters: Flow<DeadLetter>, for a DeadLetterSink.
/// # let _ = (amount_flow, dead_letters);
/// # }
/// ```
pub struct Decode {
    split: Split<KafkaRecord>,
    dead: Port<DeadLetter>,
}

/// Names one output of a [`Decode`] inside its function.
pub struct DecodePort<A>(Port<Sourced<A>>);

impl<A> Clone for DecodePort<A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for DecodePort<A> {}

/// Where a decode function puts what it makes of the current record.
pub struct Decoded<'a> {
    emit: &'a mut Emit,
    tp: &'a TopicPartition,
    offset: i64,
    dead: Port<DeadLetter>,
}

impl Decoded<'_> {
    /// Sends `item`, made from the current record, to `port`.
    pub fn push<A: Send + 'static>(&mut self, port: &DecodePort<A>, item: A) {
        self.emit
            .push(&port.0, Sourced::new(self.tp, self.offset, item));
    }

    /// Sends `record` to the dead letters: `stage` and `reason` (a short stable word, e.g.
    /// `invalid_json`) say where and why, `error` says what exactly.
    pub fn dead_letter(
        &mut self,
        record: KafkaRecord,
        stage: &'static str,
        reason: &'static str,
        error: impl Into<String>,
    ) {
        self.push_dead(DeadLetter {
            record,
            error: error.into(),
            stage,
            reason,
        });
    }

    /// Sends a dead letter made elsewhere.
    pub fn push_dead(&mut self, dead: DeadLetter) {
        tracing::debug!(stage = dead.stage, reason = dead.reason, error = %dead.error, partition = %self.tp, offset = self.offset, "dead letter");
        self.emit.push(&self.dead, dead);
    }

    /// The partition and offset of the current record.
    pub fn source(&self) -> (&TopicPartition, i64) {
        (self.tp, self.offset)
    }
}

impl Flow<KafkaRecord> {
    /// Adds a decode stage with `stage.workers` workers; each partition's records go to one
    /// worker, in offset order. Returns the stage, to add outputs to and run, and the flow of
    /// its dead letters, which must end in a sink (a dropped one stops the pipeline at the
    /// first dead letter rather than lose it).
    pub fn decode(self, stage: impl Into<Stage>) -> (Decode, Flow<DeadLetter>) {
        let mut split = self.split(stage).keyed(|r: &KafkaRecord| r.partition);
        let (dead, dead_letters) = split.output::<DeadLetter>("dead_letters");
        (Decode { split, dead }, dead_letters)
    }
}

impl Decode {
    /// Adds an output named `name`: its items, each with the record it came from, in each
    /// partition's offset order.
    pub fn output<A: Send + 'static>(&mut self, name: &str) -> (DecodePort<A>, Flow<Sourced<A>>) {
        let (port, flow) = self.split.output::<Sourced<A>>(name);
        (DecodePort(port), flow)
    }

    /// Runs the stage; `factory` makes each worker's function, called once per record.
    pub fn run<F, M>(self, mut factory: M)
    where
        F: FnMut(KafkaRecord, &mut Decoded<'_>) + Send + 'static,
        M: FnMut() -> F,
    {
        let dead = self.dead;
        self.split.run(move || {
            let mut f = factory();
            move |record: KafkaRecord, emit: &mut Emit| {
                let tp = TopicPartition::new(record.topic.clone(), record.partition);
                let offset = record.offset;
                let mut out = Decoded {
                    emit,
                    tp: &tp,
                    offset,
                    dead,
                };
                f(record, &mut out);
            }
        });
    }
}
