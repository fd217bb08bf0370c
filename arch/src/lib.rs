//! x86_64 guest setup for Hourglass: the guest memory layout, ELF/PVH image loading and the PVH
//! `start_info`, CPUID with the TSC leaves a guest needs, the MSR list to save, and the boot
//! register state for the PVH 32-bit entry.
//!
//! Everything here is pure (it computes tables and writes guest memory); nothing issues ioctls.
//! The VMM applies the results through the `hypervisor` crate's `Vcpu` trait.

#![deny(missing_docs)]

pub mod x86_64;

pub use x86_64::cpuid::{build_cpuid, CpuidConfig};
pub use x86_64::layout;
pub use x86_64::loader::{configure_pvh, load_kernel, BootImage};
pub use x86_64::msr::{boot_msrs, msrs_to_save};
pub use x86_64::regs::{pvh_boot_regs, pvh_boot_sregs, write_boot_gdt};

/// Errors from guest setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel image could not be loaded.
    #[error("cannot load the kernel image: {0}")]
    Load(String),
    /// The image is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY).
    #[error("the kernel image has no PVH entry note (.note.Xen type 18); only PVH ELF images can be booted")]
    NoPvhEntry,
    /// Guest memory is too small or too large for the layout.
    #[error("invalid guest memory size {size:#x}: {reason}")]
    MemorySize {
        /// The size asked for.
        size: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The host CPUID lacks a leaf the guest needs.
    #[error("host CPUID: {0}")]
    Cpuid(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
