//! x86_64 guest setup.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod linux;
pub mod loader;
pub mod mptable;
pub mod msr;
pub mod regs;
