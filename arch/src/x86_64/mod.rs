//! x86_64 guest setup.

pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod msr;
pub mod regs;
