//! The raw spec: what a user wrote, with the right shapes but not yet judged.
//!
//! [`RawSpec`] is plain serde with unknown fields denied, so every format
//! serde reads (JSON and YAML today; compose and Procfile importers later) gives
//! the same thing, and the set of known fields is the struct itself
//! ([`known_fields`] reads it from the derived code). Fields a user may give
//! loosely keep their loose form here (`memory` as `"512M"` or a number); the
//! validation pass decides what they mean.
//!
//! A reader that stopped at the first error would hide the others, so
//! [`read`] takes a spec as a document tree (a `serde_json::Value`, which any
//! self-describing format can produce) and, when the whole does not
//! deserialize, deserializes it field by field: each unknown field and each
//! field of the wrong type is reported with its path (`env[2]`), and the
//! remaining fields still make a raw spec for validation.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_json::{Map, Value};

use super::SpecError;

/// One service as written, before validation.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    pub machine: Option<String>,
    pub name: Option<String>,
    pub image: Option<String>,
    /// `"binary"`, `"docker"` or `"vm"`; a string here, so that a wrong one
    /// gets the validation pass's message rather than serde's.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub duration: Option<String>,
    #[serde(default, deserialize_with = "string_list")]
    pub env: Vec<String>,
    /// Env files, relative to the spec file: paths as a user writes them,
    /// or `{path, env}` once read (as the master stores them).
    #[serde(default, deserialize_with = "env_files")]
    pub env_file: Vec<super::EnvFile>,
    pub proxyname: Option<String>,
    /// A URL path prefix under `proxyname` (`/api`).
    pub proxypath: Option<String>,
    /// HTTP basic auth at the proxy: `user:bcrypt-hash` entries.
    #[serde(default, deserialize_with = "string_list")]
    pub proxyauth: Vec<String>,
    #[serde(default, deserialize_with = "port")]
    pub proxyport: Option<u16>,
    pub healthcheck: Option<String>,
    pub ip: Option<String>,
    #[serde(default, deserialize_with = "string_list")]
    pub args: Vec<String>,
    #[serde(default, deserialize_with = "string_list")]
    pub link: Vec<String>,
    pub memory: Option<Size>,
    #[serde(default, deserialize_with = "cores")]
    pub cpus: Option<f64>,
}

/// A memory size as given: a number of bytes, or text like `"512M"`.
#[derive(Clone, Debug, PartialEq)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size like \"512M\", \"2G\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size::Bytes(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size::Bytes)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                Ok(Size::Text(v.to_owned()))
            }
        }
        d.deserialize_any(SizeVisitor)
    }
}

/// Lets a visitor for a value also take an absent one (`null`).
struct OrNull<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for OrNull<V> {
    type Value = Option<V::Value>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self.0).map(Some)
    }
}

/// A list of strings; `null` is an empty list.
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct ListVisitor;
    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of strings")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
    d.deserialize_option(OrNull(ListVisitor))
        .map(Option::unwrap_or_default)
}

/// A list of env files: each a path (as a user writes it) or a `{path,
/// env}` object (as the master stores it, with the file's entries); `null`
/// is an empty list.
fn env_files<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<super::EnvFile>, D::Error> {
    struct One;
    impl<'de> Visitor<'de> for One {
        type Value = super::EnvFile;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a file path")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<super::EnvFile, E> {
            Ok(super::EnvFile {
                path: v.to_owned(),
                env: None,
            })
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<super::EnvFile, A::Error> {
            super::EnvFile::deserialize(de::value::MapAccessDeserializer::new(map))
        }
    }
    struct Item(super::EnvFile);
    impl<'de> Deserialize<'de> for Item {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(One).map(Item)
        }
    }
    struct ListVisitor;
    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<super::EnvFile>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of file paths")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<super::EnvFile>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(Item(f)) = seq.next_element::<Item>()? {
                out.push(f);
            }
            Ok(out)
        }
    }
    d.deserialize_option(OrNull(ListVisitor))
        .map(Option::unwrap_or_default)
}

/// A TCP port, 1 to 65535.
fn port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    struct PortVisitor;
    impl Visitor<'_> for PortVisitor {
        type Value = u16;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a port number from 1 to 65535")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u16, E> {
            u16::try_from(v)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u16, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
            }
        }
    }
    d.deserialize_option(OrNull(PortVisitor))
}

/// A number of CPU cores, whole or not; the range is the validation's.
fn cores<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    struct CoresVisitor;
    impl Visitor<'_> for CoresVisitor {
        type Value = f64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number of cores from 0.01 up, like 0.5 or 2")
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }
    }
    d.deserialize_option(OrNull(CoresVisitor))
}

/// The fields a spec may have, as serde knows them (with `type` under its
/// own name), read from the derived `Deserialize` of [`RawSpec`].
pub fn known_fields() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The derived code hands its field list to `deserialize_struct`, which
    // records it and stops; the error is the expected outcome.
    let _ = RawSpec::deserialize(FieldList(&mut fields));
    fields
}

/// A deserializer that only records the field list of the struct asked of it.
struct FieldList<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldList<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only a struct's field list can be read"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field list read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// A spec read as far as it goes.
#[derive(Debug)]
pub struct Reading {
    /// The spec without the fields that could not be read; None only if
    /// even that failed.
    pub raw: Option<RawSpec>,
    /// Unknown fields and fields of the wrong shape, with their paths.
    pub errors: Vec<SpecError>,
    /// The top-level fields named in `errors`: the validation pass will
    /// find them absent, which says nothing new.
    pub unread: Vec<String>,
}

/// Reads one spec object, reporting every field that cannot be read.
pub fn read(item: &Value) -> Reading {
    let Value::Object(object) = item else {
        return Reading {
            raw: None,
            errors: vec![SpecError::new(
                None,
                format!("expected an object, got {}", describe(item)),
            )],
            unread: Vec::new(),
        };
    };
    // The common case: the whole spec reads at once.
    if let Ok(raw) = serde_path_to_error::deserialize::<_, RawSpec>(item) {
        return Reading {
            raw: Some(raw),
            errors: Vec::new(),
            unread: Vec::new(),
        };
    }
    let known = known_fields();
    let mut errors = Vec::new();
    let mut unread = Vec::new();
    for (key, value) in object {
        if !known.contains(&key.as_str()) {
            errors.push(SpecError::new(Some(key), unknown_field(key, known)));
            unread.push(key.clone());
            continue;
        }
        // Every field of RawSpec may be absent, so a spec of this one field
        // reads if and only if the field does.
        let alone = Value::Object(Map::from_iter([(key.clone(), value.clone())]));
        if let Err(e) = serde_path_to_error::deserialize::<_, RawSpec>(&alone) {
            let path = e.path().to_string();
            let given = at_path(&alone, e.path());
            errors.push(SpecError::new(
                Some(&path),
                reason(&e.into_inner().to_string(), given),
            ));
            unread.push(key.clone());
        }
    }
    let rest: Map<String, Value> = object
        .iter()
        .filter(|(k, _)| !unread.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let raw = match serde_path_to_error::deserialize::<_, RawSpec>(&Value::Object(rest)) {
        Ok(raw) => Some(raw),
        Err(e) => {
            // Fields that read alone but not together: not expected of a
            // struct of independent fields, but said rather than hidden.
            errors.push(SpecError::new(
                None,
                format!("cannot be read: {}", e.into_inner()),
            ));
            None
        }
    };
    Reading {
        raw,
        errors,
        unread,
    }
}

/// Turns serde's `invalid type: X, expected Y` into this crate's
/// `expected Y, got X`, describing X the way the other errors do.
fn reason(message: &str, given: Option<&Value>) -> String {
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "));
    // The expectation is the last part: a string value in the first part
    // may itself hold ", expected ".
    match (rest.and_then(|r| r.rsplit_once(", expected ")), given) {
        (Some((_, expected)), Some(v)) => format!("expected {expected}, got {}", describe(v)),
        _ => message.to_owned(),
    }
}

/// The value at a path serde reported, if the path leads anywhere.
fn at_path<'v>(root: &'v Value, path: &serde_path_to_error::Path) -> Option<&'v Value> {
    use serde_path_to_error::Segment;
    path.iter().try_fold(root, |v, segment| match segment {
        Segment::Map { key } => v.get(key),
        Segment::Seq { index } => v.get(index),
        _ => None,
    })
}

/// The reason for an unknown field: the known field it was probably meant
/// to be, or all of them.
fn unknown_field(key: &str, known: &[&str]) -> String {
    let closest = known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .min_by_key(|(d, _)| *d);
    match closest {
        // A third of the letters wrong still reads as a typo.
        Some((d, k)) if d <= (key.chars().count() / 3).max(1) => {
            format!("unknown field; did you mean `{k}`?")
        }
        _ => format!("unknown field; the known fields are {}", known.join(", ")),
    }
}

/// Edit distance with transpositions (optimal string alignment): the fewest
/// insertions, deletions, substitutions and swaps of adjacent characters
/// that turn `a` into `b`. Swaps count once, as typists make them.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: the distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitute = d[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            let mut best = substitute.min(d[i - 1][j] + 1).min(d[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// A short description of a value for error messages.
pub fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => return "null".into(),
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    let s = v.to_string();
    if s.len() <= 40 {
        format!("{kind} {s}")
    } else {
        kind.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reading(v: Value) -> Reading {
        read(&v)
    }

    #[test]
    fn known_fields_come_from_the_struct() {
        let fields = known_fields();
        assert_eq!(fields.len(), 17, "{fields:?}");
        for f in ["machine", "type", "healthcheck", "cpus", "link"] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        assert!(!fields.contains(&"kind"));
    }

    #[test]
    fn a_good_spec_reads_whole() {
        let r = reading(json!({"machine":"m","memory":"1G","env":null,"proxyport":80,"cpus":2}));
        assert!(r.errors.is_empty());
        let raw = r.raw.unwrap();
        assert_eq!(raw.memory, Some(Size::Text("1G".into())));
        assert_eq!((raw.proxyport, raw.cpus), (Some(80), Some(2.0)));
        assert!(raw.env.is_empty());
    }

    #[test]
    fn every_bad_field_is_reported_and_the_rest_still_read() {
        let r = reading(json!({
            "name": "web", "helthcheck": "/h", "env": ["A=1", "B=2", 3],
            "proxyport": 0, "args": "x", "memory": true, "cpus": "two"
        }));
        let all: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
        let all = all.join("\n");
        assert!(
            all.contains("field `helthcheck`: unknown field; did you mean `healthcheck`?"),
            "{all}"
        );
        assert!(
            all.contains("field `env[2]`: expected a string, got a number 3"),
            "{all}"
        );
        assert!(
            all.contains(
                "field `proxyport`: expected a port number from 1 to 65535, got a number 0"
            ),
            "{all}"
        );
        assert!(
            all.contains("field `args`: expected a list of strings, got a string \"x\""),
            "{all}"
        );
        assert!(all.contains("field `memory`: expected a size"), "{all}");
        assert!(
            all.contains("field `cpus`: expected a number of cores"),
            "{all}"
        );
        assert_eq!(r.errors.len(), 6, "{all}");
        assert_eq!(r.raw.unwrap().name.as_deref(), Some("web"));
        let mut unread = r.unread;
        unread.sort();
        assert_eq!(
            unread,
            ["args", "cpus", "env", "helthcheck", "memory", "proxyport"]
        );
    }

    #[test]
    fn a_spec_is_an_object() {
        let r = reading(json!(["machine"]));
        assert!(r.raw.is_none());
        assert_eq!(
            r.errors[0].reason,
            "expected an object, got an array [\"machine\"]"
        );
    }

    #[test]
    fn a_far_off_field_lists_the_known_ones() {
        let r = reading(json!({"colour": "red"}));
        assert_eq!(r.errors.len(), 1);
        let reason = &r.errors[0].reason;
        assert!(
            reason.starts_with("unknown field; the known fields are machine, name, image, type"),
            "{reason}"
        );
    }

    #[test]
    fn serde_messages_are_reworded_and_others_kept() {
        let v = json!("a, expected b");
        assert_eq!(
            reason(
                "invalid type: string \"a, expected b\", expected u16",
                Some(&v)
            ),
            "expected u16, got a string \"a, expected b\""
        );
        assert_eq!(reason("something else", Some(&v)), "something else");
        assert_eq!(
            reason("invalid type: map, expected u16", None),
            "invalid type: map, expected u16"
        );
    }

    #[test]
    fn distances() {
        assert_eq!(edit_distance("helthcheck", "healthcheck"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("ïp", "ip"), 1);
        assert_eq!(edit_distance("imgae", "image"), 1);
        assert_eq!(edit_distance("abc", "abc"), 0);
    }
}
