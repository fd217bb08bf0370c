//! Backend-neutral x86_64 register and table types.
//!
//! The VMM sets up and saves vCPUs through these types only; each backend converts them to and
//! from its own structures, so no caller ever names a KVM or MSHV type.

use serde::{Deserialize, Serialize};

/// A `$ty` whose general-purpose registers, instruction pointer and flags are `$src`'s, field
/// by field: the one place that spells the 18 names, for every conversion between
/// [`StandardRegisters`] and a backend's register struct (kvm-bindings and mshv-bindings use the
/// same field names).
macro_rules! gp_registers {
    ($src:expr => $ty:path) => {{
        let r = $src;
        $ty {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }};
}
pub(crate) use gp_registers;

/// General-purpose registers, instruction pointer and flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct StandardRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// One segment register as the hardware caches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SegmentRegister {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and descriptor-table registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SpecialRegisters {
    pub cs: SegmentRegister,
    pub ds: SegmentRegister,
    pub es: SegmentRegister,
    pub fs: SegmentRegister,
    pub gs: SegmentRegister,
    pub ss: SegmentRegister,
    pub tr: SegmentRegister,
    pub ldt: SegmentRegister,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// One CPUID leaf/subleaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct CpuIdEntry {
    pub function: u32,
    pub index: u32,
    /// Backend flags (KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// One model-specific register and its value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// One extended control register (XCR0 etc.).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Xcr {
    pub xcr: u32,
    pub value: u64,
}

/// Pending and injected events of a vCPU (exception, interrupt, NMI, SMI, SIPI), as the
/// hardware and hypervisor track them between instructions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct VcpuEvents {
    pub exception_injected: u8,
    pub exception_nr: u8,
    pub exception_has_error_code: u8,
    pub exception_pending: u8,
    pub exception_error_code: u32,
    pub interrupt_injected: u8,
    pub interrupt_nr: u8,
    pub interrupt_soft: u8,
    pub interrupt_shadow: u8,
    pub nmi_injected: u8,
    pub nmi_pending: u8,
    pub nmi_masked: u8,
    pub sipi_vector: u32,
    /// Backend validity flags for the optional fields below.
    pub flags: u32,
    pub smi_smm: u8,
    pub smi_pending: u8,
    pub smi_inside_nmi: u8,
    pub smi_latched_init: u8,
    pub triple_fault_pending: u8,
    pub exception_has_payload: u8,
    pub exception_payload: u64,
}

/// MSR numbers the time model names (architectural or KVM-defined, the same on every backend).
pub mod msr {
    /// IA32_TIME_STAMP_COUNTER.
    pub const IA32_TSC: u32 = 0x10;
    /// IA32_TSC_ADJUST.
    pub const IA32_TSC_ADJUST: u32 = 0x3b;
    /// IA32_TSC_DEADLINE (restored only after the TSC).
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    /// IA32_TSC_AUX (RDTSCP/RDPID value), saved per vCPU on both vendors.
    pub const TSC_AUX: u32 = 0xc000_0103;
    /// AMD's TSC ratio MSR (host side; never part of guest state).
    pub const AMD64_TSC_RATIO: u32 = 0xc000_0104;
    /// kvmclock: MSR_KVM_WALL_CLOCK_NEW.
    pub const KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
    /// kvmclock: MSR_KVM_SYSTEM_TIME_NEW (pvclock page address | enable).
    pub const KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
}
