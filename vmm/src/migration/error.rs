//! [`MigrationError`]: why a migration failed, on either side.

use super::ProtocolError;
use crate::vm::VmError;

/// A failed migration. The source VM keeps running after any of these but [`InDoubt`]; the
/// destination has discarded what it built.
///
/// [`InDoubt`]: MigrationError::InDoubt
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The URL does not parse.
    #[error("bad migration URL: {0}")]
    Url(String),
    /// The destination could not be reached.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The receiving socket could not be opened.
    #[error("cannot listen on {endpoint}: {source}")]
    Listen {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The conversation failed (bad frame, dropped connection, the peer's error).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The VM could not be paused, resumed, read or rebuilt.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A hypervisor call of the migration failed.
    #[error("{0}")]
    Hypervisor(String),
    /// The state could not be encoded.
    #[error("cannot encode the VM state: {0}")]
    Encode(String),
    /// The VM is in no state to migrate.
    #[error("{0}")]
    InvalidState(String),
    /// The migration ran past its `timeout_s`.
    #[error("the migration did not finish within timeout_s = {0} s")]
    Timeout(u64),
    /// The peer sent nothing for as long as this side waits for one frame or answer.
    #[error("the {peer} sent nothing for {after:?} while this side waited to {what}; it is stalled or gone")]
    Silent {
        /// "destination" or "source".
        peer: &'static str,
        /// How long this side waited.
        after: std::time::Duration,
        /// What it waited for.
        what: &'static str,
    },
    /// `Complete` was sent but the destination's answer never came: it may be running the VM.
    /// The source stays paused (never two running copies); the operator decides.
    #[error(
        "the destination may be running the VM: `Complete` was sent but its answer never came \
         ({0}); the source VM stays paused: check the destination, then `vm.resume` or \
         `vm.shutdown` here"
    )]
    InDoubt(String),
}

impl From<crate::snapshot::SnapshotError> for MigrationError {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        Self::Vm(VmError::Snapshot(e))
    }
}

impl MigrationError {
    /// A read that timed out (the socket's read timeout, `after`) becomes [`Self::Silent`],
    /// which says so, instead of "Resource temporarily unavailable"; anything else is kept.
    pub fn silent_peer(self, peer: &'static str, after: std::time::Duration) -> Self {
        match self {
            Self::Protocol(ProtocolError::Io { what, source })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Self::Silent { peer, after, what }
            }
            other => other,
        }
    }

    /// The HTTP status of the failed API request: 4xx where the request, the VM's state or
    /// the peer's input is at fault, 5xx where this host failed.
    pub fn status(&self) -> u16 {
        match self {
            Self::Url(_) | Self::InvalidState(_) => 400,
            Self::Protocol(p) if p.is_bad_input() => 400,
            Self::Connect { .. } | Self::Timeout(_) | Self::Silent { .. } => 400,
            _ => 500,
        }
    }
}
