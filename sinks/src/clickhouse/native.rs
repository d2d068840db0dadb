//! Rows a [`RowEncoder`](super::RowEncoder) encoded, sent as one `Native` (columnar) block:
//! ClickHouse takes a Native insert for about 40% less of its own CPU per row than RowBinary
//! (`scripts/format-cost.sh`), and on a machine it shares with the worker that CPU bounds
//! throughput. The rows stay RowBinary until the insert, so batches, replays and the row check
//! after a crash are those of [`RowBinary`]; the insert walks each row once, column by column,
//! by the table's column types (read from the server once).

use std::marker::PhantomData;
use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use clickhouse::{Row, RowWrite};

use super::encode::{Encoded, Encoder, InsertRequest, RowBinary};

/// How a column's values lie in RowBinary, which is also how Native lays out each value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Layout {
    /// A fixed number of bytes.
    Fixed(usize),
    /// A length (LEB128) and that many bytes.
    String,
    /// A null flag, then the value unless null; in Native, a null map then the values.
    Nullable(Box<Layout>),
}

/// One column of the block: its name, the type the block declares, its layout.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Column {
    name: String,
    declared: String,
    layout: Layout,
}

/// The layout of a ClickHouse type and the type a Native block declares for it, or `None`
/// for a type whose values this encoder does not walk (arrays, maps, tuples…).
fn layout(ty: &str) -> Option<(Layout, String)> {
    let ty = ty.trim();
    if let Some(inner) = strip(ty, "LowCardinality(") {
        // Declared as the plain type: the server converts (Native input allows it), and the
        // values are the plain type's.
        return layout(inner);
    }
    if let Some(inner) = strip(ty, "Nullable(") {
        let (inner, declared) = layout(inner)?;
        if matches!(inner, Layout::Nullable(_)) {
            return None;
        }
        return Some((
            Layout::Nullable(Box::new(inner)),
            format!("Nullable({declared})"),
        ));
    }
    if let Some(n) = strip(ty, "FixedString(") {
        return Some((Layout::Fixed(n.trim().parse().ok()?), ty.to_owned()));
    }
    let width = match ty {
        "String" => return Some((Layout::String, ty.to_owned())),
        "UInt8" | "Int8" | "Bool" => 1,
        "UInt16" | "Int16" | "Date" => 2,
        "UInt32" | "Int32" | "Float32" | "Date32" | "DateTime" | "IPv4" => 4,
        "UInt64" | "Int64" | "Float64" => 8,
        "UInt128" | "Int128" | "UUID" | "IPv6" => 16,
        "UInt256" | "Int256" => 32,
        _ if ty.starts_with("DateTime(") => 4,
        _ if ty.starts_with("DateTime64(") => 8,
        _ if ty.starts_with("Enum8(") => 1,
        _ if ty.starts_with("Enum16(") => 2,
        _ => return None,
    };
    Some((Layout::Fixed(width), ty.to_owned()))
}

/// `ty` without `prefix` and its closing parenthesis.
fn strip<'t>(ty: &'t str, prefix: &str) -> Option<&'t str> {
    ty.strip_prefix(prefix)?.strip_suffix(')')
}

/// A row's bytes did not match the columns: a bug (the row type's check passed), not data.
fn mismatch(column: &str) -> clickhouse::error::Error {
    clickhouse::error::Error::Custom(format!(
        "a RowBinary row does not match column `{column}` while building a Native block"
    ))
}

/// Reads a LEB128 length at `at`: its value and how many bytes it took.
fn leb128(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// How many bytes the value at the start of `row` takes in `layout`.
fn value_len(layout: &Layout, row: &[u8]) -> Option<usize> {
    match layout {
        Layout::Fixed(n) => (row.len() >= *n).then_some(*n),
        Layout::String => {
            let (len, head) = leb128(row)?;
            (row.len() >= head + len).then_some(head + len)
        }
        Layout::Nullable(inner) => match row.first()? {
            1 => Some(1),
            0 => Some(1 + value_len(inner, &row[1..])?),
            _ => None,
        },
    }
}

/// One column's bytes while a block is built.
#[derive(Default)]
struct ColumnData {
    nulls: Vec<u8>,
    values: Vec<u8>,
}

/// Builds the Native block (no block info: what the HTTP interface reads) of `rows`.
fn block<'r>(
    columns: &[Column],
    rows: impl ExactSizeIterator<Item = &'r [u8]> + Clone,
) -> Result<Bytes, clickhouse::error::Error> {
    let n = rows.len();
    let total: usize = rows.clone().map(<[u8]>::len).sum();
    let mut data: Vec<ColumnData> = columns.iter().map(|_| ColumnData::default()).collect();
    for d in &mut data {
        d.values.reserve(total / columns.len().max(1));
    }
    for row in rows {
        let mut at = 0;
        for (c, d) in columns.iter().zip(&mut data) {
            let rest = &row[at..];
            let len = value_len(&c.layout, rest).ok_or_else(|| mismatch(&c.name))?;
            match &c.layout {
                Layout::Nullable(inner) => {
                    d.nulls.push(rest[0]);
                    if rest[0] == 1 {
                        // A null's slot holds the type's default.
                        match **inner {
                            Layout::Fixed(w) => d.values.resize(d.values.len() + w, 0),
                            _ => d.values.push(0),
                        }
                    } else {
                        d.values.extend_from_slice(&rest[1..len]);
                    }
                }
                _ => d.values.extend_from_slice(&rest[..len]),
            }
            at += len;
        }
        if at != row.len() {
            return Err(mismatch(
                columns.last().map_or("(none)", |c| c.name.as_str()),
            ));
        }
    }
    let mut out = BytesMut::with_capacity(total + n * columns.len() / 4 + 64 * columns.len());
    put_leb128(&mut out, columns.len());
    put_leb128(&mut out, n);
    for (c, d) in columns.iter().zip(data) {
        for text in [&c.name, &c.declared] {
            put_leb128(&mut out, text.len());
            out.put_slice(text.as_bytes());
        }
        out.put_slice(&d.nulls);
        out.put_slice(&d.values);
    }
    Ok(out.freeze())
}

fn put_leb128(out: &mut BytesMut, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.put_u8(byte);
            return;
        }
        out.put_u8(byte | 0x80);
    }
}

/// The encoder of rows a [`RowEncoder`](super::RowEncoder) made that sends each batch as one
/// Native block (see the module). Its start-up check is [`RowBinary`]'s, and it reads the
/// table's column types; a table with a column whose type it does not lay out (arrays, maps,
/// tuples…) is written in RowBinary instead.
pub struct Native<R> {
    row_binary: RowBinary<R>,
    format: String,
    /// The columns as the block declares them; `None` when a type cannot be laid out.
    columns: OnceLock<Option<Vec<Column>>>,
    _row: PhantomData<fn() -> R>,
}

impl<R: Row> Default for Native<R> {
    fn default() -> Self {
        let names: Vec<String> = R::COLUMN_NAMES
            .iter()
            .map(|c| super::encode::quote_identifier(c))
            .collect();
        Self {
            row_binary: RowBinary::default(),
            format: format!("({}) FORMAT Native", names.join(", ")),
            columns: OnceLock::new(),
            _row: PhantomData,
        }
    }
}

impl<R: Row> Native<R> {
    /// The block's columns, read from the server the first time.
    async fn columns(
        &self,
        insert: &InsertRequest<'_>,
    ) -> Result<Option<&[Column]>, clickhouse::error::Error> {
        if let Some(columns) = self.columns.get() {
            return Ok(columns.as_deref());
        }
        let types: Vec<(String, String)> = insert
            .client()
            .query("SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = ?")
            .bind(insert.table())
            .fetch_all()
            .await?;
        let columns: Option<Vec<Column>> = R::COLUMN_NAMES
            .iter()
            .map(|name| {
                let (_, ty) = types.iter().find(|(n, _)| n == name)?;
                let (layout, declared) = layout(ty)?;
                Some(Column {
                    name: (*name).to_owned(),
                    declared,
                    layout,
                })
            })
            .collect();
        if columns.is_none() {
            tracing::info!(
                table = insert.table(),
                "a column's type has no Native layout here; writing the table in RowBinary"
            );
        }
        Ok(self.columns.get_or_init(|| columns).as_deref())
    }
}

impl<R> Encoder for Native<R>
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
        let Some(columns) = self.columns(&insert).await? else {
            return self.row_binary.write(insert, items).await;
        };
        let body = block(columns, items.iter().map(Encoded::bytes))?;
        insert.encoded(&self.format, body).await
    }

    async fn check(&self, insert: InsertRequest<'_>) -> Result<(), clickhouse::error::Error> {
        let columns = InsertRequest::new(insert.client(), insert.table(), None);
        self.columns(&columns).await?;
        self.row_binary.check(insert).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_lay_out_as_rowbinary_writes_them() {
        assert_eq!(layout("UUID"), Some((Layout::Fixed(16), "UUID".into())));
        assert_eq!(
            layout("LowCardinality(String)"),
            Some((Layout::String, "String".into()))
        );
        assert_eq!(
            layout("Nullable(UInt32)"),
            Some((
                Layout::Nullable(Box::new(Layout::Fixed(4))),
                "Nullable(UInt32)".into()
            ))
        );
        assert_eq!(
            layout("LowCardinality(Nullable(String))"),
            Some((
                Layout::Nullable(Box::new(Layout::String)),
                "Nullable(String)".into()
            ))
        );
        assert_eq!(
            layout("FixedString(2)"),
            Some((Layout::Fixed(2), "FixedString(2)".into()))
        );
        assert_eq!(
            layout("DateTime('UTC')").map(|l| l.0),
            Some(Layout::Fixed(4))
        );
        assert_eq!(layout("Array(String)"), None);
        assert_eq!(layout("Map(String, UInt8)"), None);
    }

    #[test]
    fn rows_become_columns_with_null_maps() {
        let columns = vec![
            Column {
                name: "n".into(),
                declared: "UInt16".into(),
                layout: Layout::Fixed(2),
            },
            Column {
                name: "s".into(),
                declared: "Nullable(String)".into(),
                layout: Layout::Nullable(Box::new(Layout::String)),
            },
        ];
        let rows: [&[u8]; 2] = [b"\x01\x00\x00\x02hi", b"\x02\x00\x01"];
        let block = block(&columns, rows.iter().copied()).expect("block");
        let mut want = vec![2, 2];
        want.extend(b"\x01n\x06UInt16\x01\x00\x02\x00");
        want.extend(b"\x01s\x10Nullable(String)\x00\x01\x02hi\x00");
        assert_eq!(&block[..], &want[..]);
    }

    #[test]
    fn a_row_that_does_not_match_is_an_error() {
        let columns = vec![Column {
            name: "n".into(),
            declared: "UInt32".into(),
            layout: Layout::Fixed(4),
        }];
        let short: [&[u8]; 1] = [b"\x01\x00"];
        assert!(block(&columns, short.iter().copied()).is_err());
        let long: [&[u8]; 1] = [b"\x01\x00\x00\x00\x05"];
        assert!(block(&columns, long.iter().copied()).is_err());
    }
}
