//! A VM that arrives instead of booting: restored from a snapshot, or received by a migration.
//! Both go through [`Vm::prepare_incoming`]-like preparation (RAM, vCPUs, CPUID, TSC rate) and
//! [`Vm::finish_incoming`] (vCPU and device state, threads parked), and both come up paused,
//! their guest time thawed by the first resume with the origin recorded here.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use hypervisor::arch::msr;
use hypervisor::tsc::{Capture, ClockPolicy, ThawOrigin};
use hypervisor::{Hypervisor, Vcpu};
use log::info;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::setup::{create_vcpus, map_guest_memory, set_cpuids, Parts};
use super::{hv_err, ns, DeviceManager, Frozen, RestoredFrom, Vm, VmError};
use crate::config::VmConfig;
use crate::snapshot::{LoadOptions, MemoryMode, Snapshot, VmState, MEMORY_FILE};
use crate::vcpu::VmEvent;

/// How [`Vm::restore`] brings a snapshot back.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// How guest memory is backed and checked.
    pub memory: LoadOptions,
    /// Serial output instead of the snapshot configuration's.
    pub serial: Option<::devices::SerialOutput>,
    /// Clock policy of the first resume when that names none.
    pub policy: Option<ClockPolicy>,
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

impl Vm {
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
    /// [`Vm::resume`], which knows it comes from `origin` and applies `policy` when the resume
    /// names none.
    pub fn finish_incoming(
        inc: Incoming,
        state: &VmState,
        origin: ThawOrigin,
        policy: Option<ClockPolicy>,
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
        // The VM-wide interrupt controllers first (both PICs, the IOAPIC: a kernel's routes for
        // its devices' interrupts), as the vCPUs' local APICs will find them.
        if let Some(irqchip) = &state.irqchip {
            vm.set_irqchip_state(irqchip)
                .map_err(hv_err("restore the interrupt controllers' state"))?;
        }
        // Then per vCPU: registers, special registers, XSAVE, XCRs, LAPIC, then MSRs
        // (TSC_DEADLINE is held back by the backend until the thaw has put the TSC in place),
        // events, MP state.
        for (v, st) in vcpus.iter().zip(&state.vcpus) {
            v.set_state(st)
                .map_err(hv_err(format!("restore vCPU {}'s state", st.id)))?;
        }
        let devices = DeviceManager::restore(&state.devices, &config.serial)?;
        let capture = Capture {
            snapshot: state.tsc.clone(),
            skew_cycles: 0,
        };
        let mut vm = Self::assemble(Parts {
            hv_name,
            vm,
            config,
            memory,
            vcpus,
            devices,
            tsc_khz,
            events,
            paused: Some(Frozen {
                capture,
                origin,
                policy,
            }),
        })?;
        vm.kvmclock_msrs = state
            .vcpus
            .iter()
            .map(|st| {
                st.msrs
                    .iter()
                    .find(|m| m.index == msr::KVM_SYSTEM_TIME_NEW)
                    .map(|m| m.data)
            })
            .collect();
        Ok(vm)
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
        let mut vm =
            Self::finish_incoming(inc, &snap.state, ThawOrigin::Snapshot, opts.policy, events)?;
        vm.restored_vcpus = Some(snap.state.vcpus.clone());
        if opts.memory.mode == MemoryMode::MapPrivate {
            vm.backing_file = Some((snap.dir().join(MEMORY_FILE), snap.memory.file_len()));
        }
        vm.restored_from = Some(RestoredFrom::Snapshot {
            source: snap.dir().to_path_buf(),
            memory_mode: opts.memory.mode,
            memory_verified: opts.memory.verify,
            memory_load_ns: ns(memory_time),
            snapshot_realtime_ns: tsc.realtime_ns(),
            snapshot_vm_tsc: tsc.vm_tsc(),
            snapshot_kvmclock_ns: tsc.kvmclock_ns(),
        });
        info!(
            "restored from {} ({:?} memory in {memory_time:?}); paused until resumed",
            snap.dir().display(),
            opts.memory.mode
        );
        Ok(vm)
    }
}
