//! RowBinary, written by serde from a row borrowed for the moment it takes: what lets a
//! pipeline encode a row straight from its record (the `clickhouse` crate's own serializer
//! only writes into an open insert). It writes what the crate writes for the same `Serialize`
//! impl (`Option` as `Nullable`, sequences as `Array`, maps as `Map`, tuples and structs field
//! after field, `clickhouse::serde` helpers as their columns), so a row type's start-up check
//! through the crate also checks these bytes.

use bytes::BufMut;
use serde::Serialize;
use serde::ser::{self, Impossible};

/// Why a row cannot be written as RowBinary: its type has a field RowBinary has no form for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode as RowBinary: {0}")]
pub struct EncodeError(String);

impl ser::Error for EncodeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

/// Appends `row` to `out` as one RowBinary row.
pub(crate) fn write_row<B: BufMut, T: Serialize + ?Sized>(
    out: &mut B,
    row: &T,
) -> Result<(), EncodeError> {
    row.serialize(&mut Writer(out))
}

fn put_len<B: BufMut>(out: &mut B, mut n: u64) {
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

fn unsupported(what: &str) -> EncodeError {
    EncodeError(format!("{what} has no RowBinary form"))
}

struct Writer<'b, B>(&'b mut B);

impl<'a, 'b, B: BufMut> ser::Serializer for &'a mut Writer<'b, B> {
    type Ok = ();
    type Error = EncodeError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Impossible<(), EncodeError>;
    type SerializeTupleVariant = Impossible<(), EncodeError>;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Impossible<(), EncodeError>;

    fn serialize_bool(self, v: bool) -> Result<(), EncodeError> {
        self.0.put_u8(u8::from(v));
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), EncodeError> {
        self.0.put_i8(v);
        Ok(())
    }
    fn serialize_i16(self, v: i16) -> Result<(), EncodeError> {
        self.0.put_i16_le(v);
        Ok(())
    }
    fn serialize_i32(self, v: i32) -> Result<(), EncodeError> {
        self.0.put_i32_le(v);
        Ok(())
    }
    fn serialize_i64(self, v: i64) -> Result<(), EncodeError> {
        self.0.put_i64_le(v);
        Ok(())
    }
    fn serialize_i128(self, v: i128) -> Result<(), EncodeError> {
        self.0.put_i128_le(v);
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Result<(), EncodeError> {
        self.0.put_u8(v);
        Ok(())
    }
    fn serialize_u16(self, v: u16) -> Result<(), EncodeError> {
        self.0.put_u16_le(v);
        Ok(())
    }
    fn serialize_u32(self, v: u32) -> Result<(), EncodeError> {
        self.0.put_u32_le(v);
        Ok(())
    }
    fn serialize_u64(self, v: u64) -> Result<(), EncodeError> {
        self.0.put_u64_le(v);
        Ok(())
    }
    fn serialize_u128(self, v: u128) -> Result<(), EncodeError> {
        self.0.put_u128_le(v);
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<(), EncodeError> {
        self.0.put_f32_le(v);
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Result<(), EncodeError> {
        self.0.put_f64_le(v);
        Ok(())
    }
    fn serialize_char(self, _: char) -> Result<(), EncodeError> {
        Err(unsupported("`char`"))
    }
    fn serialize_str(self, v: &str) -> Result<(), EncodeError> {
        self.serialize_bytes(v.as_bytes())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), EncodeError> {
        put_len(self.0, v.len() as u64);
        self.0.put_slice(v);
        Ok(())
    }
    fn serialize_none(self) -> Result<(), EncodeError> {
        self.0.put_u8(1);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), EncodeError> {
        self.0.put_u8(0);
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), EncodeError> {
        Err(unsupported("`()`"))
    }
    fn serialize_unit_struct(self, name: &'static str) -> Result<(), EncodeError> {
        Err(unsupported(name))
    }
    fn serialize_unit_variant(
        self,
        name: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<(), EncodeError> {
        Err(unsupported(name))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        // The crate's fixed-width wrappers (Int256, BFloat16) are written without a length
        // prefix by its own serializer: refuse them rather than write them differently.
        if name.starts_with("clickhouse::") {
            return Err(unsupported(name));
        }
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        // `Variant(...)`: the discriminant, then the value.
        let index = u8::try_from(index).map_err(|_| unsupported(name))?;
        self.0.put_u8(index);
        value.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self, EncodeError> {
        let len = len.ok_or_else(|| unsupported("a sequence without a length"))?;
        put_len(self.0, len as u64);
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, EncodeError> {
        Ok(self)
    }
    fn serialize_tuple_struct(
        self,
        name: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, EncodeError> {
        Err(unsupported(name))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, EncodeError> {
        Err(unsupported(name))
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self, EncodeError> {
        let len = len.ok_or_else(|| unsupported("a map without a length"))?;
        put_len(self.0, len as u64);
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, EncodeError> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, EncodeError> {
        Err(unsupported(name))
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

impl<B: BufMut> ser::SerializeSeq for &mut Writer<'_, B> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

impl<B: BufMut> ser::SerializeTuple for &mut Writer<'_, B> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

impl<B: BufMut> ser::SerializeMap for &mut Writer<'_, B> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), EncodeError> {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

impl<B: BufMut> ser::SerializeStruct for &mut Writer<'_, B> {
    type Ok = ();
    type Error = EncodeError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _: &'static str,
        value: &T,
    ) -> Result<(), EncodeError> {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result<(), EncodeError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::collections::BTreeMap;

    use super::*;

    #[derive(Serialize)]
    struct Sample<'a> {
        #[serde(with = "clickhouse::serde::uuid")]
        id: uuid::Uuid,
        n: u32,
        name: Cow<'a, str>,
        code: [u8; 2],
        absent: Option<u64>,
        present: Option<i16>,
        tags: Vec<&'a str>,
        map: BTreeMap<&'a str, u8>,
        ratio: f32,
        ok: bool,
    }

    #[test]
    fn writes_each_column_as_rowbinary_lays_it_out() {
        let id = uuid::Uuid::from_u64_pair(1, 2);
        let row = Sample {
            id,
            n: 0x0102_0304,
            name: Cow::Borrowed("héllo"),
            code: *b"NL",
            absent: None,
            present: Some(-2),
            tags: vec!["a", "bc"],
            map: BTreeMap::from([("k", 7)]),
            ratio: 1.5,
            ok: true,
        };
        let mut out = Vec::new();
        write_row(&mut out, &row).expect("encodes");
        let mut want = Vec::new();
        want.extend(1u64.to_le_bytes()); // UUID: high half, then low half
        want.extend(2u64.to_le_bytes());
        want.extend([4, 3, 2, 1]);
        want.push(6);
        want.extend("héllo".as_bytes());
        want.extend(b"NL"); // FixedString(2): the bytes alone
        want.push(1); // NULL
        want.extend([0, 0xfe, 0xff]); // not NULL, -2
        want.extend([2, 1, b'a', 2, b'b', b'c']);
        want.extend([1, 1, b'k', 7]);
        want.extend(1.5f32.to_le_bytes());
        want.push(1);
        assert_eq!(out, want);
    }

    #[test]
    fn long_strings_get_a_multi_byte_length() {
        let mut out = Vec::new();
        write_row(&mut out, &"x".repeat(300)).expect("encodes");
        assert_eq!(&out[..2], &[0xac, 0x02]); // 300 = 0b10_0101100
        assert_eq!(out.len(), 302);
    }

    #[test]
    fn types_without_a_form_are_errors() {
        let mut out = Vec::new();
        assert!(write_row(&mut out, &'c').is_err());
        assert!(write_row(&mut out, &()).is_err());
    }
}
