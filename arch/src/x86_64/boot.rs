//! The front door for `--kernel`, `--initramfs` and `--cmdline`: tell the two kernel forms
//! apart, check what the boot protocol allows, and put the kernel, the initramfs, the command
//! line and the boot structures into guest memory.
//!
//! * An ELF with a PVH entry note (a Linux `vmlinux` built with CONFIG_PVH, or any small PVH
//!   program such as the built-in test guest) is entered at its 32-bit PVH entry; the command
//!   line and the initramfs (one module) are named in `hvm_start_info`.
//! * A bzImage (`vmlinuz` as distributions ship it) is entered through the Linux 64-bit boot
//!   protocol ([`super::linux`]).
//!
//! Everything is checked against the image and the memory size before anything is written, so
//! that a caller that builds guest memory first and the VM afterwards refuses bad input before
//! any VM exists.

use std::io::Cursor;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;
use super::linux::{self, LinuxExtras};
use super::loader::{self, PvhExtras};
use crate::{Error, Result};

/// The longest command line (without its NUL) given to a kernel entered through PVH: Linux
/// copies it into a buffer of COMMAND_LINE_SIZE (2048 on x86, NUL included) and would cut a
/// longer one silently, so a longer one is refused instead.
pub const PVH_CMDLINE_MAX: usize = 2047;
/// Where in guest memory the initramfs may start: page aligned.
const PAGE: u64 = 4096;

/// How the vCPU enters the loaded image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// The PVH 32-bit entry (EBX = `hvm_start_info`).
    Pvh,
    /// The Linux 64-bit boot protocol (RSI = `boot_params`); only the boot vCPU starts there,
    /// the others wait for INIT/SIPI.
    Linux64,
}

/// What to boot: the image bytes, and optionally an initramfs and a command line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Payload<'a> {
    /// The kernel image (ELF with a PVH note, or bzImage).
    pub kernel: &'a [u8],
    /// The initramfs.
    pub initramfs: Option<&'a [u8]>,
    /// The command line.
    pub cmdline: Option<&'a str>,
}

/// What [`load_payload`] put where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// How to enter it.
    pub mode: EntryMode,
    /// The entry point.
    pub entry: GuestAddress,
    /// Whether every vCPU starts at the entry (an image that asks for it with Hourglass's ELF
    /// note, like the built-in test guest); otherwise only the boot vCPU does and the others
    /// wait for INIT/SIPI, as a Linux kernel (PVH or bzImage) expects.
    pub all_vcpus_at_entry: bool,
    /// First address past what the kernel occupies (for a bzImage: what it decompresses into).
    pub kernel_end: GuestAddress,
    /// Where the initramfs is, and its size.
    pub initramfs: Option<(GuestAddress, u64)>,
    /// Where the command line is.
    pub cmdline: Option<GuestAddress>,
}

/// The two kernel forms.
#[derive(Clone, Copy, Debug)]
pub enum KernelFormat {
    /// An ELF (it must have a PVH note; checked when it is loaded).
    Elf,
    /// A bzImage and its setup header.
    BzImage(setup_header),
}

/// Tell the kernel forms apart by their magic.
pub fn kernel_format(image: &[u8]) -> Result<KernelFormat> {
    if image.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    match linux::setup_header_of(image) {
        Some(hdr) => {
            linux::check_header(&hdr)?;
            Ok(KernelFormat::BzImage(hdr))
        }
        None => Err(Error::UnknownKernelFormat),
    }
}

/// Refuse a command line longer than `max` bytes or holding a NUL.
pub fn check_cmdline(cmdline: &str, max: usize, why: &'static str) -> Result<()> {
    if let Some(i) = cmdline.bytes().position(|b| b == 0) {
        return Err(Error::CmdlineNul(i));
    }
    if cmdline.len() > max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max,
            why,
        });
    }
    Ok(())
}

/// Where an initramfs of `size` bytes goes: as high as possible, page aligned, ending at or below
/// `top`, starting at or above `kernel_end` (rounded up to a page).
pub fn place_initramfs(size: u64, kernel_end: u64, top: u64) -> Result<GuestAddress> {
    let floor = kernel_end.div_ceil(PAGE) * PAGE;
    let too_large = || Error::InitramfsTooLarge {
        size,
        room: top.saturating_sub(floor),
        kernel_end,
        top,
    };
    let start = top.checked_sub(size).ok_or_else(too_large)? / PAGE * PAGE;
    if start < floor {
        return Err(too_large());
    }
    Ok(GuestAddress(start))
}

/// The end of RAM below the 32-bit hole for a guest of `mem_size` bytes.
/// The firmware's reset vector (F000:FFF0), as this VM's firmware: `mov $0xfe,%al ;
/// out %al,$0x64 ; 1: cli ; hlt ; jmp 1b` (the i8042 reset). A kernel that restarts through
/// the BIOS jumps here in real mode: Linux does when its other ways fail, and on a
/// hardware-reduced ACPI platform without EFI it tries EFI, then the BIOS, before the
/// reset register (arch/x86/kernel/reboot.c). Without it the jump runs zeros.
pub const RESET_VECTOR_CODE: [u8; 8] = [0xb0, 0xfe, 0xe6, 0x64, 0xfa, 0xf4, 0xeb, 0xfc];

/// Write [`RESET_VECTOR_CODE`] at [`layout::RESET_VECTOR`].
pub fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<()> {
    mem.write_slice(&RESET_VECTOR_CODE, layout::RESET_VECTOR)
        .map_err(|source| Error::GuestMemory {
            what: "the reset vector",
            source,
        })
}

fn low_ram_top(mem_size: u64) -> u64 {
    mem_size.min(layout::MEM_32BIT_GAP_START)
}

/// Check `payload` against the boot protocol and guest memory of `mem_size` bytes, load it into
/// `mem` and write the boot structures (GDT, PVH start info or `boot_params` with page tables)
/// and the MP tables describing `vcpus` vCPUs.
pub fn load_payload(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    vcpus: u32,
    payload: &Payload,
) -> Result<Loaded> {
    let format = kernel_format(payload.kernel)?;
    let (cmdline_max, why) = match &format {
        KernelFormat::Elf => (
            PVH_CMDLINE_MAX,
            "Hourglass gives a PVH kernel (Linux's COMMAND_LINE_SIZE is 2048 with the NUL)",
        ),
        KernelFormat::BzImage(hdr) => (
            linux::cmdline_max(hdr),
            "this kernel takes (its setup header's cmdline_size)",
        ),
    };
    if let Some(c) = payload.cmdline {
        check_cmdline(c, cmdline_max, why)?;
    }
    if payload.initramfs.is_some_and(|i| i.is_empty()) {
        return Err(Error::InitramfsEmpty);
    }
    let top = low_ram_top(mem_size);

    let mut all_vcpus_at_entry = false;
    let (mode, entry, kernel_end, initrd_top, hdr) = match format {
        KernelFormat::Elf => {
            let img = loader::load_kernel(mem, payload.kernel)?;
            all_vcpus_at_entry = img.all_vcpus_at_entry;
            (EntryMode::Pvh, img.entry, img.end.raw_value(), top, None)
        }
        KernelFormat::BzImage(_) => {
            let r = BzImage::load(
                mem,
                None,
                &mut Cursor::new(payload.kernel),
                Some(layout::HIGH_RAM_START),
            )
            .map_err(|e| Error::Load(e.to_string()))?;
            let hdr = r
                .setup_header
                .ok_or_else(|| Error::Load("linux-loader returned no setup header".into()))?;
            let load = r.kernel_load.raw_value();
            // The kernel decompresses itself in place, from its load address rounded up to its
            // alignment (or its preferred address, if higher), into init_size bytes.
            let align = u64::from(hdr.kernel_alignment).max(1);
            let base = load.div_ceil(align) * align;
            let base = base.max(hdr.pref_address);
            let end = r
                .kernel_end
                .max(base.saturating_add(u64::from(hdr.init_size)));
            let initrd_max = u64::from(hdr.initrd_addr_max).saturating_add(1);
            (
                EntryMode::Linux64,
                GuestAddress(load + linux::ENTRY_64_OFFSET),
                end,
                top.min(initrd_max),
                Some(hdr),
            )
        }
    };
    if kernel_end > top {
        return Err(Error::KernelTooLarge {
            end: kernel_end,
            top,
        });
    }

    let initramfs = match payload.initramfs {
        Some(bytes) => {
            let size = bytes.len() as u64;
            let at = place_initramfs(size, kernel_end, initrd_top)?;
            mem.write_slice(bytes, at)
                .map_err(|source| Error::GuestMemory {
                    what: "the initramfs",
                    source,
                })?;
            Some((at, size))
        }
        None => None,
    };
    let cmdline = match payload.cmdline {
        Some(c) => {
            let mut bytes = Vec::with_capacity(c.len() + 1);
            bytes.extend_from_slice(c.as_bytes());
            bytes.push(0);
            mem.write_slice(&bytes, layout::CMDLINE_START)
                .map_err(|source| Error::GuestMemory {
                    what: "the command line",
                    source,
                })?;
            Some(layout::CMDLINE_START)
        }
        None => None,
    };

    super::regs::write_gdt(mem, mode)?;
    super::mptable::write(mem, vcpus)?;
    let rsdp = Some(super::acpi::write(mem, vcpus)?);
    write_reset_vector(mem)?;
    match hdr {
        None => loader::configure_pvh(
            mem,
            mem_size,
            &PvhExtras {
                cmdline,
                module: initramfs,
                rsdp,
            },
        )?,
        Some(hdr) => {
            let extras = LinuxExtras {
                cmdline,
                initramfs,
                rsdp,
            };
            let params = linux::boot_params_for(&hdr, mem_size, &extras)?;
            linux::write_boot_params(mem, &params)?;
            linux::write_page_tables(mem)?;
        }
    }
    Ok(Loaded {
        mode,
        entry,
        all_vcpus_at_entry,
        kernel_end: GuestAddress(kernel_end),
        initramfs,
        cmdline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::linux::testimg::bzimage;
    use crate::x86_64::linux::XLF_KERNEL_64;
    use linux_loader::loader::bootparam::boot_params;
    use linux_loader::loader::elf::start_info::{hvm_modlist_entry, hvm_start_info};

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&layout::ram_regions(size).unwrap()).unwrap()
    }

    fn guest_elf() -> Vec<u8> {
        loader::tests_support::tiny_elf(true)
    }

    #[test]
    fn formats() {
        assert!(matches!(kernel_format(&guest_elf()), Ok(KernelFormat::Elf)));
        assert!(matches!(
            kernel_format(&bzimage(0x020f, XLF_KERNEL_64, 2047, 0)),
            Ok(KernelFormat::BzImage(_))
        ));
        for junk in [&b""[..], b"MZ", &[0u8; 8192], b"#!/bin/sh\necho hi\n"] {
            let e = kernel_format(junk).unwrap_err();
            assert!(matches!(e, Error::UnknownKernelFormat), "{e}");
            assert!(e.to_string().contains("neither an ELF"), "{e}");
        }
        let e = kernel_format(&bzimage(0x020a, 0, 2047, 0)).unwrap_err();
        assert!(matches!(e, Error::NoLinux64Entry { .. }), "{e}");
        let e = load_payload(
            &mem(64 << 20),
            64 << 20,
            1,
            &Payload {
                kernel: &loader::tests_support::tiny_elf(false),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, Error::NoPvhEntry), "{e}");
    }

    #[test]
    fn pvh_with_initramfs_and_cmdline() {
        let size = 64u64 << 20;
        let m = mem(size);
        let initrd = vec![0xabu8; 10_000];
        let l = load_payload(
            &m,
            size,
            1,
            &Payload {
                kernel: &guest_elf(),
                initramfs: Some(&initrd),
                cmdline: Some("console=ttyS0 quiet"),
            },
        )
        .unwrap();
        assert_eq!(l.mode, EntryMode::Pvh);
        assert_eq!(l.entry, GuestAddress(0x10_0004));
        // At the top of RAM, page aligned.
        let at = (size - 10_000) / 4096 * 4096;
        assert_eq!(l.initramfs, Some((GuestAddress(at), 10_000)));
        let info: hvm_start_info = m.read_obj(layout::PVH_INFO_START).unwrap();
        assert_eq!(info.cmdline_paddr, 0x2_0000);
        assert_eq!((info.nr_modules, info.modlist_paddr), (1, 0x6400));
        let e: hvm_modlist_entry = m.read_obj(layout::PVH_MODLIST_START).unwrap();
        assert_eq!((e.paddr, e.size), (at, 10_000));
        let mut c = [0u8; 20];
        m.read_slice(&mut c, layout::CMDLINE_START).unwrap();
        assert_eq!(&c, b"console=ttyS0 quiet\0");
        let first: u8 = m.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(first, 0xab);
        // The platform around the kernel: the RSDP the start info names, and the reset vector.
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        let mut sig = [0u8; 8];
        m.read_slice(&mut sig, GuestAddress(info.rsdp_paddr))
            .unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let mut rv = [0u8; 4];
        m.read_slice(&mut rv, GuestAddress(0xf_fff0)).unwrap();
        assert_eq!(
            rv,
            [0xb0, 0xfe, 0xe6, 0x64],
            "mov $0xfe,%al ; out %al,$0x64"
        );
    }

    #[test]
    fn bzimage_boot_params() {
        let size = 256u64 << 20;
        let m = mem(size);
        let img = bzimage(0x020f, XLF_KERNEL_64, 2047, 32 << 20);
        let l = load_payload(
            &m,
            size,
            1,
            &Payload {
                kernel: &img,
                initramfs: Some(&[1, 2, 3]),
                cmdline: Some("console=ttyS0"),
            },
        )
        .unwrap();
        assert_eq!(l.mode, EntryMode::Linux64);
        assert_eq!(l.entry, GuestAddress(0x10_0200));
        // Decompressed at pref_address (16 MiB) + init_size (32 MiB).
        assert_eq!(l.kernel_end, GuestAddress(48 << 20));
        let p: boot_params = m.read_obj(layout::ZERO_PAGE_START).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ p.hdr.ramdisk_image }, (size - 4096) as u32);
        assert_eq!({ p.hdr.ramdisk_size }, 3);
        assert_eq!({ p.hdr.code32_start }, 0x10_0000);
        assert_eq!(p.e820_entries, 3);
        let code: u8 = m.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(code, 0xf4, "protected-mode code at 1 MiB");
        let pml4: u64 = m.read_obj(layout::PML4_START).unwrap();
        assert_eq!(pml4, 0xa003);
    }

    #[test]
    fn command_line_limits() {
        let size = 64u64 << 20;
        let long = "x".repeat(2048);
        let e = load_payload(
            &mem(size),
            size,
            1,
            &Payload {
                kernel: &guest_elf(),
                cmdline: Some(&long),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::CmdlineTooLong {
                    len: 2048,
                    max: 2047,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("PVH"), "{e}");
        let ok = "x".repeat(2047);
        load_payload(
            &mem(size),
            size,
            1,
            &Payload {
                kernel: &guest_elf(),
                cmdline: Some(&ok),
                ..Default::default()
            },
        )
        .unwrap();
        // A bzImage's own cmdline_size rules.
        let img = bzimage(0x020f, XLF_KERNEL_64, 100, 1 << 20);
        let e = load_payload(
            &mem(size),
            size,
            1,
            &Payload {
                kernel: &img,
                cmdline: Some(&"y".repeat(101)),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, Error::CmdlineTooLong { max: 100, .. }), "{e}");
        assert!(e.to_string().contains("cmdline_size"), "{e}");
        assert!(matches!(
            check_cmdline("a\0b", 10, "x"),
            Err(Error::CmdlineNul(1))
        ));
    }

    #[test]
    fn initramfs_that_does_not_fit() {
        let size = 64u64 << 20;
        let big = vec![0u8; 63 << 20];
        let e = load_payload(
            &mem(size),
            size,
            1,
            &Payload {
                kernel: &guest_elf(),
                initramfs: Some(&big),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, Error::InitramfsTooLarge { .. }), "{e}");
        assert!(e.to_string().contains("give more --memory"), "{e}");
        assert!(matches!(
            load_payload(
                &mem(size),
                size,
                1,
                &Payload {
                    kernel: &guest_elf(),
                    initramfs: Some(&[]),
                    ..Default::default()
                },
            ),
            Err(Error::InitramfsEmpty)
        ));
        // Larger than everything below the top.
        assert!(place_initramfs(u64::MAX, 0, 1 << 30).is_err());
        assert_eq!(
            place_initramfs(4096, 0x10_0001, 0x10_3000).unwrap(),
            GuestAddress(0x10_2000)
        );
        assert_eq!(
            place_initramfs(0x2000, 0x10_0001, 0x10_3000).unwrap(),
            GuestAddress(0x10_1000)
        );
        assert!(place_initramfs(0x2001, 0x10_0001, 0x10_3000).is_err());
    }

    #[test]
    fn bzimage_that_needs_more_memory() {
        // init_size of 100 MiB from 16 MiB does not fit in 64 MiB.
        let size = 64u64 << 20;
        let img = bzimage(0x020f, XLF_KERNEL_64, 2047, 100 << 20);
        let e = load_payload(
            &mem(size),
            size,
            1,
            &Payload {
                kernel: &img,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, Error::KernelTooLarge { .. }), "{e}");
    }

    #[test]
    fn initramfs_stays_below_the_hole() {
        let size = 5u64 << 30;
        let m = GuestMemoryMmap::from_ranges(&layout::ram_regions(size).unwrap()).unwrap();
        let l = load_payload(
            &m,
            size,
            1,
            &Payload {
                kernel: &guest_elf(),
                initramfs: Some(&[7; 100]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            l.initramfs,
            Some((GuestAddress(layout::MEM_32BIT_GAP_START - 4096), 100))
        );
    }
}
