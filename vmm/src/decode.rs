//! One way to decode the JSON the VMM reads (API request bodies, the files of a snapshot):
//! parse, don't validate.
//!
//! Each input has a plain serde form (a `Raw…` struct with `#[derive(Deserialize)]`, usually
//! `#[serde(deny_unknown_fields)]`) and a validated form built from it with `TryFrom`. [`from_value`]
//! reads the plain form from parsed JSON like `serde_json::from_value`, but its error says where
//! the problem is: a [`DecodeError`] holds the path of the field (`vcpus[1].msrs[0].index`) and
//! what was wrong with it, so that callers can name the file or request body and the field.
//!
//! It is a small serde [`Deserializer`] over [`Value`] that hands every struct field and array
//! element to serde's derived code and puts the field name or index in front of any error that
//! comes back.

use std::fmt;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, Expected, MapAccess, SeqAccess, Unexpected,
    VariantAccess, Visitor,
};
use serde::Deserialize;
use serde_json::Value;

/// What was wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The value has the wrong JSON type, or a number out of range.
    Type {
        /// `type` or `value` (a number out of range, an unknown enum variant).
        invalid: &'static str,
        /// What was wanted, in words (`a boolean`, `a non-negative integer`).
        expected: String,
        /// What was found (`a string "yes"`).
        got: String,
    },
    /// A required field is absent.
    Missing,
    /// A field the structure does not have.
    Unknown {
        /// The fields it has.
        expected: &'static [&'static str],
    },
    /// Any other reason (a `TryFrom` or `FromStr` refusing the value), in its own words.
    Invalid(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Type {
                invalid,
                expected,
                got,
            } => write!(f, "invalid {invalid}: expected {expected}, got {got}"),
            Problem::Missing => f.write_str("missing field"),
            Problem::Unknown { expected } => write!(
                f,
                "unknown field (expected one of: {})",
                expected.join(", ")
            ),
            Problem::Invalid(reason) => f.write_str(reason),
        }
    }
}

/// A field that could not be decoded: its path and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Dotted path from the top (`vcpus[1].regs`); empty for the top-level value itself.
    pub path: String,
    /// What was wrong.
    pub problem: Problem,
}

impl DecodeError {
    /// `field` (a path) holds a value that a `TryFrom` check refuses, for `reason`.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::at(Problem::Invalid(reason.into())).under(field)
    }

    /// The required `field` (a path) is absent.
    pub fn missing(field: &str) -> Self {
        Self::at(Problem::Missing).under(field)
    }

    fn at(problem: Problem) -> Self {
        Self {
            path: String::new(),
            problem,
        }
    }

    /// Puts a field name (`key`) or an index (`[3]`) in front of the path.
    fn under(mut self, segment: &str) -> Self {
        self.path = match self.path.as_str() {
            "" => segment.to_string(),
            p if p.starts_with('[') => format!("{segment}{p}"),
            p => format!("{segment}.{p}"),
        };
        self
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.path, self.problem)
        }
    }
}

impl std::error::Error for DecodeError {}

impl de::Error for DecodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::at(Problem::Invalid(msg.to_string()))
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::at(mismatch("type", unexp, exp))
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::at(mismatch("value", unexp, exp))
    }

    fn missing_field(field: &'static str) -> Self {
        Self::missing(field)
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Self::at(Problem::Unknown { expected }).under(field)
    }
}

fn mismatch(invalid: &'static str, unexp: Unexpected<'_>, exp: &dyn Expected) -> Problem {
    Problem::Type {
        invalid,
        expected: expected_words(&exp.to_string()),
        got: got_words(unexp),
    }
}

/// serde's names for what a type wants, in JSON's words.
fn expected_words(exp: &str) -> String {
    match exp {
        "u8" => "an integer from 0 to 255".into(),
        "u16" => "an integer from 0 to 65535".into(),
        "u32" => "an integer from 0 to 4294967295".into(),
        "u64" | "usize" => "a non-negative integer".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "an integer".into(),
        "a sequence" => "an array".into(),
        "a map" => "an object".into(),
        e if e.starts_with("struct ") => "an object".into(),
        e => e.into(),
    }
}

/// What was found, in JSON's words, long strings cut short.
fn got_words(unexp: Unexpected<'_>) -> String {
    match unexp {
        Unexpected::Bool(b) => format!("a boolean {b}"),
        Unexpected::Unsigned(n) => format!("a number {n}"),
        Unexpected::Signed(n) => format!("a number {n}"),
        Unexpected::Float(n) => format!("a number {n}"),
        Unexpected::Str(s) => {
            let mut s = Value::from(s).to_string();
            if s.len() > 40 {
                let mut cut = 40;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
                s.push_str("...");
            }
            format!("a string {s}")
        }
        Unexpected::Unit => "null".into(),
        Unexpected::Seq => "an array".into(),
        Unexpected::Map => "an object".into(),
        other => other.to_string(),
    }
}

/// Decodes `T` from `v`; the error names the field that was wrong.
pub fn from_value<'de, T: Deserialize<'de>>(v: &'de Value) -> Result<T, DecodeError> {
    T::deserialize(Json(v))
}

/// Decodes the plain form `R` from `v` and checks it into `T`.
pub fn checked<'de, R, T>(v: &'de Value) -> Result<T, DecodeError>
where
    R: Deserialize<'de>,
    T: TryFrom<R, Error = DecodeError>,
{
    T::try_from(from_value::<R>(v)?)
}

/// A JSON value being decoded.
#[derive(Clone, Copy)]
struct Json<'de>(&'de Value);

impl<'de> Deserializer<'de> for Json<'de> {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => visitor.visit_u64(u),
                (None, Some(i)) => visitor.visit_i64(i),
                _ => visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(a) => {
                let mut seq = Elements {
                    iter: a.iter(),
                    index: 0,
                };
                let out = visitor.visit_seq(&mut seq)?;
                match seq.iter.len() {
                    0 => Ok(out),
                    left => Err(de::Error::invalid_length(
                        seq.index + left,
                        &"fewer elements in the array",
                    )),
                }
            }
            Value::Object(m) => visitor.visit_map(Fields {
                iter: m.iter(),
                next: None,
            }),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(BorrowedStrDeserializer::new(s)),
            Value::Object(m) if m.len() == 1 => match m.iter().next() {
                Some((k, v)) => visitor.visit_enum(Variant(k, Json(v))),
                None => self.deserialize_any(visitor),
            },
            _ => Err(de::Error::invalid_type(
                unexpected(self.0),
                &"a string or an object with one key",
            )),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(visitor),
            v => Err(de::Error::invalid_type(unexpected(v), &"an object")),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map identifier
    }
}

fn unexpected(v: &Value) -> Unexpected<'_> {
    match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => n
            .as_f64()
            .map_or(Unexpected::Other("a number"), Unexpected::Float),
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

/// An array's elements; an error names the index.
struct Elements<'de> {
    iter: std::slice::Iter<'de, Value>,
    index: usize,
}

impl<'de> SeqAccess<'de> for Elements<'de> {
    type Error = DecodeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DecodeError> {
        let Some(v) = self.iter.next() else {
            return Ok(None);
        };
        let i = self.index;
        self.index += 1;
        seed.deserialize(Json(v))
            .map(Some)
            .map_err(|e| e.under(&format!("[{i}]")))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// An object's fields; an error names the field.
struct Fields<'de> {
    iter: serde_json::map::Iter<'de>,
    next: Option<(&'de str, &'de Value)>,
}

impl<'de> MapAccess<'de> for Fields<'de> {
    type Error = DecodeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DecodeError> {
        let Some((k, v)) = self.iter.next() else {
            return Ok(None);
        };
        self.next = Some((k, v));
        seed.deserialize(BorrowedStrDeserializer::new(k)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DecodeError> {
        match self.next.take() {
            Some((k, v)) => seed.deserialize(Json(v)).map_err(|e| e.under(k)),
            None => Err(de::Error::custom("a value was asked for before its key")),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// An enum written as `{"Variant": content}`.
struct Variant<'de>(&'de str, Json<'de>);

impl<'de> EnumAccess<'de> for Variant<'de> {
    type Error = DecodeError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self), DecodeError> {
        let v = seed.deserialize(BorrowedStrDeserializer::new(self.0))?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for Variant<'de> {
    type Error = DecodeError;

    fn unit_variant(self) -> Result<(), DecodeError> {
        match self.1 .0 {
            Value::Null => Ok(()),
            v => Err(de::Error::invalid_type(unexpected(v), &"null")),
        }
        .map_err(|e: DecodeError| e.under(self.0))
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, DecodeError> {
        seed.deserialize(self.1).map_err(|e| e.under(self.0))
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.1.deserialize_seq(visitor).map_err(|e| e.under(self.0))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        self.1.deserialize_map(visitor).map_err(|e| e.under(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        index: u32,
        on: Option<bool>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Copy,
        Map,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        inner: Vec<Inner>,
        mode: Option<Mode>,
        #[serde(default)]
        sizes: std::collections::BTreeMap<String, u64>,
    }

    fn err(v: Value) -> DecodeError {
        from_value::<Outer>(&v).unwrap_err()
    }

    #[test]
    fn decodes_what_serde_json_decodes() {
        let v = json!({"name": "n", "inner": [{"index": 3, "on": null}, {"index": 4, "on": true}],
            "mode": "map", "sizes": {"a": 1}});
        let ours: Outer = from_value(&v).unwrap();
        assert_eq!(ours, serde_json::from_value::<Outer>(v).unwrap());
        assert_eq!(ours.inner[1].on, Some(true));
    }

    #[test]
    fn unknown_field_is_named() {
        let e = err(json!({"name": "n", "inner": [{"index": 1}, {"index": 2, "of": 1}]}));
        assert_eq!(e.path, "inner[1].of");
        assert_eq!(
            e.to_string(),
            "inner[1].of: unknown field (expected one of: index, on)"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let e = err(json!({"name": "n", "inner": [{"index": "x"}]}));
        assert_eq!(e.path, "inner[0].index");
        assert_eq!(
            e.problem,
            Problem::Type {
                invalid: "type",
                expected: "an integer from 0 to 4294967295".into(),
                got: "a string \"x\"".into(),
            }
        );
        let e = err(json!({"name": "n", "inner": [{"index": -1}]}));
        assert_eq!(e.path, "inner[0].index");
        assert!(
            e.to_string()
                .contains("invalid value: expected an integer from 0"),
            "{e}"
        );
        let e = err(json!({"name": 5, "inner": []}));
        assert_eq!(
            e.to_string(),
            "name: invalid type: expected a string, got a number 5"
        );
        let e = err(json!({"name": "n", "inner": [], "sizes": {"a": true}}));
        assert_eq!(e.path, "sizes.a");
        let e = err(json!(["name"]));
        assert_eq!(e.path, "");
        assert!(
            e.to_string().contains("expected an object, got an array"),
            "{e}"
        );
    }

    #[test]
    fn bad_enum_value_is_named() {
        let e = err(json!({"name": "n", "inner": [], "mode": "Copy"}));
        assert_eq!(e.path, "mode");
        assert!(e.to_string().contains("unknown variant `Copy`"), "{e}");
        let e = err(json!({"name": "n", "inner": [], "mode": 1}));
        assert_eq!(e.path, "mode");
    }

    #[test]
    fn missing_required_field_is_named() {
        let e = err(json!({"name": "n", "inner": [{"on": true}]}));
        assert_eq!(e.path, "inner[0].index");
        assert_eq!(e.problem, Problem::Missing);
        let e = err(json!({"inner": []}));
        assert_eq!(e.to_string(), "name: missing field");
    }

    #[test]
    fn long_strings_are_cut() {
        let long = "é".repeat(100);
        let e = err(json!({"name": "n", "inner": [{"index": long}]}));
        let Problem::Type { got, .. } = e.problem else {
            panic!("{e}")
        };
        assert!(got.len() < 60 && got.ends_with("..."), "{got}");
    }
}
