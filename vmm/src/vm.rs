//! One VM: guest memory, the loaded image, devices, vCPU threads, and pause/resume with guest time
//! frozen and thawed through the hypervisor crate's `TscState`.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::probe::{ProbeReport, TimeProbe, PROBE_BASE, PROBE_PORT_COUNT};
use devices::serial::{COM1_PORT, SERIAL_PORT_LEN};
use devices::{PioBus, Serial, I8042};
use hypervisor::tsc::{Capture, ClockPolicy, ClockReport, ThawOrigin};
use hypervisor::{Hypervisor, TscCapabilities, Vcpu, VcpuState};
use log::{info, warn};
use serde::Serialize;
use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::config::VmConfig;
use crate::snapshot::{DeviceStates, LoadOptions, Snapshot, VmState, WriteOptions, WriteReport};
use crate::vcpu::{PauseError, Shared, VcpuSet, VmEvent};

/// Errors building or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A hypervisor call failed.
    #[error("{what}")]
    Hypervisor {
        /// What was being done.
        what: String,
        /// The hypervisor's error.
        #[source]
        source: hypervisor::HypervisorError,
    },
    /// Guest setup (layout, image, CPUID) failed.
    #[error("guest setup")]
    Arch(#[from] arch::Error),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {size} bytes of guest memory: {reason}")]
    Memory {
        /// Bytes asked for.
        size: u64,
        /// Why it failed.
        reason: String,
    },
    /// The kernel image could not be read.
    #[error("cannot read the kernel image {path}")]
    Kernel {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot run (e.g. too many vCPUs for the test guest).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A device could not be created.
    #[error("device setup: {0}")]
    Device(String),
    /// vCPU threads could not be started.
    #[error("cannot start vCPU threads")]
    Thread(#[source] std::io::Error),
    /// The VM is not in a state that allows the action.
    #[error("{0}")]
    InvalidState(String),
    /// Parking or releasing the vCPUs failed.
    #[error("vCPU threads")]
    Pause(#[from] PauseError),
    /// Writing or reading a snapshot failed (the error names the file and field).
    #[error("snapshot")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// How [`Vm::restore`] brings a snapshot back.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// How guest memory is backed and checked.
    pub memory: LoadOptions,
    /// Serial output instead of the snapshot configuration's.
    pub serial: Option<devices::SerialOutput>,
    /// Clock policy of the first resume when that names none.
    pub policy: Option<ClockPolicy>,
}

fn hv_err(what: impl Into<String>) -> impl FnOnce(hypervisor::HypervisorError) -> VmError {
    let what = what.into();
    move |source| VmError::Hypervisor { what, source }
}

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

/// `KVM_MP_STATE_RUNNABLE`: the vCPU runs (rather than waiting for INIT/SIPI).
const KVM_MP_STATE_RUNNABLE: u32 = 0;

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A running (or paused, or shut down) VM.
pub struct Vm {
    config: VmConfig,
    hv_name: &'static str,
    vm: Arc<dyn hypervisor::Vm>,
    vcpus: VcpuSet,
    probe: Arc<TimeProbe>,
    state: RunState,
    capture: Option<Capture>,
    /// Where `capture` came from, for the thaw of the next resume.
    thaw_origin: ThawOrigin,
    caps: TscCapabilities,
    tsc_khz: u32,
    last_report: Option<ClockReport>,
    last_policy: ClockPolicy,
    stats: PauseStats,
    warnings: Vec<String>,
    serial: Arc<Mutex<Serial>>,
    /// The policy a resume without one uses, when a restore asked for one.
    resume_policy: Option<ClockPolicy>,
    /// What this VM was restored from (shown in `vm.info`).
    restored_from: Option<serde_json::Value>,
    /// The restored vCPU states until the first resume: snapshotting a restored VM that never
    /// ran saves them as they were (the backend holds TSC_DEADLINE back until the thaw, so
    /// reading the vCPUs back before it would lose it).
    restored_vcpus: Option<Vec<VcpuState>>,
}

/// The pieces [`Vm::assemble`] puts together.
struct Parts {
    hv_name: &'static str,
    vm: Arc<dyn hypervisor::Vm>,
    config: VmConfig,
    memory: GuestMemoryMmap,
    vcpus: Vec<Box<dyn Vcpu>>,
    serial: Serial,
    probe: TimeProbe,
    tsc_khz: u32,
    events: Sender<VmEvent>,
    paused: Option<Capture>,
}

/// A VM being received by a migration (or restored): guest RAM mapped, vCPUs created with
/// their CPUID and the guest TSC rate set, no state yet. [`Vm::finish_incoming`] completes it.
pub struct Incoming {
    hv_name: &'static str,
    vm: Arc<dyn hypervisor::Vm>,
    config: VmConfig,
    memory: GuestMemoryMmap,
    vcpus: Vec<Box<dyn Vcpu>>,
    tsc_khz: u32,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("config", &self.config)
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// Guest RAM (written by the migration before the state arrives).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The RAM regions as `(guest address, bytes)`.
    pub fn ram_regions(&self) -> Vec<(u64, u64)> {
        self.memory
            .iter()
            .map(|r| (r.start_addr().raw_value(), r.len()))
            .collect()
    }
}

/// Map every region of `memory` into the VM, one slot per region.
fn map_guest_memory(
    vm: &dyn hypervisor::Vm,
    memory: &GuestMemoryMmap,
    size: u64,
    dirty_log: bool,
) -> Result<(), VmError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory {
                size,
                reason: e.to_string(),
            })?;
        // SAFETY: the region belongs to `memory`, which the VM's vCPU threads keep alive (an
        // `Arc` in `Shared`) for as long as the VM can run.
        unsafe {
            vm.set_user_memory_region(
                slot as u32,
                region.start_addr().raw_value(),
                region.len(),
                host as u64,
                dirty_log,
            )
        }
        .map_err(hv_err(format!("map guest memory slot {slot}")))?;
    }
    Ok(())
}

/// Create vCPUs `0..n`.
fn create_vcpus(vm: &dyn hypervisor::Vm, n: u32) -> Result<Vec<Box<dyn Vcpu>>, VmError> {
    (0..n)
        .map(|id| {
            vm.create_vcpu(id)
                .map_err(hv_err(format!("create vCPU {id}")))
        })
        .collect()
}

/// Give every vCPU the guest CPUID (TSC leaves at `tsc_khz`).
fn set_cpuids(
    hv: &dyn Hypervisor,
    vcpus: &[Box<dyn Vcpu>],
    n: u32,
    tsc_khz: u32,
) -> Result<(), VmError> {
    let host_cpuid = hv
        .supported_cpuid()
        .map_err(hv_err("read the host CPUID"))?;
    for v in vcpus {
        let id = v.id();
        let cpuid = arch::build_cpuid(
            &host_cpuid,
            &arch::CpuidConfig {
                vcpu_id: id,
                vcpu_count: n,
                tsc_khz,
            },
        )?;
        v.set_cpuid(&cpuid)
            .map_err(hv_err(format!("set vCPU {id}'s CPUID")))?;
    }
    Ok(())
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
    /// Build the VM and start its vCPUs at the image's PVH entry.
    pub fn boot(
        hv: Arc<dyn Hypervisor>,
        config: VmConfig,
        events: Sender<VmEvent>,
    ) -> Result<Self, VmError> {
        let n = config.cpus.boot_vcpus;
        let size = config.memory.size;
        if config.kernel.is_none() {
            if n > guest::MAX_VCPUS {
                return Err(VmError::Config(format!(
                    "the built-in test guest runs at most {} vCPUs, {n} asked",
                    guest::MAX_VCPUS
                )));
            }
            let need = guest::DIRTY_BASE + u64::from(config.dirty_mib) * (1 << 20);
            if need > size {
                return Err(VmError::Config(format!(
                    "--dirty-mib {} needs at least {} MiB of memory, {} MiB given",
                    config.dirty_mib,
                    need.div_ceil(1 << 20),
                    size >> 20
                )));
            }
        }
        let vm = hv.create_vm().map_err(hv_err("create the VM"))?;

        let regions = arch::layout::ram_regions(size)?;
        let memory = GuestMemoryMmap::from_ranges(&regions).map_err(|e| VmError::Memory {
            size,
            reason: e.to_string(),
        })?;
        map_guest_memory(vm.as_ref(), &memory, size, false)?;

        let image: std::borrow::Cow<'static, [u8]> = match &config.kernel {
            Some(p) => std::fs::read(p)
                .map_err(|source| VmError::Kernel {
                    path: p.clone(),
                    source,
                })?
                .into(),
            None => guest::GUEST_ELF.into(),
        };
        let boot = arch::load_kernel(&memory, &image)?;
        arch::configure_pvh(&memory, size)?;
        arch::write_boot_gdt(&memory)?;
        info!(
            "loaded {} ({} bytes), PVH entry {:#x}",
            config
                .kernel
                .as_ref()
                .map_or("the built-in test guest".to_string(), |p| p
                    .display()
                    .to_string()),
            image.len(),
            boot.entry.raw_value()
        );

        let vcpus = create_vcpus(vm.as_ref(), n)?;
        let tsc_khz = vm.guest_tsc_khz();
        set_cpuids(hv.as_ref(), &vcpus, n, tsc_khz)?;
        for v in &vcpus {
            let id = v.id();
            // With an in-kernel irqchip KVM creates application processors waiting for
            // INIT/SIPI; the PVH contract starts every vCPU at the entry, so make them runnable.
            let mut st = v
                .state()
                .map_err(hv_err(format!("read vCPU {id}'s state")))?;
            if st.mp_state.is_some_and(|m| m != KVM_MP_STATE_RUNNABLE) {
                st.mp_state = Some(KVM_MP_STATE_RUNNABLE);
                v.set_state(&st)
                    .map_err(hv_err(format!("make vCPU {id} runnable")))?;
            }
            if let Err(e) = v.set_msrs(&arch::boot_msrs()) {
                warn!("vCPU {id}: boot MSRs not set: {e}");
            }
            let sregs = v
                .sregs()
                .map_err(hv_err(format!("read vCPU {id}'s special registers")))?;
            v.set_sregs(&arch::pvh_boot_sregs(&sregs))
                .map_err(hv_err(format!("set vCPU {id}'s special registers")))?;
            v.set_regs(&arch::pvh_boot_regs(boot.entry))
                .map_err(hv_err(format!("set vCPU {id}'s registers")))?;
        }

        let serial = Serial::new(&config.serial).map_err(|e| VmError::Device(e.to_string()))?;
        let probe = TimeProbe::new(n, config.dirty_mib, tsc_khz);
        probe.set_idle_us(config.guest_idle_us);
        Self::assemble(Parts {
            hv_name: hv.name(),
            vm,
            config,
            memory,
            vcpus,
            serial,
            probe,
            tsc_khz,
            events,
            paused: None,
        })
    }

    /// Put a built VM together: devices on the bus, the capability report, the vCPU threads
    /// (running, or parked with `paused` as the capture to thaw on resume).
    fn assemble(p: Parts) -> Result<Self, VmError> {
        let Parts {
            hv_name,
            vm,
            config,
            memory,
            vcpus,
            serial,
            probe,
            tsc_khz,
            events,
            paused,
        } = p;
        let n = config.cpus.boot_vcpus;
        let size = config.memory.size;
        let serial = Arc::new(Mutex::new(serial));
        let mut bus = PioBus::new();
        bus.insert(COM1_PORT, SERIAL_PORT_LEN, serial.clone())
            .map_err(|e| VmError::Device(e.to_string()))?;
        bus.insert(
            devices::i8042::I8042_DATA_PORT,
            5,
            Arc::new(Mutex::new(I8042::new())),
        )
        .map_err(|e| VmError::Device(e.to_string()))?;
        let probe = Arc::new(probe);
        debug_assert!(PROBE_BASE.checked_add(PROBE_PORT_COUNT).is_some());

        let caps = vm.tsc_capabilities();
        let mut warnings = Vec::new();
        if caps.offsets_honoured == Some(false) {
            let w = "this host ignores TSC offsets: the guest TSC always equals the host TSC, so \
                     only the host's own TSC can be shown to the guest (policy host_tsc); the \
                     frozen policy cannot be applied"
                .to_string();
            warn!("{w}");
            warnings.push(w);
        }
        info!(
            "guest TSC {tsc_khz} kHz; host {:?} TSC {} kHz, offsets honoured {:?}, scaling {}",
            caps.vendor, caps.host_tsc_khz, caps.offsets_honoured, caps.tsc_scaling
        );

        let shared = Arc::new(Shared::new(Arc::new(memory), bus, probe.clone(), events));
        let state = if paused.is_some() {
            RunState::Paused
        } else {
            RunState::Running
        };
        let vcpus = if paused.is_some() {
            VcpuSet::start_paused(shared, vcpus)
        } else {
            VcpuSet::start(shared, vcpus)
        }
        .map_err(VmError::Thread)?;
        info!(
            "VM {} with {n} vCPU(s), {} MiB",
            if paused.is_some() {
                "paused"
            } else {
                "running"
            },
            size >> 20
        );
        Ok(Self {
            last_policy: config.clock_policy,
            config,
            hv_name,
            vm,
            vcpus,
            probe,
            serial,
            state,
            capture: paused,
            thaw_origin: ThawOrigin::Snapshot,
            caps,
            tsc_khz,
            last_report: None,
            stats: PauseStats::default(),
            warnings,
            resume_policy: None,
            restored_from: None,
            restored_vcpus: None,
        })
    }

    /// Say where the paused capture came from (a VM from `finish_incoming` starts as
    /// [`ThawOrigin::Snapshot`]; the destination of a migration says `Migration`).
    pub(crate) fn set_thaw_origin(&mut self, origin: ThawOrigin) {
        self.thaw_origin = origin;
    }

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
        self.probe.report()
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

    /// The clock policy of a resume that names none: the one a restore asked for (until that
    /// VM's first resume), else the configuration's.
    pub fn default_resume_policy(&self) -> ClockPolicy {
        self.resume_policy.unwrap_or(self.config.clock_policy)
    }

    /// Write a snapshot of the paused VM into the directory `dest`, atomically: the time
    /// capture of the pause, every vCPU's state, the devices' states and guest RAM (see
    /// [`crate::snapshot`]). A running VM is refused ([`VmError::InvalidState`]).
    pub fn snapshot(&self, dest: &Path) -> Result<WriteReport, VmError> {
        let state = self.capture_state()?;
        let memory = self.vcpus.shared().memory.clone();
        let report = crate::snapshot::write(
            dest,
            &self.config,
            &state,
            &memory,
            &WriteOptions::default(),
        )?;
        info!(
            "snapshot written to {}: {} MiB of RAM, {} MiB of data, in {:?}",
            dest.display(),
            report.memory_bytes >> 20,
            report.data_bytes >> 20,
            report.total_time
        );
        Ok(report)
    }

    /// The paused VM's state: the time capture of the pause, every vCPU's state and the
    /// devices' states (what a snapshot's `state.json` and a migration's `State` frame hold).
    /// A running VM is refused ([`VmError::InvalidState`]).
    pub fn capture_state(&self) -> Result<VmState, VmError> {
        match self.state {
            RunState::Paused => {}
            RunState::Running => {
                return Err(VmError::InvalidState(
                    "the VM must be paused to be snapshotted (vm.pause first)".into(),
                ))
            }
            RunState::Shutdown => return Err(VmError::InvalidState("the VM is shut down".into())),
        }
        let capture = self
            .capture
            .as_ref()
            .ok_or_else(|| VmError::InvalidState("paused without a time capture".into()))?;
        let vcpus = if let Some(v) = &self.restored_vcpus {
            v.clone()
        } else {
            let guards = self.vcpus.lock_all();
            guards
                .iter()
                .map(|g| {
                    g.state()
                        .map_err(hv_err(format!("read vCPU {}'s state", g.id())))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state();
        Ok(VmState {
            tsc: capture.snapshot.clone(),
            vcpus,
            devices: DeviceStates {
                serial,
                probe: self.probe.state(),
            },
        })
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
    pub fn set_restored_from(&mut self, v: serde_json::Value) {
        self.restored_from = Some(v);
    }

    /// Start receiving a VM with `config` whose guest TSC runs at `tsc_khz`: fresh zeroed
    /// RAM, the hypervisor VM, vCPUs with CPUID. Refused before any state exists when the
    /// host cannot run the guest TSC at `tsc_khz`.
    pub fn prepare_incoming(
        hv: Arc<dyn Hypervisor>,
        config: VmConfig,
        tsc_khz: u32,
    ) -> Result<Incoming, VmError> {
        let size = config.memory.size;
        let regions = arch::layout::ram_regions(size)?;
        let memory = GuestMemoryMmap::from_ranges(&regions).map_err(|e| VmError::Memory {
            size,
            reason: e.to_string(),
        })?;
        Self::prepare_with_memory(hv.as_ref(), config, tsc_khz, memory)
    }

    fn prepare_with_memory(
        hv: &dyn Hypervisor,
        config: VmConfig,
        khz: u32,
        memory: GuestMemoryMmap,
    ) -> Result<Incoming, VmError> {
        let n = config.cpus.boot_vcpus;
        let vm = hv.create_vm().map_err(hv_err("create the VM"))?;
        map_guest_memory(vm.as_ref(), &memory, config.memory.size, false)?;
        let vcpus = create_vcpus(vm.as_ref(), n)?;
        if vm.guest_tsc_khz() != khz {
            let refs: Vec<&dyn Vcpu> = vcpus.iter().map(|v| v.as_ref()).collect();
            vm.set_guest_tsc_khz(&refs, khz).map_err(hv_err(format!(
                "the guest TSC runs at {khz} kHz, which this host cannot provide"
            )))?;
        }
        set_cpuids(hv, &vcpus, n, khz)?;
        Ok(Incoming {
            hv_name: hv.name(),
            vm,
            config,
            memory,
            vcpus,
            tsc_khz: khz,
        })
    }

    /// Complete a VM started by [`Vm::prepare_incoming`] (or a restore) with `state`: vCPU and
    /// device state restored, vCPU threads parked; its guest time is thawed by the first
    /// [`Vm::resume`].
    pub fn finish_incoming(
        inc: Incoming,
        state: &VmState,
        events: Sender<VmEvent>,
    ) -> Result<Self, VmError> {
        let Incoming {
            hv_name,
            vm,
            config,
            memory,
            vcpus,
            tsc_khz,
        } = inc;
        if state.vcpus.len() != vcpus.len() {
            return Err(VmError::Config(format!(
                "the state holds {} vCPUs, the configuration {}",
                state.vcpus.len(),
                vcpus.len()
            )));
        }
        // Registers, special registers, XSAVE, XCRs, LAPIC, then MSRs (TSC_DEADLINE is held
        // back by the backend until the thaw has put the TSC in place), events, MP state.
        for (v, st) in vcpus.iter().zip(&state.vcpus) {
            v.set_state(st)
                .map_err(hv_err(format!("restore vCPU {}'s state", st.id)))?;
        }
        let serial = Serial::from_state(&state.devices.serial, &config.serial)
            .map_err(|e| VmError::Device(format!("serial: {e}")))?;
        let probe = TimeProbe::restore(state.devices.probe.clone())
            .map_err(|e| VmError::Device(format!("time probe: {e}")))?;
        let capture = Capture {
            snapshot: state.tsc.clone(),
            skew_cycles: 0,
        };
        Self::assemble(Parts {
            hv_name,
            vm,
            config,
            memory,
            vcpus,
            serial,
            probe,
            tsc_khz,
            events,
            paused: Some(capture),
        })
    }

    /// Recreate a VM from a snapshot that [`Snapshot::read`] checked, parked: its guest time
    /// is thawed by the first [`Vm::resume`] (with `opts.policy` when that names none). Refused
    /// before any vCPU exists when the host cannot run the guest TSC at the snapshot's
    /// frequency. Nothing is changed in the snapshot.
    pub fn restore(
        hv: Arc<dyn Hypervisor>,
        snap: &Snapshot,
        opts: &RestoreOptions,
        events: Sender<VmEvent>,
    ) -> Result<Self, VmError> {
        let mut config = snap.config.clone();
        if let Some(s) = &opts.serial {
            config.serial = s.clone();
        }
        let tsc = &snap.state.tsc;
        let khz = tsc.tsc_khz();

        let t0 = Instant::now();
        let memory = snap.load_memory(&opts.memory)?;
        let memory_time = t0.elapsed();
        let inc = Self::prepare_with_memory(hv.as_ref(), config, khz, memory)?;
        let mut vm = Self::finish_incoming(inc, &snap.state, events)?;
        vm.resume_policy = opts.policy;
        vm.restored_vcpus = Some(snap.state.vcpus.clone());
        vm.restored_from = Some(serde_json::json!({
            "source": snap.dir(),
            "memory_mode": opts.memory.mode,
            "memory_verified": opts.memory.verify,
            "memory_load_ns": ns(memory_time),
            "snapshot_realtime_ns": tsc.realtime_ns(),
            "snapshot_vm_tsc": tsc.vm_tsc(),
            "snapshot_kvmclock_ns": tsc.kvmclock_ns(),
        }));
        info!(
            "restored from {} ({:?} memory in {memory_time:?}); paused until resumed",
            snap.dir().display(),
            opts.memory.mode
        );
        Ok(vm)
    }

    /// Park every vCPU, then freeze guest time from one host sample and tell each vCPU's guest
    /// (KVMCLOCK_CTRL) that the host stopped it.
    pub fn pause(&mut self) -> Result<(), VmError> {
        match self.state {
            RunState::Running => {}
            RunState::Paused => {
                return Err(VmError::InvalidState("the VM is already paused".into()))
            }
            RunState::Shutdown => return Err(VmError::InvalidState("the VM is shut down".into())),
        }
        let t0 = Instant::now();
        let park = self.vcpus.pause()?;
        let f0 = Instant::now();
        let capture = {
            let guards = self.vcpus.lock_all();
            let refs: Vec<&dyn Vcpu> = guards.iter().map(|g| g.as_ref()).collect();
            let park = self.vcpus.take_park_reads();
            let readings: Vec<_> = park.iter().map(|p| p.reading).collect();
            match self.vm.freeze_with_readings(&refs, &readings) {
                Ok(c) => {
                    let told = park.iter().map(|p| p.clock_paused);
                    for v in refs.iter().zip(told).filter(|(_, t)| !t).map(|(v, _)| v) {
                        if let Err(e) = v.notify_guest_clock_paused() {
                            // EINVAL until the guest has enabled kvmclock: not an error.
                            log::debug!("vCPU {}: KVMCLOCK_CTRL: {e}", v.id());
                        }
                    }
                    c
                }
                Err(e) => {
                    drop(refs);
                    drop(guards);
                    self.vcpus.resume();
                    return Err(VmError::Hypervisor {
                        what: "freeze guest time".into(),
                        source: e,
                    });
                }
            }
        };
        if capture.skew_cycles != 0 {
            warn!(
                "vCPU TSC offsets differed by {} cycles at freeze; the thaw writes one VM offset",
                capture.skew_cycles
            );
        }
        self.capture = Some(capture);
        self.thaw_origin = ThawOrigin::OwnFreeze;
        self.state = RunState::Paused;
        self.stats.pauses += 1;
        self.stats.last_park_ns = ns(park);
        self.stats.last_freeze_ns = ns(f0.elapsed());
        self.stats.last_pause_ns = ns(t0.elapsed());
        info!(
            "paused: vCPUs parked in {:?}, time frozen in {:?}",
            park,
            f0.elapsed()
        );
        Ok(())
    }

    /// Thaw guest time under `policy` before any vCPU runs, then release the vCPUs.
    pub fn resume(&mut self, policy: ClockPolicy) -> Result<&ClockReport, VmError> {
        match self.state {
            RunState::Paused => {}
            RunState::Running => return Err(VmError::InvalidState("the VM is not paused".into())),
            RunState::Shutdown => return Err(VmError::InvalidState("the VM is shut down".into())),
        }
        let t0 = Instant::now();
        let capture = self
            .capture
            .as_ref()
            .ok_or_else(|| VmError::InvalidState("paused without a time capture".into()))?;
        let report = {
            let guards = self.vcpus.lock_all();
            let refs: Vec<&dyn Vcpu> = guards.iter().map(|g| g.as_ref()).collect();
            self.vm
                .thaw(&refs, &capture.snapshot, self.thaw_origin, policy)
                .map_err(hv_err(format!("thaw guest time ({policy})")))?
        };
        let thaw = t0.elapsed();
        for w in &report.warnings {
            warn!("clock: {w}");
        }
        if report.policy_requested != policy || report.policy_applied_name() != policy.name() {
            info!(
                "clock policy requested {policy}, applied {:?}",
                report.policy_applied
            );
        }
        self.last_policy = policy;
        self.resume_policy = None;
        self.restored_vcpus = None;
        self.last_report = Some(report);
        self.capture = None;
        // The vCPUs are released whatever happens next; a thread slow to be scheduled again is
        // worth a warning, not a VM left half paused.
        let unpark = self.vcpus.resume();
        self.state = RunState::Running;
        self.stats.resumes += 1;
        self.stats.last_thaw_ns = ns(thaw);
        self.stats.last_unpark_ns = ns(unpark);
        self.stats.last_resume_ns = ns(t0.elapsed());
        info!("resumed: time thawed in {thaw:?}, vCPUs released in {unpark:?}");
        Ok(self.last_report.as_ref().expect("set above"))
    }

    /// Stop every vCPU for good.
    pub fn shutdown(&mut self) {
        if self.state != RunState::Shutdown {
            self.vcpus.stop();
            self.state = RunState::Shutdown;
            info!("VM shut down");
        }
    }

    /// The `clock` object of `vm.info`.
    pub fn clock_info(&self) -> serde_json::Value {
        let r = self.last_report.as_ref();
        let mut warnings = self.warnings.clone();
        if let Some(r) = r {
            for w in &r.warnings {
                if !warnings.contains(w) {
                    warnings.push(w.clone());
                }
            }
        }
        serde_json::json!({
            "policy_requested": r.map_or(self.last_policy, |r| r.policy_requested),
            "policy_default": self.config.clock_policy,
            "policy_applied": r.map(|r| r.policy_applied),
            "tsc_khz": self.tsc_khz,
            "vm_offset": r.map(|r| r.vm_offset_applied.unwrap_or(r.vm_offset_planned)),
            "vm_offset_planned": r.map(|r| r.vm_offset_planned),
            "offsets_honoured": r.map_or(self.caps.offsets_honoured, |r| Some(r.offsets_honoured)),
            "vendor": self.caps.vendor,
            "backend": self.hv_name,
            "capabilities": self.caps,
            "last_freeze_duration_ns": self.stats.last_freeze_ns,
            "last_elapsed_ns": r.map(|r| r.elapsed_ns),
            "error_bound_ns": r.map(|r| r.error_bound_ns),
            "last_report": r,
            "warnings": warnings,
            "restored_from": self.restored_from,
        })
    }
}

/// The applied policy's name, to compare with the requested one.
trait AppliedName {
    fn policy_applied_name(&self) -> &'static str;
}

impl AppliedName for ClockReport {
    fn policy_applied_name(&self) -> &'static str {
        match self.policy_applied {
            hypervisor::tsc::AppliedPolicy::Wallclock => "wallclock",
            hypervisor::tsc::AppliedPolicy::Frozen => "frozen",
            hypervisor::tsc::AppliedPolicy::HostTsc => "host_tsc",
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
