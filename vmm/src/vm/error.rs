//! What can go wrong building or driving a VM.

use std::path::PathBuf;

use crate::vcpu::PauseError;

/// Errors building or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A hypervisor call failed.
    #[error("{what}")]
    Hypervisor {
        /// What was being done.
        what: String,
        /// The hypervisor's error.
        #[source]
        source: hypervisor::HypervisorError,
    },
    /// Guest setup (layout, image, CPUID) failed.
    #[error("guest setup")]
    Arch(#[from] arch::Error),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {size} bytes of guest memory: {reason}")]
    Memory {
        /// Bytes asked for.
        size: u64,
        /// Why it failed.
        reason: String,
    },
    /// The kernel image could not be read.
    #[error("cannot read the kernel image {path}")]
    Kernel {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot run (e.g. too many vCPUs for the test guest).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A device could not be created.
    #[error("device setup: {0}")]
    Device(String),
    /// vCPU threads could not be started.
    #[error("cannot start vCPU threads")]
    Thread(#[source] std::io::Error),
    /// The VM is not in a state that allows the action.
    #[error("{0}")]
    InvalidState(String),
    /// Parking or releasing the vCPUs failed.
    #[error("vCPU threads")]
    Pause(#[from] PauseError),
    /// Writing or reading a snapshot failed (the error names the file and field).
    #[error("snapshot")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// Wraps a hypervisor error with what was being done.
pub(crate) fn hv_err(
    what: impl Into<String>,
) -> impl FnOnce(hypervisor::HypervisorError) -> VmError {
    let what = what.into();
    move |source| VmError::Hypervisor { what, source }
}
