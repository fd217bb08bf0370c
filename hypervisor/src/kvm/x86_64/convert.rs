//! Our backend-neutral [`crate::arch`] types to and from kvm-bindings structures.
//!
//! Plain field copies; the only thing dropped is `kvm_sregs::interrupt_bitmap`, which KVM leaves
//! empty whenever the interrupt controller is in the kernel (this crate always creates one).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_dtable, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs,
};

use crate::arch::{
    CpuIdEntry, DescriptorTable, MsrEntry, SegmentRegister, SpecialRegisters, StandardRegisters,
    VcpuEvents, Xcr,
};

use crate::arch::gp_registers;

/// `StandardRegisters` from `kvm_regs`.
pub fn regs_from_kvm(r: &kvm_regs) -> StandardRegisters {
    gp_registers!(r => StandardRegisters)
}

/// `kvm_regs` from `StandardRegisters`.
pub fn regs_to_kvm(r: &StandardRegisters) -> kvm_regs {
    gp_registers!(r => kvm_regs)
}

fn seg_from_kvm(s: &kvm_segment) -> SegmentRegister {
    SegmentRegister {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
    }
}

fn seg_to_kvm(s: &SegmentRegister) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

fn dt_from_kvm(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

fn dt_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

/// `SpecialRegisters` from `kvm_sregs`.
pub fn sregs_from_kvm(s: &kvm_sregs) -> SpecialRegisters {
    SpecialRegisters {
        cs: seg_from_kvm(&s.cs),
        ds: seg_from_kvm(&s.ds),
        es: seg_from_kvm(&s.es),
        fs: seg_from_kvm(&s.fs),
        gs: seg_from_kvm(&s.gs),
        ss: seg_from_kvm(&s.ss),
        tr: seg_from_kvm(&s.tr),
        ldt: seg_from_kvm(&s.ldt),
        gdt: dt_from_kvm(&s.gdt),
        idt: dt_from_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// `kvm_sregs` from `SpecialRegisters` (empty interrupt bitmap).
pub fn sregs_to_kvm(s: &SpecialRegisters) -> kvm_sregs {
    kvm_sregs {
        cs: seg_to_kvm(&s.cs),
        ds: seg_to_kvm(&s.ds),
        es: seg_to_kvm(&s.es),
        fs: seg_to_kvm(&s.fs),
        gs: seg_to_kvm(&s.gs),
        ss: seg_to_kvm(&s.ss),
        tr: seg_to_kvm(&s.tr),
        ldt: seg_to_kvm(&s.ldt),
        gdt: dt_to_kvm(&s.gdt),
        idt: dt_to_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: [0; 4],
    }
}

/// `CpuIdEntry` from `kvm_cpuid_entry2`.
pub fn cpuid_from_kvm(e: &kvm_cpuid_entry2) -> CpuIdEntry {
    CpuIdEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

/// `kvm_cpuid_entry2` from `CpuIdEntry`.
pub fn cpuid_to_kvm(e: &CpuIdEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

/// `kvm_msr_entry` from `MsrEntry`.
pub fn msr_to_kvm(e: &MsrEntry) -> kvm_msr_entry {
    kvm_msr_entry {
        index: e.index,
        data: e.data,
        ..Default::default()
    }
}

/// XCR list from `kvm_xcrs` (at most 16 entries, as KVM defines).
pub fn xcrs_from_kvm(x: &kvm_xcrs) -> Vec<Xcr> {
    let n = (x.nr_xcrs as usize).min(x.xcrs.len());
    x.xcrs[..n]
        .iter()
        .map(|e| Xcr {
            xcr: e.xcr,
            value: e.value,
        })
        .collect()
}

/// `kvm_xcrs` from an XCR list; `None` when the list has more than 16 entries.
pub fn xcrs_to_kvm(x: &[Xcr]) -> Option<kvm_xcrs> {
    let mut k = kvm_xcrs::default();
    if x.len() > k.xcrs.len() {
        return None;
    }
    k.nr_xcrs = x.len() as u32;
    for (d, s) in k.xcrs.iter_mut().zip(x) {
        d.xcr = s.xcr;
        d.value = s.value;
    }
    Some(k)
}

/// `VcpuEvents` from `kvm_vcpu_events`.
pub fn events_from_kvm(e: &kvm_vcpu_events) -> VcpuEvents {
    VcpuEvents {
        exception_injected: e.exception.injected,
        exception_nr: e.exception.nr,
        exception_has_error_code: e.exception.has_error_code,
        exception_pending: e.exception.pending,
        exception_error_code: e.exception.error_code,
        interrupt_injected: e.interrupt.injected,
        interrupt_nr: e.interrupt.nr,
        interrupt_soft: e.interrupt.soft,
        interrupt_shadow: e.interrupt.shadow,
        nmi_injected: e.nmi.injected,
        nmi_pending: e.nmi.pending,
        nmi_masked: e.nmi.masked,
        sipi_vector: e.sipi_vector,
        flags: e.flags,
        smi_smm: e.smi.smm,
        smi_pending: e.smi.pending,
        smi_inside_nmi: e.smi.smm_inside_nmi,
        smi_latched_init: e.smi.latched_init,
        triple_fault_pending: e.triple_fault.pending,
        exception_has_payload: e.exception_has_payload,
        exception_payload: e.exception_payload,
    }
}

/// `kvm_vcpu_events` from `VcpuEvents`.
pub fn events_to_kvm(e: &VcpuEvents) -> kvm_vcpu_events {
    let mut k = kvm_vcpu_events::default();
    k.exception.injected = e.exception_injected;
    k.exception.nr = e.exception_nr;
    k.exception.has_error_code = e.exception_has_error_code;
    k.exception.pending = e.exception_pending;
    k.exception.error_code = e.exception_error_code;
    k.interrupt.injected = e.interrupt_injected;
    k.interrupt.nr = e.interrupt_nr;
    k.interrupt.soft = e.interrupt_soft;
    k.interrupt.shadow = e.interrupt_shadow;
    k.nmi.injected = e.nmi_injected;
    k.nmi.pending = e.nmi_pending;
    k.nmi.masked = e.nmi_masked;
    k.sipi_vector = e.sipi_vector;
    k.flags = e.flags;
    k.smi.smm = e.smi_smm;
    k.smi.pending = e.smi_pending;
    k.smi.smm_inside_nmi = e.smi_inside_nmi;
    k.smi.latched_init = e.smi_latched_init;
    k.triple_fault.pending = e.triple_fault_pending;
    k.exception_has_payload = e.exception_has_payload;
    k.exception_payload = e.exception_payload;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip() {
        let r = StandardRegisters {
            rax: 1,
            r15: 2,
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        };
        assert_eq!(regs_from_kvm(&regs_to_kvm(&r)), r);
        let mut s = SpecialRegisters::default();
        s.cs.selector = 8;
        s.cs.l = 1;
        s.gdt.limit = 0x17;
        s.efer = 0x500;
        assert_eq!(sregs_from_kvm(&sregs_to_kvm(&s)), s);
    }

    #[test]
    fn events_and_xcrs_round_trip() {
        let e = VcpuEvents {
            exception_nr: 14,
            nmi_masked: 1,
            exception_payload: 0xdead,
            triple_fault_pending: 1,
            ..Default::default()
        };
        assert_eq!(events_from_kvm(&events_to_kvm(&e)), e);
        let x = vec![Xcr { xcr: 0, value: 7 }];
        assert_eq!(xcrs_from_kvm(&xcrs_to_kvm(&x).unwrap()), x);
        assert!(xcrs_to_kvm(&vec![Xcr::default(); 17]).is_none());
    }
}
