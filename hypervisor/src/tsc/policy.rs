//! The operator's clock policy for a thaw.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// What the guest sees of the time the VM spent frozen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockPolicy {
    /// The guest sees the real elapsed time (TSC and kvmclock jump forward).
    #[default]
    Wallclock,
    /// The guest sees no time pass (TSC and kvmclock continue where they stopped).
    Frozen,
}

impl ClockPolicy {
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

/// An unknown clock policy name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("clock policy: expected \"wallclock\" or \"frozen\", got {0:?}")]
pub struct ParsePolicyError(
    /// The name that was given.
    pub String,
);

impl FromStr for ClockPolicy {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "wallclock" => Ok(ClockPolicy::Wallclock),
            "frozen" => Ok(ClockPolicy::Frozen),
            other => Err(ParsePolicyError(other.to_string())),
        }
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
        let err = "Frozen".parse::<ClockPolicy>().unwrap_err().to_string();
        assert!(
            err.contains("clock policy") && err.contains("Frozen"),
            "{err}"
        );
    }
}
