//! `dead-letters`: what the dead-letter topic holds, read from its beginning (no consumer
//! group is joined and nothing is committed).

use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;

use crate::Error;
use crate::config::KafkaConfig;

/// Prints up to `limit` dead letters: where each came from, why, and the start of its value.
pub(crate) async fn show(kafka: &KafkaConfig, limit: usize) -> Result<(), Error> {
    let topic = kafka.dlq_topic();
    let kafka_error = |message: String| Error::Service {
        service: "kafka".into(),
        message,
    };
    let consumer: BaseConsumer = kafka
        .producer_client()?
        .set(
            "group.id",
            format!("{}-dead-letters-reader", kafka.group_id),
        )
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| kafka_error(format!("cannot create a consumer: {e}")))?;
    tokio::task::spawn_blocking(move || {
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .map_err(|e| kafka_error(format!("cannot read the metadata of {topic}: {e}")))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if partitions == 0 {
            println!("{topic}: no such topic (no dead letter yet)");
            return Ok(());
        }
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition_offset(&topic, p, rdkafka::Offset::Beginning)
                .map_err(|e| kafka_error(e.to_string()))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| kafka_error(format!("cannot read {topic}: {e}")))?;
        let (mut shown, mut idle) = (0, Instant::now());
        while shown < limit && idle.elapsed() < Duration::from_secs(3) {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            idle = Instant::now();
            shown += 1;
            let header = |name: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|h| h.key == name))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            let value = String::from_utf8_lossy(m.payload().unwrap_or_default());
            let value: String = value.chars().take(200).collect();
            println!(
                "{topic}/{}@{}: {} ({}) from {}/{}@{}: {}\n  value: {value}",
                m.partition(),
                m.offset(),
                header("error_reason"),
                header("error_stage"),
                header("source_topic"),
                header("source_partition"),
                header("source_offset"),
                header("error"),
            );
        }
        println!("{topic}: {shown} dead letter(s) shown");
        Ok(())
    })
    .await
    .map_err(|e| Error::Other(e.to_string()))?
}
