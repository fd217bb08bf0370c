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

/// The kernel and initramfs bytes to boot.
struct PayloadBytes {
    kernel: std::borrow::Cow<'static, [u8]>,
    initramfs: Option<Vec<u8>>,
}

/// Read `--kernel` (or take the built-in test guest) and `--initramfs`, each a regular file of
/// bounded size; an initramfs without a kernel, or a command line without one, is refused.
fn read_payload(config: &VmConfig) -> Result<PayloadBytes, VmError> {
    let Some(kernel) = &config.kernel else {
        if config.initramfs.is_some() || config.cmdline.is_some() {
            return Err(VmError::Config(
                "an initramfs or a command line needs a kernel (--kernel); the built-in test \
                 guest takes neither"
                    .into(),
            ));
        }
        return Ok(PayloadBytes {
            kernel: guest::GUEST_ELF.into(),
            initramfs: None,
        });
    };
    let kernel_bytes =
        crate::files::read_regular(kernel, MAX_KERNEL_BYTES).map_err(|source| VmError::Kernel {
            path: kernel.clone(),
            source,
        })?;
    // No initramfs larger than RAM below the 32-bit hole can fit: refuse it unread.
    let room = config.memory.size.min(arch::layout::MEM_32BIT_GAP_START);
    let initramfs = match &config.initramfs {
        Some(p) => {
            Some(
                crate::files::read_regular(p, room).map_err(|source| VmError::Initramfs {
                    path: p.clone(),
                    room,
                    source,
                })?,
            )
        }
        None => None,
    };
    Ok(PayloadBytes {
        kernel: kernel_bytes.into(),
        initramfs,
    })
}

/// Name the file or flag an `arch` error is about.
fn payload_error(config: &VmConfig, source: arch::Error) -> VmError {
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map_or("(none)".to_string(), |p| p.display().to_string())
    };
    let subject = match source.subject() {
        arch::Subject::Kernel => match &config.kernel {
            Some(p) => format!("--kernel {}", p.display()),
            None => "the built-in test guest".into(),
        },
        arch::Subject::Initramfs => format!("--initramfs {}", path(&config.initramfs)),
        arch::Subject::Cmdline => "--cmdline".into(),
        arch::Subject::Other => return VmError::Arch(source),
    };
    VmError::Payload { subject, source }
}

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
        Self::boot_fresh(hv, config, events, false)
    }

    /// As [`Vm::boot`], for a VM that replaces one the guest rebooted: the serial output goes
    /// on where the last boot's stopped (a file is appended to).
    pub fn boot_again(
        hv: Arc<dyn Hypervisor>,
        config: VmConfig,
        events: Sender<VmEvent>,
    ) -> Result<Self, VmError> {
        Self::boot_fresh(hv, config, events, true)
    }

    fn boot_fresh(
        hv: Arc<dyn Hypervisor>,
        config: VmConfig,
        events: Sender<VmEvent>,
        again: bool,
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
        // Everything the operator named is read and checked, and guest memory filled, before
        // the VM is created: bad input is refused with nothing to tear down.
        let payload = read_payload(&config)?;
        let regions = arch::layout::ram_regions(size)?;
        let memory = GuestMemoryMmap::from_ranges(&regions).map_err(|e| VmError::Memory {
            size,
            reason: e.to_string(),
        })?;
        let boot = arch::load_payload(
            &memory,
            size,
            n,
            &arch::Payload {
                kernel: &payload.kernel,
                initramfs: payload.initramfs.as_deref(),
                cmdline: config.cmdline.as_deref(),
            },
        )
        .map_err(|source| payload_error(&config, source))?;
        info!(
            "loaded {} ({} bytes), {:?} entry {:#x}{}",
            config
                .kernel
                .as_ref()
                .map_or("the built-in test guest".to_string(), |p| p
                    .display()
                    .to_string()),
            payload.kernel.len(),
            boot.mode,
            boot.entry.raw_value(),
            boot.initramfs.map_or(String::new(), |(a, n)| format!(
                ", initramfs of {n} bytes at {:#x}",
                a.raw_value()
            )),
        );

        let vm = hv.create_vm().map_err(hv_err("create the VM"))?;
        map_guest_memory(vm.as_ref(), &memory, size, false)?;

        let vcpus = create_vcpus(vm.as_ref(), n)?;
        let tsc_khz = vm.guest_tsc_khz();
        set_cpuids(hv.as_ref(), &vcpus, n, tsc_khz)?;
        for v in &vcpus {
            let id = v.id();
            // A kernel starts its other CPUs itself (INIT/SIPI), so only the boot vCPU starts at
            // the entry; the others stay as KVM made them with their CPUID and MSRs. Only an
            // image that asks for it with Hourglass's ELF note (the built-in test guest) gets
            // every vCPU at the entry.
            if !boot.all_vcpus_at_entry && id != 0 {
                if let Err(e) = v.set_msrs(&arch::boot_msrs()) {
                    warn!("vCPU {id}: boot MSRs not set: {e}");
                }
                continue;
            }
            // With an in-kernel irqchip KVM creates application processors waiting for
            // INIT/SIPI; an image started on every vCPU needs them runnable.
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
            v.set_sregs(&arch::boot_sregs(boot.mode, &sregs))
                .map_err(hv_err(format!("set vCPU {id}'s special registers")))?;
            v.set_regs(&arch::boot_regs(boot.mode, boot.entry))
                .map_err(hv_err(format!("set vCPU {id}'s registers")))?;
        }

        let probe = TimeProbe::new(n, config.dirty_mib, tsc_khz);
        probe.set_idle_us(config.guest_idle_us);
        probe.set_dirty_passes(config.dirty_passes);
        let devices = DeviceManager::new(&config.serial, probe, again)?;
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
        devices.connect(vm.as_ref())?;

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
            kvmclock_msrs: vec![None; n as usize],
        })
    }
}

#[cfg(test)]
mod tests {
    use arch::x86_64::loader::{has_note, HOURGLASS_NOTE_ALL_VCPUS_AT_ENTRY, HOURGLASS_NOTE_NAME};

    #[test]
    fn the_built_in_guest_asks_for_every_vcpu_at_its_entry() {
        // Its vCPUs pick their roles from their APIC IDs at the entry; without the note only
        // vCPU 0 would start and the guest would wait for the others forever.
        assert!(has_note(
            guest::GUEST_ELF,
            HOURGLASS_NOTE_NAME,
            HOURGLASS_NOTE_ALL_VCPUS_AT_ENTRY
        ));
        assert!(has_note(guest::GUEST_ELF, b"Xen\0", 18));
    }
}
