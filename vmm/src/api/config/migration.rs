//! The migration bodies: `vm.send-migration` and `vm.receive-migration`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    by_name, options, required, unsupported, ClockPolicy, ConfigError, MigrationUrl, NO_VFIO,
    NO_ZONES,
};
use crate::decode::DecodeError;

/// How memory moves during migration (Cloud Hypervisor's `MigrationMode`). Hourglass only
/// implements pre-copy; `Postcopy` is recognised so that it can be refused by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub enum MigrationMode {
    /// All memory is sent before the destination runs.
    #[default]
    Precopy,
    /// The destination runs first and faults pages in (not supported).
    Postcopy,
}

impl TryFrom<String> for MigrationMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let names = [("Precopy", Self::Precopy), ("Postcopy", Self::Postcopy)];
        by_name(&s, &names, "Precopy, Postcopy")
    }
}

/// What to do when a migration reaches its timeout (Cloud Hypervisor's `TimeoutStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub enum TimeoutStrategy {
    /// Abort the migration; the VM keeps running on the source.
    #[default]
    Cancel,
    /// Finish the migration even if the downtime target cannot be met.
    Ignore,
}

impl TryFrom<String> for TimeoutStrategy {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let names = [("Cancel", Self::Cancel), ("Ignore", Self::Ignore)];
        by_name(&s, &names, "Cancel, Ignore")
    }
}

/// Body of `PUT /api/v1/vm.send-migration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawSendMigrationConfig")]
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
#[serde(try_from = "RawReceiveMigrationConfig")]
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

fn migration_url(field: &str, v: Option<String>) -> Result<(String, MigrationUrl), DecodeError> {
    let url = required(field, v)?;
    let parsed = MigrationUrl::parse(&url).map_err(|e| DecodeError::invalid(field, e))?;
    Ok((url, parsed))
}

fn precopy(mode: Option<MigrationMode>) -> Result<MigrationMode, DecodeError> {
    match mode.unwrap_or_default() {
        MigrationMode::Precopy => Ok(MigrationMode::Precopy),
        MigrationMode::Postcopy => Err(DecodeError::invalid(
            "memory_mode",
            "Postcopy migration is not supported by Hourglass; use Precopy",
        )),
    }
}

fn positive(field: &str, v: Option<u64>, default: u64) -> Result<u64, DecodeError> {
    match v {
        None => Ok(default),
        Some(0) => Err(DecodeError::invalid(field, "must be at least 1")),
        Some(n) => Ok(n),
    }
}

const NO_TLS: &str = "migration over TLS is not implemented";

/// The `vm.send-migration` body as sent.
#[derive(Deserialize)]
pub struct RawSendMigrationConfig {
    destination_url: Option<String>,
    local: Option<bool>,
    preserve_source: Option<bool>,
    downtime_ms: Option<u64>,
    timeout_s: Option<u64>,
    timeout_strategy: Option<TimeoutStrategy>,
    connections: Option<u64>,
    tls_dir: Option<Value>,
    memory_mode: Option<MigrationMode>,
}

impl TryFrom<RawSendMigrationConfig> for SendMigrationConfig {
    type Error = DecodeError;
    fn try_from(r: RawSendMigrationConfig) -> Result<Self, DecodeError> {
        let (destination_url, dest) = migration_url("destination_url", r.destination_url)?;
        let unix = matches!(dest, MigrationUrl::Unix(_));
        unsupported("tls_dir", &r.tls_dir, NO_TLS)?;
        let local = r.local.unwrap_or(false);
        if local && !unix {
            return Err(DecodeError::invalid(
                "local",
                "local migration needs a unix: destination_url",
            ));
        }
        let connections = positive("connections", r.connections, 1)?;
        let connections = u32::try_from(connections)
            .ok()
            .filter(|n| *n <= Self::MAX_CONNECTIONS)
            .ok_or_else(|| {
                let most = Self::MAX_CONNECTIONS;
                DecodeError::invalid("connections", format!("{connections} is more than {most}"))
            })?;
        if connections > 1 && unix {
            return Err(DecodeError::invalid(
                "connections",
                "more than one connection needs a tcp: destination_url",
            ));
        }
        Ok(Self {
            destination_url,
            local,
            preserve_source: r.preserve_source.unwrap_or(false),
            downtime_ms: positive("downtime_ms", r.downtime_ms, Self::DEFAULT_DOWNTIME_MS)?,
            timeout_s: positive("timeout_s", r.timeout_s, Self::DEFAULT_TIMEOUT_S)?,
            timeout_strategy: r.timeout_strategy.unwrap_or_default(),
            connections,
            memory_mode: precopy(r.memory_mode)?,
        })
    }
}

/// The `vm.receive-migration` body as sent.
#[derive(Deserialize)]
pub struct RawReceiveMigrationConfig {
    receiver_url: Option<String>,
    tls_dir: Option<Value>,
    memory_mode: Option<MigrationMode>,
    clock_policy: Option<ClockPolicy>,
    vfio_fds: Option<Value>,
    iommufd_fd: Option<Value>,
    zone_updates: Option<Value>,
}

impl TryFrom<RawReceiveMigrationConfig> for ReceiveMigrationConfig {
    type Error = DecodeError;
    fn try_from(r: RawReceiveMigrationConfig) -> Result<Self, DecodeError> {
        let (receiver_url, _) = migration_url("receiver_url", r.receiver_url)?;
        unsupported("tls_dir", &r.tls_dir, NO_TLS)?;
        unsupported("vfio_fds", &r.vfio_fds, NO_VFIO)?;
        unsupported("iommufd_fd", &r.iommufd_fd, NO_VFIO)?;
        unsupported("zone_updates", &r.zone_updates, NO_ZONES)?;
        Ok(Self {
            receiver_url,
            memory_mode: precopy(r.memory_mode)?,
            clock_policy: r.clock_policy,
        })
    }
}

impl SendMigrationConfig {
    /// Builds from `unix:/path` or Cloud Hypervisor's syntax:
    /// `destination_url=<url>[,local=on|off][,preserve_source=on|off][,downtime_ms=N]`
    /// `[,timeout_s=N][,timeout_strategy=cancel|ignore][,connections=N][,memory_mode=precopy]`.
    pub fn from_options(s: &str) -> Result<Self, ConfigError> {
        use options::Kind;
        let what = "send-migration options";
        let v = super::option_json(
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
    /// Builds from `unix:/path` or `receiver_url=<url>[,memory_mode=precopy]`
    /// `[,clock_policy=wallclock|frozen]`.
    pub fn from_options(s: &str) -> Result<Self, ConfigError> {
        use options::Kind;
        let what = "receive-migration options";
        let v = super::option_json(
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
