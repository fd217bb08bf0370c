//! x86_64 guest setup for Hourglass: the guest memory layout, ELF/PVH image loading and the PVH
//! `start_info`, CPUID with the TSC leaves a guest needs, the MSR list to save, and the boot
//! register state for the PVH 32-bit entry.
//!
//! Everything here is pure (it computes tables and writes guest memory); nothing issues ioctls.
//! The VMM applies the results through the `hypervisor` crate's `Vcpu` trait.

#![deny(missing_docs)]

pub mod x86_64;

pub use x86_64::boot::{load_payload, EntryMode, Loaded, Payload};
pub use x86_64::cpuid::{build_cpuid, CpuidConfig};
pub use x86_64::layout;
pub use x86_64::loader::{configure_pvh, load_kernel, BootImage};
pub use x86_64::msr::{boot_msrs, msrs_to_save};
pub use x86_64::regs::{boot_regs, boot_sregs, pvh_boot_regs, pvh_boot_sregs, write_boot_gdt};

/// Errors from guest setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel image could not be loaded.
    #[error("cannot load the kernel image: {0}")]
    Load(String),
    /// The image is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY).
    #[error(
        "it is an ELF without a PVH entry note (.note.Xen type 18): an ELF kernel boots only \
         through its PVH entry (Linux: CONFIG_PVH=y); boot the bzImage instead"
    )]
    NoPvhEntry,
    /// The image is neither an ELF nor a bzImage.
    #[error(
        "it is neither an ELF with a PVH entry note nor a bzImage (no ELF magic at 0, no \
         \"HdrS\" boot protocol header at 0x202)"
    )]
    UnknownKernelFormat,
    /// A bzImage without the 64-bit entry point.
    #[error(
        "it is a bzImage of boot protocol {major}.{minor:02} without the 64-bit entry point \
         (xloadflags XLF_KERNEL_64, protocol 2.12 or later, is needed)"
    )]
    NoLinux64Entry {
        /// Protocol major version.
        major: u16,
        /// Protocol minor version.
        minor: u16,
    },
    /// The kernel (with the memory it decompresses into) does not fit in guest memory.
    #[error(
        "it needs guest memory up to {end:#x} but RAM below the 32-bit hole ends at {top:#x}: \
         give more --memory"
    )]
    KernelTooLarge {
        /// First address past what the kernel needs.
        end: u64,
        /// End of usable RAM below the hole.
        top: u64,
    },
    /// The initramfs is an empty file.
    #[error("it is empty")]
    InitramfsEmpty,
    /// The command line is longer than the boot protocol takes.
    #[error("the command line is {len} bytes, more than the {max} bytes {why}")]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit (without the terminating NUL).
        max: usize,
        /// Where the limit comes from.
        why: &'static str,
    },
    /// The command line holds a NUL byte (it would end there for the kernel).
    #[error("the command line holds a NUL byte at {0}")]
    CmdlineNul(usize),
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error(
        "it is {size} bytes but only {room} bytes of guest RAM are free between the kernel's \
         end ({kernel_end:#x}) and {top:#x} (the top of RAM below the 32-bit hole, or the \
         kernel's initrd_addr_max): give more --memory"
    )]
    InitramfsTooLarge {
        /// Its size.
        size: u64,
        /// The room there is.
        room: u64,
        /// The end of the kernel's footprint.
        kernel_end: u64,
        /// The highest address the initramfs may end at.
        top: u64,
    },
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

/// What an [`Error`] is about, for a caller that names the file or flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// The kernel image.
    Kernel,
    /// The initramfs.
    Initramfs,
    /// The command line.
    Cmdline,
    /// Something else (memory size, guest memory, CPUID).
    Other,
}

impl Error {
    /// What this error is about.
    pub fn subject(&self) -> Subject {
        match self {
            Error::Load(_)
            | Error::NoPvhEntry
            | Error::UnknownKernelFormat
            | Error::NoLinux64Entry { .. }
            | Error::KernelTooLarge { .. } => Subject::Kernel,
            Error::InitramfsEmpty | Error::InitramfsTooLarge { .. } => Subject::Initramfs,
            Error::CmdlineTooLong { .. } | Error::CmdlineNul(_) => Subject::Cmdline,
            Error::MemorySize { .. } | Error::GuestMemory { .. } | Error::Cpuid(_) => {
                Subject::Other
            }
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
