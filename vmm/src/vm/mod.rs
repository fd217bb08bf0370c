//! One VM: guest memory, the loaded image, devices, vCPU threads, and pause/resume with guest time
//! frozen and thawed through the hypervisor crate's `TscState`.
//!
//! One file per concern, all of them `impl Vm` blocks over the one struct defined here:
//!
//! * [`setup`]: building a VM (memory, image, vCPUs, CPUID) and putting it together.
//! * [`device_manager`]: the [`DeviceManager`]: the port-I/O bus, each device and its saved state.
//! * [`incoming`]: a VM that arrives instead of booting: a restored snapshot or a migration.
//! * [`lifecycle`]: pause (park, freeze) and resume (thaw, release), and which clock policy a
//!   resume applies.
//! * [`capture`]: the paused VM's whole state, and a snapshot of it.
//! * [`clock`]: `vm.info`'s typed `clock` object.
//! * [`error`]: what can go wrong ([`VmError`]).

use std::sync::Arc;
use std::time::Duration;

use ::devices::probe::ProbeReport;
use hypervisor::tsc::ClockReport;
use hypervisor::{TscCapabilities, VcpuState};
use log::info;
use serde::Serialize;
use vm_memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::vcpu::VcpuSet;

mod capture;
mod clock;
mod device_manager;
mod error;
mod incoming;
mod lifecycle;
mod setup;

pub use clock::{ClockInfo, RestoredFrom};
pub use device_manager::DeviceManager;
pub(crate) use error::hv_err;
pub use error::VmError;
pub use incoming::{Incoming, RestoreOptions};
use lifecycle::Frozen;
use setup::map_guest_memory;

/// The VM's run state, spelled as Cloud Hypervisor's `vm.info` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RunState {
    /// vCPUs running.
    Running,
    /// vCPUs parked, guest time frozen.
    Paused,
    /// Stopped for good.
    Shutdown,
}

/// Timings of the latest pause and resume, measured inside the VMM.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PauseStats {
    /// Pauses done.
    pub pauses: u64,
    /// Resumes done.
    pub resumes: u64,
    /// Pause request to every vCPU parked, ns.
    pub last_park_ns: u64,
    /// Time inside `TscState::freeze` (plus KVMCLOCK_CTRL), ns.
    pub last_freeze_ns: u64,
    /// Whole pause (park + freeze), ns.
    pub last_pause_ns: u64,
    /// Time inside `TscState::thaw`, ns.
    pub last_thaw_ns: u64,
    /// Thaw done to the park opened (the resume request is answered after this), ns.
    pub last_unpark_ns: u64,
    /// Park opened to the last vCPU thread scheduled out of it, ns (measured by that thread).
    pub last_released_ns: u64,
    /// Whole resume (thaw + release), ns.
    pub last_resume_ns: u64,
}

pub(crate) fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
/// A running (or paused, or shut down) VM.
pub struct Vm {
    config: VmConfig,
    hv_name: &'static str,
    vm: Arc<dyn hypervisor::Vm>,
    vcpus: VcpuSet,
    devices: DeviceManager,
    state: RunState,
    /// While paused: the guest time to thaw, where it comes from, and the policy asked for it.
    frozen: Option<Frozen>,
    caps: TscCapabilities,
    tsc_khz: u32,
    last_report: Option<ClockReport>,
    stats: PauseStats,
    warnings: Vec<String>,
    /// Guest memory mapped from a file (a snapshot's `memory.bin` restored `OnDemand`) and the
    /// length it had: the file must stay whole while the VM runs.
    backing_file: Option<(std::path::PathBuf, u64)>,
    /// Kinds of clock warnings already logged ([`lifecycle`]: once per VM each).
    warned: std::collections::HashSet<String>,
    /// What this VM was restored from (shown in `vm.info`).
    restored_from: Option<RestoredFrom>,
    /// The restored vCPU states until the first resume: snapshotting a restored VM that never
    /// ran saves them as they were (the backend holds TSC_DEADLINE back until the thaw, so
    /// reading the vCPUs back before it would lose it).
    restored_vcpus: Option<Vec<VcpuState>>,
    /// Each vCPU's MSR_KVM_SYSTEM_TIME_NEW as last known (read as it parked for a pause, or
    /// restored from a snapshot or a migration): where the guest's kvmclock page is.
    kvmclock_msrs: Vec<Option<u64>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("state", &self.state)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// The run state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The time probe's report.
    pub fn probe_report(&self) -> ProbeReport {
        self.devices.probe().report()
    }

    /// Why guest memory may have failed under the guest: the file it is mapped from (a
    /// snapshot restored `OnDemand`) is shorter than it was, or gone. A page past the file's end
    /// cannot be read, and the host ends the guest or the VMM for it; this names the cause.
    pub fn memory_backing_problem(&self) -> Option<String> {
        let (path, len) = self.backing_file.as_ref()?;
        let why = match std::fs::metadata(path) {
            Ok(m) if m.len() >= *len => return None,
            Ok(m) => format!("was truncated to {} bytes (it had {len})", m.len()),
            Err(e) => format!("cannot be read ({e})"),
        };
        Some(format!(
            "guest memory is mapped from {} (memory_restore_mode=ondemand), which {why} while \
             the VM ran: pages past its end cannot be read, so the VM stopped; keep a snapshot's \
             files in place while a VM restored from it on demand runs",
            path.display()
        ))
    }

    /// Whether this VM arrived by a live migration (its source no longer runs it).
    pub fn came_by_migration(&self) -> bool {
        matches!(self.restored_from, Some(RestoredFrom::Migration { .. }))
    }

    /// `vm.info`'s `device_tree`, in Cloud Hypervisor's shape.
    pub fn device_tree(&self) -> serde_json::Value {
        self.devices.device_tree()
    }

    /// The latest pause/resume timings.
    pub fn stats(&self) -> PauseStats {
        PauseStats {
            last_released_ns: ns(self.vcpus.last_release()),
            ..self.stats
        }
    }

    /// The report of the latest thaw.
    pub fn last_clock_report(&self) -> Option<&ClockReport> {
        self.last_report.as_ref()
    }

    /// Guest RAM.
    pub fn guest_memory(&self) -> Arc<GuestMemoryMmap> {
        self.vcpus.shared().memory.clone()
    }

    /// The hypervisor's VM (for dirty logs).
    pub fn hypervisor_vm(&self) -> Arc<dyn hypervisor::Vm> {
        self.vm.clone()
    }

    /// The guest TSC frequency, kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Turn KVM dirty-page logging on or off on every RAM slot (the slots are registered
    /// again with the flag changed; the guest may run meanwhile).
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        let memory = self.guest_memory();
        map_guest_memory(self.vm.as_ref(), &memory, self.config.memory.size, on)
    }

    /// What `vm.info`'s `clock.restored_from` shows (e.g. the migration this VM came from).
    pub fn set_restored_from(&mut self, v: RestoredFrom) {
        self.restored_from = Some(v);
    }

    /// Stop every vCPU for good.
    pub fn shutdown(&mut self) {
        if self.state != RunState::Shutdown {
            self.vcpus.stop();
            self.state = RunState::Shutdown;
            info!("VM shut down");
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
