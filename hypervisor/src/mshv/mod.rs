//! The MSHV backend (feature `mshv`): Microsoft Hypervisor partitions via `/dev/mshv`.
//!
//! Kept minimal: enough to create a partition and vCPUs behind the same traits, and guest time
//! through the same [`TscSnapshot`]. MSHV keeps time per partition, not per vCPU: a freeze sets
//! `HV_PARTITION_PROPERTY_TIME_FREEZE` and reads `HV_PARTITION_PROPERTY_REFERENCE_TIME` (100 ns
//! units), which stands in for kvmclock in the snapshot; a thaw writes the planned reference time
//! and unfreezes. The guest TSC follows the partition's time, so no per-vCPU offsets are written.
//! Selected by [`crate::new`] only when `/dev/mshv` exists.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mshv_bindings::{
    hv_partition_property_code_HV_PARTITION_PROPERTY_REFERENCE_TIME as REFERENCE_TIME,
    hv_partition_property_code_HV_PARTITION_PROPERTY_TIME_FREEZE as TIME_FREEZE, msr_entry, Msrs,
};
use mshv_ioctls::{Mshv, MshvError, VcpuFd, VmFd};

use crate::arch::{msr, CpuIdEntry, MsrEntry, SpecialRegisters, StandardRegisters};
use crate::caps::TscCapabilities;
use crate::cpu::{Vcpu, VcpuKicker, VmExit};
use crate::error::HypervisorError;
use crate::host::{rdtsc, realtime_ns};
use crate::hypervisor::Hypervisor;
use crate::state::VcpuState;
use crate::tsc::{
    capture, plan_thaw, tsc_ratio, Capture, ClockPolicy, ClockReport, HostSample, HostTsc,
    ThawOrigin, TscSnapshot, VcpuTscReading, Vendor,
};
use crate::vm::{TscState, Vm};

/// Nanoseconds per reference-time unit.
pub const REFERENCE_TIME_UNIT_NS: u64 = 100;

/// Reference time (100 ns units) to ns, saturating.
pub fn reference_to_ns(reference: u64) -> u64 {
    reference.saturating_mul(REFERENCE_TIME_UNIT_NS)
}

/// ns to reference time (100 ns units), rounded down.
pub fn ns_to_reference(ns: u64) -> u64 {
    ns / REFERENCE_TIME_UNIT_NS
}

fn err(ioctl: &'static str) -> impl FnOnce(MshvError) -> HypervisorError {
    move |e| HypervisorError::ioctl(ioctl, e.errno())
}

/// An MSHV hypervisor handle.
pub struct MshvHypervisor {
    mshv: Mshv,
    vendor: Vendor,
}

impl MshvHypervisor {
    /// Open `/dev/mshv`.
    pub fn new() -> Result<Self, HypervisorError> {
        let mshv = Mshv::new().map_err(err("open /dev/mshv"))?;
        let vendor = crate::host::host_vendor().ok_or_else(|| {
            HypervisorError::Unsupported("host CPU is neither Intel nor AMD".into())
        })?;
        Ok(MshvHypervisor { mshv, vendor })
    }
}

impl Hypervisor for MshvHypervisor {
    fn name(&self) -> &'static str {
        "mshv"
    }
    fn vendor(&self) -> Vendor {
        self.vendor
    }
    fn create_vm(&self) -> Result<Arc<dyn Vm>, HypervisorError> {
        let fd = self
            .mshv
            .create_vm()
            .map_err(err("MSHV_CREATE_PARTITION"))?;
        fd.initialize().map_err(err("MSHV_INITIALIZE_PARTITION"))?;
        let host_khz = host_tsc_khz();
        Ok(Arc::new(MshvVm {
            fd,
            caps: TscCapabilities {
                backend: "mshv".into(),
                vendor: self.vendor,
                host_tsc_khz: host_khz,
                tsc_offset_attr: false,
                offsets_honoured: None,
                tsc_scaling: false,
                vm_tsc_control: false,
                clock_realtime: false,
                clock_host_tsc: false,
                nested_state: false,
            },
        }))
    }
    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>, HypervisorError> {
        Err(HypervisorError::Unsupported(
            "mshv: supported CPUID is not implemented".into(),
        ))
    }
    fn msr_index_list(&self) -> Result<Vec<u32>, HypervisorError> {
        self.mshv
            .get_msr_index_list()
            .map_err(err("MSHV_GET_MSR_INDEX_LIST"))
    }
}

/// Host TSC kHz from CPUID leaf 0x15, or 0 (unknown).
fn host_tsc_khz() -> u32 {
    crate::host::cpuid_tsc_khz().unwrap_or(0)
}

/// One MSHV partition.
pub struct MshvVm {
    fd: VmFd,
    caps: TscCapabilities,
}

impl MshvVm {
    fn host(&self, guest_khz: u32) -> Result<HostTsc, HypervisorError> {
        Ok(HostTsc {
            vendor: self.caps.vendor,
            host_khz: self.caps.host_tsc_khz,
            ratio: tsc_ratio(self.caps.vendor, self.caps.host_tsc_khz, guest_khz)?.ratio,
        })
    }
}

impl TscState for MshvVm {
    fn tsc_capabilities(&self) -> TscCapabilities {
        self.caps.clone()
    }
    fn set_guest_tsc_khz(&self, _vcpus: &[&dyn Vcpu], khz: u32) -> Result<(), HypervisorError> {
        if khz == self.caps.host_tsc_khz {
            return Ok(());
        }
        Err(HypervisorError::Unsupported(format!(
            "mshv: guest TSC {khz} kHz differs from the host's {} kHz and frequency control \
             is not implemented",
            self.caps.host_tsc_khz
        )))
    }
    fn guest_tsc_khz(&self) -> u32 {
        self.caps.host_tsc_khz
    }
    fn freeze_with_readings(
        &self,
        vcpus: &[&dyn Vcpu],
        readings: &[Option<VcpuTscReading>],
    ) -> Result<Capture, HypervisorError> {
        self.fd
            .set_partition_property(TIME_FREEZE, 1)
            .map_err(err("HV_PARTITION_PROPERTY_TIME_FREEZE"))?;
        let t0 = realtime_ns();
        let h = rdtsc();
        let reference = self
            .fd
            .get_partition_property(REFERENCE_TIME)
            .map_err(err("HV_PARTITION_PROPERTY_REFERENCE_TIME"))?;
        let t1 = realtime_ns();
        let sample = HostSample {
            kvmclock_ns: reference_to_ns(reference),
            realtime_ns: t0 + (t1 - t0) / 2,
            host_tsc: h,
            bracket_ns: t1.saturating_sub(t0),
        };
        let readings = vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| match readings.get(i).copied().flatten() {
                Some(r) => Ok(r),
                None => v.tsc_reading(),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let khz = self.guest_tsc_khz();
        Ok(capture(
            &sample,
            &self.host(khz)?,
            khz,
            &readings,
            true,
            true,
        )?)
    }
    fn thaw(
        &self,
        vcpus: &[&dyn Vcpu],
        snapshot: &TscSnapshot,
        // Reference time is per partition and restored as planned: no same-host shortcut.
        origin: ThawOrigin,
        policy: ClockPolicy,
    ) -> Result<ClockReport, HypervisorError> {
        snapshot.check_vcpus(vcpus.len())?;
        let host = self.host(snapshot.tsc_khz())?;
        let now = HostSample {
            kvmclock_ns: 0,
            realtime_ns: realtime_ns(),
            host_tsc: rdtsc(),
            bracket_ns: 0,
        };
        let plan = plan_thaw(snapshot, &now, &host, policy)?;
        let clock = plan
            .set_clock
            .clock_ns
            .saturating_add(realtime_ns().saturating_sub(plan.set_clock.realtime_ns));
        self.fd
            .set_partition_property(REFERENCE_TIME, ns_to_reference(clock))
            .map_err(err("HV_PARTITION_PROPERTY_REFERENCE_TIME"))?;
        self.fd
            .set_partition_property(TIME_FREEZE, 0)
            .map_err(err("HV_PARTITION_PROPERTY_TIME_FREEZE"))?;
        let mut r = ClockReport::from_plan(
            policy,
            &plan,
            self.caps.vendor,
            snapshot.tsc_khz(),
            plan.vm_offset,
            None,
            true,
        );
        r.origin = Some(origin);
        r.warnings.push(
            "mshv: the guest TSC follows the partition reference time; no per-vCPU offsets".into(),
        );
        Ok(r)
    }
}

impl Vm for MshvVm {
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>, HypervisorError> {
        let idx = u8::try_from(id)
            .map_err(|_| HypervisorError::InvalidArgument(format!("mshv vCPU id {id} > 255")))?;
        let fd = self.fd.create_vcpu(idx).map_err(err("MSHV_CREATE_VP"))?;
        Ok(Box::new(MshvVcpu {
            id,
            fd,
            kick: Arc::new(MshvKicker(AtomicBool::new(false))),
        }))
    }
    unsafe fn set_user_memory_region(
        &self,
        _slot: u32,
        guest_phys_addr: u64,
        size: u64,
        host_addr: u64,
        _dirty_log: bool,
    ) -> Result<(), HypervisorError> {
        let region = mshv_bindings::mshv_user_mem_region {
            size,
            guest_pfn: guest_phys_addr >> 12,
            userspace_addr: host_addr,
            flags: (1 << mshv_bindings::MSHV_SET_MEM_BIT_WRITABLE)
                | (1 << mshv_bindings::MSHV_SET_MEM_BIT_EXECUTABLE),
            ..Default::default()
        };
        self.fd
            .map_user_memory(region)
            .map_err(err("MSHV_SET_GUEST_MEMORY"))
    }
    fn dirty_log(&self, _slot: u32, _size: u64) -> Result<Vec<u64>, HypervisorError> {
        Err(HypervisorError::Unsupported(
            "mshv: dirty logging is not implemented".into(),
        ))
    }

    fn register_irqfd(
        &self,
        _fd: &vmm_sys_util::eventfd::EventFd,
        _gsi: u32,
    ) -> Result<(), HypervisorError> {
        Err(HypervisorError::Unsupported(
            "mshv: interrupt routing is not implemented".into(),
        ))
    }

    fn irqchip_state(&self) -> Result<Option<crate::state::IrqchipState>, HypervisorError> {
        Ok(None)
    }

    fn set_irqchip_state(
        &self,
        _state: &crate::state::IrqchipState,
    ) -> Result<(), HypervisorError> {
        Err(HypervisorError::Unsupported(
            "mshv: interrupt controller state is not implemented".into(),
        ))
    }
}

/// MSHV has no `immediate_exit`: the flag is checked before each run; a signal breaks a run
/// already in the hypervisor.
struct MshvKicker(AtomicBool);

impl VcpuKicker for MshvKicker {
    fn set(&self, exit: bool) {
        self.0.store(exit, Ordering::SeqCst);
    }
}

/// One MSHV virtual processor.
pub struct MshvVcpu {
    id: u32,
    fd: VcpuFd,
    kick: Arc<MshvKicker>,
}

fn unsupported<T>(what: &str) -> Result<T, HypervisorError> {
    Err(HypervisorError::Unsupported(format!(
        "mshv: {what} is not implemented"
    )))
}

impl Vcpu for MshvVcpu {
    fn id(&self) -> u32 {
        self.id
    }
    fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
        if self.kick.0.swap(false, Ordering::SeqCst) {
            return Ok(VmExit::Interrupted);
        }
        match self.fd.run() {
            Ok(m) => {
                let kind = { m.header.message_type };
                Ok(VmExit::Other(format!("mshv message type {kind:#x}")))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::ioctl("MSHV_RUN_VP", e.errno())),
        }
    }
    fn kicker(&mut self) -> Arc<dyn VcpuKicker> {
        self.kick.clone()
    }
    fn set_cpuid(&self, _entries: &[CpuIdEntry]) -> Result<(), HypervisorError> {
        unsupported("set_cpuid")
    }
    fn regs(&self) -> Result<StandardRegisters, HypervisorError> {
        let r = self.fd.get_regs().map_err(err("MSHV_GET_VP_REGISTERS"))?;
        Ok(crate::arch::gp_registers!(r => StandardRegisters))
    }
    fn set_regs(&self, r: &StandardRegisters) -> Result<(), HypervisorError> {
        let m = crate::arch::gp_registers!(r => mshv_bindings::StandardRegisters);
        self.fd.set_regs(&m).map_err(err("MSHV_SET_VP_REGISTERS"))
    }
    fn sregs(&self) -> Result<SpecialRegisters, HypervisorError> {
        unsupported("sregs")
    }
    fn set_sregs(&self, _sregs: &SpecialRegisters) -> Result<(), HypervisorError> {
        unsupported("set_sregs")
    }
    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>, HypervisorError> {
        let e: Vec<msr_entry> = indices
            .iter()
            .map(|i| msr_entry {
                index: *i,
                ..Default::default()
            })
            .collect();
        let mut m = Msrs::from_entries(&e)
            .map_err(|_| HypervisorError::InvalidArgument("too many MSRs".into()))?;
        self.fd
            .get_msrs(&mut m)
            .map_err(err("MSHV_GET_VP_REGISTERS"))?;
        Ok(m.as_slice()
            .iter()
            .map(|e| MsrEntry {
                index: e.index,
                data: e.data,
            })
            .collect())
    }
    fn set_msrs(&self, entries: &[MsrEntry]) -> Result<(), HypervisorError> {
        let e: Vec<msr_entry> = entries
            .iter()
            .map(|m| msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let m = Msrs::from_entries(&e)
            .map_err(|_| HypervisorError::InvalidArgument("too many MSRs".into()))?;
        self.fd.set_msrs(&m).map_err(err("MSHV_SET_VP_REGISTERS"))?;
        Ok(())
    }
    fn notify_guest_clock_paused(&self) -> Result<(), HypervisorError> {
        Ok(())
    }
    fn tsc_reading(&self) -> Result<VcpuTscReading, HypervisorError> {
        let a = self.msrs(&[msr::IA32_TSC_ADJUST])?;
        let tsc_adjust = a.first().map_or(0, |e| e.data);
        // The partition's time is the offset: per vCPU only TSC_ADJUST differs.
        Ok(VcpuTscReading {
            offset: tsc_adjust,
            tsc_adjust,
        })
    }
    fn state(&self) -> Result<VcpuState, HypervisorError> {
        unsupported("vCPU state")
    }
    fn set_state(&self, _state: &VcpuState) -> Result<(), HypervisorError> {
        unsupported("vCPU state")
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_time_units() {
        assert_eq!(reference_to_ns(1), 100);
        assert_eq!(ns_to_reference(199), 1);
        assert_eq!(ns_to_reference(reference_to_ns(123_456_789)), 123_456_789);
        assert_eq!(reference_to_ns(u64::MAX), u64::MAX);
        // 1 s = 10^7 units.
        assert_eq!(ns_to_reference(1_000_000_000), 10_000_000);
    }

    #[test]
    fn new_without_dev_mshv_is_an_error_naming_it() {
        if std::path::Path::new("/dev/mshv").exists() {
            println!("skipped: /dev/mshv exists here");
            return;
        }
        let e = MshvHypervisor::new().err().expect("no /dev/mshv");
        assert!(e.to_string().contains("/dev/mshv"), "{e}");
    }
}
