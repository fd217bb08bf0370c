//! `--kernel`, `--initramfs` and `--cmdline` through the real `hourglass`, for both kernel forms,
//! on this host's KVM: a PVH ELF (as a Linux `vmlinux` is) and a bzImage (as a distribution's
//! `vmlinuz` is). Each image here is a few instructions that print, on the serial port, what the
//! boot protocol handed them: the command line, the number of modules or e820 entries, and the
//! initramfs's bytes. The images are built here byte by byte from the protocols' own layouts
//! (not with the loader under test), so a wrong field offset in the loader shows as wrong text.
//!
//! A kernel starts its other CPUs itself: with 2 vCPUs, only vCPU 0 may run the PVH entry, and
//! vCPU 1 must still be waiting for INIT/SIPI (read back from a snapshot's `state.json`).

mod vmm_support;

use std::process::Command;
use std::time::Duration;

use vmm_support::*;

/// The PVH entry (32-bit, EBX = `hvm_start_info`): prints the command line (`cmdline_paddr`,
/// +0x18), `|`, `nr_modules` (+0x0c) as a digit, then the first module's bytes (`modlist_paddr`,
/// +0x10: `paddr`, `size`), and halts.
///
/// ```text
///     mov 0x18(%ebx),%esi ; mov $0x3f8,%dx
/// 1:  mov (%esi),%al ; test %al,%al ; je 2f ; out %al,(%dx) ; inc %esi ; jmp 1b
/// 2:  mov $'|',%al ; out %al,(%dx)
///     mov 0xc(%ebx),%eax ; add $'0',%al ; out %al,(%dx)
///     mov 0x10(%ebx),%edi ; mov (%edi),%esi ; mov 0x8(%edi),%ecx
/// 3:  test %ecx,%ecx ; je 4f ; mov (%esi),%al ; out %al,(%dx) ; inc %esi ; dec %ecx ; jmp 3b
/// 4:  cli ; hlt ; jmp 4b
/// ```
const PVH_CODE: [u8; 49] = [
    0x8b, 0x73, 0x18, 0x66, 0xba, 0xf8, 0x03, 0x8a, 0x06, 0x84, 0xc0, 0x74, 0x04, 0xee, 0x46, 0xeb,
    0xf6, 0xb0, 0x7c, 0xee, 0x8b, 0x43, 0x0c, 0x04, 0x30, 0xee, 0x8b, 0x7b, 0x10, 0x8b, 0x37, 0x8b,
    0x4f, 0x08, 0x85, 0xc9, 0x74, 0x07, 0x8a, 0x06, 0xee, 0x46, 0x49, 0xeb, 0xf5, 0xfa, 0xf4, 0xeb,
    0xfc,
];

/// The Linux 64-bit entry (long mode, RSI = `boot_params`): prints the command line
/// (`hdr.cmd_line_ptr`, +0x228), `|`, `e820_entries` (+0x1e8) as a digit, then the initramfs
/// (`hdr.ramdisk_image` +0x218, `hdr.ramdisk_size` +0x21c), and halts.
///
/// ```text
///     mov 0x228(%rsi),%edi ; mov $0x3f8,%dx
/// 1:  mov (%rdi),%al ; test %al,%al ; je 2f ; out %al,(%dx) ; inc %rdi ; jmp 1b
/// 2:  mov $'|',%al ; out %al,(%dx)
///     mov 0x1e8(%rsi),%al ; add $'0',%al ; out %al,(%dx)
///     mov 0x218(%rsi),%edi ; mov 0x21c(%rsi),%ecx
/// 3:  test %ecx,%ecx ; je 4f ; mov (%rdi),%al ; out %al,(%dx) ; inc %rdi ; dec %ecx ; jmp 3b
/// 4:  cli ; hlt ; jmp 4b
/// ```
const LINUX64_CODE: [u8; 64] = [
    0x8b, 0xbe, 0x28, 0x02, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0x8a, 0x07, 0x84, 0xc0, 0x74, 0x06,
    0xee, 0x48, 0xff, 0xc7, 0xeb, 0xf4, 0xb0, 0x7c, 0xee, 0x8a, 0x86, 0xe8, 0x01, 0x00, 0x00, 0x04,
    0x30, 0xee, 0x8b, 0xbe, 0x18, 0x02, 0x00, 0x00, 0x8b, 0x8e, 0x1c, 0x02, 0x00, 0x00, 0x85, 0xc9,
    0x74, 0x0a, 0x8a, 0x07, 0xee, 0x48, 0xff, 0xc7, 0xff, 0xc9, 0xeb, 0xf2, 0xfa, 0xf4, 0xeb, 0xfc,
];

fn put(v: &mut [u8], at: usize, bytes: &[u8]) {
    v[at..at + bytes.len()].copy_from_slice(bytes);
}

/// An ELF64 executable: one PT_LOAD of `code` at 1 MiB and a PT_NOTE with the Xen
/// PHYS32_ENTRY note (type 18) naming 1 MiB, and no other note.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let phoff = 64usize;
    let code_off = phoff + 2 * 56;
    let note_off = code_off + code.len().next_multiple_of(4);
    let mut note = Vec::new();
    for w in [4u32, 4, 18] {
        note.extend_from_slice(&w.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD as u32).to_le_bytes());
    let mut v = vec![0u8; note_off + note.len()];
    put(&mut v, 0, b"\x7fELF\x02\x01\x01");
    put(&mut v, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut v, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut v, 20, &1u32.to_le_bytes());
    put(&mut v, 24, &LOAD.to_le_bytes()); // e_entry
    put(&mut v, 32, &(phoff as u64).to_le_bytes());
    put(&mut v, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut v, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut v, 56, &2u16.to_le_bytes()); // e_phnum
    let ph =
        |v: &mut Vec<u8>, i: usize, kind: u32, flags: u32, off: usize, addr: u64, len: usize| {
            let at = phoff + i * 56;
            put(v, at, &kind.to_le_bytes());
            put(v, at + 4, &flags.to_le_bytes());
            put(v, at + 8, &(off as u64).to_le_bytes());
            put(v, at + 16, &addr.to_le_bytes());
            put(v, at + 24, &addr.to_le_bytes());
            put(v, at + 32, &(len as u64).to_le_bytes());
            put(v, at + 40, &(len as u64).to_le_bytes());
            put(v, at + 48, &4u64.to_le_bytes());
        };
    ph(&mut v, 0, 1, 7, code_off, LOAD, code.len()); // PT_LOAD, RWX
    ph(&mut v, 1, 4, 4, note_off, 0, note.len()); // PT_NOTE
    put(&mut v, code_off, code);
    put(&mut v, note_off, &note);
    v
}

/// A bzImage of boot protocol 2.15 with the 64-bit entry (XLF_KERNEL_64): the boot sector and
/// 4 setup sectors holding the setup header (Documentation/arch/x86/boot.rst offsets), then
/// the protected-mode code: 0x200 bytes of HLT (the 32-bit entry) and `code` at +0x200.
fn bzimage(code: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; 5 * 512];
    v[0x1f1] = 4; // setup_sects
    put(&mut v, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(&mut v, 0x202, b"HdrS");
    put(&mut v, 0x206, &0x020fu16.to_le_bytes()); // version
    v[0x211] = 1; // loadflags: LOADED_HIGH
    put(&mut v, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut v, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut v, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    v[0x234] = 1; // relocatable_kernel
    put(&mut v, 0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(&mut v, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(&mut v, 0x258, &0x100_0000u64.to_le_bytes()); // pref_address
    put(&mut v, 0x260, &(1u32 << 20).to_le_bytes()); // init_size
    v.extend_from_slice(&[0xf4; 0x200]);
    v.extend_from_slice(code);
    v
}

/// Boot `kernel` with an initramfs and a command line on `cpus` vCPUs; wait until the guest
/// has printed `expected` in full and return the VMM.
fn boot(tag: &str, cpus: u32, kernel: &[u8], expected: &str) -> Hourglass {
    let dir = temp_dir(tag);
    let k = dir.join("kernel");
    let i = dir.join("initrd");
    std::fs::write(&k, kernel).expect("write the kernel");
    std::fs::write(&i, b"initrd-ok").expect("write the initramfs");
    let mut h = Hourglass::start(
        tag,
        cpus,
        &[
            "--kernel",
            k.to_str().expect("utf-8"),
            "--initramfs",
            i.to_str().expect("utf-8"),
            "--cmdline",
            "console=ttyS0 hello",
        ],
    );
    let info = h.info();
    let payload = &info["config"]["payload"];
    assert_eq!(payload["kernel"], k.to_str().unwrap());
    assert_eq!(payload["initramfs"], i.to_str().unwrap());
    assert_eq!(payload["cmdline"], "console=ttyS0 hello");
    h.wait_until(
        "the guest's report of its boot protocol",
        Duration::from_secs(20),
        |h| h.serial_text().contains(expected),
    );
    h
}

#[test]
fn a_pvh_kernel_gets_its_command_line_and_initramfs_and_starts_alone() {
    let _x = exclusive();
    if skip("a_pvh_kernel_gets_its_command_line_and_initramfs_and_starts_alone") {
        return;
    }
    // One module: the initramfs.
    let expected = "console=ttyS0 hello|1initrd-ok";
    let h = boot("pvh-kernel", 2, &pvh_elf(&PVH_CODE), expected);
    let (code, body) = h.api("PUT", "vm.pause", None);
    assert_eq!(code, 204, "{body}");
    // Paused: whatever the guest printed is all it will print.
    assert_eq!(h.serial_text(), expected, "printed once, by one vCPU");
    let snap = temp_dir("pvh-kernel-snap");
    let state = h.snapshot_state(&snap).expect("a snapshot");
    let vcpus = state["vcpus"].as_array().expect("vcpus");
    assert_eq!(vcpus.len(), 2);
    // KVM_MP_STATE_RUNNABLE 0, UNINITIALIZED 1, INIT_RECEIVED 2, HALTED 3.
    let mp = |i: usize| vcpus[i]["mp_state"].as_u64();
    if mp(1).is_some() {
        assert!(
            matches!(mp(1), Some(1 | 2)),
            "vCPU 1 must still wait for INIT/SIPI, it is in mp_state {:?} at rip {}",
            mp(1),
            vcpus[1]["regs"]["rip"]
        );
        assert_eq!(mp(0), Some(3), "vCPU 0 halted after printing");
    } else {
        eprintln!("no mp_state in the snapshot (no in-kernel irqchip): vCPU states not compared");
    }
    let _ = std::fs::remove_dir_all(&snap);
}

#[test]
fn a_bzimage_enters_through_the_64_bit_boot_protocol() {
    let _x = exclusive();
    if skip("a_bzimage_enters_through_the_64_bit_boot_protocol") {
        return;
    }
    // 64 MiB: e820 has low RAM, the reserved EBDA/ROM area and RAM from 1 MiB.
    let expected = "console=ttyS0 hello|3initrd-ok";
    let h = boot("bzimage", 1, &bzimage(&LINUX64_CODE), expected);
    let (code, body) = h.api("PUT", "vm.pause", None);
    assert_eq!(code, 204, "{body}");
    assert_eq!(h.serial_text(), expected);
}

#[test]
fn a_file_that_is_no_kernel_is_refused_by_name() {
    let _x = exclusive();
    if skip("a_file_that_is_no_kernel_is_refused_by_name") {
        return;
    }
    let dir = temp_dir("not-a-kernel");
    let k = dir.join("script.sh");
    std::fs::write(&k, b"#!/bin/sh\necho hello\n").expect("write");
    let out = Command::new(binary("hourglass"))
        .args(["--kernel", k.to_str().expect("utf-8")])
        .args(["--serial", "off"])
        .output()
        .expect("run hourglass");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("--kernel {}", k.display())) && err.contains("neither an ELF"),
        "{err}"
    );
    // A command line without a kernel is refused before anything starts.
    let out = Command::new(binary("hourglass"))
        .args(["--cmdline", "console=ttyS0", "--serial", "off"])
        .output()
        .expect("run hourglass");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kernel"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A PVH kernel that prints `off`, then powers off as an ACPI kernel does on a hardware-reduced
/// platform: clear the wake status (0x80 to the sleep status register, port 0x601), then
/// `SLP_TYP 5 << 2 | SLP_EN` (0x34) to the sleep control register (port 0x600).
///
/// ```text
///     mov $0x3f8,%dx ; mov $'o',%al ; out %al,(%dx) ; mov $'f',%al ; out %al,(%dx)
///     out %al,(%dx) ; mov $'\n',%al ; out %al,(%dx)
///     mov $0x601,%dx ; mov $0x80,%al ; out %al,(%dx)
///     mov $0x600,%dx ; mov $0x34,%al ; out %al,(%dx)
/// 1:  cli ; hlt ; jmp 1b
/// ```
const POWER_OFF_CODE: [u8; 32] = [
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x6f, 0xee, 0xb0, 0x66, 0xee, 0xee, 0xb0, 0x0a, 0xee, 0x66, 0xba,
    0x01, 0x06, 0xb0, 0x80, 0xee, 0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xfa, 0xf4, 0xeb, 0xfc,
];

/// A PVH kernel that prints `up`, then resets through the FADT's reset register (0xfe to the
/// i8042's command port, 0x64): every boot of it reboots at once.
///
/// ```text
///     mov $0x3f8,%dx ; mov $'u',%al ; out %al,(%dx) ; mov $'p',%al ; out %al,(%dx)
///     mov $'\n',%al ; out %al,(%dx) ; mov $0xfe,%al ; out %al,$0x64
/// 1:  cli ; hlt ; jmp 1b
/// ```
const REBOOT_CODE: [u8; 21] = [
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x75, 0xee, 0xb0, 0x70, 0xee, 0xb0, 0x0a, 0xee, 0xb0, 0xfe, 0xe6,
    0x64, 0xfa, 0xf4, 0xeb, 0xfc,
];

/// A PVH kernel that prints `tf`, then executes `ud2` with the IDT hourglass hands a PVH entry
/// (limit 0): #UD cannot be delivered, nor the #GP and #DF after it, so the CPU shuts down
/// (a triple fault).
///
/// ```text
///     mov $0x3f8,%dx ; mov $'t',%al ; out %al,(%dx) ; mov $'f',%al ; out %al,(%dx)
///     mov $'\n',%al ; out %al,(%dx) ; ud2
/// 1:  cli ; hlt ; jmp 1b
/// ```
const TRIPLE_FAULT_CODE: [u8; 19] = [
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x74, 0xee, 0xb0, 0x66, 0xee, 0xb0, 0x0a, 0xee, 0x0f, 0x0b, 0xfa,
    0xf4, 0xeb, 0xfc,
];

/// `hourglass` with `kernel` on 2 vCPUs, waiting for nothing.
fn spawn_kernel(tag: &str, kernel: &[u8]) -> Hourglass {
    let dir = temp_dir(&format!("{tag}-image"));
    let k = dir.join("kernel");
    std::fs::write(&k, kernel).expect("write the kernel");
    let mut cmd = Command::new(binary("hourglass"));
    cmd.args(["--cpus", "boot=2", "--memory", "size=64M", "--kernel"])
        .arg(&k);
    Hourglass::spawn_cmd(cmd, tag)
}

/// The guest's power-off (ACPI S5) ends `hourglass` with status 0, after the guest's output,
/// and the log says why.
#[test]
fn a_guest_power_off_ends_the_vmm_with_status_0() {
    let _x = exclusive();
    if skip("a_guest_power_off_ends_the_vmm_with_status_0") {
        return;
    }
    let mut h = spawn_kernel("power-off", &pvh_elf(&POWER_OFF_CODE));
    let st = h.wait_exit(Duration::from_secs(20));
    let log = h.stderr();
    assert_eq!(st.code(), Some(0), "{log}");
    assert_eq!(h.serial_text(), "off\n");
    assert!(
        log.contains("the guest powered off (ACPI S5, vCPU 0)"),
        "{log}"
    );
}

/// A triple fault ends the VM with a log line that says which way the shutdown came and where
/// the vCPU was (issue 18's first probe): the vCPU thread reads its registers after the exit,
/// which its seccomp filter must allow (a forbidden ioctl there would kill hourglass with
/// SIGSYS instead).
#[test]
fn a_triple_fault_is_reported_with_where_the_vcpu_was() {
    use std::os::unix::process::ExitStatusExt;
    let _x = exclusive();
    if skip("a_triple_fault_is_reported_with_where_the_vcpu_was") {
        return;
    }
    let mut h = spawn_kernel("triple-fault", &pvh_elf(&TRIPLE_FAULT_CODE));
    let st = h.wait_exit(Duration::from_secs(20));
    let log = h.stderr();
    assert_eq!(st.signal(), None, "hourglass was killed: {log}");
    assert_eq!(h.serial_text(), "tf\n");
    let line = log
        .lines()
        .find(|l| l.contains("vCPU 0: guest shutdown;"))
        .unwrap_or_else(|| panic!("no shutdown line: {log}"));
    assert!(
        line.contains("SHUTDOWN intercept") || line.contains("guest's state intact"),
        "{line}"
    );
    for field in [" rip 0x", " cs 0x", " cr0 0x", " idt 0x"] {
        assert!(line.contains(field), "{field:?} missing: {line}");
    }
    assert!(log.contains("the guest shut down (vCPU 0)"), "{log}");
}

/// The guest's reset reboots the VM in the same process (as Cloud Hypervisor does): the guest
/// boots again and again, its console file continues (appended, not truncated), vm.info
/// counts the reboots, and the API stays up until asked to stop.
#[test]
fn a_guest_reset_reboots_the_vm_in_the_same_process() {
    let _x = exclusive();
    if skip("a_guest_reset_reboots_the_vm_in_the_same_process") {
        return;
    }
    let mut h = spawn_kernel("reboot", &pvh_elf(&REBOOT_CODE));
    h.wait_until("three boots", Duration::from_secs(20), |h| {
        h.try_info()
            .is_some_and(|i| i["reboots"].as_u64().unwrap_or(0) >= 2)
    });
    let (code, body) = h.api("PUT", "vmm.shutdown", None);
    assert_eq!(code, 204, "{body}");
    let st = h.wait_exit(Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "{}", h.stderr());
    let serial = h.serial_text();
    let boots = serial.lines().count();
    assert!(boots >= 3, "every boot's line kept:\n{serial}");
    assert!(serial.lines().all(|l| l == "up"), "{serial}");
    let log = h.stderr();
    assert!(log.contains("the guest rebooted (reboot 2)"), "{log}");
}
