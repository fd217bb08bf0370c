//! The `Vcpu` trait: what the VMM does with one virtual CPU.

use crate::arch::{CpuIdEntry, MsrEntry, SpecialRegisters, StandardRegisters};
use crate::error::HypervisorError;
use crate::state::VcpuState;
use crate::tsc::VcpuTscReading;

/// Why `Vcpu::run` returned. `port`/`addr` name the access, `data` holds its bytes.
#[derive(Debug)]
#[allow(missing_docs)]
pub enum VmExit<'a> {
    /// Port read: fill `data`.
    IoIn { port: u16, data: &'a mut [u8] },
    /// Port write.
    IoOut { port: u16, data: &'a [u8] },
    /// MMIO read: fill `data`.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// MMIO write.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// The guest executed HLT (with no in-kernel halt handling).
    Hlt,
    /// Triple fault or shutdown request.
    Shutdown,
    /// A signal or `immediate_exit` interrupted the run (EINTR/EAGAIN): check for pause/stop.
    Interrupted,
    /// The guest asked for a reset (e.g. i8042 or KVM system event).
    Reset,
    /// The hypervisor could not handle an exit itself (KVM's `KVM_EXIT_INTERNAL_ERROR`):
    /// `suberror` says why (KVM's `KVM_INTERNAL_ERROR_*`: 1 emulation failed, 2 a fault while
    /// delivering a fault, 3 an event delivery failed, 4 an unexpected exit reason) and `data`
    /// holds the words it added (for an emulation failure with its flag bit 0 set: flags, then
    /// the instruction's length and bytes). The guest cannot go on.
    InternalError { suberror: u32, data: Vec<u64> },
    /// Anything else, described for the log.
    Other(String),
}

/// A `Send + Sync` handle that makes the owning vCPU's next or current `run` return
/// `VmExit::Interrupted`: it sets the backend's immediate-exit flag. Pair it with a signal to
/// the vCPU thread to break a run already in the kernel.
pub trait VcpuKicker: Send + Sync {
    /// Request (true) or clear (false) an immediate exit.
    fn set(&self, exit: bool);
}

/// One virtual CPU. Owned by its vCPU thread; other threads only use it while it is parked.
pub trait Vcpu: Send {
    /// The vCPU index (also its initial APIC ID).
    fn id(&self) -> u32;
    /// Enter the guest until the next exit.
    fn run(&mut self) -> Result<VmExit<'_>, HypervisorError>;
    /// A handle other threads use to stop a run.
    fn kicker(&mut self) -> std::sync::Arc<dyn VcpuKicker>;
    /// Set the CPUID the guest sees.
    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<(), HypervisorError>;
    /// General-purpose registers.
    fn regs(&self) -> Result<StandardRegisters, HypervisorError>;
    /// Set general-purpose registers.
    fn set_regs(&self, regs: &StandardRegisters) -> Result<(), HypervisorError>;
    /// Special registers.
    fn sregs(&self) -> Result<SpecialRegisters, HypervisorError>;
    /// Set special registers.
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<(), HypervisorError>;
    /// Read the listed MSRs (host-initiated).
    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>, HypervisorError>;
    /// Write MSRs (host-initiated); all or an error.
    fn set_msrs(&self, entries: &[MsrEntry]) -> Result<(), HypervisorError>;
    /// Tell the guest (KVMCLOCK_CTRL) it was stopped by the host, so its watchdogs stay quiet.
    fn notify_guest_clock_paused(&self) -> Result<(), HypervisorError>;
    /// This vCPU's TSC offset (`O + A_i`) and TSC_ADJUST (`A_i`): the per-vCPU half of a
    /// freeze. A read only, safe to take on the vCPU's own thread while it is stopped (out of
    /// `run`), so a VMM can take it as each vCPU parks and hand the readings to
    /// [`crate::vm::TscState::freeze_with_readings`]. Writing the TSC is left to
    /// [`crate::vm::TscState::thaw`], which keeps every vCPU on one VM-wide offset.
    fn tsc_reading(&self) -> Result<VcpuTscReading, HypervisorError>;
    /// Everything needed to recreate this vCPU (pieces the host lacks are recorded as absent).
    fn state(&self) -> Result<VcpuState, HypervisorError>;
    /// Restore a saved state (TSC and clock are restored separately through `TscState`).
    fn set_state(&self, state: &VcpuState) -> Result<(), HypervisorError>;
    /// The concrete vCPU, so that a backend can reach its own vCPUs' low-level time controls
    /// through `&dyn Vcpu` (and refuse another backend's). Implement as `self`.
    fn as_any(&self) -> &dyn std::any::Any;
}
