//! The JSON pieces of an event, read without building a `serde_json::Value` tree for the whole
//! record: `data`'s fields (strings borrowed from the record when they hold no escapes),
//! envelope strings, and values skipped while still checked as JSON.
//!
//! Every type here accepts and rejects exactly what `serde_json::Value` does, so decoding
//! through them cannot change which records are dead letters (tested against `Value` in
//! `event.rs`).

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use smallvec::SmallVec;

/// One `data` field: a string, or any other JSON value (numbers, booleans, null, objects,
/// arrays) as `serde_json` parses it.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'a> {
    /// A JSON string.
    Str(Cow<'a, str>),
    /// Anything else.
    Json(Value),
}

impl Field<'_> {
    /// The field as JSON text, as `serde_json` writes it.
    pub fn to_json(&self) -> String {
        match self {
            Field::Str(s) => Value::from(s.as_ref()).to_string(),
            Field::Json(v) => v.to_string(),
        }
    }

    /// The string, if the field is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Field::Str(s) => Some(s),
            Field::Json(_) => None,
        }
    }

    /// Whether the field is JSON `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Field::Json(Value::Null))
    }

    fn into_owned(self) -> Field<'static> {
        match self {
            Field::Str(s) => Field::Str(Cow::Owned(s.into_owned())),
            Field::Json(v) => Field::Json(v),
        }
    }
}

/// The `data` object: its fields in the record's order. Where a key repeats, the last
/// one counts, as in `serde_json::Map`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Data<'a> {
    // Recycled through `SPARE_FIELDS`: decoding an event allocates no vector of its own.
    fields: Vec<(Cow<'a, str>, Field<'a>)>,
}

/// Fields sorted for `write_json` without an allocation.
const SORT_INLINE: usize = 16;

thread_local! {
    /// The vector of the last `Data` dropped on this thread, emptied, for the next decode.
    static SPARE_FIELDS: Cell<Vec<(Cow<'static, str>, Field<'static>)>> =
        const { Cell::new(Vec::new()) };
}

/// `v` emptied, as a vector of fields of another lifetime, in the same allocation (std
/// collects a vector's own iterator in place when the layouts match, as they do here).
// `filter_map` is what changes the element type here, which the lint's `filter` would not.
#[allow(clippy::unnecessary_filter_map)]
fn recycle<'x, 'y>(mut v: Vec<(Cow<'x, str>, Field<'x>)>) -> Vec<(Cow<'y, str>, Field<'y>)> {
    v.clear();
    v.into_iter().filter_map(|_| None).collect()
}

impl Drop for Data<'_> {
    fn drop(&mut self) {
        let fields = std::mem::take(&mut self.fields);
        // A vector grown by an unusually large object is freed, not kept.
        if fields.capacity() != 0 && fields.capacity() <= 64 {
            let _ = SPARE_FIELDS.try_with(|spare| spare.set(recycle(fields)));
        }
    }
}

impl<'a> Data<'a> {
    /// The field named `key`.
    pub fn get(&self, key: &str) -> Option<&Field<'a>> {
        // Events carry a dozen fields at most: a scan comparing lengths first touches the
        // bytes of few keys. From the back, so the last of duplicates wins.
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k.len() == key.len() && k.as_bytes() == key.as_bytes())
            .map(|(_, v)| v)
    }

    /// The object as JSON text, keys sorted and duplicates dropped: what `serde_json`
    /// writes for the same object parsed into a `Map`.
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(2 + self.fields.len() * 32);
        self.write_json(&mut out);
        String::from_utf8(out).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Appends [`Data::to_json`]'s text to `out` (a buffer reused across events costs no
    /// allocation).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut fields: SmallVec<[&(Cow<'a, str>, Field<'a>); SORT_INLINE]> =
            self.fields.iter().rev().collect();
        // Reversed, a stable sort puts the last of a key's duplicates first among its
        // equals, and `dedup_by` keeps the first of each run.
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        fields.dedup_by(|a, b| a.0 == b.0);
        out.push(b'{');
        for (i, (key, field)) in fields.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // Writing into a Vec cannot fail, and strings and parsed values always serialise.
            let _ = serde_json::to_writer(&mut *out, key.as_ref());
            out.push(b':');
            let _ = match field {
                Field::Str(s) => serde_json::to_writer(&mut *out, s.as_ref()),
                Field::Json(v) => serde_json::to_writer(&mut *out, v),
            };
        }
        out.push(b'}');
    }

    /// The same fields, owning their strings.
    pub fn into_owned(mut self) -> Data<'static> {
        Data {
            fields: std::mem::take(&mut self.fields)
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k.into_owned()), v.into_owned()))
                .collect(),
        }
    }
}

impl<'de> ReadMap<'de> for Data<'de> {
    fn read_map<A: MapAccess<'de>>(mut map: A) -> Result<Data<'de>, A::Error> {
        let mut fields = recycle(SPARE_FIELDS.try_with(Cell::take).unwrap_or_default());
        while let Some(CowStr(key)) = map.next_key()? {
            fields.push((key, map.next_value()?));
        }
        Ok(Data { fields })
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = Field<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'de>, E> {
                Ok(Field::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Field<'de>, E> {
                Ok(Field::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Field<'de>, E> {
                Ok(Field::Str(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Field<'de>, E> {
                Ok(Field::Json(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Field<'de>, E> {
                Ok(Field::Json(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Field<'de>, E> {
                Ok(Field::Json(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Field<'de>, E> {
                Ok(Field::Json(Value::from(v)))
            }
            fn visit_unit<E>(self) -> Result<Field<'de>, E> {
                Ok(Field::Json(Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field<'de>, A::Error> {
                Value::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Field::Json)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field<'de>, A::Error> {
                Value::deserialize(de::value::MapAccessDeserializer::new(map)).map(Field::Json)
            }
        }
        d.deserialize_any(FieldVisitor)
    }
}

/// Reads an object from its entries.
pub(crate) trait ReadMap<'de>: Sized {
    /// Reads the entries.
    fn read_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

/// Any JSON value, read in one pass and checked as `serde_json::Value` would check it
/// (strings unescaped and their UTF-8 checked, numbers in range, nesting limited): a string
/// (borrowed when it holds no escapes), an object read by `T`, `null`, or the JSON kind of
/// anything else (dropped once checked).
pub(crate) enum Json<'a, T> {
    Str(Cow<'a, str>),
    Object(T),
    Null,
    Other(&'static str),
}

impl<'de, T: ReadMap<'de>> Deserialize<'de> for Json<'de, T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor(PhantomData))
    }
}

struct JsonVisitor<T>(PhantomData<T>);

impl<'de, T: ReadMap<'de>> Visitor<'de> for JsonVisitor<T> {
    type Value = Json<'de, T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Json::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Json::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Json::Str(Cow::Owned(v)))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Json::Other("boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Json::Other("number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Json::Other("number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Json::Other("number"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Json::Other("array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::read_map(map).map(Json::Object)
    }
}

impl<T> Json<'_, T> {
    /// The JSON kind of a value that is not an object.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Json::Str(_) => "string",
            Json::Object(_) => "object",
            Json::Null => "null",
            Json::Other(kind) => kind,
        }
    }
}

/// An object's entries, checked and dropped.
pub(crate) struct Entries;

impl<'de> ReadMap<'de> for Entries {
    fn read_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<CowStr, Checked>()?.is_some() {}
        Ok(Entries)
    }
}

/// Any JSON value, checked as `serde_json::Value` would check it, then dropped. Unlike
/// `serde::de::IgnoredAny`, which `serde_json` skips without these checks.
pub(crate) struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Json::<Entries>::deserialize(d).map(|_| Checked)
    }
}

/// A JSON string; any other value is `None` (checked, then dropped). The envelope's fields
/// count only as strings.
pub(crate) struct MaybeStr<'a>(pub(crate) Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for MaybeStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Json::<Entries>::deserialize(d).map(|v| match v {
            Json::Str(s) => MaybeStr(Some(s)),
            _ => MaybeStr(None),
        })
    }
}

/// A map key, borrowed when it holds no escapes.
pub(crate) struct CowStr<'a>(pub(crate) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for CowStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_str(JsonVisitor::<Entries>(PhantomData))? {
            Json::Str(s) => Ok(CowStr(s)),
            other => Err(de::Error::custom(format!(
                "a key is a JSON {}, not a string",
                other.kind()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn data(json: &str) -> Data<'_> {
        match serde_json::from_str::<Json<Data>>(json).expect(json) {
            Json::Object(data) => data,
            _ => panic!("{json} is not an object"),
        }
    }

    /// `Data` agrees with `serde_json::Map` on every input: fields, duplicates, text.
    #[test]
    fn data_reads_and_writes_as_serde_json_map_does() {
        let cases = [
            r#"{}"#,
            r#"{"b":"2","a":"1"}"#,
            r#"{"a":"first","b":1,"a":"last"}"#,
            r#"{"a":1,"a":{"x":[1,2.5,-0,1e3,"s"]},"a":null}"#,
            r#"{"esc\"aped":"tab\there","uni":"caf\u00e9 \ud83d\ude00","slash":"a\/b"}"#,
            r#"{"n":12345678901234567890,"m":-9223372036854775808,"f":1.50,"e":2E-3}"#,
            r#"{"t":true,"f":false,"z":null,"arr":[],"obj":{"b":1,"a":2}}"#,
            r#"{ "spaced" : "  x  " , "é":"ü" }"#,
        ];
        for json in cases {
            let data = data(json);
            let map: Map<String, Value> = serde_json::from_str(json).expect(json);
            assert_eq!(
                data.to_json(),
                serde_json::to_string(&map).unwrap(),
                "{json}"
            );
            for (k, v) in &map {
                let field = data.get(k).expect(k);
                match v {
                    Value::String(s) => assert_eq!(field.as_str(), Some(s.as_str()), "{json}"),
                    other => assert_eq!(field, &Field::Json(other.clone()), "{json}"),
                }
                assert_eq!(field.to_json(), v.to_string(), "{json}");
            }
            assert_eq!(data.clone().into_owned(), data);
        }
    }

    #[test]
    fn strings_without_escapes_are_borrowed() {
        let data = data(r#"{"plain":"abc","esc":"a\nb"}"#);
        assert!(matches!(
            data.get("plain"),
            Some(Field::Str(Cow::Borrowed("abc")))
        ));
        assert!(matches!(data.get("esc"), Some(Field::Str(Cow::Owned(s))) if s == "a\nb"));
        assert_eq!(data.get("missing"), None);
    }

    /// `Checked` refuses what `Value` refuses, and accepts what it accepts.
    #[test]
    fn checked_values_fail_where_value_fails() {
        let cases: [&[u8]; 9] = [
            br#"[1,"a",{"k":[true,null]}]"#,
            br#""lone \ud800 surrogate""#,
            b"\"bad utf8 \xff\"",
            br#"1e400"#,
            br#"{"a":1,}"#,
            br#"[01]"#,
            br#""bad \x escape""#,
            br#"{"a" 1}"#,
            br#"-"#,
        ];
        for json in cases {
            assert_eq!(
                serde_json::from_slice::<Checked>(json).is_ok(),
                serde_json::from_slice::<Value>(json).is_ok(),
                "{}",
                String::from_utf8_lossy(json)
            );
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(serde_json::from_str::<Checked>(&deep).is_err());
        assert!(serde_json::from_str::<Value>(&deep).is_err());
    }
}
