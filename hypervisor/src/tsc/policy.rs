//! The operator's clock policy for a thaw.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// What the guest sees of the time the VM spent frozen.
///
/// Spelled `wallclock` or `frozen`, exactly: lower case, no surrounding whitespace, in every
/// place a policy is read (the `--clock-policy` option, API bodies, `ch-remote` options, saved
/// configurations). [`FromStr`] is the one parser; serde reads and writes the same names through
/// it and [`ClockPolicy::name`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ClockPolicy {
    /// The guest sees the real elapsed time (TSC and kvmclock jump forward).
    #[default]
    Wallclock,
    /// The guest sees no time pass (TSC and kvmclock continue where they stopped).
    Frozen,
}

impl ClockPolicy {
    /// Every policy, in the order error messages list them.
    pub const ALL: [ClockPolicy; 2] = [ClockPolicy::Wallclock, ClockPolicy::Frozen];

    /// The policy's name as accepted by [`FromStr`] and serde.
    pub const fn name(self) -> &'static str {
        match self {
            ClockPolicy::Wallclock => "wallclock",
            ClockPolicy::Frozen => "frozen",
        }
    }
}

impl fmt::Display for ClockPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for ClockPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for ClockPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// An unknown clock policy name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("clock policy: `{0}` is not one of wallclock, frozen")]
pub struct ParsePolicyError(
    /// The name that was given.
    pub String,
);

impl FromStr for ClockPolicy {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| ParsePolicyError(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        for p in [ClockPolicy::Wallclock, ClockPolicy::Frozen] {
            assert_eq!(p.to_string().parse::<ClockPolicy>(), Ok(p));
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{p}\""));
            assert_eq!(serde_json::from_str::<ClockPolicy>(&json).unwrap(), p);
        }
        assert_eq!(ClockPolicy::default(), ClockPolicy::Wallclock);
        for bad in ["Frozen", " frozen", "frozen\n", "", "sometimes"] {
            let err = bad.parse::<ClockPolicy>().unwrap_err().to_string();
            assert_eq!(
                err,
                format!("clock policy: `{bad}` is not one of wallclock, frozen")
            );
            let json = serde_json::to_string(bad).unwrap();
            let err = serde_json::from_str::<ClockPolicy>(&json).unwrap_err();
            assert!(err
                .to_string()
                .starts_with(&format!("clock policy: `{bad}`")));
        }
        assert!(serde_json::from_str::<ClockPolicy>("12").is_err());
    }
}
