//! How a batch's items become the body of one insert: the seam where a faster encoder plugs
//! in. The sink hands an [`Encoder`] an [`InsertRequest`] (table and settings set, the
//! deduplication token among them) and the items; the encoder sends them in the form it
//! chooses and ends the insert.
//!
//! Two encoders come with it: [`SerdeRows`] (owned rows, serialised by the `clickhouse` crate
//! when the batch is inserted) and [`RowBinary`] (rows encoded once, straight from the record,
//! by a [`RowEncoder`] in the stage that makes them; the insert only copies their bytes).

use std::future::Future;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use clickhouse::{Client, Row, RowOwned, RowWrite};

use super::rowbinary::{EncodeError, write_row};

/// One insert into a table with its settings: what an [`Encoder`] writes items into.
pub struct InsertRequest<'a> {
    client: &'a Client,
    table: &'a str,
    token: Option<&'a str>,
}

impl<'a> InsertRequest<'a> {
    /// An insert into `table` through `client`, under the deduplication `token` if any (the
    /// sink makes these; a benchmark or a test of an encoder can too).
    pub fn new(client: &'a Client, table: &'a str, token: Option<&'a str>) -> Self {
        Self {
            client,
            table,
            token,
        }
    }

    /// The table inserted into.
    pub fn table(&self) -> &'a str {
        self.table
    }

    /// The client the insert goes through.
    pub(crate) fn client(&self) -> &'a Client {
        self.client
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

    /// Sends rows already encoded in `format` (`"(a, b) FORMAT RowBinary"`), one slice each,
    /// through the client's buffer (lz4 chunks when compression is on), and ends the insert.
    pub async fn encoded_rows<'r>(
        self,
        format: &str,
        rows: impl IntoIterator<Item = &'r [u8]>,
    ) -> Result<(), clickhouse::error::Error> {
        let sql = format!("INSERT INTO {} {format}", quote_identifier(self.table));
        let mut insert = self.client.insert_formatted_with(sql);
        if let Some(token) = self.token {
            insert = insert.with_setting("insert_deduplication_token", token);
        }
        let mut insert = insert.buffered_with_capacity(INSERT_CHUNK);
        for mut row in rows {
            while !row.is_empty() {
                let n = insert.write(row).await?;
                row = &row[n..];
            }
        }
        insert.end().await
    }

    /// Opens the insert the way [`InsertRequest::rows`] does, serialises a default `T`
    /// against the table's columns and aborts: nothing is written.
    pub async fn check_rows<T>(self) -> Result<(), clickhouse::error::Error>
    where
        T: Row + RowWrite,
        T::Value<'static>: Default,
    {
        let mut insert = self.client.insert::<T>(self.table).await?;
        let sample = <T::Value<'static>>::default();
        insert.write(&sample).await?;
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
        insert.check_rows::<T>().await
    }
}

/// Bytes of an insert body sent as one chunk (compressed as one lz4 block): the
/// `clickhouse` crate's own insert buffer size.
const INSERT_CHUNK: usize = 256 * 1024;

/// One row of a table of `R` rows, encoded as RowBinary: the item of a [`RowBinary`] sink.
/// Cloning it shares its bytes.
pub struct Encoded<R> {
    bytes: Bytes,
    _row: PhantomData<fn() -> R>,
}

impl<R> Encoded<R> {
    /// The row's RowBinary bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// What the row holds in memory: its bytes and this handle. What a batch's byte limit
    /// counts for it (`Table::encoded` in the worker uses it).
    pub fn size(&self) -> usize {
        self.bytes.len() + std::mem::size_of::<Self>()
    }
}

impl<R> Clone for Encoded<R> {
    fn clone(&self) -> Self {
        Self {
            bytes: self.bytes.clone(),
            _row: PhantomData,
        }
    }
}

impl<R> std::fmt::Debug for Encoded<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoded")
            .field("row", &std::any::type_name::<R>())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// Encodes rows of one table as they are made, each into its own [`Encoded`] cut from a
/// shared buffer: a row borrowed from its record is written once and never owned, and a new
/// buffer is allocated only every [`RowEncoder::CHUNK`] bytes (a buffer is freed when the
/// last batch holding one of its rows is inserted). Keep one per table per worker.
///
/// ```
/// use std::borrow::Cow;
///
/// #[derive(clickhouse::Row, serde::Serialize, Default)]
/// struct Page<'a> { path: Cow<'a, str>, hits: u32 }
///
/// let record = String::from("/index.html");
/// let mut pages = sluice_sinks::RowEncoder::<Page<'static>>::default();
/// let row = pages.encode(&Page { path: Cow::Borrowed(&record), hits: 1 })?;
/// assert_eq!(row.bytes(), b"\x0b/index.html\x01\x00\x00\x00");
/// # Ok::<(), sluice_sinks::EncodeError>(())
/// ```
pub struct RowEncoder<R> {
    buf: BytesMut,
    _row: PhantomData<fn() -> R>,
}

impl<R> Default for RowEncoder<R> {
    fn default() -> Self {
        Self {
            buf: BytesMut::new(),
            _row: PhantomData,
        }
    }
}

impl<R: Row + RowWrite> RowEncoder<R> {
    /// Bytes of each buffer rows are cut from.
    pub const CHUNK: usize = 32 * 1024;

    /// `row` as RowBinary. A row of any lifetime of `R`'s type: borrowed from the record
    /// that is being decoded, say.
    pub fn encode(&mut self, row: &R::Value<'_>) -> Result<Encoded<R>, EncodeError> {
        // Room for a typical row without a reallocation mid-row; a larger one grows it.
        if self.buf.capacity() - self.buf.len() < Self::CHUNK / 8 {
            self.buf.reserve(Self::CHUNK);
        }
        if let Err(e) = write_row(&mut self.buf, row) {
            self.buf.clear();
            return Err(e);
        }
        Ok(Encoded {
            bytes: self.buf.split().freeze(),
            _row: PhantomData,
        })
    }
}

/// The encoder of rows a [`RowEncoder`] made: the insert body is their bytes one after
/// another, with the columns of `R` named. Its start-up check is the `clickhouse` crate's
/// check of `R` against the table (the bytes are what the crate would write for `R`).
pub struct RowBinary<R> {
    format: String,
    _row: PhantomData<fn() -> R>,
}

impl<R: Row> Default for RowBinary<R> {
    fn default() -> Self {
        let columns: Vec<String> = R::COLUMN_NAMES
            .iter()
            .map(|c| quote_identifier(c))
            .collect();
        Self {
            format: format!("({}) FORMAT RowBinary", columns.join(", ")),
            _row: PhantomData,
        }
    }
}

impl<R> Encoder for RowBinary<R>
where
    R: Row + RowWrite + 'static,
    R::Value<'static>: Default,
    for<'r> R::Value<'r>: Send + Sync,
{
    type Item = Encoded<R>;

    fn columns(&self) -> &[&'static str] {
        R::COLUMN_NAMES
    }

    async fn write(
        &self,
        insert: InsertRequest<'_>,
        items: &[Encoded<R>],
    ) -> Result<(), clickhouse::error::Error> {
        insert
            .encoded_rows(&self.format, items.iter().map(Encoded::bytes))
            .await
    }

    async fn check(&self, insert: InsertRequest<'_>) -> Result<(), clickhouse::error::Error> {
        insert.check_rows::<R>().await
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
