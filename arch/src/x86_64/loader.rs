//! Loading a PVH ELF image and writing the PVH `hvm_start_info` and memory map.

use std::io::Cursor;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use super::layout;
use crate::{Error, Result};

/// `hvm_start_info.magic` ("xEn3" with the top bit flipped, per the PVH ABI).
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// What loading an image produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootImage {
    /// The 32-bit PVH entry point (from the ELF note).
    pub entry: GuestAddress,
    /// First guest address after the loaded image.
    pub end: GuestAddress,
}

/// Load an ELF image with a PVH entry note into guest memory at its physical addresses (at or
/// above [`layout::HIGH_RAM_START`]). Images without the note are refused.
pub fn load_kernel(mem: &GuestMemoryMmap, image: &[u8]) -> Result<BootImage> {
    let result = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(layout::HIGH_RAM_START),
    )
    .map_err(|e| Error::Load(e.to_string()))?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(BootImage {
            entry,
            end: GuestAddress(result.kernel_end),
        }),
        _ => Err(Error::NoPvhEntry),
    }
}

/// The PVH memory map for a guest of `mem_size` bytes.
pub fn memmap(mem_size: u64) -> Result<Vec<hvm_memmap_table_entry>> {
    let regions = layout::ram_regions(mem_size)?;
    let mut map = vec![
        hvm_memmap_table_entry {
            addr: layout::RAM_START.raw_value(),
            size: layout::LOW_RAM_END,
            type_: E820_RAM,
            reserved: 0,
        },
        hvm_memmap_table_entry {
            addr: layout::LOW_RAM_END,
            size: layout::HIGH_RAM_START.raw_value() - layout::LOW_RAM_END,
            type_: E820_RESERVED,
            reserved: 0,
        },
    ];
    for (start, size) in regions {
        let start_raw = start.raw_value().max(layout::HIGH_RAM_START.raw_value());
        let end = start.raw_value() + size as u64;
        map.push(hvm_memmap_table_entry {
            addr: start_raw,
            size: end - start_raw,
            type_: E820_RAM,
            reserved: 0,
        });
    }
    Ok(map)
}

/// Write the PVH `hvm_start_info` at [`layout::PVH_INFO_START`] and the memory map at
/// [`layout::MEMMAP_START`].
pub fn configure_pvh(mem: &GuestMemoryMmap, mem_size: u64) -> Result<()> {
    let map = memmap(mem_size)?;
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        memmap_paddr: layout::MEMMAP_START.raw_value(),
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&start_info, layout::PVH_INFO_START);
    params.set_sections::<hvm_memmap_table_entry>(&map, layout::MEMMAP_START);
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| Error::Load(format!("writing the PVH start_info: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// A minimal 64-bit ELF: one PT_LOAD of 16 bytes at 1 MiB and, unless `with_note` is false,
    /// a PT_NOTE holding a Xen note of type 18 with the entry 0x100004.
    fn tiny_elf(with_note: bool) -> Vec<u8> {
        let phnum: u16 = if with_note { 2 } else { 1 };
        let mut v = vec![0u8; 64];
        v[0..4].copy_from_slice(b"\x7fELF");
        v[4] = 2; // 64-bit
        v[5] = 1; // little endian
        v[6] = 1; // version
        v[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        v[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        v[20..24].copy_from_slice(&1u32.to_le_bytes());
        v[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
        v[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        v[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        v[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        v[56..58].copy_from_slice(&phnum.to_le_bytes());
        let data_off = 64 + 56 * phnum as u64;
        let note_off = data_off + 16;
        // PT_LOAD
        let mut ph = vec![0u8; 56];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes());
        ph[8..16].copy_from_slice(&data_off.to_le_bytes());
        ph[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes());
        ph[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
        ph[32..40].copy_from_slice(&16u64.to_le_bytes());
        ph[40..48].copy_from_slice(&16u64.to_le_bytes());
        v.extend_from_slice(&ph);
        // Note: namesz 4 ("Xen\0"), descsz 4, type 18, then the 32-bit entry.
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&18u32.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x10_0004u32.to_le_bytes());
        if with_note {
            let mut ph = vec![0u8; 56];
            ph[0..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
            ph[8..16].copy_from_slice(&note_off.to_le_bytes());
            ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
            ph[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes());
            ph[48..56].copy_from_slice(&4u64.to_le_bytes());
            v.extend_from_slice(&ph);
        }
        v.extend_from_slice(&[0xf4u8; 16]); // segment bytes: hlt
        v.extend_from_slice(&note);
        v
    }

    #[test]
    fn loads_pvh_elf_and_finds_the_entry() {
        let m = mem(8 << 20);
        let img = load_kernel(&m, &tiny_elf(true)).unwrap();
        assert_eq!(img.entry, GuestAddress(0x10_0004));
        let byte: u8 = m.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(byte, 0xf4);
    }

    #[test]
    fn elf_without_pvh_note_is_refused() {
        let m = mem(8 << 20);
        assert!(matches!(
            load_kernel(&m, &tiny_elf(false)),
            Err(Error::NoPvhEntry)
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let m = mem(8 << 20);
        assert!(load_kernel(&m, b"not an elf").is_err());
        assert!(load_kernel(&m, &[]).is_err());
        let mut bad = tiny_elf(true);
        bad.truncate(100);
        assert!(load_kernel(&m, &bad).is_err());
    }

    #[test]
    fn start_info_and_memmap_are_written() {
        let size = 64u64 << 20;
        let m = mem(size as usize);
        configure_pvh(&m, size).unwrap();
        let info: hvm_start_info = m.read_obj(layout::PVH_INFO_START).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.memmap_paddr, 0x7000);
        assert_eq!(info.memmap_entries, 3);
        let e2: hvm_memmap_table_entry = m.read_obj(GuestAddress(0x7000 + 2 * 24)).unwrap();
        assert_eq!(e2.addr, 0x10_0000);
        assert_eq!(e2.size, size - 0x10_0000);
        assert_eq!(e2.type_, E820_RAM);
        let e0: hvm_memmap_table_entry = m.read_obj(GuestAddress(0x7000)).unwrap();
        assert_eq!((e0.addr, e0.size, e0.type_), (0, 0x9_fc00, E820_RAM));
    }

    #[test]
    fn memmap_above_4g() {
        let map = memmap(5 << 30).unwrap();
        assert_eq!(map.len(), 4);
        assert_eq!(map[3].addr, 1 << 32);
        assert_eq!(map[3].size, 2 << 30);
        assert_eq!(map[2].size, (3 << 30) - 0x10_0000);
    }
}
