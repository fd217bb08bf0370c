//! Hourglass's hypervisor crate: `Hypervisor` / `Vm` / `Vcpu` traits, KVM and MSHV backends, and
//! guest time (TSC, kvmclock) across freeze and thaw with **one VM-wide TSC offset**.
//!
//! Layers, with the arrows pointing one way:
//!
//! * [`tsc`]: the pure time model (plan, arithmetic, state types; no ioctls).
//! * [`arch`], [`cpu`], [`vm`], [`hypervisor`]: backend-neutral types and traits. A VMM names
//!   only these; it never sees a KVM or MSHV type.
//! * [`host`]: the host's TSC, realtime clock and CPU vendor (no hypervisor needed).
//! * [`kvm`] (and [`mshv`] with the `mshv` feature): the backends.
//!
//! A VMM that owns its kvm-ioctls descriptors and wants none of these traits uses the same time
//! logic through [`kvm::tsc::freeze`] and [`kvm::tsc::thaw`] on borrowed `VmFd`/`VcpuFd`s.
//!
//! Freeze and thaw a VM through [`vm::TscState`]; the thaw reports what it really applied in a
//! [`tsc::ClockReport`] (some hosts accept TSC offsets and ignore them; the report says so):
//!
//! ```
//! use hypervisor::tsc::{ClockPolicy, ThawOrigin};
//! if !std::path::Path::new("/dev/kvm").exists() {
//!     println!("skipped: /dev/kvm is absent");
//!     return;
//! }
//! let hv = hypervisor::new().unwrap();
//! let vm = hv.create_vm().unwrap();
//! let vcpus: Vec<_> = (0..2).map(|i| vm.create_vcpu(i).unwrap()).collect();
//! let refs: Vec<&dyn hypervisor::cpu::Vcpu> = vcpus.iter().map(|v| v.as_ref()).collect();
//! let capture = vm.freeze(&refs).unwrap();
//! match vm.thaw(&refs, &capture.snapshot, ThawOrigin::OwnFreeze, ClockPolicy::Wallclock) {
//!     Ok(report) => println!("applied {:?}, warnings {:?}", report.policy_applied, report.warnings),
//!     // A host that ignores offsets refuses a thaw that would move the TSC backwards.
//!     Err(e) => println!("thaw refused: {e}"),
//! }
//! ```

#![deny(missing_docs)]

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod arch;
pub mod cpu;
pub mod host;
pub mod hypervisor;
pub mod kvm;
#[cfg(feature = "mshv")]
pub mod mshv;
pub mod state;
pub mod tsc;
pub mod vm;

pub use crate::hypervisor::Hypervisor;
pub use crate::state::{VcpuState, VcpuStateError, VCPU_STATE_VERSION};
pub use crate::vm::{TscState, Vm};
pub use cpu::{Vcpu, VcpuKicker, VmExit};

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

/// What the host can do for guest time, as probed (never assumed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TscCapabilities {
    /// Backend ("kvm", "mshv").
    pub backend: String,
    /// Host CPU vendor (decides the scaling arithmetic).
    pub vendor: tsc::Vendor,
    /// Host TSC frequency in kHz (KVM_GET_TSC_KHZ on a fresh vCPU).
    pub host_tsc_khz: u32,
    /// The per-vCPU KVM_VCPU_TSC_OFFSET attribute exists (KVM_HAS_DEVICE_ATTR).
    pub tsc_offset_attr: bool,
    /// Whether written offsets take effect, probed by read-back of the offset and of the guest
    /// TSC on a scratch vCPU; `None` if it could not be probed.
    pub offsets_honoured: Option<bool>,
    /// Hardware TSC scaling (KVM_CAP_TSC_CONTROL).
    pub tsc_scaling: bool,
    /// VM-wide default TSC frequency (KVM_CAP_VM_TSC_CONTROL).
    pub vm_tsc_control: bool,
    /// KVM_SET_CLOCK/KVM_GET_CLOCK understand KVM_CLOCK_REALTIME (KVM_CAP_ADJUST_CLOCK bits).
    pub clock_realtime: bool,
    /// KVM_GET_CLOCK can return the host TSC (KVM_CLOCK_HOST_TSC).
    pub clock_host_tsc: bool,
    /// Nested-virtualisation state can be saved (KVM_CAP_NESTED_STATE > 0).
    pub nested_state: bool,
}

/// The best backend on this host: MSHV when the `mshv` feature is on and `/dev/mshv` exists,
/// otherwise KVM.
pub fn new() -> Result<Arc<dyn Hypervisor>, HypervisorError> {
    #[cfg(feature = "mshv")]
    if std::path::Path::new("/dev/mshv").exists() {
        return Ok(Arc::new(mshv::MshvHypervisor::new()?));
    }
    Ok(Arc::new(kvm::KvmHypervisor::new()?))
}
