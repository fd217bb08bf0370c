//! Cloud Hypervisor's comma-separated option syntax: `key=value,key2="a,b",list=[x,y]`.
//!
//! Commas inside double quotes or square brackets do not split; quotes around a value are
//! removed. A value given as `key=` counts as absent. Where a command has a main option, its value
//! may be given alone as the first item (`unix:/tmp/sock` for `receiver_url=unix:/tmp/sock`).

use serde_json::{Map, Value};
use thiserror::Error;

/// A syntax error in an option string.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OptionError {
    /// Quotes or brackets do not balance.
    #[error("unbalanced quotes or brackets in `{0}`")]
    Unbalanced(String),
    /// An item has no `=` and is not the leading main value.
    #[error("`{0}` is not of the form key=value")]
    NotKeyValue(String),
    /// The key is not one this command takes.
    #[error("unknown option `{key}` (known: {known})")]
    Unknown {
        /// The key given.
        key: String,
        /// The keys accepted, comma separated.
        known: String,
    },
    /// The same key appears twice.
    #[error("option `{0}` is given more than once")]
    Duplicate(String),
    /// A value cannot be converted to the option's type.
    #[error("option `{key}`: `{value}` is not {expected}")]
    BadValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What was wanted.
        expected: &'static str,
    },
}

/// The type an option's value is converted to before validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Kept as a JSON string.
    Str,
    /// `on`, `off`, `true`, `false` (any case).
    Bool,
    /// A non-negative decimal integer.
    U64,
}

/// Splits at top-level commas; errors if quotes or brackets do not balance.
pub fn split(s: &str) -> Result<Vec<String>, OptionError> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut depth = 0usize;
    let mut quoted = false;
    for c in s.trim().chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '[' => depth += 1,
            ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| OptionError::Unbalanced(s.to_string()))?;
            }
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if quoted || depth != 0 {
        return Err(OptionError::Unbalanced(s.to_string()));
    }
    items.push(cur);
    Ok(items)
}

fn dequote(v: &str) -> String {
    v.replace('"', "")
}

/// Parses `s` into `(key, value)` pairs, in order, checking keys against `known`.
pub fn parse(
    s: &str,
    main: Option<&str>,
    known: &[&str],
) -> Result<Vec<(String, String)>, OptionError> {
    let mut out: Vec<(String, String)> = Vec::new();
    if s.trim().is_empty() {
        return Ok(out);
    }
    for (i, item) in split(s)?.into_iter().enumerate() {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        // An item is `key=value` when what precedes the first `=` looks like an option name;
        // a URL such as `tcp:host:port` or `unix:/a=b` does not.
        let pair = item.split_once('=').filter(|(k, _)| {
            let k = k.trim();
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        let (key, value) = match (pair, main) {
            (Some((k, v)), _) => {
                let k = k.trim();
                if !known.contains(&k) {
                    return Err(OptionError::Unknown {
                        key: k.to_string(),
                        known: known.join(", "),
                    });
                }
                (k.to_string(), v.trim())
            }
            (None, Some(main)) if i == 0 => (main.to_string(), item),
            (None, _) => return Err(OptionError::NotKeyValue(item.to_string())),
        };
        if out.iter().any(|(k, _)| *k == key) {
            return Err(OptionError::Duplicate(key));
        }
        out.push((key, dequote(value)));
    }
    Ok(out)
}

/// Parses `s` and converts each value by its kind into a JSON object for the config decoders
/// (which name what they decode in their errors).
pub(crate) fn to_json(
    s: &str,
    main: Option<&str>,
    spec: &[(&'static str, Kind)],
) -> Result<Value, OptionError> {
    let known: Vec<&str> = spec.iter().map(|(k, _)| *k).collect();
    let mut map = Map::new();
    for (key, value) in parse(s, main, &known)? {
        if value.is_empty() {
            continue;
        }
        let kind = spec
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(Kind::Str, |(_, kind)| *kind);
        let bad = |expected| OptionError::BadValue {
            key: key.clone(),
            value: value.clone(),
            expected,
        };
        let v = match kind {
            Kind::Str => Value::String(value.clone()),
            Kind::Bool => match value.to_ascii_lowercase().as_str() {
                "on" | "true" => Value::Bool(true),
                "off" | "false" => Value::Bool(false),
                _ => return Err(bad("on, off, true or false")),
            },
            Kind::U64 => Value::from(
                value
                    .parse::<u64>()
                    .map_err(|_| bad("a non-negative integer"))?,
            ),
        };
        map.insert(key, v);
    }
    Ok(Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_cloud_hypervisor() {
        assert_eq!(
            split("a=1,b=[x,y],c=\"p,q\"").unwrap(),
            ["a=1", "b=[x,y]", "c=\"p,q\""]
        );
        assert!(matches!(split("a=[1"), Err(OptionError::Unbalanced(_))));
        assert!(matches!(split("a=1]"), Err(OptionError::Unbalanced(_))));
        assert!(matches!(split("a=\"1"), Err(OptionError::Unbalanced(_))));
    }

    #[test]
    fn main_value_keys_and_errors() {
        let known = ["receiver_url", "memory_mode"];
        assert_eq!(
            parse("tcp:0.0.0.0:6000", Some("receiver_url"), &known).unwrap(),
            [("receiver_url".to_string(), "tcp:0.0.0.0:6000".to_string())]
        );
        assert_eq!(
            parse("receiver_url=\"unix:/a,b\"", Some("receiver_url"), &known).unwrap(),
            [("receiver_url".to_string(), "unix:/a,b".to_string())]
        );
        assert_eq!(
            parse("unix:/a,bogus=1", Some("receiver_url"), &known).unwrap_err(),
            OptionError::Unknown {
                key: "bogus".into(),
                known: "receiver_url, memory_mode".into()
            }
        );
        assert_eq!(
            parse("receiver_url=a,receiver_url=b", None, &known).unwrap_err(),
            OptionError::Duplicate("receiver_url".into())
        );
        assert_eq!(
            parse("receiver_url=a,precopy", None, &known).unwrap_err(),
            OptionError::NotKeyValue("precopy".into())
        );
    }

    #[test]
    fn kinds_convert_and_name_the_option() {
        let spec = [("resume", Kind::Bool), ("n", Kind::U64), ("s", Kind::Str)];
        let v = to_json("resume=ON,n=12,s=x,", None, &spec).unwrap();
        assert_eq!(v, serde_json::json!({"resume": true, "n": 12, "s": "x"}));
        let e = to_json("resume=yes", None, &spec).unwrap_err();
        assert_eq!(
            e.to_string(),
            "option `resume`: `yes` is not on, off, true or false"
        );
        let e = to_json("n=-1", None, &spec).unwrap_err();
        assert!(e
            .to_string()
            .contains("option `n`: `-1` is not a non-negative integer"));
        // `key=` counts as absent, as in Cloud Hypervisor.
        assert_eq!(to_json("s=", None, &spec).unwrap(), serde_json::json!({}));
    }
}
