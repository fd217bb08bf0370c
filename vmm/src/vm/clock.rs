//! `vm.info`'s `clock` object, as a type: what the operator asked for, what the host really
//! applied, and the numbers behind it.

use std::path::PathBuf;

use hypervisor::tsc::{AppliedPolicy, ClockPolicy, ClockReport, ThawOrigin, Vendor};
use hypervisor::TscCapabilities;
use serde::Serialize;

use super::Vm;
use crate::snapshot::MemoryMode;

/// Where a VM came from, when it did not boot here (`clock.restored_from`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RestoredFrom {
    /// Restored from a snapshot directory.
    Snapshot {
        /// The snapshot directory.
        source: PathBuf,
        /// How guest memory is backed.
        memory_mode: MemoryMode,
        /// Whether the memory checksums were verified.
        memory_verified: bool,
        /// Time to load (or map) guest memory, ns.
        memory_load_ns: u64,
        /// Host realtime at the snapshot's freeze, ns.
        snapshot_realtime_ns: u64,
        /// The VM TSC at the snapshot's freeze.
        snapshot_vm_tsc: u64,
        /// kvmclock at the snapshot's freeze, ns.
        snapshot_kvmclock_ns: u64,
    },
    /// Received by a live migration.
    Migration {
        /// The endpoint it was received on.
        migration: String,
        /// Bytes received.
        bytes: u64,
        /// Pages that carried data.
        data_pages: u64,
        /// Pages sent as zero.
        zero_pages: u64,
        /// Whole reception, ns.
        total_ns: u64,
    },
}

/// The `clock` object of `vm.info`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClockInfo {
    /// The policy of the latest thaw; before any, the one the next resume applies.
    pub policy_requested: ClockPolicy,
    /// The VM's default policy (`--clock-policy`, or the snapshot's configuration).
    pub policy_default: ClockPolicy,
    /// What the latest thaw could really apply.
    pub policy_applied: Option<AppliedPolicy>,
    /// While paused: where the frozen time comes from (own pause, snapshot, migration).
    pub pending_thaw: Option<ThawOrigin>,
    /// Guest TSC frequency, kHz.
    pub tsc_khz: u32,
    /// The VM-wide offset the host read back (else the one planned) at the latest thaw.
    pub vm_offset: Option<u64>,
    /// The VM-wide offset the latest thaw planned.
    pub vm_offset_planned: Option<u64>,
    /// Whether the host honours TSC offsets (latest thaw's read-back, else the probe).
    pub offsets_honoured: Option<bool>,
    /// Host CPU vendor.
    pub vendor: Vendor,
    /// Hypervisor backend ("kvm", "mshv").
    pub backend: &'static str,
    /// What the host can do for guest time, as probed.
    pub capabilities: TscCapabilities,
    /// Time inside the latest freeze, ns.
    pub last_freeze_duration_ns: u64,
    /// Time the latest thaw showed the guest, ns.
    pub last_elapsed_ns: Option<u64>,
    /// The latest thaw's error bound, ns.
    pub error_bound_ns: Option<u64>,
    /// The latest thaw's whole report.
    pub last_report: Option<ClockReport>,
    /// The VM's warnings and the latest thaw's, each once.
    pub warnings: Vec<String>,
    /// Where the VM came from, when it did not boot here.
    pub restored_from: Option<RestoredFrom>,
    /// Whether the host's guest clock runs in its stable, TSC-based mode now: KVM's master
    /// clock (`KVM_GET_CLOCK` says `KVM_CLOCK_TSC_STABLE`). `None`: the backend has no such
    /// mode, or the read failed.
    pub master_clock: Option<bool>,
    /// Each vCPU's kvmclock page as the guest reads it now, where its address is known.
    pub guest_kvmclock: Vec<GuestKvmclock>,
}

/// One vCPU's kvmclock page (`struct pvclock_vcpu_time_info`, the ABI KVM and the guest
/// share), read from guest memory: KVM rewrites it when the vCPU next enters the guest after a
/// clock update, so after a thaw it shows what the guest was given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuestKvmclock {
    /// The vCPU.
    pub vcpu: u32,
    /// Guest-physical address of its page (MSR_KVM_SYSTEM_TIME_NEW without the enable bit).
    pub gpa: u64,
    /// The page's `version` (odd while KVM is writing it).
    pub version: u32,
    /// The page's `flags`.
    pub flags: u8,
    /// `PVCLOCK_TSC_STABLE_BIT`: KVM computed this page from its master clock, and the guest
    /// may use kvmclock without cross-vCPU corrections (and in its vDSO).
    pub tsc_stable: bool,
}

/// `struct pvclock_vcpu_time_info`: `version` at byte 0, `flags` at byte 29.
const PVCLOCK_VERSION_AT: u64 = 0;
const PVCLOCK_FLAGS_AT: u64 = 29;
/// `flags` bit 0.
const PVCLOCK_TSC_STABLE_BIT: u8 = 1 << 0;

impl Vm {
    /// Each vCPU's kvmclock page, read from guest memory where the MSR's enable bit is set
    /// and the page lies in guest memory.
    fn guest_kvmclock(&self) -> Vec<GuestKvmclock> {
        use vm_memory::{Bytes, GuestAddress};
        let memory = self.guest_memory();
        self.kvmclock_msrs
            .iter()
            .enumerate()
            .filter_map(|(i, msr)| {
                let msr = (*msr)?;
                if msr & 1 == 0 {
                    return None;
                }
                let gpa = msr & !1;
                let version: u32 = memory
                    .read_obj(GuestAddress(gpa.checked_add(PVCLOCK_VERSION_AT)?))
                    .ok()?;
                let flags: u8 = memory
                    .read_obj(GuestAddress(gpa.checked_add(PVCLOCK_FLAGS_AT)?))
                    .ok()?;
                Some(GuestKvmclock {
                    vcpu: i as u32,
                    gpa,
                    version,
                    flags,
                    tsc_stable: flags & PVCLOCK_TSC_STABLE_BIT != 0,
                })
            })
            .collect()
    }
}

impl Vm {
    /// The `clock` object of `vm.info`.
    pub fn clock_info(&self) -> ClockInfo {
        let r = self.last_report.as_ref();
        let mut warnings = self.warnings.clone();
        for w in r.iter().flat_map(|r| &r.warnings) {
            if !warnings.contains(w) {
                warnings.push(w.clone());
            }
        }
        ClockInfo {
            policy_requested: r.map_or(self.thaw_policy(None), |r| r.policy_requested),
            policy_default: self.config.clock_policy,
            policy_applied: r.map(|r| r.policy_applied),
            pending_thaw: self.frozen.as_ref().map(|f| f.origin),
            tsc_khz: self.tsc_khz,
            vm_offset: r.map(|r| r.vm_offset_applied.unwrap_or(r.vm_offset_planned)),
            vm_offset_planned: r.map(|r| r.vm_offset_planned),
            offsets_honoured: r.map_or(self.caps.offsets_honoured, |r| Some(r.offsets_honoured)),
            vendor: self.caps.vendor,
            backend: self.hv_name,
            capabilities: self.caps.clone(),
            last_freeze_duration_ns: self.stats.last_freeze_ns,
            last_elapsed_ns: r.map(|r| r.elapsed_ns),
            error_bound_ns: r.map(|r| r.error_bound_ns),
            last_report: r.cloned(),
            warnings,
            restored_from: self.restored_from.clone(),
            master_clock: self.vm.clock_tsc_stable().ok().flatten(),
            guest_kvmclock: self.guest_kvmclock(),
        }
    }
}
