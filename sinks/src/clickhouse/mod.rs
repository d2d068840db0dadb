//! ClickHouse batch inserts, exactly once, in separate pieces (as Vector splits a sink):
//!
//! - [`client`]: the HTTP(S) client ([`connect`], [`ClickHouseConnection`]) and how its errors
//!   sort into retryable or not ([`classify`]);
//! - [`encode`]: how a batch's items become an insert body ([`Encoder`]; [`SerdeRows`] by
//!   default, [`RowBinary`] for rows a [`RowEncoder`] encoded from the record), the seam where
//!   a faster encoder plugs in;
//! - [`native`]: [`Native`], which sends those rows as one columnar block (less of
//!   ClickHouse's CPU per row);
//! - [`rowbinary`]: the RowBinary writer behind [`RowEncoder`];
//! - [`token`]: the deduplication token of a batch ([`batch_token`]);
//! - [`schema`]: the start-up checks of a target table ([`ClickHouseSink::check`]);
//! - [`cluster`]: writing through a cluster's `Distributed` tables ([`Layout`]) and where
//!   each replica keeps its rows;
//! - [`recovery`]: after a crash, which batches landed and the row check for the rest;
//! - [`span_log`]: where span-cutting stages record their cuts ([`ClickHouseSpanLog`]);
//! - [`sink`]: [`ClickHouseSink`], which puts them together.

mod client;
mod cluster;
mod encode;
mod native;
mod recovery;
mod rowbinary;
mod schema;
mod sink;
mod span_log;
mod token;

pub use client::{ClickHouseConnection, ConnectError, ServerError, classify, connect, error_code};
pub use cluster::Layout;
pub use encode::{Encoded, Encoder, InsertRequest, RowBinary, RowEncoder, SerdeRows};
pub use native::Native;
pub use rowbinary::EncodeError;
pub use schema::check_table;
pub use sink::ClickHouseSink;
pub use span_log::{ClickHouseSpanLog, SPAN_LOG_TABLE};
pub use token::{batch_token, dedup_token};

/// The table where each target table's landing view records, per insert, its
/// deduplication token and how many rows it stored.
pub const LANDINGS_TABLE: &str = "sluice_batch_landings";

/// The name of `table`'s landing view: a materialised view on `table` into
/// [`LANDINGS_TABLE`] (see [`landing_view_ddl`]).
pub fn landing_view(table: &str) -> String {
    format!("sluice_landed_{table}")
}

/// The statement that creates `table`'s landing view: per insert, the table's name, the
/// insert's deduplication token and how many rows it stored. A block that the table drops as
/// a repeat is dropped by the landings table too (both deduplicate), so a token's rows are
/// what landed under it.
pub fn landing_view_ddl(table: &str) -> String {
    let quoted = encode::quote_identifier(table);
    let literal = table.replace('\\', "\\\\").replace('\'', "\\'");
    format!(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {} TO {LANDINGS_TABLE} AS \
         SELECT '{literal}' AS target_table, getSetting('insert_deduplication_token') AS token, count() AS rows \
         FROM {quoted} GROUP BY token HAVING token != ''",
        encode::quote_identifier(&landing_view(table)),
    )
}
