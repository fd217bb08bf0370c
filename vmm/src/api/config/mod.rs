//! Request bodies of the API, decoded and validated.
//!
//! Each body is read into its plain serde form (`Raw…Config`) through [`crate::decode`], whose
//! errors name the field, then checked into the public type with `TryFrom`. As Cloud
//! Hypervisor's server does, unknown fields are ignored and `null` means "not given". Fields that
//! Cloud Hypervisor has and Hourglass does not implement (file descriptors, TLS, NUMA zone
//! updates, post-copy) are accepted when absent, `null` or empty, and refused with a message
//! otherwise. Cloud Hypervisor's enum values (`memory_restore_mode`, `memory_mode`,
//! `timeout_strategy`) are read without regard to case; `clock_policy` is spelled as
//! [`ClockPolicy`]'s `FromStr` wants it.
//!
//! The same structures serialize to the JSON that Cloud Hypervisor's client sends, so our
//! `ch-remote` builds its bodies from them, and they can be built from Cloud Hypervisor's
//! comma-separated option syntax (`source_url=file:///snap,resume=on`) with `from_options`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

pub use hypervisor::tsc::ClockPolicy;

use super::options::{self, OptionError};
pub use super::url::{parse_file_url, MigrationUrl};
use crate::decode::{self, DecodeError, Problem};

mod migration;
pub use migration::{
    MigrationMode, RawReceiveMigrationConfig, RawSendMigrationConfig, ReceiveMigrationConfig,
    SendMigrationConfig, TimeoutStrategy,
};

/// An invalid request body or option string: names the field and what was wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The body is not JSON at all.
    #[error("{what}: body is not valid JSON: {reason}")]
    Json {
        /// What was being decoded (e.g. "vm.restore body").
        what: String,
        /// serde_json's description, with line and column.
        reason: String,
    },
    /// The body is JSON but not an object.
    #[error("{what}: body must be a JSON object, got {got}")]
    NotObject {
        /// What was being decoded.
        what: String,
        /// The JSON value found instead, abbreviated.
        got: String,
    },
    /// A required field is absent or null.
    #[error("{what}: missing required field `{field}`")]
    Missing {
        /// What was being decoded.
        what: String,
        /// The field name.
        field: String,
    },
    /// A field has the wrong JSON type.
    #[error("{what}: field `{field}`: expected {expected}, got {got}")]
    Type {
        /// What was being decoded.
        what: String,
        /// The field name.
        field: String,
        /// The type wanted.
        expected: String,
        /// The value found, abbreviated.
        got: String,
    },
    /// A field has the right type but a value that is not allowed.
    #[error("{what}: field `{field}`: {reason}")]
    Invalid {
        /// What was being decoded.
        what: String,
        /// The field name.
        field: String,
        /// Why the value is refused.
        reason: String,
    },
    /// The option string itself could not be split into `key=value` pairs.
    #[error("{what}: {source}")]
    Options {
        /// What was being decoded.
        what: String,
        /// The syntax error.
        source: OptionError,
    },
}

impl ConfigError {
    /// The error for `what` (e.g. "vm.restore body") from the decoder's.
    fn decoding(what: &str, e: DecodeError) -> Self {
        let what = what.to_string();
        let field = e.path;
        match e.problem {
            Problem::Type { got, .. } if field.is_empty() => Self::NotObject { what, got },
            Problem::Type { expected, got, .. } => Self::Type {
                what,
                field,
                expected,
                got,
            },
            Problem::Missing => Self::Missing { what, field },
            problem => Self::Invalid {
                what,
                field,
                reason: problem.to_string(),
            },
        }
    }
}

/// The option string `s` of `what` as a JSON object for the decoders (see [`options::to_json`]).
fn option_json(
    what: &str,
    s: &str,
    main: Option<&str>,
    spec: &[(&'static str, options::Kind)],
) -> Result<Value, ConfigError> {
    options::to_json(s, main, spec).map_err(|source| ConfigError::Options {
        what: what.to_string(),
        source,
    })
}

/// One of `names` (`(name, value)`), compared without regard to case as Cloud Hypervisor's
/// option parser does; the error lists `allowed`.
fn by_name<T: Copy>(s: &str, names: &[(&str, T)], allowed: &str) -> Result<T, String> {
    names
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(s))
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("`{s}` is not one of {allowed}"))
}

/// How guest memory is brought back on restore (Cloud Hypervisor's `MemoryRestoreMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub enum MemoryRestoreMode {
    /// Guest memory is read from the snapshot into anonymous memory before the VM runs (as in
    /// Cloud Hypervisor): the snapshot may be deleted once the restore returns.
    #[default]
    Copy,
    /// Pages are brought in when the guest touches them. Cloud Hypervisor does it with
    /// userfaultfd; Hourglass maps `memory.bin` copy-on-write (`MAP_PRIVATE`), so the restore
    /// costs the same for any RAM size and the guest's writes never reach the snapshot. The
    /// snapshot must stay in place, unmodified, while the VM runs. (`MapPrivate`, the name an
    /// earlier Hourglass used, is still accepted for it.)
    OnDemand,
}

impl TryFrom<String> for MemoryRestoreMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        use MemoryRestoreMode::*;
        let names = [
            ("Copy", Copy),
            ("OnDemand", OnDemand),
            ("on_demand", OnDemand),
            ("on-demand", OnDemand),
            ("MapPrivate", OnDemand),
            ("map_private", OnDemand),
            ("map-private", OnDemand),
        ];
        by_name(&s, &names, "Copy, OnDemand")
    }
}

/// Body of `PUT /api/v1/vm.resume` (Hourglass extension; Cloud Hypervisor sends no body).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawResumeConfig")]
pub struct ResumeConfig {
    /// Clock policy for the paused interval; `None` means the VMM's default (`wallclock`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_policy: Option<ClockPolicy>,
}

/// Body of `PUT /api/v1/vm.snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawSnapshotConfig")]
pub struct SnapshotConfig {
    /// `file:///dir`: the directory the snapshot is written to.
    pub destination_url: String,
}

impl SnapshotConfig {
    /// The snapshot directory (validated when the config was decoded).
    pub fn destination_dir(&self) -> PathBuf {
        parse_file_url(&self.destination_url).unwrap_or_default()
    }
}

/// Body of `PUT /api/v1/vm.restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRestoreConfig")]
pub struct RestoreConfig {
    /// `file:///dir`: the snapshot directory.
    pub source_url: String,
    /// Touch all guest memory before the VM runs.
    pub prefault: bool,
    /// How memory is brought back.
    pub memory_restore_mode: MemoryRestoreMode,
    /// Resume the VM once restored (otherwise it comes up paused).
    pub resume: bool,
    /// Hourglass extension: the clock policy for the time between snapshot and restore.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_policy: Option<ClockPolicy>,
}

impl RestoreConfig {
    /// The snapshot directory (validated when the config was decoded).
    pub fn source_dir(&self) -> PathBuf {
        parse_file_url(&self.source_url).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// The bodies as sent, and their checks.

/// A Cloud Hypervisor field Hourglass does not implement: fine when absent, `null` or an empty
/// array.
fn unsupported(field: &str, v: &Option<Value>, why: &str) -> Result<(), DecodeError> {
    match v {
        None => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(_) => Err(DecodeError::invalid(
            field,
            format!("not supported by Hourglass ({why})"),
        )),
    }
}

fn required(field: &str, v: Option<String>) -> Result<String, DecodeError> {
    v.ok_or_else(|| DecodeError::missing(field))
}

fn file_url(field: &str, v: Option<String>) -> Result<String, DecodeError> {
    let url = required(field, v)?;
    parse_file_url(&url).map_err(|e| DecodeError::invalid(field, e))?;
    Ok(url)
}

const NO_VFIO: &str = "Hourglass VMs have no VFIO devices";
const NO_ZONES: &str = "Hourglass has no NUMA memory zones";

/// The `vm.resume` body as sent.
#[derive(Deserialize)]
pub struct RawResumeConfig {
    clock_policy: Option<ClockPolicy>,
}

impl TryFrom<RawResumeConfig> for ResumeConfig {
    type Error = DecodeError;
    fn try_from(r: RawResumeConfig) -> Result<Self, DecodeError> {
        Ok(Self {
            clock_policy: r.clock_policy,
        })
    }
}

/// The `vm.snapshot` body as sent.
#[derive(Deserialize)]
pub struct RawSnapshotConfig {
    destination_url: Option<String>,
}

impl TryFrom<RawSnapshotConfig> for SnapshotConfig {
    type Error = DecodeError;
    fn try_from(r: RawSnapshotConfig) -> Result<Self, DecodeError> {
        Ok(Self {
            destination_url: file_url("destination_url", r.destination_url)?,
        })
    }
}

/// The `vm.restore` body as sent.
#[derive(Deserialize)]
pub struct RawRestoreConfig {
    source_url: Option<String>,
    prefault: Option<bool>,
    memory_restore_mode: Option<MemoryRestoreMode>,
    resume: Option<bool>,
    clock_policy: Option<ClockPolicy>,
    net_fds: Option<Value>,
    vfio_fds: Option<Value>,
    iommufd_fd: Option<Value>,
    zone_updates: Option<Value>,
}

impl TryFrom<RawRestoreConfig> for RestoreConfig {
    type Error = DecodeError;
    fn try_from(r: RawRestoreConfig) -> Result<Self, DecodeError> {
        let source_url = file_url("source_url", r.source_url)?;
        unsupported(
            "net_fds",
            &r.net_fds,
            "Hourglass VMs have no network devices",
        )?;
        unsupported("vfio_fds", &r.vfio_fds, NO_VFIO)?;
        unsupported("iommufd_fd", &r.iommufd_fd, NO_VFIO)?;
        unsupported("zone_updates", &r.zone_updates, NO_ZONES)?;
        Ok(Self {
            source_url,
            prefault: r.prefault.unwrap_or(false),
            memory_restore_mode: r.memory_restore_mode.unwrap_or_default(),
            resume: r.resume.unwrap_or(false),
            clock_policy: r.clock_policy,
        })
    }
}

/// Parses a request body as JSON; an empty body reads as `{}` only where `empty_ok`.
pub(crate) fn parse_body(what: &str, body: &[u8], empty_ok: bool) -> Result<Value, ConfigError> {
    if empty_ok && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(body).map_err(|e| ConfigError::Json {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

macro_rules! from_value {
    ($($t:ident: $raw:ident),* $(,)?) => {$(
        impl $t {
            /// Decodes and validates a JSON body; errors start with `what`.
            pub fn from_value(what: &str, v: &Value) -> Result<Self, ConfigError> {
                decode::checked::<$raw, Self>(v).map_err(|e| ConfigError::decoding(what, e))
            }
        }
    )*};
}

from_value!(
    ResumeConfig: RawResumeConfig,
    SnapshotConfig: RawSnapshotConfig,
    RestoreConfig: RawRestoreConfig,
    SendMigrationConfig: RawSendMigrationConfig,
    ReceiveMigrationConfig: RawReceiveMigrationConfig,
);

impl ResumeConfig {
    /// Builds from `clock_policy=frozen` (empty string: defaults).
    pub fn from_options(s: &str) -> Result<Self, ConfigError> {
        let what = "resume options";
        let v = option_json(what, s, None, &[("clock_policy", options::Kind::Str)])?;
        Self::from_value(what, &v)
    }
}

impl SnapshotConfig {
    /// Builds from `file:///dir` or `destination_url=file:///dir`.
    pub fn from_options(s: &str) -> Result<Self, ConfigError> {
        let what = "snapshot options";
        let v = option_json(
            what,
            s,
            Some("destination_url"),
            &[("destination_url", options::Kind::Str)],
        )?;
        Self::from_value(what, &v)
    }
}

impl RestoreConfig {
    /// Builds from Cloud Hypervisor's syntax:
    /// `source_url=file:///dir[,prefault=on|off][,memory_restore_mode=copy|ondemand]`
    /// `[,resume=true|false][,clock_policy=wallclock|frozen]`.
    pub fn from_options(s: &str) -> Result<Self, ConfigError> {
        use options::Kind;
        let what = "restore options";
        let v = option_json(
            what,
            s,
            Some("source_url"),
            &[
                ("source_url", Kind::Str),
                ("prefault", Kind::Bool),
                ("memory_restore_mode", Kind::Str),
                ("resume", Kind::Bool),
                ("clock_policy", Kind::Str),
                ("net_fds", Kind::Str),
                ("vfio_fds", Kind::Str),
                ("iommufd_fd", Kind::Str),
                ("zone_updates", Kind::Str),
            ],
        )?;
        Self::from_value(what, &v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn restore(v: Value) -> Result<RestoreConfig, ConfigError> {
        RestoreConfig::from_value("vm.restore body", &v)
    }

    #[test]
    fn restore_accepts_cloud_hypervisor_body_with_nulls_and_unknown_fields() {
        // What Cloud Hypervisor's ch-remote serializes for `restore source_url=...`.
        let v = json!({"source_url": "file:///tmp/snap", "prefault": false,
            "memory_restore_mode": "Copy", "net_fds": null, "vfio_fds": null,
            "resume": true, "zone_updates": [], "something_new": 7});
        let c = restore(v).unwrap();
        assert_eq!(c.source_url, "file:///tmp/snap");
        assert_eq!(c.source_dir(), PathBuf::from("/tmp/snap"));
        assert!(c.resume);
        assert!(!c.prefault);
        assert_eq!(c.memory_restore_mode, MemoryRestoreMode::Copy);
        assert_eq!(c.clock_policy, None);
    }

    #[test]
    fn restore_errors_name_the_field() {
        let e = restore(json!({"source_url": "file:///s", "resume": "yes"})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vm.restore body: field `resume`: expected a boolean, got a string \"yes\""
        );
        let e = restore(json!({"resume": true})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vm.restore body: missing required field `source_url`"
        );
        let e = restore(json!({"source_url": "/tmp/snap"})).unwrap_err();
        assert!(e.to_string().contains("field `source_url`"), "{e}");
        let e =
            restore(json!({"source_url": "file:///s", "clock_policy": "sometimes"})).unwrap_err();
        assert!(e
            .to_string()
            .contains("`sometimes` is not one of wallclock, frozen"));
        let e = restore(json!({"source_url": "file:///s", "net_fds": [{"id": "n", "num_fds": 1}]}))
            .unwrap_err();
        assert!(
            e.to_string().contains("field `net_fds`: not supported"),
            "{e}"
        );
        let e = restore(json!(["source_url"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vm.restore body: body must be a JSON object, got an array"
        );
    }

    #[test]
    fn clock_policy_is_spelled_exactly() {
        let resume = |v: Value| ResumeConfig::from_value("vm.resume body", &v);
        assert_eq!(
            resume(json!({"clock_policy": "frozen", "other": 1})).unwrap(),
            ResumeConfig {
                clock_policy: Some(ClockPolicy::Frozen)
            }
        );
        assert_eq!(
            resume(json!({"clock_policy": "Frozen"})).unwrap_err().to_string(),
            "vm.resume body: field `clock_policy`: clock policy: `Frozen` is not one of wallclock, frozen"
        );
        assert_eq!(
            resume(json!({"clock_policy": 12})).unwrap_err().to_string(),
            "vm.resume body: field `clock_policy`: expected a string, got a number 12"
        );
        // Cloud Hypervisor's own enums keep their case-insensitive names.
        let c = restore(json!({"source_url": "file:///s", "memory_restore_mode": "map_private"}));
        assert_eq!(c.unwrap().memory_restore_mode, MemoryRestoreMode::OnDemand);
        let e = restore(json!({"source_url": "file:///s", "memory_restore_mode": "Lazy"}));
        assert_eq!(
            e.unwrap_err().to_string(),
            "vm.restore body: field `memory_restore_mode`: `Lazy` is not one of Copy, OnDemand"
        );
    }

    #[test]
    fn serialized_restore_round_trips() {
        let c = RestoreConfig::from_options(
            "source_url=file:///s,prefault=on,memory_restore_mode=ondemand,resume=true,clock_policy=frozen",
        )
        .unwrap();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            r#"{"source_url":"file:///s","prefault":true,"memory_restore_mode":"OnDemand","resume":true,"clock_policy":"frozen"}"#
        );
        let back: RestoreConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, c);
    }
}
