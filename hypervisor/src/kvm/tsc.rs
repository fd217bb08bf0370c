//! Guest time for a VMM that owns its kvm-ioctls file descriptors: two calls, no traits.
//!
//! A VMM that already has a [`VmFd`] and its [`VcpuFd`]s (and no wish to adopt this crate's
//! `Vm`/`Vcpu` traits) freezes and thaws guest time with [`freeze`] and [`thaw`] on borrowed
//! descriptors. They run the same engine as [`crate::kvm::KvmVm`]'s
//! [`TscState`](crate::vm::TscState) implementation, with what that engine needs derived from the
//! descriptors on every call:
//!
//! * host CPU vendor: CPUID ([`crate::host::host_vendor`]);
//! * `KVM_VCPU_TSC_OFFSET`: `KVM_HAS_DEVICE_ATTR` on the first vCPU;
//! * TSC scaling, `KVM_CLOCK_REALTIME`: `KVM_CHECK_EXTENSION` on the VM;
//! * guest TSC kHz: `KVM_GET_TSC_KHZ` on the first vCPU; host TSC kHz: `KVM_GET_TSC_KHZ` on the
//!   VM where `KVM_CAP_VM_TSC_CONTROL` offers it (the VM's default, the host rate unless the VMM
//!   changed it), else the guest kHz (right whenever the guest runs unscaled);
//! * whether the host honours TSC offsets: not probed (that would need a scratch VM); [`thaw`]
//!   writes them, reads them back and falls back to the TSC the guest really has.
//!
//! What the embedder must do:
//!
//! * call both with every vCPU out of `KVM_RUN`, and pass the vCPUs in the same order each time
//!   (index `i` of the snapshot's TSC_ADJUST list is `vcpus[i]`);
//! * after [`thaw`], write TSC_DEADLINE (MSR 0x6e0) and any other MSR that KVM interprets against
//!   the guest TSC: KVM converts the deadline against the TSC current when it is written, so it
//!   must come after the TSC is in place (the trait path does this itself);
//! * say where the snapshot came from ([`ThawOrigin`]): only [`ThawOrigin::OwnFreeze`] (resume
//!   of the last freeze of this VM, same host and boot) lets `wallclock` measure the pause with
//!   the host TSC;
//! * tell the guest it was stopped (`KVM_KVMCLOCK_CTRL`) if it wants soft-lockup watchdogs
//!   quiet; this module does not.
//!
//! ```no_run
//! use hypervisor::tsc::{ClockPolicy, ThawOrigin};
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! vm.create_irq_chip()?;
//! let vcpus = [vm.create_vcpu(0)?, vm.create_vcpu(1)?];
//! let refs: Vec<&kvm_ioctls::VcpuFd> = vcpus.iter().collect();
//! let capture = hypervisor::kvm::tsc::freeze(&vm, &refs)?;
//! let report = hypervisor::kvm::tsc::thaw(
//!     &vm, &refs, &capture.snapshot, ThawOrigin::OwnFreeze, ClockPolicy::Wallclock)?;
//! println!("{report:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::error::HypervisorError;
use crate::kvm::x86_64::attr;
use crate::kvm::x86_64::tsc::engine::{self, TscContext};
use crate::tsc::{Capture, ClockPolicy, ClockReport, ThawOrigin, TscSnapshot};
use kvm_bindings::{
    KVM_CAP_ADJUST_CLOCK, KVM_CAP_TSC_CONTROL, KVM_CAP_VM_TSC_CONTROL, KVM_CLOCK_REALTIME,
};
use kvm_ioctls::{VcpuFd, VmFd};

/// The VM ioctl number, private here (kvm-ioctls has it only on a vCPU).
mod nr {
    use kvm_bindings::KVMIO;
    use vmm_sys_util::ioctl_io_nr;

    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
}
use nr::KVM_GET_TSC_KHZ;

/// Capture guest time from one host sample: the host-independent [`TscSnapshot`] (in
/// [`Capture::snapshot`]) and the spread of the vCPUs' offsets. Every vCPU must be stopped.
pub fn freeze(vm: &VmFd, vcpus: &[&VcpuFd]) -> Result<Capture, HypervisorError> {
    let ctx = context(vm, vcpus)?;
    engine::freeze(vm, &ctx, vcpus, &[], None)
}

/// Restore guest time from `snapshot` under `policy`, before any vCPU runs again: one VM-wide
/// TSC offset written to every vCPU and verified by read-back, kvmclock set from the same host
/// sample and checked against the TSC. Returns what was really applied (a host that ignores
/// offsets gives [`crate::tsc::AppliedPolicy::HostTsc`]); a thaw that would move the guest TSC
/// backwards is refused with what was written put back. Then write TSC_DEADLINE (see the
/// module doc).
pub fn thaw(
    vm: &VmFd,
    vcpus: &[&VcpuFd],
    snapshot: &TscSnapshot,
    origin: ThawOrigin,
    policy: ClockPolicy,
) -> Result<ClockReport, HypervisorError> {
    let mut ctx = context(vm, vcpus)?;
    engine::thaw(vm, &mut ctx, vcpus, snapshot, origin, policy)
}

/// What the engine needs, from the descriptors (see the module doc).
fn context(vm: &VmFd, vcpus: &[&VcpuFd]) -> Result<TscContext, HypervisorError> {
    let first = vcpus
        .first()
        .ok_or_else(|| HypervisorError::InvalidArgument("no vCPUs given".into()))?;
    let vendor = crate::host::host_vendor()
        .ok_or_else(|| HypervisorError::Unsupported("host CPU is neither Intel nor AMD".into()))?;
    let guest_tsc_khz = first
        .get_tsc_khz()
        .map_err(|e| HypervisorError::ioctl("KVM_GET_TSC_KHZ", e.errno()))?;
    let host_tsc_khz = if vm.check_extension_raw(u64::from(KVM_CAP_VM_TSC_CONTROL)) > 0 {
        vm_tsc_khz(vm)?
    } else {
        guest_tsc_khz
    };
    let adjust = vm
        .check_extension_raw(u64::from(KVM_CAP_ADJUST_CLOCK))
        .max(0) as u32;
    Ok(TscContext {
        vendor,
        host_tsc_khz,
        guest_tsc_khz,
        tsc_offset_attr: attr::has_tsc_offset(*first)?,
        tsc_scaling: vm.check_extension_raw(u64::from(KVM_CAP_TSC_CONTROL)) > 0,
        clock_realtime: adjust & KVM_CLOCK_REALTIME != 0,
        offsets_honoured: None,
    })
}

/// The VM's default TSC kHz (`KVM_GET_TSC_KHZ` on the VM, KVM_CAP_VM_TSC_CONTROL).
fn vm_tsc_khz(vm: &VmFd) -> Result<u32, HypervisorError> {
    // SAFETY: KVM_GET_TSC_KHZ takes no argument and returns the value; the fd is a live VM.
    let r = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_GET_TSC_KHZ()) };
    if r <= 0 {
        return Err(HypervisorError::ioctl(
            "KVM_GET_TSC_KHZ (VM)",
            vmm_sys_util::errno::Error::last().errno(),
        ));
    }
    Ok(r as u32)
}
