//! Loading a PVH ELF image and writing the PVH `hvm_start_info` and memory map.

use std::io::Cursor;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
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

/// The ELF note name of Hourglass's own notes.
pub const HOURGLASS_NOTE_NAME: &[u8] = b"Hourglass\0";
/// Hourglass note type: every vCPU starts at the PVH entry at once (the built-in test guest).
/// Without it only the boot vCPU does, and the others wait for INIT/SIPI from the guest, as the
/// PVH ABI says and as a Linux kernel expects (it starts its CPUs itself).
pub const HOURGLASS_NOTE_ALL_VCPUS_AT_ENTRY: u32 = 1;
const PT_NOTE: u32 = 4;

/// What loading an image produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootImage {
    /// The 32-bit PVH entry point (from the ELF note).
    pub entry: GuestAddress,
    /// First guest address after the loaded image.
    pub end: GuestAddress,
    /// Whether the image asks for every vCPU at the entry ([`HOURGLASS_NOTE_ALL_VCPUS_AT_ENTRY`]).
    pub all_vcpus_at_entry: bool,
}

/// Whether the ELF `image` carries the note `name`/`ntype` in a PT_NOTE segment. A malformed
/// header or note table reads as "no such note" (the loader has already accepted the image).
pub fn has_note(image: &[u8], name: &[u8], ntype: u32) -> bool {
    let u16_at = |o: usize| {
        image
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        image
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| {
        image
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    for i in 0..usize::from(phnum) {
        let Some(ph) = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i * usize::from(phentsize)))
        else {
            return false;
        };
        if u32_at(ph) != Some(PT_NOTE) {
            continue;
        }
        let (Some(off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 0x20)) else {
            continue;
        };
        let notes = usize::try_from(off)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(o, n)| image.get(o..o.checked_add(n)?));
        let Some(notes) = notes else { continue };
        let mut pos = 0usize;
        while let (Some(namesz), Some(descsz), Some(t)) = (
            note_word(notes, pos),
            note_word(notes, pos + 4),
            note_word(notes, pos + 8),
        ) {
            let name_at = pos + 12;
            let Some(desc_at) = name_at.checked_add(namesz.div_ceil(4) * 4) else {
                break;
            };
            if t == ntype as usize && notes.get(name_at..name_at + namesz) == Some(name) {
                return true;
            }
            match desc_at.checked_add(descsz.div_ceil(4) * 4) {
                Some(next) if next > pos => pos = next,
                _ => break,
            }
        }
    }
    false
}

fn note_word(notes: &[u8], at: usize) -> Option<usize> {
    let b = notes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?) as usize)
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
            all_vcpus_at_entry: has_note(
                image,
                HOURGLASS_NOTE_NAME,
                HOURGLASS_NOTE_ALL_VCPUS_AT_ENTRY,
            ),
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

/// What `hvm_start_info` points at besides the memory map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvhExtras {
    /// The NUL-terminated command line (`cmdline_paddr`), already in guest memory.
    pub cmdline: Option<GuestAddress>,
    /// The one module (`modlist_paddr`, `nr_modules` = 1): the initramfs at this address and of
    /// this size, already in guest memory.
    pub module: Option<(GuestAddress, u64)>,
    /// The ACPI RSDP (`rsdp_paddr`), already in guest memory.
    pub rsdp: Option<GuestAddress>,
}

/// Write the PVH `hvm_start_info` at [`layout::PVH_INFO_START`], the memory map at
/// [`layout::MEMMAP_START`] and, with a module, its list at [`layout::PVH_MODLIST_START`].
pub fn configure_pvh(mem: &GuestMemoryMmap, mem_size: u64, extras: &PvhExtras) -> Result<()> {
    let map = memmap(mem_size)?;
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        memmap_paddr: layout::MEMMAP_START.raw_value(),
        memmap_entries: map.len() as u32,
        cmdline_paddr: extras.cmdline.map_or(0, |a| a.raw_value()),
        rsdp_paddr: extras.rsdp.map_or(0, |a| a.raw_value()),
        ..Default::default()
    };
    if extras.module.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = layout::PVH_MODLIST_START.raw_value();
    }
    let mut params = BootParams::new::<hvm_start_info>(&start_info, layout::PVH_INFO_START);
    params.set_sections::<hvm_memmap_table_entry>(&map, layout::MEMMAP_START);
    if let Some((addr, size)) = extras.module {
        let entry = hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            ..Default::default()
        };
        params.set_modules::<hvm_modlist_entry>(&[entry], layout::PVH_MODLIST_START);
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| Error::Load(format!("writing the PVH start_info: {e}")))
}

/// Test images shared by this crate's tests.
#[cfg(test)]
pub(crate) mod tests_support {
    /// A minimal 64-bit ELF: one PT_LOAD of 16 bytes at 1 MiB and, unless `with_note` is false,
    /// a PT_NOTE holding a Xen note of type 18 with the entry 0x100004.
    pub(crate) fn tiny_elf(with_note: bool) -> Vec<u8> {
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
}

#[cfg(test)]
mod tests {
    use super::tests_support::tiny_elf;
    use super::*;
    use vm_memory::Bytes;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// `tiny_elf(true)` with one more note after the Xen one, inside the same PT_NOTE.
    fn with_extra_note(name: &[u8], ntype: u32) -> Vec<u8> {
        let mut v = tiny_elf(true);
        let mut note = Vec::new();
        note.extend_from_slice(&(name.len() as u32).to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&ntype.to_le_bytes());
        note.extend_from_slice(name);
        note.resize(12 + name.len().div_ceil(4) * 4, 0);
        note.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&note);
        // The PT_NOTE header is the second one: grow its p_filesz and p_memsz.
        let ph = 64 + 56;
        for field in [ph + 32, ph + 40] {
            let old = u64::from_le_bytes(v[field..field + 8].try_into().unwrap());
            v[field..field + 8].copy_from_slice(&(old + note.len() as u64).to_le_bytes());
        }
        v
    }

    #[test]
    fn the_all_vcpus_note_is_found_only_where_it_is() {
        let plain = tiny_elf(true);
        assert!(has_note(&plain, b"Xen\0", 18));
        assert!(!has_note(
            &plain,
            HOURGLASS_NOTE_NAME,
            HOURGLASS_NOTE_ALL_VCPUS_AT_ENTRY
        ));
        let m = mem(8 << 20);
        assert!(!load_kernel(&m, &plain).unwrap().all_vcpus_at_entry);

        let marked = with_extra_note(HOURGLASS_NOTE_NAME, HOURGLASS_NOTE_ALL_VCPUS_AT_ENTRY);
        assert!(has_note(&marked, b"Xen\0", 18));
        let img = load_kernel(&m, &marked).unwrap();
        assert!(img.all_vcpus_at_entry);
        assert_eq!(img.entry, GuestAddress(0x10_0004));
        // Same name, another type; another name, same type: not the note.
        assert!(
            !load_kernel(&m, &with_extra_note(HOURGLASS_NOTE_NAME, 2))
                .unwrap()
                .all_vcpus_at_entry
        );
        assert!(
            !load_kernel(&m, &with_extra_note(b"Hourglas\0", 1))
                .unwrap()
                .all_vcpus_at_entry
        );
        // Every truncation and a few corruptions answer without panicking.
        for n in 0..marked.len() {
            let _ = has_note(&marked[..n], HOURGLASS_NOTE_NAME, 1);
        }
        for at in [
            0x20,
            0x36,
            0x38,
            64 + 56 + 8,
            64 + 56 + 32,
            marked.len() - 24,
        ] {
            let mut bad = marked.clone();
            bad[at..at + 2].copy_from_slice(&[0xff, 0xff]);
            let _ = has_note(&bad, HOURGLASS_NOTE_NAME, 1);
        }
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
        configure_pvh(&m, size, &PvhExtras::default()).unwrap();
        let info: hvm_start_info = m.read_obj(layout::PVH_INFO_START).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(
            (info.nr_modules, info.modlist_paddr, info.cmdline_paddr),
            (0, 0, 0)
        );
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
    fn start_info_points_at_the_module_and_the_cmdline() {
        let size = 64u64 << 20;
        let m = mem(size as usize);
        let extras = PvhExtras {
            cmdline: Some(layout::CMDLINE_START),
            module: Some((GuestAddress(0x3f0_0000), 0x1234)),
            rsdp: Some(layout::ACPI_START),
        };
        configure_pvh(&m, size, &extras).unwrap();
        let info: hvm_start_info = m.read_obj(layout::PVH_INFO_START).unwrap();
        assert_eq!(info.cmdline_paddr, 0x2_0000);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        assert_eq!((info.nr_modules, info.modlist_paddr), (1, 0x6400));
        let e: hvm_modlist_entry = m.read_obj(GuestAddress(0x6400)).unwrap();
        assert_eq!((e.paddr, e.size, e.cmdline_paddr), (0x3f0_0000, 0x1234, 0));
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
