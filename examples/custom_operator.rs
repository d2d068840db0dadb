//! A new operator in a few dozen lines: a PII scrubber that masks e-mail addresses and IPv4
//! addresses in Kafka record values, wired between the Kafka source and a file sink.
//!
//! ```sh
//! KAFKA_BROKERS=127.0.0.1:9092 TOPIC=events GROUP=scrubber OUT=/tmp/scrubbed.txt \
//!   cargo run --example custom_operator            # add DRAIN=1 to stop at the end of the topic
//! ```
//! Each output line is `partition offset scrubbed-value`. SIGINT/SIGTERM stops it gracefully.

use std::io::Write;
use std::time::Duration;

use sluice_pipeline::{
    Batch, BatchLimits, BoxError, KafkaRecord, KafkaSource, KafkaSourceConfig, Operator, Pipeline,
    PipelineConfig, Sink, SinkError,
};

/// The operator: one small trait, CPU work over a micro-batch.
struct ScrubPii;

impl Operator for ScrubPii {
    type In = KafkaRecord;
    type Out = (i32, i64, String);

    fn process(
        &mut self,
        input: Vec<KafkaRecord>,
        out: &mut Vec<Self::Out>,
    ) -> Result<(), BoxError> {
        for r in input {
            let text = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
            let scrubbed: Vec<String> = text.split(' ').map(scrub_word).collect();
            out.push((r.partition, r.offset, scrubbed.join(" ")));
        }
        Ok(())
    }
}

fn scrub_word(word: &str) -> String {
    let is_ipv4 = word.split('.').count() == 4 && word.split('.').all(|p| p.parse::<u8>().is_ok());
    match () {
        _ if is_ipv4 => "[ip]".into(),
        _ if word.contains('@') && word.contains('.') => "[email]".into(),
        _ => word.into(),
    }
}

/// Appends lines to a file and syncs it before the batch counts as written.
struct FileSink {
    file: std::fs::File,
    delay: Duration,
}

impl Sink for FileSink {
    type Item = (i32, i64, String);

    async fn write(&mut self, batch: &Batch<Self::Item>) -> Result<(), SinkError> {
        tokio::time::sleep(self.delay).await;
        let mut buf = String::new();
        for (p, o, v) in &batch.items {
            buf.push_str(&format!("{p} {o} {v}\n"));
        }
        self.file
            .write_all(buf.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(SinkError::transient)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into()))
        .init();
    let env =
        |k: &str| std::env::var(k).map_err(|_| format!("environment variable {k} is required"));
    let mut kafka =
        KafkaSourceConfig::new(env("KAFKA_BROKERS")?, env("GROUP")?, vec![env("TOPIC")?]);
    kafka.drain = std::env::var("DRAIN").is_ok_and(|v| v == "1");
    if let Ok(ms) = std::env::var("KAFKA_SESSION_TIMEOUT_MS") {
        kafka.client.insert("session.timeout.ms".into(), ms);
    }
    let delay = Duration::from_millis(
        std::env::var("SINK_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env("OUT")?)?;

    let pipeline = Pipeline::new(PipelineConfig::default());
    sluice_pipeline::shutdown_on_signals(pipeline.handle().shutdown_signal());
    pipeline
        .source("kafka", KafkaSource::new(kafka))
        .apply("scrub-pii", || ScrubPii)
        .batch(
            "batch",
            BatchLimits {
                max_rows: 500,
                ..Default::default()
            },
            |(_, _, v)| v.len(),
        )
        .sink("file", move || FileSink {
            file: file.try_clone().expect("clone file handle"),
            delay,
        });
    pipeline.run().await?;
    Ok(())
}
