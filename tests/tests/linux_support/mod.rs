//! A Linux guest for the tests: where Debian's kernel is, and an initramfs built here, byte by
//! byte, whose `/init` is a static program of a few hundred bytes (no toolchain needed where the
//! test runs), or the clock probe built by tests/build.rs. The programs ([`Init`]):
//!
//! - [`Init::ExitSeven`] writes `HOURGLASS-LINUX-INIT` to its standard output (the console) and
//!   exits with status 7. Linux answers an exiting init with `Kernel panic - not syncing:
//!   Attempted to kill init! exitcode=0x00000700`, printed on the serial console by the kernel
//!   itself: proof that the kernel booted, unpacked the initramfs and ran our `/init`, whatever
//!   state the console's interrupt is in. With `panic=0` the kernel then waits forever.
//! - [`Init::Ticker`] writes the same line, then `HOURGLASS-TICK` every 200 ms forever
//!   (`nanosleep`): a guest whose timer and console interrupts must keep working.
//! - [`Init::Report`] mounts sysfs, reports the guest's date, its online CPUs and its
//!   clocksource, and powers off (or reboots): the guest's own view, then the VM's end through
//!   ACPI.
//! - [`Init::Busy`], [`Init::BusyIo`]: every vCPU busy (issue 18's soaks).
//! - [`Init::ClockProbe`] (`clock_probe.c`): the guest's clocks read in a tight loop and reported
//!   when the host asks (tests/tests/nested_linux_clock.rs).
//!
//! [`shell_initramfs`] is the other kind: busybox and `scripts/linux-guest/init`, a shell on the
//! console.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The line the kernel prints when it starts `/init`.
pub const RUN_INIT: &str = "Run /init as init process";
/// What the kernel prints when our `/init` has exited with status 7.
pub const INIT_EXITED: &str = "exitcode=0x00000700";
/// What `/init` itself writes first.
pub const INIT_SAYS: &str = "HOURGLASS-LINUX-INIT";
/// What [`Init::Ticker`] writes every 200 ms.
pub const TICK: &str = "HOURGLASS-TICK";
/// [`Init::Report`]'s line with the guest's `CLOCK_REALTIME` seconds at `/init`.
pub const REPORT_DATE: &str = "HOURGLASS-DATE ";
/// [`Init::Report`]'s line with `/sys/devices/system/cpu/online`.
pub const REPORT_ONLINE: &str = "HOURGLASS-CPUS-ONLINE ";
/// [`Init::Report`]'s line with the current clocksource.
pub const REPORT_CLOCKSOURCE: &str = "HOURGLASS-CLOCKSOURCE ";

/// What [`Init::Report`] does once it has reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// `reboot(LINUX_REBOOT_CMD_POWER_OFF)`.
    PowerOff,
    /// `reboot(LINUX_REBOOT_CMD_RESTART)`.
    Reboot,
}

/// Which `/init` the initramfs holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// Say [`INIT_SAYS`], exit with status 7.
    ExitSeven,
    /// Say [`INIT_SAYS`], then [`TICK`] every 200 ms forever.
    Ticker,
    /// Fork four processes that spin forever, then tick as [`Init::Ticker`] does: every vCPU
    /// of a 4-vCPU guest busy, and a sign of life on the console.
    Busy,
    /// As [`Init::Busy`], but the four write `busy-io` to the console in a loop: every vCPU
    /// busy with port I/O exits and the UART's interrupts.
    BusyIo,
    /// Say [`INIT_SAYS`], then [`REPORT_DATE`], [`REPORT_ONLINE`] and [`REPORT_CLOCKSOURCE`]
    /// lines, wait for the console to drain, then power off or reboot (exit 7 if that fails).
    Report(Then),
    /// The clock probe (`clock_probe.c` beside this file, built by tests/build.rs): the
    /// guest's clocks in a tight loop, reported on the console when the host asks.
    ClockProbe,
}

/// [`Init::ClockProbe`]'s executable.
pub const CLOCK_PROBE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/clock_probe"));

/// [`Init::ExitSeven`]'s code, loaded at [`INIT_LOAD`] + [`INIT_CODE_OFFSET`]. Between the
/// write and the exit it waits until the console has sent every byte (`tcdrain`, the
/// `TCSBRK` ioctl with 1): the kernel panics as soon as init exits and would otherwise stop
/// the CPUs before the UART's interrupt-driven output got the line out (seen once in the
/// nested host).
///
/// ```text
///     mov $1,%edi ; lea msg(%rip),%rsi ; mov $21,%edx ; mov $1,%eax ; syscall   # write(1, msg, 21)
///     mov $1,%edi ; mov $0x5409,%esi ; mov $1,%edx ; mov $16,%eax ; syscall     # ioctl(1, TCSBRK, 1)
///     mov $7,%edi ; mov $60,%eax ; syscall                                      # exit(7)
/// msg: .ascii "HOURGLASS-LINUX-INIT\n"
/// ```
const INIT_CODE: [u8; 79] = [
    0xbf, 0x01, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x2e, 0x00, 0x00, 0x00, 0xba, 0x15, 0x00, 0x00,
    0x00, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xbf, 0x01, 0x00, 0x00, 0x00, 0xbe, 0x09, 0x54,
    0x00, 0x00, 0xba, 0x01, 0x00, 0x00, 0x00, 0xb8, 0x10, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xbf, 0x07,
    0x00, 0x00, 0x00, 0xb8, 0x3c, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x4f, 0x55, 0x52, 0x47, 0x4c,
    0x41, 0x53, 0x53, 0x2d, 0x4c, 0x49, 0x4e, 0x55, 0x58, 0x2d, 0x49, 0x4e, 0x49, 0x54, 0x0a,
];
/// [`Init::Report`]'s code, assembled from `report_init.s` beside this file
/// (`as --64` then `objcopy -O binary -j .text`; a test below re-assembles it where `as` is
/// installed and compares). [`REPORT_CMD_AT`] is the reboot command's immediate.
const REPORT_CODE: [u8; 527] = [
    0x48, 0x8d, 0x3d, 0x4d, 0x01, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x4c, 0x01, 0x00, 0x00, 0x48, 0x89,
    0xfa, 0x45, 0x31, 0xd2, 0x45, 0x31, 0xc0, 0xb8, 0xa5, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xbf, 0x01,
    0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x95, 0x01, 0x00, 0x00, 0xba, 0x15, 0x00, 0x00, 0x00, 0xb8,
    0x01, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x83, 0xec, 0x40, 0x31, 0xff, 0x48, 0x89, 0xe6, 0xb8,
    0xe4, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x8b, 0x04, 0x24, 0x48, 0x8d, 0x74, 0x24, 0x3f, 0xc6,
    0x06, 0x0a, 0xb9, 0x0a, 0x00, 0x00, 0x00, 0x31, 0xd2, 0x48, 0xf7, 0xf1, 0x80, 0xc2, 0x30, 0x48,
    0xff, 0xce, 0x88, 0x16, 0x48, 0x85, 0xc0, 0x75, 0xee, 0x48, 0x83, 0xee, 0x0f, 0xb9, 0x0f, 0x00,
    0x00, 0x00, 0x48, 0x8d, 0x3d, 0x5b, 0x01, 0x00, 0x00, 0x8a, 0x07, 0x88, 0x06, 0x48, 0xff, 0xc7,
    0x48, 0xff, 0xc6, 0xe2, 0xf4, 0x48, 0x83, 0xee, 0x0f, 0x48, 0x8d, 0x54, 0x24, 0x40, 0x48, 0x29,
    0xf2, 0xbf, 0x01, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x83, 0xc4,
    0x40, 0x48, 0x8d, 0x3d, 0xb7, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x34, 0x01, 0x00, 0x00, 0xe8,
    0x4b, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x3d, 0xc3, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x37, 0x01,
    0x00, 0x00, 0xe8, 0x38, 0x00, 0x00, 0x00, 0xbf, 0x01, 0x00, 0x00, 0x00, 0xbe, 0x09, 0x54, 0x00,
    0x00, 0xba, 0x01, 0x00, 0x00, 0x00, 0xb8, 0x10, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xbf, 0xad, 0xde,
    0xe1, 0xfe, 0xbe, 0x69, 0x19, 0x12, 0x28, 0xba, 0xdc, 0xfe, 0x21, 0x43, 0xb8, 0xa9, 0x00, 0x00,
    0x00, 0x0f, 0x05, 0xbf, 0x07, 0x00, 0x00, 0x00, 0xb8, 0x3c, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x57,
    0x48, 0x89, 0xf6, 0xbf, 0x01, 0x00, 0x00, 0x00, 0xba, 0x16, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00,
    0x00, 0x00, 0x0f, 0x05, 0x5f, 0x31, 0xf6, 0xb8, 0x02, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x85, 0xc0,
    0x78, 0x31, 0x48, 0x81, 0xec, 0x00, 0x01, 0x00, 0x00, 0x89, 0xc7, 0x48, 0x89, 0xe6, 0xba, 0x00,
    0x01, 0x00, 0x00, 0x31, 0xc0, 0x0f, 0x05, 0x85, 0xc0, 0x7e, 0x11, 0x89, 0xc2, 0x48, 0x89, 0xe6,
    0xbf, 0x01, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x81, 0xc4, 0x00,
    0x01, 0x00, 0x00, 0xc3, 0x73, 0x79, 0x73, 0x66, 0x73, 0x00, 0x2f, 0x73, 0x79, 0x73, 0x00, 0x2f,
    0x73, 0x79, 0x73, 0x2f, 0x64, 0x65, 0x76, 0x69, 0x63, 0x65, 0x73, 0x2f, 0x73, 0x79, 0x73, 0x74,
    0x65, 0x6d, 0x2f, 0x63, 0x70, 0x75, 0x2f, 0x6f, 0x6e, 0x6c, 0x69, 0x6e, 0x65, 0x00, 0x2f, 0x73,
    0x79, 0x73, 0x2f, 0x64, 0x65, 0x76, 0x69, 0x63, 0x65, 0x73, 0x2f, 0x73, 0x79, 0x73, 0x74, 0x65,
    0x6d, 0x2f, 0x63, 0x6c, 0x6f, 0x63, 0x6b, 0x73, 0x6f, 0x75, 0x72, 0x63, 0x65, 0x2f, 0x63, 0x6c,
    0x6f, 0x63, 0x6b, 0x73, 0x6f, 0x75, 0x72, 0x63, 0x65, 0x30, 0x2f, 0x63, 0x75, 0x72, 0x72, 0x65,
    0x6e, 0x74, 0x5f, 0x63, 0x6c, 0x6f, 0x63, 0x6b, 0x73, 0x6f, 0x75, 0x72, 0x63, 0x65, 0x00, 0x48,
    0x4f, 0x55, 0x52, 0x47, 0x4c, 0x41, 0x53, 0x53, 0x2d, 0x4c, 0x49, 0x4e, 0x55, 0x58, 0x2d, 0x49,
    0x4e, 0x49, 0x54, 0x0a, 0x48, 0x4f, 0x55, 0x52, 0x47, 0x4c, 0x41, 0x53, 0x53, 0x2d, 0x44, 0x41,
    0x54, 0x45, 0x20, 0x48, 0x4f, 0x55, 0x52, 0x47, 0x4c, 0x41, 0x53, 0x53, 0x2d, 0x43, 0x50, 0x55,
    0x53, 0x2d, 0x4f, 0x4e, 0x4c, 0x49, 0x4e, 0x45, 0x20, 0x48, 0x4f, 0x55, 0x52, 0x47, 0x4c, 0x41,
    0x53, 0x53, 0x2d, 0x43, 0x4c, 0x4f, 0x43, 0x4b, 0x53, 0x4f, 0x55, 0x52, 0x43, 0x45, 0x20,
];
/// Offset in [`REPORT_CODE`] of the `reboot` command (LINUX_REBOOT_CMD_POWER_OFF there).
const REPORT_CMD_AT: usize = 232;
const LINUX_REBOOT_CMD_POWER_OFF: u32 = 0x4321_fedc;
const LINUX_REBOOT_CMD_RESTART: u32 = 0x0123_4567;

/// [`Init::Ticker`]'s code:
///
/// ```text
///     mov $1,%edi ; lea msg(%rip),%rsi ; mov $21,%edx ; mov $1,%eax ; syscall   # write(1, msg, 21)
/// 1:  mov $1,%edi ; lea tick(%rip),%rsi ; mov $15,%edx ; mov $1,%eax ; syscall # write(1, tick, 15)
///     lea ts(%rip),%rdi ; xor %esi,%esi ; mov $35,%eax ; syscall                # nanosleep(&ts, 0)
///     jmp 1b
///     .balign 8
/// ts:   .quad 0, 200000000
/// msg:  .ascii "HOURGLASS-LINUX-INIT\n"
/// tick: .ascii "HOURGLASS-TICK\n"
/// ```
const TICKER_CODE: [u8; 124] = [
    0xbf, 0x01, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x4c, 0x00, 0x00, 0x00, 0xba, 0x15, 0x00, 0x00,
    0x00, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xbf, 0x01, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x35,
    0x49, 0x00, 0x00, 0x00, 0xba, 0x0f, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05,
    0x48, 0x8d, 0x3d, 0x11, 0x00, 0x00, 0x00, 0x31, 0xf6, 0xb8, 0x23, 0x00, 0x00, 0x00, 0x0f, 0x05,
    0xeb, 0xd6, 0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0xc2, 0xeb, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x48, 0x4f, 0x55, 0x52, 0x47, 0x4c, 0x41, 0x53,
    0x53, 0x2d, 0x4c, 0x49, 0x4e, 0x55, 0x58, 0x2d, 0x49, 0x4e, 0x49, 0x54, 0x0a, 0x48, 0x4f, 0x55,
    0x52, 0x47, 0x4c, 0x41, 0x53, 0x53, 0x2d, 0x54, 0x49, 0x43, 0x4b, 0x0a,
];
/// [`Init::Busy`]'s code:
///
/// ```text
///     mov $4,%r12d
/// 1:  mov $57,%eax ; syscall ; test %eax,%eax ; je 3f ; dec %r12d ; jne 1b   # fork() x4
///     (then Init::Ticker's code: the line, and a tick every 200 ms)
/// 3:  jmp 3b                                                                 # children spin
/// ```
const BUSY_CODE: [u8; 148] = [
    0x41, 0xbc, 0x04, 0x00, 0x00, 0x00, 0xb8, 0x39, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x85, 0xc0, 0x74,
    0x47, 0x41, 0xff, 0xcc, 0x75, 0xf0, 0xbf, 0x01, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x4e, 0x00,
    0x00, 0x00, 0xba, 0x15, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xbf, 0x01,
    0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x4b, 0x00, 0x00, 0x00, 0xba, 0x0f, 0x00, 0x00, 0x00, 0xb8,
    0x01, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x8d, 0x3d, 0x13, 0x00, 0x00, 0x00, 0x31, 0xf6, 0xb8,
    0x23, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xd6, 0xeb, 0xfe, 0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc2, 0xeb, 0x0b, 0x00, 0x00, 0x00, 0x00,
    0x48, 0x4f, 0x55, 0x52, 0x47, 0x4c, 0x41, 0x53, 0x53, 0x2d, 0x4c, 0x49, 0x4e, 0x55, 0x58, 0x2d,
    0x49, 0x4e, 0x49, 0x54, 0x0a, 0x48, 0x4f, 0x55, 0x52, 0x47, 0x4c, 0x41, 0x53, 0x53, 0x2d, 0x54,
    0x49, 0x43, 0x4b, 0x0a,
];
/// [`Init::BusyIo`]'s code: [`BUSY_CODE`] with the children's loop
/// `3: mov $1,%edi ; lea spin(%rip),%rsi ; mov $8,%edx ; mov $1,%eax ; syscall ; jmp 3b` and
/// `spin: .ascii "busy-io\n"` after the other strings.
const BUSY_IO_CODE: [u8; 180] = [
    0x41, 0xbc, 0x04, 0x00, 0x00, 0x00, 0xb8, 0x39, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x85, 0xc0, 0x74,
    0x47, 0x41, 0xff, 0xcc, 0x75, 0xf0, 0xbf, 0x01, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x66, 0x00,
    0x00, 0x00, 0xba, 0x15, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xbf, 0x01,
    0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x63, 0x00, 0x00, 0x00, 0xba, 0x0f, 0x00, 0x00, 0x00, 0xb8,
    0x01, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x8d, 0x3d, 0x2b, 0x00, 0x00, 0x00, 0x31, 0xf6, 0xb8,
    0x23, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xeb, 0xd6, 0xbf, 0x01, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x35,
    0x48, 0x00, 0x00, 0x00, 0xba, 0x08, 0x00, 0x00, 0x00, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0x05,
    0xeb, 0xe6, 0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0xc2, 0xeb, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x48, 0x4f, 0x55, 0x52, 0x47, 0x4c, 0x41, 0x53,
    0x53, 0x2d, 0x4c, 0x49, 0x4e, 0x55, 0x58, 0x2d, 0x49, 0x4e, 0x49, 0x54, 0x0a, 0x48, 0x4f, 0x55,
    0x52, 0x47, 0x4c, 0x41, 0x53, 0x53, 0x2d, 0x54, 0x49, 0x43, 0x4b, 0x0a, 0x62, 0x75, 0x73, 0x79,
    0x2d, 0x69, 0x6f, 0x0a,
];
/// Where `/init` is mapped.
const INIT_LOAD: u64 = 0x40_0000;
/// The code follows the ELF header and the one program header.
const INIT_CODE_OFFSET: u64 = 64 + 56;

/// `/init`: an ELF64 executable, one read+execute PT_LOAD of the whole file at [`INIT_LOAD`].
pub fn init_elf(init: Init) -> Vec<u8> {
    let report;
    let code: &[u8] = match init {
        // Already an executable.
        Init::ClockProbe => return CLOCK_PROBE_ELF.to_vec(),
        Init::ExitSeven => &INIT_CODE,
        Init::Ticker => &TICKER_CODE,
        Init::Busy => &BUSY_CODE,
        Init::BusyIo => &BUSY_IO_CODE,
        Init::Report(then) => {
            let mut c = REPORT_CODE;
            let cmd = match then {
                Then::PowerOff => LINUX_REBOOT_CMD_POWER_OFF,
                Then::Reboot => LINUX_REBOOT_CMD_RESTART,
            };
            c[REPORT_CMD_AT..REPORT_CMD_AT + 4].copy_from_slice(&cmd.to_le_bytes());
            report = c;
            &report
        }
    };
    let mut v = vec![0u8; INIT_CODE_OFFSET as usize];
    let put = |v: &mut Vec<u8>, at: usize, b: &[u8]| v[at..at + b.len()].copy_from_slice(b);
    put(&mut v, 0, b"\x7fELF\x02\x01\x01");
    put(&mut v, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut v, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut v, 20, &1u32.to_le_bytes());
    put(&mut v, 24, &(INIT_LOAD + INIT_CODE_OFFSET).to_le_bytes()); // e_entry
    put(&mut v, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut v, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut v, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut v, 56, &1u16.to_le_bytes()); // e_phnum
    let len = INIT_CODE_OFFSET + code.len() as u64;
    put(&mut v, 64, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut v, 68, &5u32.to_le_bytes()); // R+X
    put(&mut v, 72, &0u64.to_le_bytes()); // p_offset
    put(&mut v, 80, &INIT_LOAD.to_le_bytes()); // p_vaddr
    put(&mut v, 88, &INIT_LOAD.to_le_bytes()); // p_paddr
    put(&mut v, 96, &len.to_le_bytes()); // p_filesz
    put(&mut v, 104, &len.to_le_bytes()); // p_memsz
    put(&mut v, 112, &0x1000u64.to_le_bytes()); // p_align
    v.extend_from_slice(code);
    v
}

/// One entry of a newc ("070701") cpio archive.
fn newc_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The initramfs: `/dev`, `/dev/console` (char 5:1, so that `/init` has a console), `/sys`
/// (where [`Init::Report`] mounts sysfs) and `/init`.
pub fn initramfs(init: Init) -> Vec<u8> {
    let mut out = Vec::new();
    newc_entry(&mut out, 1, "dev", 0o040_755, (0, 0), &[]);
    newc_entry(&mut out, 2, "dev/console", 0o020_600, (5, 1), &[]);
    newc_entry(&mut out, 4, "sys", 0o040_755, (0, 0), &[]);
    newc_entry(&mut out, 3, "init", 0o100_755, (0, 0), &init_elf(init));
    newc_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

/// `/init` of the shell guest: the script `scripts/linux-guest.sh` boots, so the test that
/// types into it tests what a person gets.
pub const SHELL_INIT: &str = include_str!("../../../scripts/linux-guest/init");
/// What [`SHELL_INIT`] prints once it has mounted the pseudo filesystems, before the shell.
pub const SHELL_READY: &str = "HOURGLASS-SHELL-READY ";
/// The shell's prompt ([`SHELL_INIT`] sets `PS1`).
pub const SHELL_PROMPT: &str = "hourglass-guest# ";

/// The shell guest's initramfs: `/dev/console`, `/bin/busybox` (the static `busybox` file
/// given) and [`SHELL_INIT`] as `/init`.
pub fn shell_initramfs(busybox: &Path) -> std::io::Result<Vec<u8>> {
    let bb = std::fs::read(busybox)?;
    let mut out = Vec::new();
    newc_entry(&mut out, 1, "dev", 0o040_755, (0, 0), &[]);
    newc_entry(&mut out, 2, "dev/console", 0o020_600, (5, 1), &[]);
    newc_entry(&mut out, 3, "bin", 0o040_755, (0, 0), &[]);
    newc_entry(&mut out, 4, "bin/busybox", 0o100_755, (0, 0), &bb);
    newc_entry(
        &mut out,
        5,
        "init",
        0o100_755,
        (0, 0),
        SHELL_INIT.as_bytes(),
    );
    newc_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    Ok(out)
}

/// Where `scripts/nested-kvm.sh` puts Debian's kernel inside the nested host, both forms:
/// `vmlinuz` (the bzImage) and, where it could be extracted, `vmlinux` (the PVH ELF).
pub const NESTED_KERNEL_DIR: &str = "/opt/hourglass-linux";

/// Debian's kernel of the form `name` (`vmlinuz` or `vmlinux`): in the nested host at
/// [`NESTED_KERNEL_DIR`]; elsewhere in the cache `scripts/nested-kvm.sh` fills
/// (`target/nested/kernel/<package>/`), if a run has filled it.
pub fn debian_kernel(name: &str) -> Option<PathBuf> {
    let nested = Path::new(NESTED_KERNEL_DIR).join(name);
    if nested.is_file() {
        return Some(nested);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cache = root.join("target/nested/kernel");
    let current = std::fs::read_to_string(cache.join("current")).ok()?;
    let p = cache.join(current.trim()).join(name);
    p.is_file().then_some(p)
}

/// `hourglass`'s arguments for a Linux guest of `mib` MiB booting `kernel` with `initramfs` and
/// `cmdline` (the vCPU count is the caller's).
pub fn linux_args(kernel: &Path, initramfs: &Path, cmdline: &str, mib: u32) -> Vec<String> {
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    vec![
        "--memory".into(),
        format!("size={mib}M"),
        "--kernel".into(),
        path(kernel),
        "--initramfs".into(),
        path(initramfs),
        "--cmdline".into(),
        cmdline.into(),
    ]
}

/// Inside the nested host: Debian's kernel `name`. Elsewhere: `None`, after saying why the
/// test is skipped.
pub fn nested_kernel(name: &str) -> Option<PathBuf> {
    if !crate::vmm_support::in_nested_host() {
        println!(
            "skipped: this host's KVM (kvm_pvm) cannot run a stock Linux kernel; run \
             scripts/nested-kvm.sh"
        );
        return None;
    }
    Some(debian_kernel(name).unwrap_or_else(|| {
        panic!(
            "HOURGLASS_NESTED=1 but no {name} in {NESTED_KERNEL_DIR} (scripts/nested-kvm.sh \
             packs it)"
        )
    }))
}

/// Kernel messages that mean the guest's clocks or CPUs were upset.
pub const CLOCK_COMPLAINTS: [&str; 6] = [
    "Marking TSC unstable",
    "clocksource watchdog",
    "soft lockup",
    "self-detected stall",
    "timekeeping watchdog",
    "hung task",
];

/// Check that the report program's bytes are its source's, and that the reboot command sits
/// where [`Init::Report`] patches it. Called by the test that runs the programs, not a test of
/// its own: it spawns `as`, and a spawn in another thread while that test writes an executable
/// would hold the file open for writing across the fork and make its exec fail (ETXTBSY).
pub fn check_report_code_is_its_source() {
    assert_eq!(
        REPORT_CODE[REPORT_CMD_AT - 1..REPORT_CMD_AT + 4],
        [0xba, 0xdc, 0xfe, 0x21, 0x43],
        "mov $LINUX_REBOOT_CMD_POWER_OFF,%edx"
    );
    let reboot = init_elf(Init::Report(Then::Reboot));
    let at = INIT_CODE_OFFSET as usize + REPORT_CMD_AT;
    assert_eq!(reboot[at..at + 4], 0x0123_4567u32.to_le_bytes());
    let dir = std::env::temp_dir().join(format!("hourglass-report-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/linux_support/report_init.s");
    let (obj, bin) = (dir.join("r.o"), dir.join("r.bin"));
    let assembled = std::process::Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg(&src)
        .status();
    match assembled {
        Ok(s) if s.success() => {}
        _ => {
            println!("skipped the comparison: no working `as` (binutils) here");
            return;
        }
    }
    let s = std::process::Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&obj)
        .arg(&bin)
        .status()
        .expect("objcopy (binutils, beside as)");
    assert!(s.success());
    assert_eq!(std::fs::read(&bin).unwrap(), REPORT_CODE.to_vec());
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_init_prints_what_the_tests_wait_for() {
        assert!(SHELL_INIT.starts_with("#!/bin/busybox sh\n"));
        assert!(
            SHELL_INIT.contains(&format!("PS1='{SHELL_PROMPT}'")),
            "the prompt the tests wait for is not the one /init sets"
        );
        assert!(SHELL_INIT.contains(&format!("echo \"{SHELL_READY}cpus=$(nproc) ")));
    }

    #[test]
    fn the_initramfs_is_well_formed_newc() {
        let a = initramfs(Init::Ticker);
        assert!(a.len().is_multiple_of(4));
        // Walk it as a reader would: magic, sizes, names, 4-byte alignment, the trailer last.
        let mut at = 0;
        let mut names = Vec::new();
        loop {
            assert_eq!(&a[at..at + 6], b"070701", "magic at {at}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&a[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
                usize::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6), field(11));
            let name = std::str::from_utf8(&a[at + 110..at + 110 + namesize - 1]).unwrap();
            assert_eq!(a[at + 110 + namesize - 1], 0);
            names.push((name.to_string(), mode, size));
            at = (at + 110 + namesize).next_multiple_of(4);
            at = (at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(at, a.len());
        let init = names.iter().find(|n| n.0 == "init").unwrap();
        assert_eq!((init.1, init.2), (0o100_755, init_elf(Init::Ticker).len()));
        assert!(names
            .iter()
            .any(|n| n.0 == "dev/console" && n.1 == 0o020_600));
        assert!(names.iter().any(|n| n.0 == "sys" && n.1 == 0o040_755));
    }
}
