//! What each vCPU thread reads from its own vCPU as it parks for a pause.
//!
//! The per-vCPU half of a freeze (`Vcpu::tsc_reading`) and the guest's "you were stopped"
//! notice (`KVMCLOCK_CTRL`) are per-vCPU ioctls. Done by each thread on its own vCPU as it
//! parks, they run side by side instead of one after the other on the controller thread; the
//! controller then takes them ([`ParkCache::take`]) for `TscState::freeze_with_readings` and
//! tells only the guests not yet told. A reading is only good while the vCPU stays stopped: the
//! thread clears it before the vCPU runs again, and the take empties it, so a later freeze (after
//! a thaw wrote new offsets) never sees it.

use std::sync::{Mutex, MutexGuard};

use hypervisor::arch::msr;
use hypervisor::tsc::VcpuTscReading;
use hypervisor::Vcpu;
use log::debug;

/// What a vCPU thread read from its own vCPU as it parked for a pause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParkRead {
    /// `Vcpu::tsc_reading`, taken after the vCPU left `KVM_RUN` (`None`: not read at this park,
    /// or the read failed; the freeze reads it then).
    pub reading: Option<VcpuTscReading>,
    /// `KVMCLOCK_CTRL` succeeded at this park: the guest need not be told again.
    pub clock_paused: bool,
    /// The host TSC as the thread began to park, its vCPU out of `KVM_RUN`: the guest ran no
    /// code on this vCPU after it. The latest of these is when the whole guest stopped, the
    /// instant the freeze takes guest time at (`TscState::freeze_stopped_at`).
    pub stopped_at: Option<u64>,
    /// MSR_KVM_SYSTEM_TIME_NEW (the guest's kvmclock page address, bit 0 enable) as the vCPU
    /// parked (`None`: not read); `vm.info` reads the guest's page there.
    pub system_time: Option<u64>,
}

/// One vCPU's [`ParkRead`], shared by its thread and the controller.
#[derive(Debug, Default)]
pub(super) struct ParkCache(Mutex<ParkRead>);

impl ParkCache {
    fn lock(&self) -> MutexGuard<'_, ParkRead> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// On the vCPU's own thread, stopped for a pause: read the TSC state, tell the guest.
    pub(super) fn read_at_park(&self, id: u32, vcpu: &dyn Vcpu) {
        let stopped_at = hypervisor::host::rdtsc();
        let reading = vcpu.tsc_reading();
        let clock = vcpu.notify_guest_clock_paused();
        if let Err(e) = &clock {
            // EINVAL until the guest has enabled kvmclock; the controller tries again.
            debug!("vCPU {id}: KVMCLOCK_CTRL at park: {e}");
        }
        let system_time = vcpu
            .msrs(&[msr::KVM_SYSTEM_TIME_NEW])
            .ok()
            .and_then(|m| m.first().map(|e| e.data));
        *self.lock() = ParkRead {
            reading: reading.ok(),
            clock_paused: clock.is_ok(),
            stopped_at: Some(stopped_at),
            system_time,
        };
    }

    /// Before the vCPU runs again: what was read no longer holds.
    pub(super) fn clear(&self) {
        *self.lock() = ParkRead::default();
    }

    /// What was read at this park, once.
    pub(super) fn take(&self) -> ParkRead {
        std::mem::take(&mut *self.lock())
    }
}
