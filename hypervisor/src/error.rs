//! [`HypervisorError`]: every failure of this crate, at the bottom of its layers so that the
//! time model, the traits and the backends all name it without pointing back up at the crate root.

use thiserror::Error;

use crate::state::VcpuStateError;
use crate::tsc;

/// Every failure of this crate. Ioctl failures carry the ioctl's name and the errno.
#[derive(Debug, Error)]
pub enum HypervisorError {
    /// An ioctl (or the open/mmap around one) failed.
    #[error("{ioctl} failed: {} (errno {errno})", std::io::Error::from_raw_os_error(*errno))]
    Ioctl {
        /// The ioctl, e.g. "KVM_SET_CLOCK".
        ioctl: &'static str,
        /// The errno it returned.
        errno: i32,
    },
    /// The time model refused (frequency, backwards thaw, vCPU count, ...).
    #[error(transparent)]
    Tsc(#[from] tsc::TscError),
    /// A TSC snapshot is unusable.
    #[error(transparent)]
    TscState(#[from] tsc::StateError),
    /// A vCPU state is unusable.
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    /// A guest TSC frequency this host cannot run, refused before anything changed.
    #[error(
        "guest TSC frequency {guest_khz} kHz refused: this host (TSC {host_khz} kHz) has no TSC \
         scaling, so it can only run guests within KVM's 250 ppm window [{window_lo}, {window_hi}] kHz"
    )]
    TscFrequencyRefused {
        /// Host TSC frequency, kHz.
        host_khz: u32,
        /// Requested guest frequency, kHz.
        guest_khz: u32,
        /// Lowest kHz that runs unscaled.
        window_lo: u32,
        /// Highest kHz that runs unscaled.
        window_hi: u32,
    },
    /// A read-back after a write did not show what was written.
    #[error("{what}: wrote {wrote:#x}, read back {read:#x}")]
    ReadBack {
        /// What was written.
        what: String,
        /// The value written.
        wrote: u64,
        /// The value read back.
        read: u64,
    },
    /// The host lacks something the operation needs.
    #[error("unsupported on this host: {0}")]
    Unsupported(String),
    /// A caller passed something unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl HypervisorError {
    /// An ioctl failure.
    pub fn ioctl(ioctl: &'static str, errno: i32) -> Self {
        HypervisorError::Ioctl { ioctl, errno }
    }

    /// The errno, for ioctl failures.
    pub fn errno(&self) -> Option<i32> {
        match self {
            HypervisorError::Ioctl { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}
