//! The Intel MultiProcessor Specification 1.4 tables: how a kernel learns the vCPUs, the
//! IOAPIC and how the 16 ISA interrupts reach it.
//!
//! Why MP tables and not ACPI (MADT): they say all a kernel needs to bring up every vCPU and
//! route the legacy interrupts, in about 200 bytes and no AML; Linux reads them when it finds
//! no ACPI tables (CONFIG_X86_MPPARSE, on in distribution kernels). ACPI adds power buttons and
//! sleep states, which need a DSDT; it can replace this file when Hourglass grows those.
//!
//! Layout: the floating pointer at [`layout::MPTABLE_START`] (0xf0000, in the BIOS area the
//! kernel scans, reserved in the memory map), the configuration table right after it.
//!
//! Interrupts follow KVM's default routing with the in-kernel irqchip: ISA IRQ `n` is IOAPIC
//! pin `n` (and PIC input `n`); LINT0 of every local APIC takes the PIC (ExtINT), LINT1 NMI.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;
use crate::{Error, Result};

/// The local APICs' address.
pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// The IOAPIC's address.
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// KVM's local APIC version.
const LAPIC_VERSION: u8 = 0x14;
/// KVM's IOAPIC version (24 pins).
const IOAPIC_VERSION: u8 = 0x11;
/// ISA interrupts described (IRQ 0..15).
const ISA_IRQS: u8 = 16;
/// The most vCPUs the tables can name (APIC IDs are 8 bits; one ID goes to the IOAPIC).
pub const MAX_CPUS: u32 = 254;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;

/// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
/// Interrupt types.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;

/// Bytes the tables take for `cpus` vCPUs.
pub fn size(cpus: u32) -> usize {
    FLOATING_LEN + HEADER_LEN + config_entries_len(cpus)
}

fn config_entries_len(cpus: u32) -> usize {
    PROCESSOR_LEN * cpus as usize + ENTRY_LEN * (2 + usize::from(ISA_IRQS) + 2)
}

/// The byte that makes `bytes` sum to zero (MP and ACPI tables alike).
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The tables for `cpus` vCPUs (vCPU 0 the boot processor), as they go at `at`.
pub fn build(cpus: u32, at: GuestAddress) -> Result<Vec<u8>> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::Load(format!(
            "MP table: {cpus} vCPUs, the tables name 1 to {MAX_CPUS}"
        )));
    }
    let ioapic_id = cpus as u8;
    let mut entries = Vec::with_capacity(config_entries_len(cpus));
    for id in 0..cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(id as u8);
        entries.push(LAPIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    for irq in 0..ISA_IRQS {
        // Flags 0: polarity and trigger as the ISA bus has them (high, edge).
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_VECTORED,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    // Every local APIC (0xff): LINT0 from the PIC, LINT1 NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_NMI, 0, 0, 0, 0, 0xff, 1]);
    let count = cpus as u16 + 2 + u16::from(ISA_IRQS) + 2;

    let config_at = at
        .checked_add(FLOATING_LEN as u64)
        .ok_or_else(|| Error::Load("MP table address overflows".into()))?;
    let mut config = Vec::with_capacity(HEADER_LEN + entries.len());
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    config.push(4); // specification 1.4
    config.push(0); // checksum, below
    config.extend_from_slice(b"HOURGLAS"); // OEM ID
    config.extend_from_slice(b"HOURGLASS VM"); // product ID
    config.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    config.extend_from_slice(&0u16.to_le_bytes());
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    config.extend_from_slice(&0u16.to_le_bytes()); // no extended table
    config.extend_from_slice(&[0, 0]); // its checksum, reserved
    debug_assert_eq!(config.len(), HEADER_LEN);
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut out = Vec::with_capacity(size(cpus));
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(config_at.raw_value() as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // specification 1.4
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature 1 = 0: the configuration table is present
    out[10] = checksum(&out);
    out.extend_from_slice(&config);
    Ok(out)
}

/// Write the tables for `cpus` vCPUs at [`layout::MPTABLE_START`].
pub fn write(mem: &GuestMemoryMmap, cpus: u32) -> Result<()> {
    let bytes = build(cpus, layout::MPTABLE_START)?;
    mem.write_slice(&bytes, layout::MPTABLE_START)
        .map_err(|source| Error::GuestMemory {
            what: "the MP tables",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// Read the tables back as a kernel does: the floating pointer, its checksum, the
    /// configuration table it points at, its checksum, and each entry by its type's length.
    /// Returns (APIC IDs with their flags, the IOAPIC ID, (irq, pin) pairs, local interrupts).
    #[allow(clippy::type_complexity)]
    fn parse(t: &[u8], at: u64) -> (Vec<(u8, u8)>, u8, Vec<(u8, u8)>, Vec<(u8, u8)>) {
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
        assert_eq!((t[8], t[9], t[11]), (1, 4, 0));
        let c = (u32_at(t, 4) as u64 - at) as usize;
        assert_eq!(c, 16);
        let len = u16_at(t, c + 4) as usize;
        let cfg = &t[c..c + len];
        assert_eq!(&cfg[..4], b"PCMP");
        assert_eq!(sum(cfg), 0, "configuration table checksum");
        assert_eq!(u32_at(cfg, 36), 0xfee0_0000);
        let count = u16_at(cfg, 34) as usize;
        let (mut cpus, mut ioapic, mut irqs, mut lints) = (Vec::new(), None, Vec::new(), vec![]);
        let mut p = 44;
        for _ in 0..count {
            match cfg[p] {
                0 => {
                    cpus.push((cfg[p + 1], cfg[p + 3]));
                    p += 20;
                }
                1 => {
                    assert_eq!(&cfg[p + 2..p + 8], b"ISA   ");
                    p += 8;
                }
                2 => {
                    assert_eq!(u32_at(cfg, p + 4), 0xfec0_0000);
                    ioapic = Some(cfg[p + 1]);
                    p += 8;
                }
                3 => {
                    assert_eq!(Some(cfg[p + 6]), ioapic, "routed to the IOAPIC named");
                    irqs.push((cfg[p + 5], cfg[p + 7]));
                    p += 8;
                }
                4 => {
                    lints.push((cfg[p + 1], cfg[p + 7]));
                    p += 8;
                }
                t => panic!("entry type {t}"),
            }
        }
        assert_eq!(p, len, "entries fill the table exactly");
        (cpus, ioapic.expect("an IOAPIC"), irqs, lints)
    }

    #[test]
    fn tables_read_back_as_a_kernel_reads_them() {
        for n in [1u32, 2, 4, 64, MAX_CPUS] {
            let t = build(n, layout::MPTABLE_START).unwrap();
            assert_eq!(t.len(), size(n));
            let (cpus, ioapic, irqs, lints) = parse(&t, layout::MPTABLE_START.raw_value());
            assert_eq!(cpus.len(), n as usize);
            for (i, (id, flags)) in cpus.iter().enumerate() {
                assert_eq!(*id as usize, i);
                assert_eq!(
                    *flags,
                    if i == 0 { 3 } else { 1 },
                    "vCPU 0 alone is the BSP"
                );
            }
            assert!(ioapic as u32 >= n, "the IOAPIC ID is no vCPU's");
            assert_eq!(irqs, (0..16).map(|i| (i, i)).collect::<Vec<_>>());
            assert_eq!(lints, vec![(3, 0), (1, 1)]);
        }
        assert!(build(0, layout::MPTABLE_START).is_err());
        assert!(build(MAX_CPUS + 1, layout::MPTABLE_START).is_err());
    }

    #[test]
    fn the_largest_table_fits_below_the_end_of_the_bios_area() {
        assert!(layout::MPTABLE_START.raw_value() + size(MAX_CPUS) as u64 <= 0x10_0000);
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&m, 3).unwrap();
        let mut back = vec![0u8; size(3)];
        m.read_slice(&mut back, layout::MPTABLE_START).unwrap();
        assert_eq!(back, build(3, layout::MPTABLE_START).unwrap());
    }
}
