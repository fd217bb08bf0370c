//! The KVM backend.
//!
//! * [`KvmHypervisor`] (this file): opens `/dev/kvm`, detects the vendor, probes what the host
//!   does with TSC offsets (once, on a scratch VM), creates VMs.
//! * [`vm`]: [`KvmVm`], VM creation details, memory and dirty logging.
//! * [`vcpu`]: [`KvmVcpu`], run loop, kicker, registers and saved state.
//! * [`clock`]: the kvmclock sample and `KVM_SET_CLOCK`.
//! * [`tsc`]: freeze and thaw on borrowed kvm-ioctls descriptors, for VMMs without our traits.
//! * [`x86_64`]: the VMX/SVM table, the TscState implementation, device attributes, conversions.

pub mod clock;
pub mod tsc;
pub mod vcpu;
pub mod vm;
pub mod x86_64;

use std::sync::Arc;

use kvm_bindings::{
    KVM_CAP_ADJUST_CLOCK, KVM_CAP_NESTED_STATE, KVM_CAP_TSC_CONTROL, KVM_CAP_VM_TSC_CONTROL,
    KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::Kvm;

use crate::arch::{msr, CpuIdEntry};
use crate::caps::TscCapabilities;
use crate::error::HypervisorError;
use crate::hypervisor::Hypervisor;
use crate::tsc::Vendor;
use crate::vm::Vm;

pub use vcpu::KvmVcpu;
pub use vm::KvmVm;

/// The value written when probing whether offsets take effect (about 7 minutes at 2.5 GHz).
const PROBE_OFFSET: u64 = 1 << 40;
/// How far a probed guest TSC may be from the expected one and still count (about 1.7 s).
const PROBE_SLACK: u64 = 1 << 32;

/// A KVM hypervisor handle.
pub struct KvmHypervisor {
    kvm: Kvm,
    caps: TscCapabilities,
}

impl KvmHypervisor {
    /// Open `/dev/kvm`, detect the vendor and probe the TSC capabilities.
    pub fn new() -> Result<Self, HypervisorError> {
        let kvm = Kvm::new().map_err(|e| HypervisorError::ioctl("open /dev/kvm", e.errno()))?;
        let vendor = crate::host::host_vendor().ok_or_else(|| {
            HypervisorError::Unsupported("host CPU is neither Intel nor AMD".into())
        })?;
        let caps = probe(&kvm, vendor)?;
        log::info!("kvm: TSC capabilities {caps:?}");
        Ok(KvmHypervisor { kvm, caps })
    }

    /// The probed TSC capabilities.
    pub fn tsc_capabilities(&self) -> &TscCapabilities {
        &self.caps
    }

    /// The underlying kvm-ioctls handle (for embedders that need more than the traits).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Create a VM, returning the concrete type.
    pub fn create_kvm_vm(&self) -> Result<KvmVm, HypervisorError> {
        KvmVm::new(&self.kvm, self.caps.clone())
    }
}

/// A guest TSC read by a host-initiated `MSR_IA32_TSC` read, bracketed by host RDTSCs:
/// `(host_before, guest, host_after)`.
pub(crate) fn bracketed_guest_tsc(
    vcpu: &kvm_ioctls::VcpuFd,
) -> Result<(u64, u64, u64), HypervisorError> {
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: msr::IA32_TSC,
        ..Default::default()
    }])
    .map_err(|_| HypervisorError::InvalidArgument("MSR list".into()))?;
    let h0 = crate::host::rdtsc();
    let n = vcpu
        .get_msrs(&mut msrs)
        .map_err(|e| HypervisorError::ioctl("KVM_GET_MSRS", e.errno()))?;
    let h1 = crate::host::rdtsc();
    if n != 1 {
        return Err(HypervisorError::Unsupported(
            "KVM_GET_MSRS did not return MSR_IA32_TSC".into(),
        ));
    }
    Ok((h0, msrs.as_slice()[0].data, h1))
}

/// Whether `guest - host_before` is `expected_delta` within the bracket and [`PROBE_SLACK`].
fn delta_matches(h0: u64, guest: u64, h1: u64, expected_delta: u64) -> bool {
    let delta = guest.wrapping_sub(h0);
    let lo = expected_delta.wrapping_sub(PROBE_SLACK);
    let span = h1.wrapping_sub(h0).saturating_add(2 * PROBE_SLACK);
    delta.wrapping_sub(lo) <= span
}

/// Probe the host on a scratch VM, so the VMs the caller creates are never touched.
fn probe(kvm: &Kvm, vendor: Vendor) -> Result<TscCapabilities, HypervisorError> {
    let adjust = kvm
        .check_extension_raw(u64::from(KVM_CAP_ADJUST_CLOCK))
        .max(0) as u32;
    let vm = kvm
        .create_vm()
        .map_err(|e| HypervisorError::ioctl("KVM_CREATE_VM", e.errno()))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| HypervisorError::ioctl("KVM_CREATE_VCPU", e.errno()))?;
    let host_tsc_khz = vcpu
        .get_tsc_khz()
        .map_err(|e| HypervisorError::ioctl("KVM_GET_TSC_KHZ", e.errno()))?;
    let tsc_offset_attr = x86_64::attr::has_tsc_offset(&vcpu)?;
    let offsets_honoured = probe_offsets(&vcpu, tsc_offset_attr).ok();
    Ok(TscCapabilities {
        backend: "kvm".into(),
        vendor,
        host_tsc_khz,
        tsc_offset_attr,
        offsets_honoured,
        tsc_scaling: kvm.check_extension_raw(u64::from(KVM_CAP_TSC_CONTROL)) > 0,
        vm_tsc_control: kvm.check_extension_raw(u64::from(KVM_CAP_VM_TSC_CONTROL)) > 0,
        clock_realtime: adjust & KVM_CLOCK_REALTIME != 0,
        clock_host_tsc: adjust & KVM_CLOCK_HOST_TSC != 0,
        nested_state: kvm.check_extension_raw(u64::from(KVM_CAP_NESTED_STATE)) > 0,
    })
}

/// Write a large offset (or TSC) to the scratch vCPU and see whether the guest TSC follows.
fn probe_offsets(vcpu: &kvm_ioctls::VcpuFd, attr: bool) -> Result<bool, HypervisorError> {
    if attr {
        x86_64::attr::set_tsc_offset(vcpu, PROBE_OFFSET)?;
        let read = x86_64::attr::tsc_offset(vcpu)?;
        let (h0, g, h1) = bracketed_guest_tsc(vcpu)?;
        Ok(read == PROBE_OFFSET && delta_matches(h0, g, h1, PROBE_OFFSET))
    } else {
        let target = crate::host::rdtsc().wrapping_add(PROBE_OFFSET);
        let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: msr::IA32_TSC,
            data: target,
            ..Default::default()
        }])
        .map_err(|_| HypervisorError::InvalidArgument("MSR list".into()))?;
        vcpu.set_msrs(&msrs)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_MSRS", e.errno()))?;
        let (h0, g, h1) = bracketed_guest_tsc(vcpu)?;
        Ok(delta_matches(h0, g, h1, PROBE_OFFSET))
    }
}

impl Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn vendor(&self) -> Vendor {
        self.caps.vendor
    }

    fn create_vm(&self) -> Result<Arc<dyn Vm>, HypervisorError> {
        Ok(Arc::new(self.create_kvm_vm()?))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>, HypervisorError> {
        let c = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HypervisorError::ioctl("KVM_GET_SUPPORTED_CPUID", e.errno()))?;
        let mut entries: Vec<CpuIdEntry> = c
            .as_slice()
            .iter()
            .map(x86_64::convert::cpuid_from_kvm)
            .collect();
        // KVM reports some features by capability and not in this list (its API document:
        // the TSC-deadline timer is emulated by the in-kernel LAPIC whatever the host CPU
        // has). Without it a kernel calibrates its LAPIC timer against a PIT this VM lacks.
        let by_capability = [(
            self.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
            CPUID_1_ECX_TSC_DEADLINE,
        )];
        if let Some(leaf1) = entries.iter_mut().find(|e| e.function == 1 && e.index == 0) {
            for (present, bit) in by_capability {
                if present {
                    leaf1.ecx |= bit;
                }
            }
        }
        Ok(entries)
    }

    fn msr_index_list(&self) -> Result<Vec<u32>, HypervisorError> {
        let l = self
            .kvm
            .get_msr_index_list()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_MSR_INDEX_LIST", e.errno()))?;
        Ok(l.as_slice().to_vec())
    }
}

/// CPUID leaf 1 ECX: the LAPIC timer has the TSC-deadline mode.
pub const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_delta_window() {
        // Honoured: guest = host + offset (+ a little).
        assert!(delta_matches(
            1000,
            1000 + PROBE_OFFSET + 50,
            1100,
            PROBE_OFFSET
        ));
        // Ignored: guest = host.
        assert!(!delta_matches(1000, 1050, 1100, PROBE_OFFSET));
        // Wrap-around of the host TSC.
        let h0 = u64::MAX - 10;
        assert!(delta_matches(
            h0,
            h0.wrapping_add(PROBE_OFFSET + 5),
            h0.wrapping_add(20),
            PROBE_OFFSET
        ));
    }
}
