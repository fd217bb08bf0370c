//! The Hourglass VMM library: VM lifecycle, one thread per vCPU, pause/resume with guest time
//! frozen and thawed through the `hypervisor` crate's `TscState`, and the Cloud Hypervisor
//! compatible HTTP API ([`api`]).
//!
//! [`Vmm`] owns the VM and implements [`api::ApiHandler`]; the `hourglass` binary builds one from
//! its command line, serves the API socket and waits for a [`VmmEvent`] that ends the process.

#![deny(missing_docs)]

pub mod api;
pub mod config;
pub mod control;
pub mod decode;
pub mod events;
pub mod files;
pub mod fresh_ram;
pub mod migration;
pub mod residency;
pub mod seccomp;
pub mod signal;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use hypervisor::Hypervisor;
use log::info;

use crate::api::{
    ApiError, ApiHandler, ApiRequest, ApiResponse, MemoryRestoreMode, RestoreConfig,
    VmmPingResponse,
};
use crate::config::VmConfig;
use crate::snapshot::{LoadOptions, MemoryMode, Snapshot};
use crate::vcpu::VmEvent;
use crate::vm::{RestoreOptions, RestoredFrom, RunState, Vm, VmError};
pub use events::{EventSender, VmmEvent};

/// The `features` `vmm.ping` lists: what this VMM can do (Cloud Hypervisor lists its build
/// features here, e.g. `kvm`).
pub const FEATURES: &[&str] = &[
    "kvm",
    "clock_policy",
    "time_probe",
    "snapshot",
    "migration",
    "seccomp",
];

/// The VMM: one VM and the API's view of it.
pub struct Vmm {
    vm: Mutex<Vm>,
    events: EventSender,
    /// The latest outgoing migration's progress (`vm.info`'s `migration`).
    migration: migration::SharedProgress,
    /// An outgoing migration is running.
    migrating: std::sync::atomic::AtomicBool,
    /// Set when the VM's events stop counting (its forwarding thread drops them): the VM is
    /// being replaced by a reboot. `None` for a VM whose events come another way (received by
    /// migration).
    retired: Mutex<Option<Arc<AtomicBool>>>,
    /// Times the guest rebooted (`vm.info`'s `reboots`).
    reboots: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm").finish_non_exhaustive()
    }
}

fn chain(status: u16, context: &str, e: &VmError) -> ApiError {
    ApiError::from_error(status, context, e)
}

/// The HTTP status of a failed snapshot or restore: 400 when the request or the snapshot is at
/// fault (bad or mismatched snapshot, a snapshot this host cannot run), 500 otherwise, and
/// for a VM in the wrong state (not paused, shut down), as Cloud Hypervisor answers: its
/// client knows no 409 and prints "Server responded with Unknown" for one.
pub fn snapshot_error_status(e: &VmError) -> u16 {
    use hypervisor::HypervisorError as H;
    match e {
        VmError::InvalidState(_) => 500,
        VmError::Snapshot(s) if s.is_bad_input() => 400,
        VmError::Config(_) => 400,
        VmError::Hypervisor {
            source:
                H::Tsc(_)
                | H::TscState(_)
                | H::VcpuState(_)
                | H::TscFrequencyRefused { .. }
                | H::Unsupported(_)
                | H::InvalidArgument(_),
            ..
        } => 400,
        _ => 500,
    }
}

/// The memory backing a restore asks for: Cloud Hypervisor's `Copy` copies (the snapshot may
/// be deleted afterwards); `OnDemand` (pages brought in as the guest touches them) maps
/// `memory.bin` copy-on-write.
pub fn memory_mode_from_api(m: MemoryRestoreMode) -> MemoryMode {
    match m {
        MemoryRestoreMode::Copy => MemoryMode::Copy,
        MemoryRestoreMode::OnDemand => MemoryMode::MapPrivate,
    }
}

/// The VM's own events, passed on as [`VmmEvent::Vm`] (the one forwarding thread: vCPU threads
/// report on a channel of their own).
/// Events arriving once `retired` is set are dropped: they come from a VM a reboot replaces.
fn forward_vm_events(events: EventSender) -> Result<(Sender<VmEvent>, Arc<AtomicBool>), VmError> {
    let (vm_tx, vm_rx) = std::sync::mpsc::channel::<VmEvent>();
    let retired = Arc::new(AtomicBool::new(false));
    let gone = retired.clone();
    std::thread::Builder::new()
        .name("vm-events".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Signal);
            while let Ok(ev) = vm_rx.recv() {
                if gone.load(Ordering::SeqCst) {
                    log::debug!("dropped an event of a VM that was rebooted: {ev}");
                    continue;
                }
                if !events.send(VmmEvent::Vm(ev)) {
                    break;
                }
            }
        })
        .map_err(VmError::Thread)?;
    Ok((vm_tx, retired))
}

impl Vmm {
    /// Boot a VM with `config` on `hv`. VM events (guest shutdown, vCPU failure) are forwarded
    /// to `events` as [`VmmEvent::Vm`].
    pub fn boot(
        hv: Arc<dyn Hypervisor>,
        config: VmConfig,
        events: impl Into<EventSender>,
    ) -> Result<Self, VmError> {
        let events = events.into();
        let (vm_tx, retired) = forward_vm_events(events.clone())?;
        let vm = Vm::boot(hv, config, vm_tx)?;
        Ok(Self::adopt(vm, events, retired))
    }

    /// The guest asked for a reset: stop this VM and boot a new one from the same
    /// configuration on `hv` (Cloud Hypervisor reboots too; its process exits only on power
    /// off). The serial output goes on where it was (a file is appended to, not truncated).
    /// Events the old VM still sends are dropped. On error the old VM stays stopped and the
    /// error says why: the caller ends the VMM.
    pub fn reboot(&self, hv: Arc<dyn Hypervisor>) -> Result<(), VmError> {
        let mut vm = self.vm();
        let config = vm.config().clone();
        if let Some(r) = self
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            r.store(true, Ordering::SeqCst);
        }
        vm.shutdown();
        let (vm_tx, retired) = forward_vm_events(self.events.clone())?;
        *vm = Vm::boot_again(hv, config, vm_tx)?;
        *self.retired.lock().unwrap_or_else(|e| e.into_inner()) = Some(retired);
        let n = self.reboots.fetch_add(1, Ordering::SeqCst) + 1;
        info!("the guest rebooted (reboot {n})");
        Ok(())
    }

    /// Restore a VM from the snapshot `cfg.source_url` names (`hourglass --restore` and
    /// `vm.restore`). The VM comes up paused unless `cfg.resume`; then guest time is thawed
    /// under `cfg.clock_policy` (default: the snapshot configuration's policy). `serial`
    /// replaces the snapshot configuration's serial output. On any error nothing is left
    /// running and the snapshot is unchanged.
    pub fn restore(
        hv: Arc<dyn Hypervisor>,
        cfg: &RestoreConfig,
        serial: Option<devices::SerialOutput>,
        events: impl Into<EventSender>,
    ) -> Result<Self, VmError> {
        let events = events.into();
        let dir = cfg.source_dir();
        let snap = Snapshot::read(&dir)?;
        let opts = RestoreOptions {
            memory: LoadOptions {
                mode: memory_mode_from_api(cfg.memory_restore_mode),
                verify: true,
                prefault: cfg.prefault,
            },
            serial,
            policy: cfg.clock_policy,
        };
        let (vm_tx, retired) = forward_vm_events(events.clone())?;
        let mut vm = Vm::restore(hv, &snap, &opts, vm_tx)?;
        if cfg.resume {
            vm.resume(None)?;
        }
        info!(
            "restored from {} ({})",
            dir.display(),
            if cfg.resume { "running" } else { "paused" }
        );
        Ok(Self::adopt(vm, events, retired))
    }

    /// A VMM around `vm`, whose events [`forward_vm_events`] forwards with `retired`.
    fn adopt(vm: Vm, events: EventSender, retired: Arc<AtomicBool>) -> Self {
        let vmm = Self::from_vm(vm, events);
        *vmm.retired.lock().unwrap_or_else(|e| e.into_inner()) = Some(retired);
        vmm
    }

    /// A VMM around a VM built elsewhere (an embedder's).
    pub fn from_vm(vm: Vm, events: impl Into<EventSender>) -> Self {
        Self {
            vm: Mutex::new(vm),
            events: events.into(),
            migration: Default::default(),
            migrating: Default::default(),
            retired: Mutex::new(None),
            reboots: Default::default(),
        }
    }

    /// The latest outgoing migration's progress, if there was one.
    pub fn migration_progress(&self) -> Option<migration::MigrationProgress> {
        let p = self.migration.lock().unwrap_or_else(|e| e.into_inner());
        (!p.phase.is_empty()).then(|| p.clone())
    }

    /// Migrate the VM to `cfg.destination_url` (see [`migration::send`]); one at a time.
    pub fn send_migration(
        &self,
        cfg: &crate::api::SendMigrationConfig,
    ) -> Result<migration::SendReport, ApiError> {
        use std::sync::atomic::Ordering;
        if self.migrating.swap(true, Ordering::SeqCst) {
            return Err(ApiError::internal("The VM could not be migrated")
                .caused_by("a migration of this VM is already running"));
        }
        info!("API: vm.send-migration to {}", cfg.destination_url);
        let r = migration::send(&self.vm, cfg, &self.migration);
        self.migrating.store(false, Ordering::SeqCst);
        r.map_err(|e| ApiError::from_error(e.status(), "The VM could not be migrated", &e))
    }

    /// The VM (serialises every control operation).
    pub fn vm(&self) -> MutexGuard<'_, Vm> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body of `vm.info`: Cloud Hypervisor's `config`, `state` and `memory_actual_size`, plus
    /// Hourglass's `clock`, `time_probe` and `pause_stats`.
    pub fn info(&self) -> serde_json::Value {
        // Before the VM lock: the progress is updated while a migration runs.
        let migration = self.migration_progress();
        let vm = self.vm();
        let c = vm.config();
        // Cloud Hypervisor's shapes for the fields it has (a typed client of its API parses
        // them), Hourglass's own beside them.
        let (mode, file) = match &c.serial {
            devices::SerialOutput::Tty => ("Tty", None),
            devices::SerialOutput::File(p) => ("File", Some(p)),
            devices::SerialOutput::Off => ("Off", None),
        };
        serde_json::json!({
            "config": {
                "cpus": c.cpus,
                "memory": c.memory,
                "payload": {
                    "firmware": null,
                    "kernel": c.kernel,
                    "cmdline": c.cmdline,
                    "initramfs": c.initramfs,
                },
                "serial": { "file": file, "mode": mode, "iommu": false, "socket": null },
                "console": { "file": null, "mode": "Off", "iommu": false, "socket": null },
                "clock_policy": c.clock_policy,
                "dirty_mib": c.dirty_mib,
                "guest_idle_us": c.guest_idle_us,
                "dirty_passes": c.dirty_passes,
            },
            "state": vm.state(),
            "memory_actual_size": c.memory.size,
            "device_tree": vm.device_tree(),
            "clock": vm.clock_info(),
            "time_probe": vm.probe_report(),
            "pause_stats": vm.stats(),
            "migration": migration,
            "reboots": self.reboots.load(Ordering::SeqCst),
        })
    }

    /// Stop the VM's vCPUs for good.
    pub fn shutdown_vm(&self) {
        self.vm().shutdown();
    }

    fn send(&self, ev: VmmEvent) {
        self.events.send(ev);
    }
}

impl ApiHandler for Vmm {
    fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        match req {
            ApiRequest::VmmPing => {
                Ok(VmmPingResponse::current(FEATURES).to_response())
            }
            ApiRequest::VmmShutdown => {
                info!("API: vmm.shutdown");
                self.send(VmmEvent::ApiShutdown);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmInfo => Ok(ApiResponse::Json(self.info())),
            ApiRequest::VmPause => {
                let mut vm = self.vm();
                vm.pause()
                    .map(|_| ApiResponse::Empty)
                    .map_err(|e| chain(500, "The VM could not be paused", &e))
            }
            ApiRequest::VmResume(cfg) => {
                let mut vm = self.vm();
                vm.resume(cfg.clock_policy)
                    .map(|_| ApiResponse::Empty)
                    .map_err(|e| chain(500, "The VM could not be resumed", &e))
            }
            ApiRequest::VmShutdown => {
                let mut vm = self.vm();
                if vm.state() == RunState::Shutdown {
                    return Err(ApiError::internal("The VM could not be shut down")
                        .caused_by("the VM is already shut down"));
                }
                vm.shutdown();
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmSnapshot(cfg) => {
                let vm = self.vm();
                let dest = cfg.destination_dir();
                info!("API: vm.snapshot to {}", dest.display());
                vm.snapshot(&dest).map(|_| ApiResponse::Empty).map_err(|e| {
                    chain(
                        snapshot_error_status(&e),
                        "The VM could not be snapshotted",
                        &e,
                    )
                })
            }
            // Cloud Hypervisor answers 500 for a restore into a VMM that has a VM.
            ApiRequest::VmRestore(_) => Err(ApiError::internal("The VM could not be restored")
                .caused_by(
                    "this VMM already has a VM; restore into an hourglass started with only \
                     --api-socket",
                )),
            ApiRequest::VmSendMigration(cfg) => {
                self.send_migration(&cfg).map(|_| ApiResponse::Empty)
            }
            ApiRequest::VmReceiveMigration(_) => Err(ApiError::internal(
                "The VM could not be received",
            )
            .caused_by("this VMM already has a VM; receive into an hourglass started with only --api-socket")),
        }
    }
}

/// What serves the API of an `hourglass` process: the [`Vmm`] once a VM is booted or restored,
/// and before that (an `hourglass` started with only `--api-socket`) `vmm.ping`,
/// `vmm.shutdown` and `vm.restore`.
pub struct Service {
    hv: Arc<dyn Hypervisor>,
    events: EventSender,
    vmm: OnceLock<Arc<Vmm>>,
    /// Serialises restores (one VM per process).
    creating: Mutex<()>,
    /// Serial output for a VM restored through the API (None: the snapshot's).
    serial: Option<devices::SerialOutput>,
    /// The VMM is asked to stop: an incoming migration still before its hand-over gives up.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("has_vm", &self.vmm.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A service with no VM yet. VM events go to `events`; a VM restored through the API writes
    /// its serial output to `serial` when given.
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        events: impl Into<EventSender>,
        serial: Option<devices::SerialOutput>,
    ) -> Self {
        Self {
            hv,
            events: events.into(),
            vmm: OnceLock::new(),
            creating: Mutex::new(()),
            serial,
            stopping: Default::default(),
        }
    }

    /// Install the VMM (after a boot or a command-line restore).
    pub fn set(&self, vmm: Arc<Vmm>) {
        let _ = self.vmm.set(vmm);
    }

    /// Create the VM with `f` and install it, holding off `vm.restore` meanwhile (one VM per
    /// process). When a VM already exists, `f` is not called and that VM is returned.
    pub fn create<E>(&self, f: impl FnOnce() -> Result<Vmm, E>) -> Result<Arc<Vmm>, E> {
        let _one = self.creating.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = self.vmm.get() {
            return Ok(v.clone());
        }
        let v = Arc::new(f()?);
        self.set(v.clone());
        Ok(v)
    }

    /// The VMM is asked to stop: an incoming migration not yet handed over is abandoned (its
    /// source keeps the VM). Waits until no VM is being created (a migration being received
    /// gives up at its next frame) and returns whether one arrived by migration meanwhile: then
    /// this VMM runs the only copy of that guest, and ending it would lose the guest.
    pub fn begin_stop(&self) -> bool {
        use std::sync::atomic::Ordering;
        let had = self.vmm.get().is_some();
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.creating.lock().unwrap_or_else(|e| e.into_inner()));
        let received = !had && self.vmm.get().is_some_and(|v| v.vm().came_by_migration());
        if received {
            // Serve on; a later stop request is for the guest that now lives here.
            self.stopping.store(false, Ordering::SeqCst);
        }
        received
    }

    /// The VMM, once there is a VM.
    pub fn vmm(&self) -> Option<Arc<Vmm>> {
        self.vmm.get().cloned()
    }

    /// Reboot the VM (the guest asked for a reset): see [`Vmm::reboot`].
    pub fn reboot(&self) -> Result<(), VmError> {
        match self.vmm() {
            Some(v) => v.reboot(self.hv.clone()),
            None => Err(VmError::Config("no VM to reboot".into())),
        }
    }

    fn events(&self) -> EventSender {
        self.events.clone()
    }
}

impl ApiHandler for Service {
    fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        if let Some(v) = self.vmm.get() {
            return v.handle(req);
        }
        match req {
            ApiRequest::VmmPing => Ok(VmmPingResponse::current(FEATURES).to_response()),
            ApiRequest::VmmShutdown => {
                info!("API: vmm.shutdown");
                self.events.send(VmmEvent::ApiShutdown);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmRestore(cfg) => {
                let _one = self.creating.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(v) = self.vmm.get() {
                    return v.handle(ApiRequest::VmRestore(cfg));
                }
                info!("API: vm.restore from {}", cfg.source_url);
                let vmm = Vmm::restore(self.hv.clone(), &cfg, self.serial.clone(), self.events())
                    .map_err(|e| {
                    chain(
                        snapshot_error_status(&e),
                        "The VM could not be restored",
                        &e,
                    )
                })?;
                self.set(Arc::new(vmm));
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmReceiveMigration(cfg) => {
                let _one = self.creating.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(v) = self.vmm.get() {
                    return v.handle(ApiRequest::VmReceiveMigration(cfg));
                }
                let what = "The VM could not be received";
                let url = cfg
                    .receiver()
                    .map_err(|e| ApiError::bad_request(what).caused_by(e))?;
                let ep = migration::source::endpoint(&url);
                info!("API: vm.receive-migration on {ep}");
                let (vm_tx, retired) =
                    forward_vm_events(self.events()).map_err(|e| chain(500, what, &e))?;
                // No policy named: the VM's own (its configuration's), as a restore does.
                let policy = cfg.clock_policy;
                let (mut vm, report) = migration::receive_vm(
                    &ep,
                    self.hv.clone(),
                    self.serial.clone(),
                    vm_tx,
                    policy,
                    self.stopping.clone(),
                )
                .map_err(|e| ApiError::from_error(e.status(), what, &e))?;
                vm.set_restored_from(RestoredFrom::Migration {
                    migration: ep.to_string(),
                    bytes: report.bytes,
                    data_pages: report.data_pages,
                    zero_pages: report.zero_pages,
                    total_ns: u64::try_from(report.total.as_nanos()).unwrap_or(u64::MAX),
                });
                self.set(Arc::new(Vmm::adopt(vm, self.events(), retired)));
                Ok(ApiResponse::Empty)
            }
            other => {
                let msg = format!(
                    "{}: there is no VM (this hourglass was started without one; restore one with \
                     vm.restore)",
                    other.endpoint()
                );
                // Cloud Hypervisor: 404 for vm.info without a VM, 500 for the actions.
                Err(match other {
                    ApiRequest::VmInfo => ApiError::not_found(msg),
                    _ => ApiError::internal(msg),
                })
            }
        }
    }
}
