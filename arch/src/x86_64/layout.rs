//! The guest physical memory layout.
//!
//! ```text
//! 0x0000_0000  RAM (low)
//!   0x500      boot GDT (4 entries for PVH, 5 for the Linux 64-bit entry)
//!   0x6000     PVH hvm_start_info
//!   0x6400     PVH module list (one hvm_modlist_entry: the initramfs)
//!   0x7000     PVH memory map (hvm_memmap_table_entry array)
//!   0x8000     Linux boot_params ("zero page", bzImage only)
//!   0x9000     Linux boot page tables: PML4, PDPT, 4 PDs identity-mapping 4 GiB (bzImage)
//!   0xfff0     Linux boot stack pointer (bzImage; grows down into 0xf000)
//!   0x2_0000   kernel command line (NUL-terminated, at most 64 KiB)
//!   0x9_fc00   end of low RAM in the memory map (EBDA above, reserved)
//!   0xe_0000   ACPI tables (RSDP, XSDT, FADT, DSDT, MADT; reserved)
//!   0xf_0000   MP tables (floating pointer, then the configuration table; reserved)
//!   0xf_fff0   the reset vector: a jump here resets the VM (i8042 0xfe)
//! 0x0010_0000  guest image (ELF segments at their physical addresses, normally 1 MiB; a
//!              bzImage's protected-mode code at its code32_start, 1 MiB)
//!   ...        RAM up to min(size, 3 GiB); the initramfs at the top of it, page aligned
//! 0xc000_0000  32-bit MMIO hole (3 GiB .. 4 GiB), no RAM
//! 0x1_0000_0000 the rest of RAM above 4 GiB
//! ```

use vm_memory::GuestAddress;

/// Guest RAM starts at physical 0.
pub const RAM_START: GuestAddress = GuestAddress(0);
/// Boot GDT written for the PVH entry (null, code, data, TSS).
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Number of entries in the boot GDT.
pub const BOOT_GDT_ENTRIES: usize = 4;
/// Where the PVH `hvm_start_info` goes (EBX at the entry points here).
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// Where the PVH module list goes (one entry: the initramfs).
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6400);
/// Where the PVH memory map goes.
pub const MEMMAP_START: GuestAddress = GuestAddress(0x7000);
/// Maximum number of memory map entries.
pub const MEMMAP_MAX_ENTRIES: usize = 8;
/// Where a bzImage's `boot_params` (the "zero page") goes.
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x8000);
/// The boot PML4 for the Linux 64-bit entry; the PDPT follows it, then four page directories.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// The boot PDPT.
pub const PDPT_START: GuestAddress = GuestAddress(0xa000);
/// The first of the four boot page directories (2 MiB pages, identity map of 0..4 GiB).
pub const PD_START: GuestAddress = GuestAddress(0xb000);
/// The stack pointer at the Linux 64-bit entry (the kernel switches to its own at once).
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0xfff0);
/// Where the kernel command line goes.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x2_0000);
/// The room for the command line, its terminating NUL included.
pub const CMDLINE_MAX_SIZE: u64 = 0x1_0000;
/// Where the ACPI tables go, the RSDP first: the BIOS area a kernel scans for it.
pub const ACPI_START: GuestAddress = GuestAddress(0xe_0000);
/// The room for the ACPI tables (up to the MP tables).
pub const ACPI_MAX_SIZE: u64 = MPTABLE_START.0 - ACPI_START.0;
/// The ACPI sleep control register's port; the sleep status register is the next one. Port
/// 0x600 is where QEMU's q35 puts its PM block; nothing else here uses it.
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// The port the FADT's reset register names: the i8042's command port.
pub const RESET_PORT: u16 = 0x64;
/// The value written to [`RESET_PORT`] to reset: the i8042's CPU-reset command.
pub const RESET_VALUE: u8 = 0xfe;
/// Where the MP tables go: the BIOS area a kernel scans for the floating pointer.
pub const MPTABLE_START: GuestAddress = GuestAddress(0xf_0000);
/// The reset vector (F000:FFF0): 16 bytes below 1 MiB, where a CPU leaving reset (or a kernel
/// restarting through the BIOS) starts; the VM's "firmware" there resets the VM.
pub const RESET_VECTOR: GuestAddress = GuestAddress(0xf_fff0);
/// End of usable low RAM (the EBDA and the legacy ROM area sit above it).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// Where guest images are loaded (ELF images give their own physical addresses; they must be at
/// or above this).
pub const HIGH_RAM_START: GuestAddress = GuestAddress(0x10_0000);
/// Start of the 32-bit MMIO hole; RAM stops here and continues at 4 GiB.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MEM_32BIT_GAP_END: u64 = 0x1_0000_0000;
/// The smallest guest memory size accepted (room for the boot structures and a small image).
pub const MIN_MEMORY: u64 = 4 << 20;
/// The largest guest memory size accepted (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;

// The boot structures sit below the image and do not overlap (checked at compile time).
const _: () = {
    assert!(BOOT_GDT_START.0 + (BOOT_GDT_ENTRIES as u64) * 8 <= PVH_INFO_START.0);
    assert!(PVH_INFO_START.0 + 56 <= PVH_MODLIST_START.0);
    assert!(PVH_MODLIST_START.0 + 32 <= MEMMAP_START.0);
    assert!(MEMMAP_START.0 + (MEMMAP_MAX_ENTRIES as u64) * 24 <= ZERO_PAGE_START.0);
    assert!(ZERO_PAGE_START.0 + 4096 <= PML4_START.0);
    assert!(PML4_START.0 + 4096 == PDPT_START.0 && PDPT_START.0 + 4096 == PD_START.0);
    assert!(PD_START.0 + 4 * 4096 < BOOT_STACK_POINTER.0);
    assert!(BOOT_STACK_POINTER.0 < CMDLINE_START.0);
    assert!(CMDLINE_START.0 + CMDLINE_MAX_SIZE <= LOW_RAM_END);
    assert!(MEMMAP_START.0 + (MEMMAP_MAX_ENTRIES as u64) * 24 <= LOW_RAM_END);
    assert!(LOW_RAM_END <= HIGH_RAM_START.0);
    assert!(LOW_RAM_END <= MPTABLE_START.0 && MPTABLE_START.0 < HIGH_RAM_START.0);
    assert!(LOW_RAM_END <= ACPI_START.0 && ACPI_START.0 < MPTABLE_START.0);
    assert!(RESET_VECTOR.0 + 16 == HIGH_RAM_START.0);
};

/// The RAM regions `(start, size)` for a guest of `size` bytes: one region below the 32-bit hole
/// and, for more than 3 GiB, a second one from 4 GiB.
pub fn ram_regions(size: u64) -> crate::Result<Vec<(GuestAddress, usize)>> {
    if size < MIN_MEMORY {
        return Err(crate::Error::MemorySize {
            size,
            reason: "below the 4 MiB minimum",
        });
    }
    if size > MAX_MEMORY {
        return Err(crate::Error::MemorySize {
            size,
            reason: "above the 1 TiB maximum",
        });
    }
    if size & 0xfff != 0 {
        return Err(crate::Error::MemorySize {
            size,
            reason: "not a multiple of 4 KiB",
        });
    }
    if size <= MEM_32BIT_GAP_START {
        return Ok(vec![(RAM_START, size as usize)]);
    }
    Ok(vec![
        (RAM_START, MEM_32BIT_GAP_START as usize),
        (
            GuestAddress(MEM_32BIT_GAP_END),
            (size - MEM_32BIT_GAP_START) as usize,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        let r = ram_regions(512 << 20).unwrap();
        assert_eq!(r, vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let r = ram_regions(4 << 30).unwrap();
        assert_eq!(
            r,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(ram_regions(1 << 20).is_err());
        assert!(ram_regions((512 << 20) + 1).is_err());
        assert!(ram_regions(2 << 40).is_err());
    }
}
