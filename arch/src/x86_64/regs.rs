//! The register state at the PVH 32-bit entry: flat protected mode, paging off, EBX pointing at
//! `hvm_start_info` (per the PVH ABI; every vCPU starts there in Hourglass); and at the Linux
//! 64-bit entry of a bzImage: long mode on identity-mapped pages, `__BOOT_CS` (0x10) and
//! `__BOOT_DS` (0x18) flat, RSI pointing at `boot_params` (only the boot vCPU starts there).

use hypervisor::arch::{DescriptorTable, SegmentRegister, SpecialRegisters, StandardRegisters};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::EntryMode;
use super::layout;
use crate::{Error, Result};

/// CR0.PE: protected mode.
pub const X86_CR0_PE: u64 = 0x1;
/// CR0.ET: extension type (always 1).
pub const X86_CR0_ET: u64 = 0x10;

/// The boot GDT: null, flat 32-bit code (0x08), flat data (0x10), a 32-bit TSS (0x18).
pub const BOOT_GDT: [u64; layout::BOOT_GDT_ENTRIES] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0xfffff),
];

/// The GDT for the Linux 64-bit entry: two nulls, 64-bit code at `__BOOT_CS` (0x10), flat data
/// at `__BOOT_DS` (0x18), a 64-bit TSS (0x20), as Documentation/arch/x86/boot.rst asks.
pub const LINUX_BOOT_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// CR0.PG: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME and EFER.LMA: long mode enabled and active.
pub const EFER_LME_LMA: u64 = (1 << 8) | (1 << 10);

// The larger GDT fits where the PVH one goes.
const _: () = assert!(
    layout::BOOT_GDT_START.0 + (LINUX_BOOT_GDT.len() as u64) * 8 <= layout::PVH_INFO_START.0
);

/// Encode a GDT descriptor from its flags (access byte in bits 0..8, flags in 12..16), base and
/// 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decode a GDT descriptor into the cached segment register the hardware would hold.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> SegmentRegister {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    let present = ((entry >> 47) & 1) as u8;
    SegmentRegister {
        base,
        limit,
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
    }
}

/// The GDT an entry mode loads.
pub fn gdt_for(mode: EntryMode) -> &'static [u64] {
    match mode {
        EntryMode::Pvh => &BOOT_GDT,
        EntryMode::Linux64 => &LINUX_BOOT_GDT,
    }
}

/// Write [`BOOT_GDT`] at [`layout::BOOT_GDT_START`].
pub fn write_boot_gdt(mem: &GuestMemoryMmap) -> Result<()> {
    write_gdt(mem, EntryMode::Pvh)
}

/// Write the GDT of `mode` at [`layout::BOOT_GDT_START`].
pub fn write_gdt(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<()> {
    for (i, entry) in gdt_for(mode).iter().enumerate() {
        let addr = layout::BOOT_GDT_START.unchecked_add(i as u64 * 8);
        mem.write_obj(*entry, addr)
            .map_err(|source| Error::GuestMemory {
                what: "the boot GDT",
                source,
            })?;
    }
    Ok(())
}

/// General-purpose registers at the PVH entry: RIP = entry, RBX = start_info, RFLAGS = 2.
pub fn pvh_boot_regs(entry: GuestAddress) -> StandardRegisters {
    StandardRegisters {
        rip: entry.raw_value(),
        rbx: layout::PVH_INFO_START.raw_value(),
        rflags: 0x2,
        ..Default::default()
    }
}

/// Special registers at the PVH entry, starting from the vCPU's current ones (which keep their
/// APIC base and anything else not listed): flat 32-bit code and data segments from the boot GDT,
/// CR0 = PE|ET, paging, PAE and long mode off.
pub fn pvh_boot_sregs(current: &SpecialRegisters) -> SpecialRegisters {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    SpecialRegisters {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        gdt: DescriptorTable {
            base: layout::BOOT_GDT_START.raw_value(),
            limit: (layout::BOOT_GDT_ENTRIES * 8 - 1) as u16,
        },
        idt: DescriptorTable { base: 0, limit: 0 },
        cr0: (current.cr0 | X86_CR0_PE | X86_CR0_ET) & !(1 << 31),
        cr3: 0,
        cr4: 0,
        efer: 0,
        ..*current
    }
}

/// General-purpose registers at the entry of `mode`: PVH as [`pvh_boot_regs`]; Linux 64-bit:
/// RIP = entry, RSI = `boot_params`, a stack below the page tables, RFLAGS = 2.
pub fn boot_regs(mode: EntryMode, entry: GuestAddress) -> StandardRegisters {
    match mode {
        EntryMode::Pvh => pvh_boot_regs(entry),
        EntryMode::Linux64 => StandardRegisters {
            rip: entry.raw_value(),
            rsi: layout::ZERO_PAGE_START.raw_value(),
            rsp: layout::BOOT_STACK_POINTER.raw_value(),
            rbp: layout::BOOT_STACK_POINTER.raw_value(),
            rflags: 0x2,
            ..Default::default()
        },
    }
}

/// Special registers at the entry of `mode`, from the vCPU's current ones: PVH as
/// [`pvh_boot_sregs`]; Linux 64-bit: long mode (CR0.PG|PE, CR4.PAE, EFER.LME|LMA, CR3 at the
/// boot PML4), 64-bit code at 0x10, flat data at 0x18.
pub fn boot_sregs(mode: EntryMode, current: &SpecialRegisters) -> SpecialRegisters {
    match mode {
        EntryMode::Pvh => pvh_boot_sregs(current),
        EntryMode::Linux64 => {
            let code = segment_from_gdt(LINUX_BOOT_GDT[2], 2);
            let data = segment_from_gdt(LINUX_BOOT_GDT[3], 3);
            let tss = segment_from_gdt(LINUX_BOOT_GDT[4], 4);
            SpecialRegisters {
                cs: code,
                ds: data,
                es: data,
                fs: data,
                gs: data,
                ss: data,
                tr: tss,
                gdt: DescriptorTable {
                    base: layout::BOOT_GDT_START.raw_value(),
                    limit: (LINUX_BOOT_GDT.len() * 8 - 1) as u16,
                },
                idt: DescriptorTable { base: 0, limit: 0 },
                cr0: current.cr0 | X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
                cr3: layout::PML4_START.raw_value(),
                cr4: X86_CR4_PAE,
                efer: EFER_LME_LMA,
                ..*current
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_known_encodings() {
        // The well-known flat descriptors.
        assert_eq!(BOOT_GDT[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x000f_8b00_0000_ffff);
    }

    #[test]
    fn flat_segments() {
        let apic = 0xfee0_0900;
        let cur = SpecialRegisters {
            apic_base: apic,
            cr0: 0x6000_0010,
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        };
        let s = pvh_boot_sregs(&cur);
        assert_eq!(s.apic_base, apic, "APIC base kept");
        assert_eq!(s.cr0 & 1, 1);
        assert_eq!(s.cr0 & (1 << 31), 0, "paging off");
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert_eq!(
            (
                s.cs.base,
                s.cs.limit,
                s.cs.selector,
                s.cs.type_,
                s.cs.db,
                s.cs.l,
                s.cs.s
            ),
            (0, 0xffff_ffff, 0x08, 0xb, 1, 0, 1)
        );
        assert_eq!((s.cs.present, s.cs.g, s.cs.unusable), (1, 1, 0));
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!(
                (seg.base, seg.limit, seg.selector, seg.type_, seg.db),
                (0, 0xffff_ffff, 0x10, 0x3, 1)
            );
        }
        assert_eq!((s.tr.selector, s.tr.type_, s.tr.s), (0x18, 0xb, 0));
        assert_eq!((s.gdt.base, s.gdt.limit), (0x500, 31));
    }

    #[test]
    fn pvh_regs() {
        let r = pvh_boot_regs(GuestAddress(0x10_0040));
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0040, 0x6000, 2));
        assert_eq!(boot_regs(EntryMode::Pvh, GuestAddress(0x10_0040)), r);
    }

    #[test]
    fn linux64_entry_state() {
        let r = boot_regs(EntryMode::Linux64, GuestAddress(0x10_0200));
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x10_0200, 0x8000, 0xfff0, 2)
        );
        let cur = SpecialRegisters {
            apic_base: 0xfee0_0900,
            cr0: 0x6000_0010,
            ..Default::default()
        };
        let s = boot_sregs(EntryMode::Linux64, &cur);
        assert_eq!(s.apic_base, 0xfee0_0900);
        assert_eq!(s.cr0 & 0x8000_0001, 0x8000_0001, "PG and PE");
        assert_eq!((s.cr3, s.cr4, s.efer), (0x9000, 0x20, 0x500));
        assert_eq!(
            (s.cs.selector, s.cs.l, s.cs.db, s.cs.type_),
            (0x10, 1, 0, 0xb)
        );
        for seg in [s.ds, s.es, s.ss] {
            assert_eq!((seg.selector, seg.base, seg.limit), (0x18, 0, 0xffff_ffff));
        }
        assert_eq!((s.tr.selector, s.tr.type_), (0x20, 0xb));
        assert_eq!((s.gdt.base, s.gdt.limit), (0x500, 39));
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_gdt(&m, EntryMode::Linux64).unwrap();
        let e: u64 = m.read_obj(GuestAddress(0x510)).unwrap();
        assert_eq!(e, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn gdt_written_to_memory() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_gdt(&m).unwrap();
        let e: u64 = m.read_obj(GuestAddress(0x508)).unwrap();
        assert_eq!(e, 0x00cf_9b00_0000_ffff);
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 4096)]).unwrap();
        assert!(write_boot_gdt(&small).is_err());
    }
}
