//! How a batch's items become the body of one insert: the seam where a faster encoder plugs
//! in. The sink hands an [`Encoder`] an [`InsertRequest`] (table and settings set, the
//! deduplication token among them) and the items; the encoder sends them in the form it
//! chooses and ends the insert.

use std::future::Future;
use std::marker::PhantomData;

use bytes::Bytes;
use clickhouse::{Client, RowOwned, RowWrite};

/// One insert into a table with its settings: what an [`Encoder`] writes items into.
pub struct InsertRequest<'a> {
    client: &'a Client,
    table: &'a str,
    token: Option<&'a str>,
}

impl<'a> InsertRequest<'a> {
    pub(crate) fn new(client: &'a Client, table: &'a str, token: Option<&'a str>) -> Self {
        Self {
            client,
            table,
            token,
        }
    }

    /// The table inserted into.
    pub fn table(&self) -> &str {
        self.table
    }

    /// Sends `rows` as RowBinary through the `clickhouse` crate (serde; each row's fields
    /// checked against the table's columns) and ends the insert.
    pub async fn rows<T: RowOwned + RowWrite>(
        self,
        rows: &[T],
    ) -> Result<(), clickhouse::error::Error> {
        let mut insert = self.client.insert::<T>(self.table).await?;
        if let Some(token) = self.token {
            insert = insert.with_setting("insert_deduplication_token", token);
        }
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await
    }

    /// Sends a body already encoded in `format` (`"(a, b) FORMAT RowBinary"`: the column list
    /// and the format, as they follow the table in an INSERT) and ends the insert.
    pub async fn encoded(self, format: &str, body: Bytes) -> Result<(), clickhouse::error::Error> {
        let sql = format!("INSERT INTO {} {format}", quote_identifier(self.table));
        let mut insert = self.client.insert_formatted_with(sql);
        if let Some(token) = self.token {
            insert = insert.with_setting("insert_deduplication_token", token);
        }
        insert.send(body).await?;
        insert.end().await
    }

    /// Opens the insert the way [`InsertRequest::rows`] does, serialises `sample` against the
    /// table's columns and aborts: nothing is written.
    pub async fn check_rows<T: RowOwned + RowWrite>(
        self,
        sample: &T,
    ) -> Result<(), clickhouse::error::Error> {
        let mut insert = self.client.insert::<T>(self.table).await?;
        insert.write(sample).await?;
        // Dropped without `end()`: the insert is aborted.
        drop(insert);
        Ok(())
    }
}

/// Turns a batch's items into the body of one insert.
pub trait Encoder: Send + Sync + 'static {
    /// What the sink's batches hold.
    type Item: Send + Sync + 'static;

    /// The columns the encoder writes (the others take their defaults).
    fn columns(&self) -> &[&'static str];

    /// Sends `items` as the body of `insert` and ends it.
    fn write(
        &self,
        insert: InsertRequest<'_>,
        items: &[Self::Item],
    ) -> impl Future<Output = Result<(), clickhouse::error::Error>> + Send;

    /// Checks, at start and without writing anything, that the table takes what `write`
    /// sends (a schema mismatch is `clickhouse::error::Error::SchemaMismatch`).
    fn check(
        &self,
        insert: InsertRequest<'_>,
    ) -> impl Future<Output = Result<(), clickhouse::error::Error>> + Send;
}

/// The default encoder: rows of a `#[derive(clickhouse::Row, serde::Serialize)]` type, as the
/// `clickhouse` crate writes them (RowBinary, checked against the table's column types).
pub struct SerdeRows<T>(PhantomData<fn(T)>);

impl<T> Default for SerdeRows<T> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T> Clone for SerdeRows<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T> Encoder for SerdeRows<T>
where
    T: RowOwned + RowWrite + Default + Send + Sync,
{
    type Item = T;

    fn columns(&self) -> &[&'static str] {
        T::COLUMN_NAMES
    }

    async fn write(
        &self,
        insert: InsertRequest<'_>,
        items: &[T],
    ) -> Result<(), clickhouse::error::Error> {
        insert.rows(items).await
    }

    async fn check(&self, insert: InsertRequest<'_>) -> Result<(), clickhouse::error::Error> {
        insert.check_rows(&T::default()).await
    }
}

/// `name` as a ClickHouse identifier: as it is when it is a plain one (so that statements
/// stay as `migrate --cluster` rewrites them), back-quoted otherwise.
pub(crate) fn quote_identifier(name: &str) -> String {
    let plain = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        return name.to_owned();
    }
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}
