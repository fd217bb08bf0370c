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
    #[error("--kernel {path}: cannot read it")]
    Kernel {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs could not be read (missing, not a regular file, larger than RAM below
    /// the 32-bit hole).
    #[error("--initramfs {path}: cannot use it in guest RAM below {room:#x}")]
    Initramfs {
        /// The path given.
        path: PathBuf,
        /// The most bytes that could fit.
        room: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel, the initramfs or the command line does not fit the boot protocol or the
    /// guest memory.
    #[error("{subject}")]
    Payload {
        /// The flag and file: `--kernel PATH`, `--initramfs PATH`, `--cmdline`.
        subject: String,
        /// Why.
        #[source]
        source: arch::Error,
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
