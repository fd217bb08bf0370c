//! The Linux 64-bit boot protocol for a bzImage (Documentation/arch/x86/boot.rst): the setup
//! header read from the image, `boot_params` (the "zero page") with the e820 map, the command
//! line and the initramfs, and the identity-mapped page tables the 64-bit entry needs.
//!
//! The image itself is loaded by linux-loader's `BzImage` (its protected-mode code at the
//! header's `code32_start`, 1 MiB); the vCPU enters at that address + 0x200 in long mode with
//! RSI pointing at `boot_params`.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;
use crate::{Error, Result};

/// Where the setup header starts in the image (and in `boot_params`).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// "HdrS", the header's magic, at 0x202.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// The 64-bit entry is this far past the protected-mode code's load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `loadflags` bit: the protected-mode code is loaded at 1 MiB (a bzImage).
pub const LOADED_HIGH: u8 = 1 << 0;
/// `type_of_loader` for a boot loader with no assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The command line limit of protocols before 2.06 (no `cmdline_size` field).
pub const OLD_CMDLINE_MAX: usize = 255;
/// Page table entry bits: present, writable, (in a PD) 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M_PAGE: u64 = 0x83;

/// The setup header of a bzImage, or `None` when `image` has no "HdrS" at 0x202.
pub fn setup_header_of(image: &[u8]) -> Option<setup_header> {
    let end = SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>();
    let bytes = image.get(SETUP_HEADER_OFFSET..end)?;
    let mut hdr = setup_header::default();
    hdr.as_mut_slice().copy_from_slice(bytes);
    (hdr.header == HDRS_MAGIC).then_some(hdr)
}

/// Refuse a bzImage this loader cannot enter: it needs the 64-bit entry (protocol 2.12's
/// `XLF_KERNEL_64`) and a protected-mode kernel loaded high.
pub fn check_header(hdr: &setup_header) -> Result<()> {
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 || hdr.loadflags & LOADED_HIGH == 0 {
        return Err(Error::NoLinux64Entry {
            major: version >> 8,
            minor: version & 0xff,
        });
    }
    Ok(())
}

/// The longest command line (without its NUL) the kernel of this header takes.
pub fn cmdline_max(hdr: &setup_header) -> usize {
    let from_header = if hdr.version >= 0x0206 {
        hdr.cmdline_size as usize
    } else {
        OLD_CMDLINE_MAX
    };
    from_header.min(layout::CMDLINE_MAX_SIZE as usize - 1)
}

/// The e820 map for a guest of `mem_size` bytes: low RAM, the reserved EBDA/ROM area, RAM from
/// 1 MiB to the hole (or the end), and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Result<Vec<boot_e820_entry>> {
    Ok(super::loader::memmap(mem_size)?
        .into_iter()
        .map(|e| boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.type_,
        })
        .collect())
}

/// Where the initramfs and the command line are, for `boot_params`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinuxExtras {
    /// The command line (NUL-terminated, already in guest memory; `cmdline_size` is the
    /// kernel's limit, for the loader to read, not to write).
    pub cmdline: Option<GuestAddress>,
    /// The initramfs (already in guest memory) and its size.
    pub initramfs: Option<(GuestAddress, u64)>,
    /// The ACPI RSDP (`acpi_rsdp_addr`, boot protocol 2.14; older kernels scan for it).
    pub rsdp: Option<GuestAddress>,
}

/// `boot_params` for the kernel of `hdr` (as linux-loader returned it: `code32_start` set to
/// the load address) in a guest of `mem_size` bytes.
pub fn boot_params_for(
    hdr: &setup_header,
    mem_size: u64,
    extras: &LinuxExtras,
) -> Result<boot_params> {
    let mut p = boot_params {
        hdr: *hdr,
        ..Default::default()
    };
    p.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    p.hdr.loadflags |= LOADED_HIGH;
    if let Some(addr) = extras.cmdline {
        let a = addr.raw_value();
        p.hdr.cmd_line_ptr = a as u32;
        p.ext_cmd_line_ptr = (a >> 32) as u32;
    }
    if let Some((addr, size)) = extras.initramfs {
        let a = addr.raw_value();
        p.hdr.ramdisk_image = a as u32;
        p.ext_ramdisk_image = (a >> 32) as u32;
        p.hdr.ramdisk_size = size as u32;
        p.ext_ramdisk_size = (size >> 32) as u32;
    }
    if let Some(rsdp) = extras.rsdp {
        p.acpi_rsdp_addr = rsdp.raw_value();
    }
    let map = e820_map(mem_size)?;
    if map.len() > p.e820_table.len() {
        return Err(Error::Load(format!(
            "{} e820 entries is too many",
            map.len()
        )));
    }
    p.e820_entries = map.len() as u8;
    p.e820_table[..map.len()].copy_from_slice(&map);
    Ok(p)
}

/// Identity-map the first 4 GiB with 2 MiB pages (PML4 → PDPT → four PDs) for the 64-bit entry,
/// which wants the kernel, `boot_params`, the command line and the initramfs mapped.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |what: &'static str, value: u64, addr: GuestAddress| {
        mem.write_obj(value, addr)
            .map_err(|source| Error::GuestMemory { what, source })
    };
    w(
        "the boot PML4",
        layout::PDPT_START.raw_value() | PTE_PRESENT_RW,
        layout::PML4_START,
    )?;
    for i in 0..4u64 {
        let pd = layout::PD_START.unchecked_add(i * 4096);
        w(
            "the boot PDPT",
            pd.raw_value() | PTE_PRESENT_RW,
            layout::PDPT_START.unchecked_add(i * 8),
        )?;
        for j in 0..512u64 {
            let phys = ((i << 9) + j) << 21;
            w(
                "the boot page directories",
                phys | PDE_2M_PAGE,
                pd.unchecked_add(j * 8),
            )?;
        }
    }
    Ok(())
}

/// Write `params` at [`layout::ZERO_PAGE_START`].
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<()> {
    mem.write_obj(*params, layout::ZERO_PAGE_START)
        .map_err(|source| Error::GuestMemory {
            what: "boot_params",
            source,
        })
}

/// Tiny bzImages for tests: the setup sectors with a header, then `payload` bytes.
#[cfg(test)]
pub(crate) mod testimg {
    use super::*;

    /// A bzImage of protocol `version` with 4 setup sectors (+ the boot sector), the given
    /// `xloadflags`, `cmdline_size` and `init_size`, and a 4 KiB protected-mode payload of HLTs.
    pub fn bzimage(version: u16, xloadflags: u16, cmdline_size: u32, init_size: u32) -> Vec<u8> {
        let mut v = vec![0u8; 5 * 512];
        let hdr = setup_header {
            setup_sects: 4,
            boot_flag: 0xaa55,
            header: HDRS_MAGIC,
            version,
            loadflags: LOADED_HIGH,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags,
            cmdline_size,
            pref_address: 0x100_0000,
            init_size,
            ..Default::default()
        };
        v[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>()]
            .copy_from_slice(hdr.as_slice());
        v.extend_from_slice(&[0xf4; 4096]);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::testimg::bzimage;
    use super::*;
    use crate::x86_64::loader::{E820_RAM, E820_RESERVED};

    #[test]
    fn header_is_found_and_checked() {
        let img = bzimage(0x020f, XLF_KERNEL_64, 2047, 1 << 20);
        let hdr = setup_header_of(&img).unwrap();
        assert_eq!(hdr.setup_sects, 4);
        check_header(&hdr).unwrap();
        assert_eq!(cmdline_max(&hdr), 2047);
        assert!(setup_header_of(b"\x7fELF").is_none());
        assert!(setup_header_of(&[0u8; 4096]).is_none());
        let old = setup_header_of(&bzimage(0x020b, XLF_KERNEL_64, 2047, 0)).unwrap();
        let e = check_header(&old).unwrap_err().to_string();
        assert!(
            e.contains("protocol 2.11") && e.contains("XLF_KERNEL_64"),
            "{e}"
        );
        let no64 = setup_header_of(&bzimage(0x020f, 0, 2047, 0)).unwrap();
        assert!(check_header(&no64).is_err());
        let ancient = setup_header_of(&bzimage(0x0205, 0, 9999, 0)).unwrap();
        assert_eq!(cmdline_max(&ancient), OLD_CMDLINE_MAX);
        let huge = setup_header_of(&bzimage(0x020f, 1, u32::MAX, 0)).unwrap();
        assert_eq!(cmdline_max(&huge), 0xffff);
    }

    #[test]
    fn boot_params_fields() {
        let hdr = setup_header_of(&bzimage(0x020f, XLF_KERNEL_64, 2047, 1 << 20)).unwrap();
        let extras = LinuxExtras {
            cmdline: Some(layout::CMDLINE_START),
            initramfs: Some((GuestAddress(0x1f00_0000), 0x12_3456)),
            rsdp: Some(layout::ACPI_START),
        };
        let p = boot_params_for(&hdr, 512 << 20, &extras).unwrap();
        let h = p.hdr;
        assert_eq!({ h.header }, HDRS_MAGIC);
        assert_eq!({ h.boot_flag }, 0xaa55);
        assert_eq!(h.type_of_loader, 0xff);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(h.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!({ h.cmd_line_ptr }, 0x2_0000);
        assert_eq!(
            ({ h.ramdisk_image }, { h.ramdisk_size }),
            (0x1f00_0000, 0x12_3456)
        );
        assert_eq!(
            ({ p.ext_cmd_line_ptr }, { p.ext_ramdisk_image }, {
                p.ext_ramdisk_size
            }),
            (0, 0, 0)
        );
        assert_eq!(p.e820_entries, 3);
        let e: Vec<(u64, u64, u32)> = p.e820_table[..3]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        assert_eq!(
            e,
            vec![
                (0, 0x9_fc00, E820_RAM),
                (0x9_fc00, 0x10_0000 - 0x9_fc00, E820_RESERVED),
                (0x10_0000, (512 << 20) - 0x10_0000, E820_RAM),
            ]
        );
        // No initramfs, no command line: the fields stay 0.
        let bare = boot_params_for(&hdr, 512 << 20, &LinuxExtras::default()).unwrap();
        assert_eq!(
            ({ bare.hdr.cmd_line_ptr }, { bare.hdr.ramdisk_image }, {
                bare.hdr.ramdisk_size
            }),
            (0, 0, 0)
        );
    }

    #[test]
    fn e820_above_4g() {
        let e = e820_map(6 << 30).unwrap();
        assert_eq!(e.len(), 4);
        assert_eq!(
            ({ e[2].addr }, { e[2].size }),
            (0x10_0000, (3 << 30) - 0x10_0000)
        );
        assert_eq!(
            ({ e[3].addr }, { e[3].size }, { e[3].r#type }),
            (4 << 30, 3 << 30, E820_RAM)
        );
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(layout::PML4_START).unwrap();
        assert_eq!(pml4, 0xa003);
        let pdpt3: u64 = m.read_obj(GuestAddress(0xa000 + 3 * 8)).unwrap();
        assert_eq!(pdpt3, 0xe003);
        let first: u64 = m.read_obj(GuestAddress(0xb000)).unwrap();
        assert_eq!(first, 0x83);
        let last: u64 = m.read_obj(GuestAddress(0xe000 + 511 * 8)).unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
    }
}
