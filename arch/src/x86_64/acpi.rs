//! ACPI tables: what a kernel reads to power the VM off and to reset it, and (as in the MP
//! tables beside them) its vCPUs and IOAPIC.
//!
//! Hardware-reduced ACPI (ACPI 6, FADT flag `HW_REDUCED_ACPI`): no fixed-hardware PM blocks, no
//! SCI, no PM timer, no legacy PIC; power is two byte-wide registers in port space, the
//! FADT's sleep control and sleep status registers ([`layout::ACPI_SLEEP_PORT`]). A kernel
//! that finds `\_S5_` in the DSDT powers off by writing `SLP_TYP(5) << 2 | SLP_EN` to the sleep
//! control register; it resets through the FADT's reset register, which is the i8042's command
//! port with the CPU-reset command ([`layout::RESET_PORT`], [`layout::RESET_VALUE`]), the one
//! reset path the VM already has. Why hardware-reduced: the full fixed-hardware model would ask
//! for a PM1 event block, an SCI and a PM timer (Linux would then use `acpi_pm` as a
//! clocksource candidate), none of which a VM built around the TSC needs.
//!
//! The tables, in the order they sit from [`layout::ACPI_START`] (in the BIOS area a kernel
//! scans for the RSDP, reserved in the memory map; the PVH start info and `boot_params` also
//! point at the RSDP):
//!
//! ```text
//! RSDP (36 bytes, revision 2) -> XSDT -> FADT -> DSDT (AML: \_S5_, and COM1 with its IRQ 4)
//!                                     -> MADT (one local APIC per vCPU, the IOAPIC, LINT1 NMI)
//! ```
//!
//! The MP tables stay: a kernel booted with `acpi=off` (or built without ACPI) still finds its
//! vCPUs and interrupts there.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;
use super::mptable::{checksum, IOAPIC_ADDRESS, LAPIC_ADDRESS, MAX_CPUS};
use crate::{Error, Result};

/// Every table's OEM ID.
const OEM_ID: &[u8; 6] = b"HRGLAS";
/// Every table's OEM table ID.
const OEM_TABLE_ID: &[u8; 8] = b"HOURGLAS";
/// The standard table header's length.
const HEADER_LEN: usize = 36;
/// The RSDP's length (ACPI 2.0 and later).
const RSDP_LEN: usize = 36;
/// The FADT's length at revision 6 (up to the hypervisor vendor identity).
const FADT_LEN: usize = 276;
/// FADT flag: the reset register is supported.
const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// FADT flag: hardware-reduced ACPI.
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// FADT IA-PC boot architecture flag: there is no CMOS RTC. Without it Linux's `rtc_cmos`
/// probes ports 0x70/0x71, which nothing answers here, and gives up ("broken or not
/// accessible") about 4.5 s later, in the nested host; the guest's date comes from kvmclock.
const FADT_BOOT_NO_CMOS_RTC: u16 = 1 << 5;
/// The `\_S5_` sleep type a kernel writes to power off (the first element of the package); the
/// sleep control register's device is told it (`devices::acpi::SleepControl`).
pub const S5_SLEEP_TYPE: u8 = 5;
/// Generic address structure: system I/O space.
const GAS_SYSTEM_IO: u8 = 1;
/// Generic address structure: byte access.
const GAS_ACCESS_BYTE: u8 = 1;
/// MADT entry types.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;

/// The DSDT's AML, two definitions:
///
/// ```text
/// Name (_S5_, Package (4) { 5, 0, 0, 0 })     // the sleep type that powers off
/// Scope (\_SB_) {
///     Device (COM1) {                          // the 16550 and its interrupt
///         Name (_HID, EisaId ("PNP0501"))
///         Name (_UID, Zero)
///         Name (_CRS, ResourceTemplate () {
///             IO (Decode16, 0x3F8, 0x3F8, 0, 8)
///             IRQNoFlags () { 4 }
///         })
///     }
/// }
/// ```
///
/// COM1 must be described: on a hardware-reduced platform Linux has no legacy PIC and so maps
/// no ISA interrupt by default; its 8250 driver finds the port here (PNP0501) and maps GSI 4
/// through the IOAPIC. Without it, opening the console fails for want of IRQ 4 and `/init` has
/// no standard output (seen in the nested host).
///
/// Encoding (ACPI 6, section 20): NameOp 0x08; PackageOp 0x12, ScopeOp 0x10, DeviceOp
/// 0x5B 0x82, BufferOp 0x11, each followed by a one-byte PkgLength (its own byte included, all
/// under 64 here); BytePrefix 0x0A, DWordPrefix 0x0C, ZeroOp 0x00; `\` is 0x5C. The EISA ID is
/// the vendor's three letters in 5 bits each (big-endian), then the product number: 41 D0 05 01.
/// The resource template: an I/O port descriptor (0x47, 16-bit decode, min, max, alignment,
/// length), an IRQ descriptor without flags (0x22, mask 1 << 4) and the end tag (0x79, 0).
#[rustfmt::skip]
const DSDT_AML: [u8; 65] = [
    // Name (_S5_, Package (4) { 5, 0, 0, 0 })
    0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, S5_SLEEP_TYPE, 0x00, 0x00, 0x00,
    // Scope (\_SB_) {   PkgLength 0x33 = 1 + 5 (name) + 45 (the device)
    0x10, 0x33, 0x5c, b'_', b'S', b'B', b'_',
    // Device (COM1) {   PkgLength 0x2b = 1 + 4 + 10 + 6 + 22
    0x5b, 0x82, 0x2b, b'C', b'O', b'M', b'1',
    // Name (_HID, EisaId ("PNP0501"))
    0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01,
    // Name (_UID, Zero)
    0x08, b'_', b'U', b'I', b'D', 0x00,
    // Name (_CRS, Buffer (13) { ... })   PkgLength 0x10 = 1 + 2 (size) + 13
    0x08, b'_', b'C', b'R', b'S', 0x11, 0x10, 0x0a, 0x0d,
    0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08,
    0x22, 0x10, 0x00,
    0x79, 0x00,
];

/// A table: the standard header with `signature` and `revision`, then `body`, checksummed.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"HRGL"); // creator ID
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    debug_assert_eq!(t.len(), HEADER_LEN);
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A generic address structure for one byte at `port`.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = GAS_SYSTEM_IO;
    g[1] = 8; // register bit width
    g[3] = GAS_ACCESS_BYTE;
    g[4..6].copy_from_slice(&port.to_le_bytes());
    g
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut b = vec![0u8; FADT_LEN - HEADER_LEN];
    // Offsets below are the FADT's, less the header.
    let at = |off: usize| off - HEADER_LEN;
    b[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    b[at(109)..at(111)].copy_from_slice(&FADT_BOOT_NO_CMOS_RTC.to_le_bytes());
    b[at(112)..at(116)].copy_from_slice(&(FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP).to_le_bytes());
    b[at(116)..at(128)].copy_from_slice(&gas_io_byte(layout::RESET_PORT));
    b[at(128)] = layout::RESET_VALUE;
    b[at(131)] = 0; // FADT minor version (6.0)
    b[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes());
    b[at(244)..at(256)].copy_from_slice(&gas_io_byte(layout::ACPI_SLEEP_PORT));
    b[at(256)..at(268)].copy_from_slice(&gas_io_byte(layout::ACPI_SLEEP_PORT + 1));
    b[at(268)..at(276)].copy_from_slice(b"HRGLASS\0"); // hypervisor vendor identity
    table(b"FACP", 6, &b)
}

fn madt(cpus: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 8 * cpus as usize + 12 + 6);
    b.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // flags: no PC-AT 8259 pair to mask
    for id in 0..cpus {
        // ACPI processor UID = APIC ID = vCPU index; enabled.
        b.extend_from_slice(&[MADT_LOCAL_APIC, 8, id as u8, id as u8, 1, 0, 0, 0]);
    }
    // The IOAPIC, ID after the vCPUs' (as in the MP tables), GSIs from 0: ISA IRQ n is GSI n.
    b.extend_from_slice(&[MADT_IOAPIC, 12, cpus as u8, 0]);
    b.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    // Every processor (UID 0xff): LINT1 is NMI; flags 0 (bus defaults).
    b.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    table(b"APIC", 5, &b)
}

/// The tables for `cpus` vCPUs as they go at `at`, the RSDP first.
pub fn build(cpus: u32, at: GuestAddress) -> Result<Vec<u8>> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::Load(format!(
            "ACPI tables: {cpus} vCPUs, the MADT names 1 to {MAX_CPUS}"
        )));
    }
    let base = at.0;
    // RSDP, XSDT (two entries), FADT, DSDT, MADT, each 8-byte aligned.
    let align = |x: u64| (x + 7) & !7;
    let xsdt_at = align(base + RSDP_LEN as u64);
    let fadt_at = align(xsdt_at + (HEADER_LEN + 16) as u64);
    let dsdt_at = align(fadt_at + FADT_LEN as u64);
    let madt_at = align(dsdt_at + (HEADER_LEN + DSDT_AML.len()) as u64);

    let mut xsdt_body = Vec::with_capacity(16);
    xsdt_body.extend_from_slice(&fadt_at.to_le_bytes());
    xsdt_body.extend_from_slice(&madt_at.to_le_bytes());
    let xsdt = table(b"XSDT", 1, &xsdt_body);
    let dsdt = table(b"DSDT", 2, &DSDT_AML);
    let madt = madt(cpus);

    let mut rsdp = Vec::with_capacity(RSDP_LEN);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes, below
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+, XSDT
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    rsdp.extend_from_slice(&xsdt_at.to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]); // extended checksum, reserved
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    let end = madt_at + madt.len() as u64;
    let mut out = vec![0u8; (end - base) as usize];
    let mut put = |addr: u64, bytes: &[u8]| {
        let o = (addr - base) as usize;
        out[o..o + bytes.len()].copy_from_slice(bytes);
    };
    put(base, &rsdp);
    put(xsdt_at, &xsdt);
    put(fadt_at, &fadt(dsdt_at));
    put(dsdt_at, &dsdt);
    put(madt_at, &madt);
    Ok(out)
}

/// Write the tables for `cpus` vCPUs at [`layout::ACPI_START`]; returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, cpus: u32) -> Result<GuestAddress> {
    let bytes = build(cpus, layout::ACPI_START)?;
    if bytes.len() as u64 > layout::ACPI_MAX_SIZE {
        return Err(Error::Load(format!(
            "ACPI tables: {} bytes for {cpus} vCPUs, room for {}",
            bytes.len(),
            layout::ACPI_MAX_SIZE
        )));
    }
    mem.write_slice(&bytes, layout::ACPI_START)
        .map_err(|source| Error::GuestMemory {
            what: "the ACPI tables",
            source,
        })?;
    Ok(layout::ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: u64 = 0xe_0000;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table at guest address `addr`, its checksum and length checked.
    fn table_at(t: &[u8], addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let o = (addr - AT) as usize;
        assert_eq!(&t[o..o + 4], sig);
        let len = u32_at(t, o + 4) as usize;
        let tab = t[o..o + len].to_vec();
        assert_eq!(sum(&tab), 0, "{} checksum", String::from_utf8_lossy(sig));
        tab
    }

    /// Follow the tables as a kernel does: RSDP -> XSDT -> FADT -> DSDT, XSDT -> MADT.
    fn walk(t: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        assert_eq!(&t[..8], b"RSD PTR ");
        assert_eq!(sum(&t[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&t[..36]), 0, "RSDP extended checksum");
        assert_eq!((t[15], u32_at(t, 20)), (2, 36));
        let xsdt = table_at(t, u64_at(t, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = table_at(t, u64_at(&xsdt, 36), b"FACP");
        let madt = table_at(t, u64_at(&xsdt, 44), b"APIC");
        let dsdt_addr = u64_at(&fadt, 140);
        assert_eq!(u32_at(&fadt, 40) as u64, dsdt_addr, "DSDT and X_DSDT agree");
        let dsdt = table_at(t, dsdt_addr, b"DSDT");
        (fadt, madt, dsdt)
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let t = build(2, GuestAddress(AT)).unwrap();
        let (fadt, _, dsdt) = walk(&t);
        assert_eq!((fadt.len(), fadt[8]), (276, 6));
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(
            u16_at(&fadt, 109),
            1 << 5,
            "IA-PC boot flags: no CMOS RTC, nothing else"
        );
        // RESET_REG: system I/O, 8 bits, byte access, the i8042 command port; value 0xfe.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 120), 0x64);
        assert_eq!(fadt[128], 0xfe);
        // Sleep control and status registers: consecutive ports.
        assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 248), u64::from(layout::ACPI_SLEEP_PORT));
        assert_eq!(u64_at(&fadt, 260), u64::from(layout::ACPI_SLEEP_PORT) + 1);
        // No fixed hardware: no PM1 blocks, no PM timer, no SMI command port.
        for off in [48, 56, 64, 76, 80] {
            assert_eq!(u32_at(&fadt, off), 0, "FADT offset {off}");
        }
        // The DSDT: \_S5_ with sleep type 5, then the scope holding COM1.
        assert_eq!(&dsdt[36..41], b"\x08_S5_");
        assert_eq!(dsdt[36 + 9], 5);
        assert_eq!(dsdt.len(), 36 + DSDT_AML.len());
    }

    /// Every PkgLength in the AML ends where its object ends, the buffer's size is its
    /// contents', and the EISA ID is PNP0501 compressed.
    #[test]
    fn dsdt_aml_lengths_and_ids_are_consistent() {
        let a = &DSDT_AML;
        // Name (_S5_, Package): PkgLength at 6 covers the package to byte 13.
        assert_eq!((a[5], 6 + a[6] as usize), (0x12, 13));
        // Scope at 13: its PkgLength (at 14) reaches the end; so does the device's (at 22).
        assert_eq!((a[13], 14 + a[14] as usize), (0x10, a.len()));
        assert_eq!(&a[15..20], b"\\_SB_");
        assert_eq!((a[20], a[21], 22 + a[22] as usize), (0x5b, 0x82, a.len()));
        assert_eq!(&a[23..27], b"COM1");
        // EisaId: 5-bit letters ('A' = 1), big-endian, then the product 0x0501.
        let l = |c: u8| u16::from(c - b'@');
        let vendor = (l(b'P') << 10) | (l(b'N') << 5) | l(b'P');
        let hid = a.windows(5).position(|w| w == b"\x08_HID").unwrap() + 5;
        assert_eq!(a[hid], 0x0c);
        assert_eq!(
            a[hid + 1..hid + 5],
            [(vendor >> 8) as u8, vendor as u8, 0x05, 0x01]
        );
        // _CRS buffer: PkgLength to the end, BytePrefix size = what follows.
        let crs = a.windows(5).position(|w| w == b"\x08_CRS").unwrap() + 5;
        assert_eq!((a[crs], crs + 1 + a[crs + 1] as usize), (0x11, a.len()));
        assert_eq!(
            (a[crs + 2], a[crs + 3] as usize),
            (0x0a, a.len() - (crs + 4))
        );
        let rt = &a[crs + 4..];
        assert_eq!(rt[0], 0x47, "I/O port descriptor");
        assert_eq!(u16_at(rt, 2), 0x3f8);
        assert_eq!(u16_at(rt, 4), 0x3f8);
        assert_eq!(rt[7], 8, "8 ports");
        assert_eq!((rt[8], u16_at(rt, 9)), (0x22, 1 << 4), "IRQ 4");
        assert_eq!(&rt[11..], &[0x79, 0x00], "end tag");
    }

    #[test]
    fn madt_names_every_vcpu_and_the_ioapic() {
        for cpus in [1u32, 2, 4, 254] {
            let t = build(cpus, GuestAddress(AT)).unwrap();
            let (_, madt, _) = walk(&t);
            assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
            let (mut apics, mut ioapics, mut nmis) = (vec![], vec![], 0);
            let mut p = 44;
            while p < madt.len() {
                let (kind, len) = (madt[p], madt[p + 1] as usize);
                match kind {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!(madt[p + 2], madt[p + 3], "UID = APIC ID");
                        assert_eq!(u32_at(&madt, p + 4), 1, "enabled");
                        apics.push(madt[p + 3]);
                    }
                    1 => {
                        assert_eq!(len, 12);
                        assert_eq!(u32_at(&madt, p + 4), 0xfec0_0000);
                        assert_eq!(u32_at(&madt, p + 8), 0, "GSI base");
                        ioapics.push(madt[p + 2]);
                    }
                    4 => {
                        assert_eq!(
                            (len, madt[p + 2], u16_at(&madt, p + 3), madt[p + 5]),
                            (6, 0xff, 0, 1)
                        );
                        nmis += 1;
                    }
                    k => panic!("unexpected MADT entry type {k}"),
                }
                p += len;
            }
            assert_eq!(p, madt.len(), "entries end at the table's end");
            assert_eq!(apics, (0..cpus).map(|i| i as u8).collect::<Vec<_>>());
            assert_eq!(ioapics, vec![cpus as u8], "IOAPIC ID after the vCPUs'");
            assert_eq!(nmis, 1);
            assert!(t.len() as u64 <= layout::ACPI_MAX_SIZE, "{cpus} vCPUs fit");
        }
    }

    #[test]
    fn vcpu_counts_out_of_range_are_refused() {
        for cpus in [0, 255] {
            let e = build(cpus, GuestAddress(AT)).unwrap_err().to_string();
            assert!(e.contains(&cpus.to_string()), "{e}");
        }
    }

    #[test]
    fn written_where_the_layout_says() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let at = write(&m, 3).unwrap();
        assert_eq!(at, layout::ACPI_START);
        let mut head = [0u8; 8];
        m.read_slice(&mut head, at).unwrap();
        assert_eq!(&head, b"RSD PTR ");
    }
}
