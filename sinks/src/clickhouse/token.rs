//! Deduplication tokens: the identity an insert carries, the same in every run that inserts
//! the same batch, so that ClickHouse stores it once.

use sluice_pipeline::{AckSet, Batch, BatchRef, Delivery, SourceSpan};

/// The deduplication token of a batch for `table`: the batch it was cut as when it held
/// several spans ([`SourceSpan::batch`]); its one span when a span batcher cut it from one
/// partition (the same in every run, replays after a crash included); else every source
/// range it derives from (the same for retries within one run).
pub fn batch_token<T>(table: &str, batch: &Batch<T>) -> String {
    match batch.spans() {
        [] => dedup_token(table, batch.acks()),
        [s, ..] if s.batch.is_some() && batch.delivery() != Delivery::Recovered => {
            group_token(table, s.batch.as_ref().expect("checked"))
        }
        [s] => span_token(table, s),
        spans => token_of(
            table,
            spans
                .iter()
                .map(|s| format!("{}:{}:{}-{}", s.tp.topic, s.tp.partition, s.first, s.last))
                .collect(),
        ),
    }
}

/// The token of the batch `batch` names.
pub(crate) fn group_token(table: &str, batch: &BatchRef) -> String {
    format!("{table}|batch:{:032x}", batch.id)
}

/// The token of one span's rows.
pub(crate) fn span_token(table: &str, s: &SourceSpan) -> String {
    match s.window_key() {
        0 => format!(
            "{table}|{}:{}:{}-{}",
            s.tp.topic, s.tp.partition, s.first, s.last
        ),
        key => format!(
            "{table}|{}:{}:{key}:{}-{}",
            s.tp.topic, s.tp.partition, s.first, s.last
        ),
    }
}

/// The token under which a span of a batch that did not land is written alone.
pub(crate) fn recovery_token(table: &str, batch: &BatchRef, s: &SourceSpan) -> String {
    format!(
        "{}|{}:{}:{}:{}-{}",
        group_token(table, batch),
        s.tp.topic,
        s.tp.partition,
        s.window_key(),
        s.first,
        s.last
    )
}

/// The deduplication token of a batch for `table` from its source ranges: the table and every
/// range, sorted, so the same records in the same batch boundaries give the same token.
pub fn dedup_token(table: &str, acks: &AckSet) -> String {
    token_of(
        table,
        acks.ranges()
            .map(|(tp, a, b)| format!("{}:{}:{a}-{b}", tp.topic, tp.partition))
            .collect(),
    )
}

/// `table` and the sorted `ranges`, hashed when long.
fn token_of(table: &str, mut ranges: Vec<String>) -> String {
    ranges.sort_unstable();
    let token = format!("{table}|{}", ranges.join(","));
    if token.len() <= 256 {
        return token;
    }
    // Long lists (many small source batches) are hashed to keep the request small.
    let digest = twox_hash::XxHash3_128::oneshot(token.as_bytes());
    format!("{table}|{}|xxh3:{digest:032x}", ranges.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_pipeline::TopicPartition;
    use sluice_pipeline::testing::PartitionLedger;

    #[test]
    fn token_depends_on_ranges_not_their_order() {
        let a = PartitionLedger::new(TopicPartition::new("events", 0));
        let b = PartitionLedger::new(TopicPartition::new("events", 1));
        let (a1, b1) = (a.issue(0, 99).unwrap(), b.issue(5, 9).unwrap());
        let mut one = AckSet::new();
        one.push(a1.share());
        one.push(b1.share());
        let mut reversed = AckSet::new();
        reversed.push(b1.share());
        reversed.push(a1.share());
        assert_eq!(dedup_token("t", &one), "t|events:0:0-99,events:1:5-9");
        assert_eq!(dedup_token("t", &one), dedup_token("t", &reversed));
        assert_ne!(dedup_token("t", &one), dedup_token("u", &one));
        let mut many = AckSet::new();
        for i in 0..50 {
            many.push(a.issue(1000 + i * 10, 1009 + i * 10).unwrap());
        }
        let long = dedup_token("t", &many);
        assert!(long.len() < 100 && long.starts_with("t|50|xxh3:"), "{long}");
        for set in [one, reversed, many] {
            set.release();
        }
        a1.release();
        b1.release();
    }

    #[test]
    fn a_window_span_names_its_window_in_its_token() {
        let span = |window| SourceSpan {
            tp: TopicPartition::new("events", 2),
            first: 10,
            last: 19,
            items: 4,
            window,
            across: false,
            batch: None,
        };
        assert_eq!(span_token("t", &span(None)), "t|events:2:10-19");
        assert_eq!(span_token("t", &span(Some(60))), "t|events:2:60:10-19");
    }
}
