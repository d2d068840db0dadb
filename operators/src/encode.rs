//! FrameWorks rows encoded as they are routed: a [`RowEncoder`] per event table (made from
//! the one table list), so that a row goes from the borrowed event to its table's RowBinary
//! bytes without being owned in between.

use sluice_schemas::TableRow;
use sluice_schemas::rows::{
    ConnectionEventRow, NodeMetricRow, RoutingEventRow, StreamEventRow, StreamHealthRow,
    TrackListRow, ViewerMetricRow,
};
use sluice_sinks::{EncodeError, Encoded, RowEncoder};

macro_rules! encoded_rows {
    ($($variant:ident: $row:ident = $table:literal,)*) => {
        /// One routed row, encoded for its table.
        #[derive(Clone, Debug)]
        pub enum EncodedRow {
            $(
                #[doc = concat!("`", $table, "`.")]
                $variant(Encoded<$row<'static>>),
            )*
        }

        impl EncodedRow {
            /// The table this row belongs to.
            pub fn table(&self) -> &'static str {
                match self {
                    $(EncodedRow::$variant(_) => $table,)*
                }
            }

            /// Its bytes.
            pub fn bytes(&self) -> &[u8] {
                match self {
                    $(EncodedRow::$variant(r) => r.bytes(),)*
                }
            }
        }

        /// A [`RowEncoder`] per event table: one per worker thread.
        #[allow(non_snake_case)]
        #[derive(Default)]
        pub struct RowEncoders {
            $($variant: RowEncoder<$row<'static>>,)*
        }

        impl RowEncoders {
            /// `row` encoded by its table's encoder.
            pub fn encode(&mut self, row: &TableRow<'_>) -> Result<EncodedRow, EncodeError> {
                Ok(match row {
                    $(TableRow::$variant(r) => EncodedRow::$variant(self.$variant.encode(r)?),)*
                })
            }
        }
    };
}

sluice_schemas::with_event_tables!(encoded_rows);

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    #[test]
    fn each_row_is_encoded_for_its_table_and_keeps_its_own_bytes() {
        let mut encoders = RowEncoders::default();
        let name = String::from("live+a");
        let first = encoders
            .encode(&TableRow::NodeMetric(NodeMetricRow {
                node_id: Cow::Borrowed(&name),
                ..Default::default()
            }))
            .expect("encodes");
        let second = encoders
            .encode(&TableRow::NodeMetric(NodeMetricRow {
                node_id: Cow::Borrowed("n"),
                stream_count: 3,
                ..Default::default()
            }))
            .expect("encodes");
        drop(name);
        assert_eq!(first.table(), "node_metrics");
        // timestamp u32, tenant UUID (16), node_id (length + bytes), cpu f32, four u64s,
        // stream_count u32, is_healthy u8.
        assert_eq!(first.bytes().len(), 4 + 16 + 1 + 6 + 4 + 32 + 4 + 1);
        assert_eq!(&first.bytes()[20..27], b"\x06live+a");
        assert_eq!(&second.bytes()[20..22], b"\x01n");
        assert_eq!(second.bytes()[second.bytes().len() - 5], 3);
    }
}
