//! The `Vm` trait and the `TscState` trait (guest time at freeze and thaw).

use crate::caps::TscCapabilities;
use crate::cpu::Vcpu;
use crate::error::HypervisorError;
use crate::state::IrqchipState;
use crate::tsc::{Capture, ClockPolicy, ClockReport, ThawOrigin, TscSnapshot, VcpuTscReading};
use vmm_sys_util::eventfd::EventFd;

/// Guest time across a freeze and a thaw, with one VM-wide TSC offset.
///
/// Call `freeze` with every vCPU stopped; call `thaw` before any vCPU runs again.
pub trait TscState {
    /// What the host can do, as probed (never assumed).
    fn tsc_capabilities(&self) -> TscCapabilities;
    /// Ask for a guest TSC frequency; refused before anything changes when the host cannot run
    /// it within KVM's 250 ppm window.
    fn set_guest_tsc_khz(&self, vcpus: &[&dyn Vcpu], khz: u32) -> Result<(), HypervisorError>;
    /// The guest TSC frequency in kHz.
    fn guest_tsc_khz(&self) -> u32;
    /// Capture guest time from one host sample, using per-vCPU readings the caller already
    /// took ([`Vcpu::tsc_reading`], e.g. on each vCPU's own thread as it stopped); a `None`
    /// (or a missing entry) is read now. `readings` must not be longer than `vcpus`.
    fn freeze_with_readings(
        &self,
        vcpus: &[&dyn Vcpu],
        readings: &[Option<VcpuTscReading>],
    ) -> Result<Capture, HypervisorError>;
    /// As [`TscState::freeze_with_readings`], with the guest's time taken at `stopped_at`: the
    /// host TSC when the last vCPU had stopped running guest code (each vCPU thread reads it as
    /// it parks), not at the host sample that follows. The guest saw no time after that
    /// instant, so `frozen` then shows it none and `wallclock` counts it as paused time.
    /// Ignored (the sample's instant kept) when it is after the sample or more than a second
    /// before it, and by backends that cannot relate the host TSC to their sample.
    fn freeze_stopped_at(
        &self,
        vcpus: &[&dyn Vcpu],
        readings: &[Option<VcpuTscReading>],
        stopped_at: Option<u64>,
    ) -> Result<Capture, HypervisorError> {
        let _ = stopped_at;
        self.freeze_with_readings(vcpus, readings)
    }
    /// Capture guest time from one host sample, reading every vCPU now.
    fn freeze(&self, vcpus: &[&dyn Vcpu]) -> Result<Capture, HypervisorError> {
        self.freeze_with_readings(vcpus, &[])
    }
    /// Restore guest time under `policy`, verify by read-back, and report what was applied.
    /// `origin` says where `snapshot` came from: only [`ThawOrigin::OwnFreeze`] lets the
    /// `wallclock` policy measure the pause with the host TSC.
    fn thaw(
        &self,
        vcpus: &[&dyn Vcpu],
        snapshot: &TscSnapshot,
        origin: ThawOrigin,
        policy: ClockPolicy,
    ) -> Result<ClockReport, HypervisorError>;
    /// Whether the guest clock runs now in the hypervisor's stable, TSC-based mode: KVM's
    /// master clock (`KVM_GET_CLOCK` reports `KVM_CLOCK_TSC_STABLE`), under which every vCPU's
    /// kvmclock is computed from one (TSC, time) pair and the guest may trust it across vCPUs.
    /// `None` where the backend has no such mode. Callable while the vCPUs run.
    fn clock_tsc_stable(&self) -> Result<Option<bool>, HypervisorError> {
        Ok(None)
    }
}

/// One virtual machine.
pub trait Vm: TscState + Send + Sync {
    /// Create vCPU `id` (its APIC ID is `id`).
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>, HypervisorError>;
    /// Map guest memory.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must stay mapped and writable for as long as the VM lives.
    unsafe fn set_user_memory_region(
        &self,
        slot: u32,
        guest_phys_addr: u64,
        size: u64,
        host_addr: u64,
        dirty_log: bool,
    ) -> Result<(), HypervisorError>;
    /// The dirty-page bitmap of a slot (one bit per 4 KiB page), reset by the read.
    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, HypervisorError>;
    /// Raise interrupt `gsi` (an edge: asserted, then released) each time `fd` is written,
    /// without a VM exit or a VMM thread in between (KVM_IRQFD). With the in-kernel irqchip's
    /// default routing, GSI `n` < 16 is ISA IRQ `n` on the PIC and IOAPIC pin `n`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), HypervisorError>;
    /// The VM-wide interrupt controllers' state (`None`: the backend keeps none this VMM can
    /// read). Read while every vCPU is stopped.
    fn irqchip_state(&self) -> Result<Option<IrqchipState>, HypervisorError>;
    /// Put back what [`Vm::irqchip_state`] read, before any vCPU runs.
    fn set_irqchip_state(&self, state: &IrqchipState) -> Result<(), HypervisorError>;
}
