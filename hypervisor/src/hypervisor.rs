//! The `Hypervisor` trait and backend selection.

use std::sync::Arc;

use crate::arch::CpuIdEntry;
use crate::error::HypervisorError;
use crate::tsc::Vendor;
use crate::vm::Vm;

/// A hypervisor backend (KVM, MSHV).
pub trait Hypervisor: Send + Sync {
    /// Backend name for logs and `vm.info` ("kvm", "mshv").
    fn name(&self) -> &'static str;
    /// The host CPU vendor (decides TSC scaling arithmetic).
    fn vendor(&self) -> Vendor;
    /// Create a VM (with in-kernel interrupt controller where the backend has one).
    fn create_vm(&self) -> Result<Arc<dyn Vm>, HypervisorError>;
    /// The CPUID the host can offer a guest.
    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>, HypervisorError>;
    /// The MSR indices the host can save and restore.
    fn msr_index_list(&self) -> Result<Vec<u32>, HypervisorError>;
}
