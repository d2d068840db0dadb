//! Sinks: ClickHouse batch inserts and PostgreSQL state reduction, both exactly once.

mod clickhouse;
mod reducer;

pub use crate::clickhouse::{
    ClickHouseConnection, ClickHouseSink, ClickHouseSpanLog, ConnectError, EncodeError, Encoded,
    Encoder, InsertRequest, LANDINGS_TABLE, Layout, Native, RowBinary, RowEncoder, SPAN_LOG_TABLE,
    SerdeRows, ServerError, batch_token, check_table, classify, connect, dedup_token, error_code,
    landing_view, landing_view_ddl,
};
pub use crate::reducer::{
    APPLIED_OFFSETS_TABLE, Reducer, ReducerSink, Rows, TableReducer, classify_pg, coalesce,
};
