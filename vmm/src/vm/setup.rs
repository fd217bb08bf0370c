//! Building a VM: guest memory, the image, vCPUs with their CPUID and boot registers; and
//! putting the pieces together (devices, the capability report, the vCPU threads).

use std::sync::mpsc::Sender;
use std::sync::Arc;

use hypervisor::{Hypervisor, Vcpu};
use log::{info, warn};
use vm_memory::{
    Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use ::devices::probe::TimeProbe;

use super::{hv_err, DeviceManager, Frozen, PauseStats, RunState, Vm, VmError};
use crate::config::VmConfig;
use crate::vcpu::{Shared, VcpuSet, VmEvent};

/// The largest kernel image accepted (distribution kernels are 5-15 MiB; an ELF `vmlinux`
/// with debug information several hundred).
const MAX_KERNEL_BYTES: u64 = 1 << 30;

/// `KVM_MP_STATE_RUNNABLE`: the vCPU runs (rather than waiting for INIT/SIPI).
const KVM_MP_STATE_RUNNABLE: u32 = 0;

/// Map every region of `memory` into the VM, one slot per region.
pub(super) fn map_guest_memory(
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
pub(super) fn create_vcpus(vm: &dyn hypervisor::Vm, n: u32) -> Result<Vec<Box<dyn Vcpu>>, VmError> {
    (0..n)
        .map(|id| {
            vm.create_vcpu(id)
                .map_err(hv_err(format!("create vCPU {id}")))
        })
        .collect()
}

/// Give every vCPU the guest CPUID (TSC leaves at `tsc_khz`).
pub(super) fn set_cpuids(
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

/// The pieces [`Vm::assemble`] puts together.
pub(super) struct Parts {
    pub hv_name: &'static str,
    pub vm: Arc<dyn hypervisor::Vm>,
    pub config: VmConfig,
    pub memory: GuestMemoryMmap,
    pub vcpus: Vec<Box<dyn Vcpu>>,
    pub devices: DeviceManager,
    pub tsc_khz: u32,
    pub events: Sender<VmEvent>,
    /// Some: the VM comes up paused, this guest time to be thawed by the first resume.
    pub paused: Option<Frozen>,
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
            Some(p) => crate::files::read_regular(p, MAX_KERNEL_BYTES)
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

        let probe = TimeProbe::new(n, config.dirty_mib, tsc_khz);
        probe.set_idle_us(config.guest_idle_us);
        let devices = DeviceManager::new(&config.serial, probe)?;
        Self::assemble(Parts {
            hv_name: hv.name(),
            vm,
            config,
            memory,
            vcpus,
            devices,
            tsc_khz,
            events,
            paused: None,
        })
    }

    /// Put a built VM together: devices on the bus, the capability report, the vCPU threads
    /// (running, or parked with `paused` as the capture to thaw on resume).
    pub(super) fn assemble(p: Parts) -> Result<Self, VmError> {
        let Parts {
            hv_name,
            vm,
            config,
            memory,
            vcpus,
            devices,
            tsc_khz,
            events,
            paused,
        } = p;
        let n = config.cpus.boot_vcpus;
        let size = config.memory.size;
        let bus = devices.bus()?;

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

        let shared = Arc::new(Shared::new(
            Arc::new(memory),
            bus,
            devices.probe().clone(),
            events,
        ));
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
            config,
            hv_name,
            vm,
            vcpus,
            devices,
            state,
            frozen: paused,
            caps,
            tsc_khz,
            last_report: None,
            stats: PauseStats::default(),
            warnings,
            warned: Default::default(),
            backing_file: None,
            restored_from: None,
            restored_vcpus: None,
        })
    }
}
