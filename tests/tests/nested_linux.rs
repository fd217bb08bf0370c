//! Debian's own kernel boots under `hourglass` to `/init`, through both entries: the PVH ELF
//! (`vmlinux`, extracted from the package's bzImage) and the bzImage itself (`vmlinuz`, through
//! the Linux 64-bit boot protocol).
//!
//! This runs in the nested kvm_amd host of `scripts/nested-kvm.sh`, which carries the kernel in
//! (see tests/tests/linux_support). The developer machine's kvm_pvm cannot run a stock kernel:
//! there these tests print why they skip (the VMM itself ends such a guest with the instruction
//! KVM could not emulate, see docs/design.md, "Booting a kernel").

mod linux_support;
mod vmm_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use linux_support::*;
use vmm_support::*;

/// The guest's command line: serial console, wait forever after the panic that ends the test.
const CMDLINE: &str = "console=ttyS0 panic=0";

fn write_initramfs(dir: &Path) -> PathBuf {
    let p = dir.join("initramfs.cpio");
    std::fs::write(&p, initramfs()).expect("write the initramfs");
    p
}

/// Boot Debian's kernel `name` with our initramfs on 2 vCPUs and 256 MiB, and wait for `/init`
/// to have run (the kernel's report of its exit status 7). Both vCPUs must have come online
/// (the kernel found them in the MP tables and started vCPU 1 itself, INIT/SIPI), the LAPIC
/// timer must be in use (TSC-deadline, no PIT here) and /init's own output must have reached
/// the console (the UART's interrupt delivered).
fn boots_to_init(name: &str, test: &str) {
    let _x = exclusive();
    if skip(test) {
        return;
    }
    if !in_nested_host() {
        println!(
            "skipped: this host's KVM (kvm_pvm) cannot run a stock Linux kernel; run \
             scripts/nested-kvm.sh"
        );
        return;
    }
    let kernel = debian_kernel(name).unwrap_or_else(|| {
        panic!("HOURGLASS_NESTED=1 but no {name} in {NESTED_KERNEL_DIR} (scripts/nested-kvm.sh packs it)")
    });
    let dir = temp_dir(test);
    let initramfs = write_initramfs(&dir);
    let started = Instant::now();
    let mut h = Hourglass::start_anywhere(
        test,
        2,
        &[
            "--memory",
            "size=256M",
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--initramfs",
            initramfs.to_str().expect("utf-8"),
            "--cmdline",
            CMDLINE,
        ],
        6,
    );
    h.wait_until(
        "the kernel's report that /init ran and exited with status 7",
        Duration::from_secs(240),
        |h| h.serial_text().contains(INIT_EXITED),
    );
    let took = started.elapsed();
    let serial = h.serial_text();
    assert!(serial.contains(RUN_INIT), "{serial}");
    assert!(
        serial.contains("smp: Brought up 1 node, 2 CPUs"),
        "vCPU 1 did not come online:\n{serial}"
    );
    assert!(
        serial.contains(&format!("Command line: {CMDLINE}")),
        "the kernel saw another command line:\n{serial}"
    );
    // /init's own write reaches the console only through the tty layer, which sends each
    // byte when the UART's transmit interrupt (IRQ 4, through the IOAPIC) says it may.
    assert!(
        serial.contains(INIT_SAYS),
        "/init's output never reached the console (no serial interrupt?):\n{serial}"
    );
    assert!(
        !serial.contains("APIC timer disabled"),
        "the kernel could not use its LAPIC timer:\n{serial}"
    );
    println!(
        "{name}: /init ran {:.1} s after hourglass started",
        took.as_secs_f64()
    );
    // What the kernel said about its clocks, CPUs and interrupts, for the record.
    for line in serial.lines().filter(|l| {
        [
            "clocksource",
            "tsc",
            "TSC",
            "APIC",
            "smp",
            "CPU",
            "timer",
            "ttyS0",
            "Kernel panic",
            INIT_SAYS,
        ]
        .iter()
        .any(|k| l.contains(k))
    }) {
        println!("  guest: {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nested_linux_pvh_vmlinux_boots_to_init() {
    boots_to_init("vmlinux", "nested_linux_pvh_vmlinux_boots_to_init");
}

#[test]
fn nested_linux_bzimage_boots_to_init() {
    boots_to_init("vmlinuz", "nested_linux_bzimage_boots_to_init");
}

/// `/init` itself, run on this host: it prints its line and exits with status 7, so a kernel
/// that runs it reports exactly [`INIT_EXITED`].
#[test]
fn the_init_program_runs_here() {
    let dir = temp_dir("linux-init");
    let p = dir.join("init");
    std::fs::write(&p, init_elf()).expect("write init");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = Command::new(&p).output().expect("run init");
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(out.stdout, format!("{INIT_SAYS}\n").as_bytes());
    let _ = std::fs::remove_dir_all(&dir);
}
