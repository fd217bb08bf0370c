//! [`KvmVm`]: one KVM virtual machine.
//!
//! Created with what x86 KVM needs before vCPUs exist: the TSS and identity-map addresses
//! (three pages and one page just below the 4 GiB MMIO hole, as QEMU and Cloud Hypervisor place
//! them) and the in-kernel irqchip (`KVM_CREATE_IRQCHIP`; LAPIC and TSC_DEADLINE live there).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_irqchip, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::caps::TscCapabilities;
use crate::cpu::Vcpu;
use crate::error::HypervisorError;
use crate::kvm::vcpu::{KvmVcpu, VcpuCaps};
use crate::kvm::x86_64::vendor::profile;
use crate::state::{IrqChip, IrqchipState, IRQCHIP_SIZE};
use crate::vm::Vm;

/// Guest-physical address of the 3-page TSS region KVM needs on Intel.
pub const TSS_ADDRESS: usize = 0xfffb_d000;
/// Guest-physical address of the identity-map page KVM needs on Intel without unrestricted guest.
pub const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// One KVM VM.
pub struct KvmVm {
    pub(crate) fd: VmFd,
    pub(crate) caps: TscCapabilities,
    pub(crate) vcpu_caps: Arc<VcpuCaps>,
    /// Guest TSC kHz; only changed after every vCPU accepted a new frequency.
    pub(crate) guest_khz: AtomicU32,
    /// Whether the last thaw's read-back showed offsets honoured (refines the probe).
    pub(crate) offsets_seen: Mutex<Option<bool>>,
}

impl KvmVm {
    pub(crate) fn new(kvm: &Kvm, caps: TscCapabilities) -> Result<Self, HypervisorError> {
        let fd = kvm
            .create_vm()
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_VM", e.errno()))?;
        fd.set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_IDENTITY_MAP_ADDR", e.errno()))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_TSS_ADDR", e.errno()))?;
        fd.create_irq_chip()
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_IRQCHIP", e.errno()))?;
        let host_msrs = kvm
            .get_msr_index_list()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_MSR_INDEX_LIST", e.errno()))?;
        let vcpu_caps = Arc::new(VcpuCaps {
            tsc_offset_attr: caps.tsc_offset_attr,
            saved_msrs: profile(caps.vendor).saved_msrs(host_msrs.as_slice()),
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            events: kvm.check_extension(Cap::VcpuEvents),
            nested_state: caps.nested_state,
            mmap_size: kvm
                .get_vcpu_mmap_size()
                .map_err(|e| HypervisorError::ioctl("KVM_GET_VCPU_MMAP_SIZE", e.errno()))?,
        });
        Ok(KvmVm {
            fd,
            guest_khz: AtomicU32::new(caps.host_tsc_khz),
            caps,
            vcpu_caps,
            offsets_seen: Mutex::new(None),
        })
    }

    /// The kvm-ioctls VM handle (for embedders that need more than the traits).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Create a vCPU, returning the concrete type.
    pub fn create_kvm_vcpu(&self, id: u32) -> Result<KvmVcpu, HypervisorError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| HypervisorError::ioctl("KVM_CREATE_VCPU", e.errno()))?;
        KvmVcpu::new(id, fd, self.vcpu_caps.clone())
    }

    pub(crate) fn guest_khz_now(&self) -> u32 {
        self.guest_khz.load(Ordering::SeqCst)
    }
}

impl Vm for KvmVm {
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>, HypervisorError> {
        Ok(Box::new(self.create_kvm_vcpu(id)?))
    }

    unsafe fn set_user_memory_region(
        &self,
        slot: u32,
        guest_phys_addr: u64,
        size: u64,
        host_addr: u64,
        dirty_log: bool,
    ) -> Result<(), HypervisorError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr,
            memory_size: size,
            userspace_addr: host_addr,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the caller guarantees (this function's contract) that the host range stays
        // mapped and writable for the VM's lifetime.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| HypervisorError::ioctl("KVM_SET_USER_MEMORY_REGION", e.errno()))
    }

    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, HypervisorError> {
        let size = usize::try_from(size)
            .map_err(|_| HypervisorError::InvalidArgument(format!("slot size {size}")))?;
        self.fd
            .get_dirty_log(slot, size)
            .map_err(|e| HypervisorError::ioctl("KVM_GET_DIRTY_LOG", e.errno()))
    }

    fn register_irqfd(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        gsi: u32,
    ) -> Result<(), HypervisorError> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(|e| HypervisorError::ioctl("KVM_IRQFD", e.errno()))
    }

    fn irqchip_state(&self) -> Result<Option<IrqchipState>, HypervisorError> {
        let mut chips = [[0u8; IRQCHIP_SIZE]; 3];
        for (chip, out) in IrqChip::ALL.into_iter().zip(chips.iter_mut()) {
            let mut c = kvm_irqchip {
                chip_id: chip as u32,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(|e| HypervisorError::ioctl("KVM_GET_IRQCHIP", e.errno()))?;
            // SAFETY: every member of the `chip` union is plain bytes and `dummy` spans all
            // of it, so reading it is reading what KVM wrote for this chip.
            let raw = unsafe { c.chip.dummy };
            *out = raw.map(|b| b as u8);
        }
        Ok(Some(IrqchipState::new(chips)))
    }

    fn set_irqchip_state(&self, state: &IrqchipState) -> Result<(), HypervisorError> {
        for chip in IrqChip::ALL {
            let mut c = kvm_irqchip {
                chip_id: chip as u32,
                ..Default::default()
            };
            c.chip.dummy = state.chip(chip).map(|b| b as _);
            self.fd
                .set_irqchip(&c)
                .map_err(|e| HypervisorError::ioctl("KVM_SET_IRQCHIP", e.errno()))?;
        }
        Ok(())
    }
}
