//! Request bodies of the API, decoded and validated.
//!
//! Every body is first read as a JSON object and then taken apart field by field, so that an
//! error names the field and what was wrong with it (serde's own messages name neither). Unknown
//! fields are ignored and `null` means "not given", as Cloud Hypervisor's server does; fields that
//! Cloud Hypervisor has and Hourglass does not implement (file descriptors, TLS, NUMA zone
//! updates, post-copy) are accepted when absent, `null` or empty, and refused with a message
//! otherwise.
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
        /// The JSON type found instead.
        got: &'static str,
    },
    /// A required field is absent or null.
    #[error("{what}: missing required field `{field}`")]
    Missing {
        /// What was being decoded.
        what: String,
        /// The field name.
        field: &'static str,
    },
    /// A field has the wrong JSON type.
    #[error("{what}: field `{field}`: expected {expected}, got {got}")]
    Type {
        /// What was being decoded.
        what: String,
        /// The field name.
        field: &'static str,
        /// The type wanted.
        expected: &'static str,
        /// The value found, abbreviated.
        got: String,
    },
    /// A field has the right type but a value that is not allowed.
    #[error("{what}: field `{field}`: {reason}")]
    Invalid {
        /// What was being decoded.
        what: String,
        /// The field name.
        field: &'static str,
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

/// How guest memory is brought back on restore (Cloud Hypervisor's `MemoryRestoreMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MemoryRestoreMode {
    /// Guest memory is read from the snapshot into anonymous memory before the VM runs (as in
    /// Cloud Hypervisor): the snapshot may be deleted once the restore returns.
    #[default]
    Copy,
    /// Pages are brought in when the guest touches them (Cloud Hypervisor does it with
    /// userfaultfd; Hourglass maps `memory.bin` copy-on-write, as for `MapPrivate`). The snapshot
    /// must stay in place while the VM runs.
    OnDemand,
    /// Hourglass extension: map `memory.bin` `MAP_PRIVATE` (copy-on-write): restore time does
    /// not grow with RAM size and the guest's writes never reach the snapshot.
    MapPrivate,
}

impl MemoryRestoreMode {
    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "copy" => Some(Self::Copy),
            "ondemand" | "on_demand" | "on-demand" => Some(Self::OnDemand),
            "mapprivate" | "map_private" | "map-private" => Some(Self::MapPrivate),
            _ => None,
        }
    }
}

/// How memory moves during migration (Cloud Hypervisor's `MigrationMode`). Hourglass only
/// implements pre-copy; `Postcopy` is recognised so that it can be refused by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MigrationMode {
    /// All memory is sent before the destination runs.
    #[default]
    Precopy,
    /// The destination runs first and faults pages in (not supported).
    Postcopy,
}

/// What to do when a migration reaches its timeout (Cloud Hypervisor's `TimeoutStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TimeoutStrategy {
    /// Abort the migration; the VM keeps running on the source.
    #[default]
    Cancel,
    /// Finish the migration even if the downtime target cannot be met.
    Ignore,
}

impl TimeoutStrategy {
    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cancel" => Some(Self::Cancel),
            "ignore" => Some(Self::Ignore),
            _ => None,
        }
    }
}

/// A migration endpoint: `unix:/path` or `tcp:host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP endpoint; `host` has no brackets (an IPv6 literal is written `tcp:[::1]:6000`).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port, never 0.
        port: u16,
    },
}

impl MigrationUrl {
    /// Parses `unix:/path` or `tcp:host:port`; the error says what is wrong.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("`{url}`: unix: URL has an empty path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("`{url}`: expected tcp:<host>:<port>"))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(format!("`{url}`: tcp: URL has an empty host"));
            }
            let port: u16 = port
                .parse()
                .map_err(|_| format!("`{url}`: port `{port}` is not a number from 1 to 65535"))?;
            if port == 0 {
                return Err(format!("`{url}`: port 0 is not allowed"));
            }
            return Ok(Self::Tcp {
                host: host.to_string(),
                port,
            });
        }
        Err(format!(
            "`{url}`: expected unix:<path> or tcp:<host>:<port>"
        ))
    }

    /// The `host:port` string for `ToSocketAddrs` (IPv6 literals bracketed); `None` for Unix.
    pub fn tcp_address(&self) -> Option<String> {
        match self {
            Self::Unix(_) => None,
            Self::Tcp { host, port } if host.contains(':') => Some(format!("[{host}]:{port}")),
            Self::Tcp { host, port } => Some(format!("{host}:{port}")),
        }
    }
}

/// Parses a `file:///absolute/dir` URL into the directory path.
pub fn parse_file_url(url: &str) -> Result<PathBuf, String> {
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| format!("`{url}`: expected a file:///<absolute directory> URL"))?;
    if !path.starts_with('/') {
        return Err(format!(
            "`{url}`: the path after file:// must be absolute (file:///dir)"
        ));
    }
    if path.len() == 1 {
        return Err(format!("`{url}`: the snapshot directory cannot be /"));
    }
    Ok(PathBuf::from(path))
}

/// Body of `PUT /api/v1/vm.resume` (Hourglass extension; Cloud Hypervisor sends no body).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Value")]
pub struct ResumeConfig {
    /// Clock policy for the paused interval; `None` means the VMM's default (`wallclock`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_policy: Option<ClockPolicy>,
}

/// Body of `PUT /api/v1/vm.snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Value")]
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
#[serde(try_from = "Value")]
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

/// Body of `PUT /api/v1/vm.send-migration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Value")]
pub struct SendMigrationConfig {
    /// `unix:/path` or `tcp:host:port` of the receiving VMM.
    pub destination_url: String,
    /// Send guest memory by file descriptor over a local Unix socket instead of copying it.
    pub local: bool,
    /// Keep the source VM (paused) after a successful migration.
    pub preserve_source: bool,
    /// Target downtime in milliseconds (default 300, at least 1).
    pub downtime_ms: u64,
    /// Total time allowed in seconds (default 3600, at least 1).
    pub timeout_s: u64,
    /// What to do when the timeout is reached.
    pub timeout_strategy: TimeoutStrategy,
    /// Parallel connections (1 to 128; more than 1 only over tcp:).
    pub connections: u32,
    /// Always `Precopy` once validated.
    pub memory_mode: MigrationMode,
}

impl SendMigrationConfig {
    /// Default downtime target, in milliseconds (Cloud Hypervisor's and QEMU's).
    pub const DEFAULT_DOWNTIME_MS: u64 = 300;
    /// Default migration timeout, in seconds.
    pub const DEFAULT_TIMEOUT_S: u64 = 3600;
    /// Most parallel connections accepted.
    pub const MAX_CONNECTIONS: u32 = 128;

    /// A configuration with every optional field at its default.
    pub fn new(destination_url: &str) -> Self {
        Self {
            destination_url: destination_url.to_string(),
            local: false,
            preserve_source: false,
            downtime_ms: Self::DEFAULT_DOWNTIME_MS,
            timeout_s: Self::DEFAULT_TIMEOUT_S,
            timeout_strategy: TimeoutStrategy::Cancel,
            connections: 1,
            memory_mode: MigrationMode::Precopy,
        }
    }

    /// The destination (validated when the config was decoded).
    pub fn destination(&self) -> Result<MigrationUrl, String> {
        MigrationUrl::parse(&self.destination_url)
    }

    /// The downtime target.
    pub fn downtime(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.downtime_ms)
    }

    /// The total timeout.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_s)
    }
}

/// Body of `PUT /api/v1/vm.receive-migration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Value")]
pub struct ReceiveMigrationConfig {
    /// `unix:/path` or `tcp:host:port` to listen on.
    pub receiver_url: String,
    /// Always `Precopy` once validated.
    pub memory_mode: MigrationMode,
    /// Hourglass extension: clock policy applied when the migrated VM is thawed (default
    /// `wallclock`, the only policy that keeps the guest's time right across hosts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_policy: Option<ClockPolicy>,
}

impl ReceiveMigrationConfig {
    /// The listening endpoint (validated when the config was decoded).
    pub fn receiver(&self) -> Result<MigrationUrl, String> {
        MigrationUrl::parse(&self.receiver_url)
    }
}

// ---------------------------------------------------------------------------------------------
// Field extraction.

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn abbreviate(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 40 {
        let mut cut = 40;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    format!("{} {}", json_type(v), s)
}

/// A JSON object being taken apart, with the name used in error messages.
struct Fields<'a> {
    what: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn get(&self, field: &'static str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn type_error(&self, field: &'static str, expected: &'static str, v: &Value) -> ConfigError {
        ConfigError::Type {
            what: self.what.to_string(),
            field,
            expected,
            got: abbreviate(v),
        }
    }

    fn invalid(&self, field: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            what: self.what.to_string(),
            field,
            reason: reason.into(),
        }
    }

    fn string(&self, field: &'static str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.type_error(field, "a string", v)),
        }
    }

    fn required_string(&self, field: &'static str) -> Result<&'a str, ConfigError> {
        self.string(field)?.ok_or_else(|| ConfigError::Missing {
            what: self.what.to_string(),
            field,
        })
    }

    fn bool(&self, field: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.type_error(field, "a boolean", v)),
        }
    }

    fn u64(&self, field: &'static str) -> Result<Option<u64>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v @ Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.type_error(field, "a non-negative integer", v)),
            Some(v) => Err(self.type_error(field, "a non-negative integer", v)),
        }
    }

    fn enumerated<T>(
        &self,
        field: &'static str,
        allowed: &'static str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        match self.string(field)? {
            None => Ok(None),
            Some(s) => parse(s)
                .map(Some)
                .ok_or_else(|| self.invalid(field, format!("`{s}` is not one of {allowed}"))),
        }
    }

    fn clock_policy(&self) -> Result<Option<ClockPolicy>, ConfigError> {
        self.enumerated("clock_policy", "wallclock, frozen", |s| s.parse().ok())
    }

    fn migration_mode(&self) -> Result<MigrationMode, ConfigError> {
        let mode = self.enumerated("memory_mode", "Precopy, Postcopy", |s| {
            match s.to_ascii_lowercase().as_str() {
                "precopy" => Some(MigrationMode::Precopy),
                "postcopy" => Some(MigrationMode::Postcopy),
                _ => None,
            }
        })?;
        if mode == Some(MigrationMode::Postcopy) {
            return Err(self.invalid(
                "memory_mode",
                "Postcopy migration is not supported by Hourglass; use Precopy",
            ));
        }
        Ok(MigrationMode::Precopy)
    }

    /// Refuses a Cloud Hypervisor field that Hourglass does not implement unless it is absent,
    /// null, or an empty array.
    fn unsupported(&self, field: &'static str, why: &str) -> Result<(), ConfigError> {
        match self.get(field) {
            None => Ok(()),
            Some(Value::Array(a)) if a.is_empty() => Ok(()),
            Some(_) => Err(self.invalid(field, format!("not supported by Hourglass ({why})"))),
        }
    }
}

fn object<'a>(what: &str, v: &'a Value) -> Result<&'a Map<String, Value>, ConfigError> {
    v.as_object().ok_or_else(|| ConfigError::NotObject {
        what: what.to_string(),
        got: json_type(v),
    })
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

impl ResumeConfig {
    /// Validates a decoded JSON body.
    pub fn from_value(what: &str, v: &Value) -> Result<Self, ConfigError> {
        let f = Fields {
            what,
            map: object(what, v)?,
        };
        Ok(Self {
            clock_policy: f.clock_policy()?,
        })
    }

    /// Builds from `clock_policy=frozen` (empty string: defaults).
    pub fn from_options(s: &str) -> Result<Self, ConfigError> {
        let what = "resume options";
        let v = options::to_json(what, s, None, &[("clock_policy", options::Kind::Str)])?;
        Self::from_value(what, &v)
    }
}

impl SnapshotConfig {
    /// Validates a decoded JSON body.
    pub fn from_value(what: &str, v: &Value) -> Result<Self, ConfigError> {
        let f = Fields {
            what,
            map: object(what, v)?,
        };
        let url = f.required_string("destination_url")?;
        parse_file_url(url).map_err(|e| f.invalid("destination_url", e))?;
        Ok(Self {
            destination_url: url.to_string(),
        })
    }

    /// Builds from `file:///dir` or `destination_url=file:///dir`.
    pub fn from_options(s: &str) -> Result<Self, ConfigError> {
        let what = "snapshot options";
        let v = options::to_json(
            what,
            s,
            Some("destination_url"),
            &[("destination_url", options::Kind::Str)],
        )?;
        Self::from_value(what, &v)
    }
}

impl RestoreConfig {
    /// Validates a decoded JSON body.
    pub fn from_value(what: &str, v: &Value) -> Result<Self, ConfigError> {
        let f = Fields {
            what,
            map: object(what, v)?,
        };
        let url = f.required_string("source_url")?;
        parse_file_url(url).map_err(|e| f.invalid("source_url", e))?;
        f.unsupported("net_fds", "Hourglass VMs have no network devices")?;
        f.unsupported("vfio_fds", "Hourglass VMs have no VFIO devices")?;
        f.unsupported("iommufd_fd", "Hourglass VMs have no VFIO devices")?;
        f.unsupported("zone_updates", "Hourglass has no NUMA memory zones")?;
        Ok(Self {
            source_url: url.to_string(),
            prefault: f.bool("prefault")?.unwrap_or(false),
            memory_restore_mode: f
                .enumerated(
                    "memory_restore_mode",
                    "Copy, OnDemand, MapPrivate",
                    MemoryRestoreMode::parse,
                )?
                .unwrap_or_default(),
            resume: f.bool("resume")?.unwrap_or(false),
            clock_policy: f.clock_policy()?,
        })
    }

    /// Builds from Cloud Hypervisor's syntax:
    /// `source_url=file:///dir[,prefault=on|off][,memory_restore_mode=copy|ondemand|map_private]`
    /// `[,resume=true|false][,clock_policy=wallclock|frozen]`.
    pub fn from_options(s: &str) -> Result<Self, ConfigError> {
        use options::Kind;
        let what = "restore options";
        let v = options::to_json(
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

impl SendMigrationConfig {
    /// Validates a decoded JSON body.
    pub fn from_value(what: &str, v: &Value) -> Result<Self, ConfigError> {
        let f = Fields {
            what,
            map: object(what, v)?,
        };
        let url = f.required_string("destination_url")?;
        let dest = MigrationUrl::parse(url).map_err(|e| f.invalid("destination_url", e))?;
        f.unsupported("tls_dir", "migration over TLS is not implemented")?;
        let local = f.bool("local")?.unwrap_or(false);
        if local && !matches!(dest, MigrationUrl::Unix(_)) {
            return Err(f.invalid("local", "local migration needs a unix: destination_url"));
        }
        let positive = |field: &'static str, default: u64| -> Result<u64, ConfigError> {
            match f.u64(field)? {
                None => Ok(default),
                Some(0) => Err(f.invalid(field, "must be at least 1")),
                Some(n) => Ok(n),
            }
        };
        let downtime_ms = positive("downtime_ms", Self::DEFAULT_DOWNTIME_MS)?;
        let timeout_s = positive("timeout_s", Self::DEFAULT_TIMEOUT_S)?;
        let connections = positive("connections", 1)?;
        if connections > u64::from(Self::MAX_CONNECTIONS) {
            return Err(f.invalid(
                "connections",
                format!("{connections} is more than {}", Self::MAX_CONNECTIONS),
            ));
        }
        if connections > 1 && matches!(dest, MigrationUrl::Unix(_)) {
            return Err(f.invalid(
                "connections",
                "more than one connection needs a tcp: destination_url",
            ));
        }
        Ok(Self {
            destination_url: url.to_string(),
            local,
            preserve_source: f.bool("preserve_source")?.unwrap_or(false),
            downtime_ms,
            timeout_s,
            timeout_strategy: f
                .enumerated("timeout_strategy", "Cancel, Ignore", TimeoutStrategy::parse)?
                .unwrap_or_default(),
            // Checked against the bound above.
            connections: connections as u32,
            memory_mode: f.migration_mode()?,
        })
    }

    /// Builds from `unix:/path` or Cloud Hypervisor's syntax:
    /// `destination_url=<url>[,local=on|off][,preserve_source=on|off][,downtime_ms=N]`
    /// `[,timeout_s=N][,timeout_strategy=cancel|ignore][,connections=N][,memory_mode=precopy]`.
    pub fn from_options(s: &str) -> Result<Self, ConfigError> {
        use options::Kind;
        let what = "send-migration options";
        let v = options::to_json(
            what,
            s,
            Some("destination_url"),
            &[
                ("destination_url", Kind::Str),
                ("local", Kind::Bool),
                ("preserve_source", Kind::Bool),
                ("downtime_ms", Kind::U64),
                ("timeout_s", Kind::U64),
                ("timeout_strategy", Kind::Str),
                ("connections", Kind::U64),
                ("tls_dir", Kind::Str),
                ("memory_mode", Kind::Str),
            ],
        )?;
        Self::from_value(what, &v)
    }
}

impl ReceiveMigrationConfig {
    /// Validates a decoded JSON body.
    pub fn from_value(what: &str, v: &Value) -> Result<Self, ConfigError> {
        let f = Fields {
            what,
            map: object(what, v)?,
        };
        let url = f.required_string("receiver_url")?;
        MigrationUrl::parse(url).map_err(|e| f.invalid("receiver_url", e))?;
        f.unsupported("tls_dir", "migration over TLS is not implemented")?;
        f.unsupported("vfio_fds", "Hourglass VMs have no VFIO devices")?;
        f.unsupported("iommufd_fd", "Hourglass VMs have no VFIO devices")?;
        f.unsupported("zone_updates", "Hourglass has no NUMA memory zones")?;
        Ok(Self {
            receiver_url: url.to_string(),
            memory_mode: f.migration_mode()?,
            clock_policy: f.clock_policy()?,
        })
    }

    /// Builds from `unix:/path` or `receiver_url=<url>[,memory_mode=precopy]`
    /// `[,clock_policy=wallclock|frozen]`.
    pub fn from_options(s: &str) -> Result<Self, ConfigError> {
        use options::Kind;
        let what = "receive-migration options";
        let v = options::to_json(
            what,
            s,
            Some("receiver_url"),
            &[
                ("receiver_url", Kind::Str),
                ("tls_dir", Kind::Str),
                ("memory_mode", Kind::Str),
                ("clock_policy", Kind::Str),
                ("vfio_fds", Kind::Str),
                ("iommufd_fd", Kind::Str),
                ("zone_updates", Kind::Str),
            ],
        )?;
        Self::from_value(what, &v)
    }
}

macro_rules! try_from_value {
    ($($t:ty => $what:literal),* $(,)?) => {$(
        impl TryFrom<Value> for $t {
            type Error = ConfigError;
            fn try_from(v: Value) -> Result<Self, ConfigError> {
                Self::from_value($what, &v)
            }
        }
    )*};
}

try_from_value!(
    ResumeConfig => "resume config",
    SnapshotConfig => "snapshot config",
    RestoreConfig => "restore config",
    SendMigrationConfig => "send-migration config",
    ReceiveMigrationConfig => "receive-migration config",
);

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

    #[test]
    fn send_migration_defaults_and_limits() {
        let c = SendMigrationConfig::from_value(
            "b",
            &json!({"destination_url": "tcp:[::1]:6000", "tls_dir": null}),
        )
        .unwrap();
        assert_eq!(c, {
            let mut d = SendMigrationConfig::new("tcp:[::1]:6000");
            d.destination_url = "tcp:[::1]:6000".into();
            d
        });
        assert_eq!(
            c.destination().unwrap().tcp_address().unwrap(),
            "[::1]:6000"
        );
        for (body, needle) in [
            (
                json!({"destination_url": "unix:/s", "memory_mode": "Postcopy"}),
                "Postcopy migration is not supported",
            ),
            (
                json!({"destination_url": "unix:/s", "downtime_ms": 0}),
                "field `downtime_ms`: must be at least 1",
            ),
            (
                json!({"destination_url": "unix:/s", "downtime_ms": -5}),
                "field `downtime_ms`: expected a non-negative integer",
            ),
            (
                json!({"destination_url": "tcp:h:1", "connections": 129}),
                "129 is more than 128",
            ),
            (
                json!({"destination_url": "unix:/s", "connections": 2}),
                "needs a tcp:",
            ),
            (
                json!({"destination_url": "tcp:h:1", "local": true}),
                "local migration needs a unix:",
            ),
            (json!({"destination_url": "tcp:h:0"}), "port 0"),
            (json!({"destination_url": "tcp:h:x"}), "port `x`"),
            (
                json!({"destination_url": "http://h"}),
                "expected unix:<path> or tcp:<host>:<port>",
            ),
            (
                json!({"destination_url": "unix:/s", "tls_dir": "/certs"}),
                "field `tls_dir`: not supported",
            ),
        ] {
            let e = SendMigrationConfig::from_value("b", &body)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn receive_migration_refuses_postcopy_clearly() {
        let e = ReceiveMigrationConfig::from_value(
            "vm.receive-migration body",
            &json!({"receiver_url": "unix:/r", "memory_mode": "Postcopy"}),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "vm.receive-migration body: field `memory_mode`: Postcopy migration is not supported by Hourglass; use Precopy"
        );
        let c = ReceiveMigrationConfig::from_options("unix:/r").unwrap();
        assert_eq!(c.receiver().unwrap(), MigrationUrl::Unix("/r".into()));
    }

    #[test]
    fn file_urls() {
        assert_eq!(
            parse_file_url("file:///a/b").unwrap(),
            PathBuf::from("/a/b")
        );
        assert!(parse_file_url("file://a/b").is_err());
        assert!(parse_file_url("file:///").is_err());
        assert!(parse_file_url("/a/b").is_err());
    }
}
