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

pub mod arch;
mod caps;
pub mod cpu;
mod error;
pub mod host;
pub mod hypervisor;
pub mod kvm;
#[cfg(feature = "mshv")]
pub mod mshv;
pub mod state;
pub mod tsc;
pub mod vm;

pub use crate::caps::TscCapabilities;
pub use crate::error::HypervisorError;
pub use crate::hypervisor::Hypervisor;
pub use crate::state::{VcpuState, VcpuStateError, VCPU_STATE_VERSION};
pub use crate::vm::{TscState, Vm};
pub use cpu::{Vcpu, VcpuKicker, VmExit};

/// The best backend on this host: MSHV when the `mshv` feature is on and `/dev/mshv` exists,
/// otherwise KVM.
pub fn new() -> Result<Arc<dyn Hypervisor>, HypervisorError> {
    #[cfg(feature = "mshv")]
    if std::path::Path::new("/dev/mshv").exists() {
        return Ok(Arc::new(mshv::MshvHypervisor::new()?));
    }
    Ok(Arc::new(kvm::KvmHypervisor::new()?))
}
