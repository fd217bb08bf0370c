//! The Hourglass test guest, built from source (`src/c`, GNU assembly and
//! freestanding C) by `build.rs`, and embedded here as [`GUEST_ELF`].
//!
//! # Boot contract (what a VMM must set up)
//!
//! * Load the ELF's `PT_LOAD` segments at their physical addresses (the image
//!   lives at [`GUEST_LOAD_ADDR`], 1 MiB, and ends below [`DIRTY_BASE`]); give
//!   the guest at least [`min_ram_bytes`] of RAM starting at guest physical 0.
//! * **Every** vCPU starts at the 32-bit PVH entry ([`pvh_entry`]): flat 32-bit
//!   protected mode (CS base 0, limit 4 GiB, 32-bit code; DS/ES/SS flat data),
//!   CR0 = PE, paging off, EFLAGS = 2 (interrupts off), EBX = PVH `start_info`
//!   address or 0.
//! * vCPU `i` must have initial APIC ID `i` (CPUID leaf 1, EBX\[31:24\]); that
//!   is how each vCPU finds its index. vCPU 0 builds identity page tables
//!   (2 MiB pages, 0..4 GiB) and releases the others; every vCPU then runs the
//!   C sampling loop in long mode on its own stack, with interrupts off.
//! * Expose the KVM paravirtual leaves (signature at 0x40000000, feature bit
//!   `KVM_FEATURE_CLOCKSOURCE2` at 0x40000001) for kvmclock, and preferably
//!   leaf 0x40000010 EAX = TSC kHz; CPUID leaf 7 EBX bit 1 for TSC_ADJUST.
//! * Handle port I/O: COM1 at 0x3f8 (the guest polls LSR at 0x3fd bit 5 but
//!   gives up waiting after a bounded loop) and the time probe at
//!   [`PROBE_BASE`] (`devices::probe::TimeProbe`). Without a probe (the ID
//!   register reads all-ones, as under QEMU `-kernel` or Cloud Hypervisor
//!   `--kernel`), the guest runs on vCPU 0 only and prints its findings in
//!   the heartbeat on COM1.
//!
//! # What the guest does
//!
//! Each vCPU loops: RDTSC, RDMSR IA32_TSC_ADJUST, kvmclock from its own
//! pvclock page (MSR 0x4b564d01), and checks (counting violations and keeping
//! the worst value of each):
//! * TSC backwards on this vCPU (cycles);
//! * cross-vCPU order: a shared "latest VM TSC" is updated with a cmpxchg
//!   loop; reading a TSC smaller than a value published before this read
//!   began is a violation (cycles). A vCPU's own earlier sample counts too,
//!   so a backwards step on one vCPU shows up in both counters. The "VM TSC"
//!   here is the TSC minus the sum of the guest's own TSC_ADJUST writes, when
//!   the host moved the TSC for them ([`FLAG_ADJUST_MOVES_TSC`]);
//! * kvmclock/TSC disagreement between consecutive samples:
//!   `|Δkvmclock_ns - Δtsc * 10^6 / tsc_khz| > KVMCLOCK_BOUND_NS`.
//!
//! It keeps the largest forward TSC step (ns), the latest sample and a sample
//! counter in a per-vCPU record of [`RECORD_WORDS`] little-endian `u64`s, and
//! every [`REPORT_INTERVAL_US`] writes the record's guest-physical address to
//! the doorbell register. While handling it, the device may write a command
//! into the record ([`REC_CMD`], [`REC_CMD_ARG`], [`REC_CMD_SEQ`]):
//! [`CMD_SET_TSC_ADJUST`], [`CMD_HALT`], or the self-test
//! [`CMD_SIMULATE_SKEW`] that proves the checks can fire. vCPU 0 prints a banner and a
//! heartbeat about once a second of kvmclock time on COM1, and when the probe
//! asks for it, dirties one byte per 4 KiB page of `dirty_mib` MiB from
//! [`DIRTY_BASE`], 64 pages between samples: forever, or, when the probe's
//! [`PROBE_REG_DIRTY_PASSES`] register is non-zero, that many passes over the region
//! ([`REC_DIRTY_PASSES`] counts them), after which it only samples.
//!
//! # Idle mode
//!
//! When the probe's [`PROBE_REG_IDLE_US`] register is non-zero (read at boot and at every
//! report), each vCPU, after every sample, arms its local APIC timer (TSC-deadline mode where
//! CPUID offers it, else one-shot) that many microseconds ahead and halts with interrupts
//! enabled only for the `sti; hlt` window, like an idle OS on its tick. The checks are the
//! same; only the sampling rate drops. This is the "idle small guest" the pause/resume
//! benchmark compares with other VMMs.

#![deny(missing_docs)]

use thiserror::Error;

/// The guest ELF (ELF64, x86_64, PVH note), built by `build.rs`.
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hourglass-guest.elf"));

/// The guest's C-side protocol header; a unit test checks it matches these constants.
pub const PROTOCOL_H: &str = include_str!("c/protocol.h");

/// First port of the time-probe device.
pub const PROBE_BASE: u16 = 0x5a0;
/// Number of ports the probe decodes, from [`PROBE_BASE`].
pub const PROBE_PORT_COUNT: u16 = 0x1c;
/// Register offset (read, 32 bit): [`PROBE_MAGIC`].
pub const PROBE_REG_ID: u16 = 0x0;
/// Register offset (read, 32 bit): number of vCPUs.
pub const PROBE_REG_VCPUS: u16 = 0x4;
/// Register offset (read, 32 bit): MiB the guest dirties (0 = none).
pub const PROBE_REG_DIRTY_MIB: u16 = 0x8;
/// Register offset (read, 32 bit): guest TSC frequency in kHz (0 = unknown).
pub const PROBE_REG_TSC_KHZ: u16 = 0xc;
/// Register offset (write, 32 bit): guest-physical address of a record.
pub const PROBE_REG_DOORBELL: u16 = 0x10;
/// Register offset (read, 32 bit): idle mode, microseconds each vCPU halts between samples
/// (0 = busy loop; values above [`IDLE_MAX_US`] are clamped). Read at boot and at every report.
pub const PROBE_REG_IDLE_US: u16 = 0x14;
/// Register offset (read, 32 bit): passes vCPU 0 makes over the dirtied region (0 = forever).
/// Read once at boot; once that many passes are done the guest stops writing the region.
pub const PROBE_REG_DIRTY_PASSES: u16 = 0x18;
/// Value of the ID register ("HGP1" little endian).
pub const PROBE_MAGIC: u32 = 0x3150_4748;

/// First word of every record ("HGREC001").
pub const RECORD_MAGIC: u64 = 0x4847_5245_4330_3031;
/// Number of `u64` words in a record.
pub const RECORD_WORDS: usize = 23;
/// Size of a record in bytes.
pub const RECORD_BYTES: usize = RECORD_WORDS * 8;
/// Word index: [`RECORD_MAGIC`].
pub const REC_MAGIC: usize = 0;
/// Word index: vCPU index.
pub const REC_VCPU: usize = 1;
/// Word index: report sequence number (1, 2, ...).
pub const REC_SEQ: usize = 2;
/// Word index: samples taken.
pub const REC_SAMPLES: usize = 3;
/// Word index: TSC of the latest sample.
pub const REC_LAST_TSC: usize = 4;
/// Word index: kvmclock (ns) of the latest sample (0 without kvmclock).
pub const REC_LAST_KVMCLOCK_NS: usize = 5;
/// Word index: IA32_TSC_ADJUST of the latest sample.
pub const REC_LAST_TSC_ADJUST: usize = 6;
/// Word index: count of TSC-backwards steps on this vCPU.
pub const REC_TSC_BACKWARDS: usize = 7;
/// Word index: largest backwards step (cycles).
pub const REC_TSC_BACKWARDS_WORST: usize = 8;
/// Word index: count of cross-vCPU order violations.
pub const REC_CROSS_VCPU: usize = 9;
/// Word index: largest cross-vCPU violation (cycles).
pub const REC_CROSS_VCPU_WORST: usize = 10;
/// Word index: count of kvmclock/TSC disagreements.
pub const REC_KVMCLOCK_MISMATCH: usize = 11;
/// Word index: largest kvmclock/TSC disagreement (ns).
pub const REC_KVMCLOCK_MISMATCH_WORST_NS: usize = 12;
/// Word index: largest forward TSC step between samples (ns).
pub const REC_MAX_JUMP_NS: usize = 13;
/// Word index: `FLAG_*` bits.
pub const REC_FLAGS: usize = 14;
/// Word index: the TSC kHz the guest uses.
pub const REC_TSC_KHZ: usize = 15;
/// Word index: completed passes over the dirtied region.
pub const REC_DIRTY_PASSES: usize = 16;
/// Word index: TSC_ADJUST writes done on command.
pub const REC_ADJUST_WRITES: usize = 17;
/// Word index: sum of the guest's TSC_ADJUST deltas that moved the TSC.
pub const REC_TSC_BIAS: usize = 18;
/// Word index (device writes): command, `CMD_*`.
pub const REC_CMD: usize = 19;
/// Word index (device writes): command argument.
pub const REC_CMD_ARG: usize = 20;
/// Word index (device writes): command sequence number (1, 2, ...).
pub const REC_CMD_SEQ: usize = 21;
/// Word index: cycles the guest subtracts from every TSC read on
/// [`CMD_SIMULATE_SKEW`] (0 normally).
pub const REC_SIM_SKEW: usize = 22;

/// Flag: kvmclock enabled and read.
pub const FLAG_KVMCLOCK: u64 = 0x1;
/// Flag: CPUID says IA32_TSC_ADJUST exists.
pub const FLAG_TSC_ADJUST: u64 = 0x2;
/// Flag: TSC kHz from CPUID 0x40000010.
pub const FLAG_KHZ_CPUID: u64 = 0x4;
/// Flag: TSC kHz from the probe register.
pub const FLAG_KHZ_PROBE: u64 = 0x8;
/// Flag: TSC kHz derived from the pvclock mul/shift.
pub const FLAG_KHZ_PVCLOCK: u64 = 0x10;
/// Flag: a guest TSC_ADJUST write moved the TSC (architectural behaviour).
pub const FLAG_ADJUST_MOVES_TSC: u64 = 0x20;
/// Flag: the vCPU halts (`cli; hlt`) after this report.
pub const FLAG_HALTING: u64 = 0x40;

/// Command: none.
pub const CMD_NONE: u64 = 0;
/// Command: WRMSR IA32_TSC_ADJUST := argument.
pub const CMD_SET_TSC_ADJUST: u64 = 1;
/// Command: report once more with [`FLAG_HALTING`], then `cli; hlt`.
pub const CMD_HALT: u64 = 2;
/// Command (self-test of the checks): subtract the argument from every later
/// TSC read of this vCPU, as if its TSC had stepped back by that much.
pub const CMD_SIMULATE_SKEW: u64 = 3;

/// Most vCPUs the guest supports (APIC IDs 0..MAX_VCPUS).
pub const MAX_VCPUS: u32 = 32;
/// Guest-physical start of the dirtied region.
pub const DIRTY_BASE: u64 = 0x40_0000;
/// Interval between two doorbells of one vCPU (µs).
pub const REPORT_INTERVAL_US: u64 = 5000;
/// Largest idle period the guest honours ([`PROBE_REG_IDLE_US`]), microseconds.
pub const IDLE_MAX_US: u32 = 1_000_000;
/// kvmclock/TSC disagreement bound (ns).
pub const KVMCLOCK_BOUND_NS: u64 = 1000;
/// Guest-physical load address of the image.
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;

/// RAM the guest needs when dirtying `dirty_mib` MiB.
pub const fn min_ram_bytes(dirty_mib: u32) -> u64 {
    DIRTY_BASE + (dirty_mib as u64) * 0x10_0000
}

/// ELF note type of the PVH 32-bit entry (`XEN_ELFNOTE_PHYS32_ENTRY`).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Why an image could not be read as a PVH ELF.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    /// The image ends before the named structure.
    #[error("ELF image truncated: {0} out of bounds")]
    Truncated(&'static str),
    /// A header field has an unsupported value.
    #[error("unsupported ELF: {0}")]
    Unsupported(&'static str),
    /// No `Xen` note of type 18 in any `PT_NOTE` segment.
    #[error("no PVH entry note (Xen, type 18) in the ELF")]
    NoPvhNote,
}

/// A loadable segment of the guest ELF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Guest-physical load address (`p_paddr`).
    pub paddr: u64,
    /// Bytes from the file (`p_filesz`).
    pub data: &'a [u8],
    /// Size in memory (`p_memsz`); the tail past `data` is zero.
    pub mem_size: u64,
}

fn bytes<'a>(img: &'a [u8], off: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
    let start = usize::try_from(off).map_err(|_| ElfError::Truncated(what))?;
    let len = usize::try_from(len).map_err(|_| ElfError::Truncated(what))?;
    let end = start.checked_add(len).ok_or(ElfError::Truncated(what))?;
    img.get(start..end).ok_or(ElfError::Truncated(what))
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap_or([0; 4]))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or([0; 8]))
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// A program header's (type, offset, paddr, filesz, memsz).
type Phdr = (u32, u64, u64, u64, u64);

fn program_headers(img: &[u8]) -> Result<Vec<Phdr>, ElfError> {
    let eh = bytes(img, 0, 64, "ELF header")?;
    if &eh[0..4] != b"\x7fELF" {
        return Err(ElfError::Unsupported("bad magic"));
    }
    if eh[4] != 2 || eh[5] != 1 {
        return Err(ElfError::Unsupported("not ELF64 little endian"));
    }
    if u16_at(eh, 18) != 62 {
        return Err(ElfError::Unsupported("machine is not x86_64"));
    }
    let phoff = u64_at(eh, 32);
    let phentsize = u64::from(u16_at(eh, 54));
    let phnum = u64::from(u16_at(eh, 56));
    if phentsize < 56 {
        return Err(ElfError::Unsupported("program header entry too small"));
    }
    (0..phnum)
        .map(|i| {
            let ph = bytes(img, phoff + i * phentsize, 56, "program header")?;
            Ok((
                u32_at(ph, 0),
                u64_at(ph, 8),
                u64_at(ph, 24),
                u64_at(ph, 32),
                u64_at(ph, 40),
            ))
        })
        .collect()
}

/// The `PT_LOAD` segments of an ELF64 x86_64 image.
pub fn load_segments(img: &[u8]) -> Result<Vec<Segment<'_>>, ElfError> {
    program_headers(img)?
        .into_iter()
        .filter(|p| p.0 == PT_LOAD)
        .map(|(_, off, paddr, filesz, memsz)| {
            if filesz > memsz {
                return Err(ElfError::Unsupported("segment file size above memory size"));
            }
            Ok(Segment {
                paddr,
                data: bytes(img, off, filesz, "segment data")?,
                mem_size: memsz,
            })
        })
        .collect()
}

/// The 32-bit PVH entry address from the image's `Xen` note of type 18.
pub fn pvh_entry(img: &[u8]) -> Result<u32, ElfError> {
    for (_, off, _, filesz, _) in program_headers(img)?.into_iter().filter(|p| p.0 == PT_NOTE) {
        let notes = bytes(img, off, filesz, "note segment")?;
        let mut pos = 0usize;
        while pos + 12 <= notes.len() {
            let namesz = u32_at(notes, pos) as usize;
            let descsz = u32_at(notes, pos + 4) as usize;
            let ntype = u32_at(notes, pos + 8);
            let name_start = pos + 12;
            let desc_start = name_start + namesz.div_ceil(4) * 4;
            let next = desc_start + descsz.div_ceil(4) * 4;
            if next > notes.len() {
                return Err(ElfError::Truncated("note"));
            }
            let name = &notes[name_start..name_start + namesz];
            if name == b"Xen\0" && ntype == XEN_ELFNOTE_PHYS32_ENTRY && descsz >= 4 {
                return Ok(u32_at(notes, desc_start));
            }
            pos = next;
        }
    }
    Err(ElfError::NoPvhNote)
}

/// The PVH entry of [`GUEST_ELF`].
pub fn guest_pvh_entry() -> Result<u32, ElfError> {
    pvh_entry(GUEST_ELF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_elf_has_pvh_note_inside_the_image() {
        let entry = guest_pvh_entry().expect("PVH note");
        let segs = load_segments(GUEST_ELF).expect("segments");
        assert_eq!(segs.len(), 1, "one load segment");
        let s = segs[0];
        assert_eq!(s.paddr, GUEST_LOAD_ADDR);
        let entry = u64::from(entry);
        assert!(
            entry > s.paddr && entry < s.paddr + s.data.len() as u64,
            "entry {entry:#x} outside the loaded bytes"
        );
        assert!(
            s.paddr + s.mem_size <= DIRTY_BASE,
            "image ends below DIRTY_BASE"
        );
        // The entry's first instruction is `cli` (0xfa).
        assert_eq!(s.data[(entry - s.paddr) as usize], 0xfa);
        // ELF header's e_entry also points at it.
        assert_eq!(u64_at(GUEST_ELF, 24), entry);
    }

    #[test]
    fn bad_images_are_errors() {
        assert_eq!(pvh_entry(&[]), Err(ElfError::Truncated("ELF header")));
        assert_eq!(
            pvh_entry(&[0u8; 64]),
            Err(ElfError::Unsupported("bad magic"))
        );
        let mut img = GUEST_ELF.to_vec();
        img.truncate(100);
        assert!(matches!(pvh_entry(&img), Err(ElfError::Truncated(_))));
        // Corrupt the note's type: the note is no longer found.
        let mut img = GUEST_ELF.to_vec();
        let pos = img
            .windows(4)
            .position(|w| w == b"Xen\0")
            .expect("note name present");
        img[pos - 4..pos].copy_from_slice(&19u32.to_le_bytes());
        assert_eq!(pvh_entry(&img), Err(ElfError::NoPvhNote));
    }

    fn header_value(name: &str) -> u64 {
        let line = PROTOCOL_H
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name) && l.starts_with("#define"))
            .unwrap_or_else(|| panic!("{name} missing from protocol.h"));
        let v = line.split_whitespace().nth(2).expect("value");
        let v = v.trim_end_matches("ULL");
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).expect("hex"),
            None => v.parse().expect("decimal"),
        }
    }

    #[test]
    fn rust_constants_match_protocol_h() {
        let pairs: &[(&str, u64)] = &[
            ("PROBE_BASE", PROBE_BASE.into()),
            ("PROBE_PORT_COUNT", PROBE_PORT_COUNT.into()),
            ("PROBE_REG_ID", PROBE_REG_ID.into()),
            ("PROBE_REG_VCPUS", PROBE_REG_VCPUS.into()),
            ("PROBE_REG_DIRTY_MIB", PROBE_REG_DIRTY_MIB.into()),
            ("PROBE_REG_TSC_KHZ", PROBE_REG_TSC_KHZ.into()),
            ("PROBE_REG_DOORBELL", PROBE_REG_DOORBELL.into()),
            ("PROBE_REG_IDLE_US", PROBE_REG_IDLE_US.into()),
            ("PROBE_REG_DIRTY_PASSES", PROBE_REG_DIRTY_PASSES.into()),
            ("PROBE_MAGIC", PROBE_MAGIC.into()),
            ("RECORD_MAGIC", RECORD_MAGIC),
            ("RECORD_WORDS", RECORD_WORDS as u64),
            ("REC_MAGIC", REC_MAGIC as u64),
            ("REC_VCPU", REC_VCPU as u64),
            ("REC_SEQ", REC_SEQ as u64),
            ("REC_SAMPLES", REC_SAMPLES as u64),
            ("REC_LAST_TSC", REC_LAST_TSC as u64),
            ("REC_LAST_KVMCLOCK_NS", REC_LAST_KVMCLOCK_NS as u64),
            ("REC_LAST_TSC_ADJUST", REC_LAST_TSC_ADJUST as u64),
            ("REC_TSC_BACKWARDS", REC_TSC_BACKWARDS as u64),
            ("REC_TSC_BACKWARDS_WORST", REC_TSC_BACKWARDS_WORST as u64),
            ("REC_CROSS_VCPU", REC_CROSS_VCPU as u64),
            ("REC_CROSS_VCPU_WORST", REC_CROSS_VCPU_WORST as u64),
            ("REC_KVMCLOCK_MISMATCH", REC_KVMCLOCK_MISMATCH as u64),
            (
                "REC_KVMCLOCK_MISMATCH_WORST_NS",
                REC_KVMCLOCK_MISMATCH_WORST_NS as u64,
            ),
            ("REC_MAX_JUMP_NS", REC_MAX_JUMP_NS as u64),
            ("REC_FLAGS", REC_FLAGS as u64),
            ("REC_TSC_KHZ", REC_TSC_KHZ as u64),
            ("REC_DIRTY_PASSES", REC_DIRTY_PASSES as u64),
            ("REC_ADJUST_WRITES", REC_ADJUST_WRITES as u64),
            ("REC_TSC_BIAS", REC_TSC_BIAS as u64),
            ("REC_CMD", REC_CMD as u64),
            ("REC_CMD_ARG", REC_CMD_ARG as u64),
            ("REC_CMD_SEQ", REC_CMD_SEQ as u64),
            ("REC_SIM_SKEW", REC_SIM_SKEW as u64),
            ("FLAG_KVMCLOCK", FLAG_KVMCLOCK),
            ("FLAG_TSC_ADJUST", FLAG_TSC_ADJUST),
            ("FLAG_KHZ_CPUID", FLAG_KHZ_CPUID),
            ("FLAG_KHZ_PROBE", FLAG_KHZ_PROBE),
            ("FLAG_KHZ_PVCLOCK", FLAG_KHZ_PVCLOCK),
            ("FLAG_ADJUST_MOVES_TSC", FLAG_ADJUST_MOVES_TSC),
            ("FLAG_HALTING", FLAG_HALTING),
            ("CMD_NONE", CMD_NONE),
            ("CMD_SET_TSC_ADJUST", CMD_SET_TSC_ADJUST),
            ("CMD_HALT", CMD_HALT),
            ("CMD_SIMULATE_SKEW", CMD_SIMULATE_SKEW),
            ("MAX_VCPUS", MAX_VCPUS.into()),
            ("DIRTY_BASE", DIRTY_BASE),
            ("REPORT_INTERVAL_US", REPORT_INTERVAL_US),
            ("IDLE_MAX_US", IDLE_MAX_US.into()),
            ("KVMCLOCK_BOUND_NS", KVMCLOCK_BOUND_NS),
            ("GUEST_LOAD_ADDR", GUEST_LOAD_ADDR),
        ];
        for (name, value) in pairs {
            assert_eq!(
                header_value(name),
                *value,
                "{name} differs between protocol.h and lib.rs"
            );
        }
        // Every #define in the header is checked above.
        let defines = PROTOCOL_H
            .lines()
            .filter(|l| l.starts_with("#define") && l.split_whitespace().count() >= 3)
            .count();
        assert_eq!(
            defines,
            pairs.len(),
            "a protocol.h constant has no Rust twin"
        );
    }
}
