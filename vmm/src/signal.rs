//! Signals: the real-time signal that kicks a vCPU thread out of `KVM_RUN`, SIGINT/SIGTERM
//! turned into an event the main thread waits on, and SIGBUS on guest memory whose backing file
//! was cut under the VM, reported with the file's name.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// The signal that kicks vCPU threads (SIGRTMIN + 0).
pub fn vcpu_kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: c_int, _: *mut siginfo_t, _: *mut c_void) {}

/// Install the empty handler for the vCPU kick signal: its only effect is to make a blocking
/// `KVM_RUN` return with EINTR.
pub fn install_vcpu_kick_handler() -> std::io::Result<()> {
    register_signal_handler(vcpu_kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// The eventfd the termination handler writes to (-1 before installation).
static EXIT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn exit_handler(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let fd = EXIT_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local of 8 bytes and the fd
        // is the eventfd leaked for the process lifetime in `install_exit_handlers`.
        unsafe {
            libc::write(fd, &one as *const u64 as *const c_void, 8);
        }
    }
}

/// Route SIGINT and SIGTERM to an eventfd that becomes readable when one arrives. The eventfd
/// lives for the rest of the process.
pub fn install_exit_handlers() -> std::io::Result<EventFd> {
    let evt = EventFd::new(libc::EFD_CLOEXEC)?;
    let dup = evt.try_clone()?;
    EXIT_FD.store(dup.as_raw_fd(), Ordering::SeqCst);
    std::mem::forget(dup);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, exit_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(evt)
}

/// A fixed buffer that a signal handler can format into.
pub(crate) struct SigBuf {
    buf: [u8; 512],
    len: usize,
}

impl SigBuf {
    pub(crate) const fn new() -> Self {
        Self {
            buf: [0; 512],
            len: 0,
        }
    }

    /// The bytes formatted so far.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub(crate) fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    pub(crate) fn push_dec(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    pub(crate) fn push_hex(&mut self, mut v: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[i..]);
    }
}

/// Offset of `si_addr` in a `siginfo_t` (x86_64: after signo, errno, code and padding).
const SI_ADDR_OFFSET: usize = 16;

/// What the SIGBUS report says about the file that backs guest memory (set by a restore that
/// maps a snapshot's `memory.bin`).
static GUEST_MEMORY_FILE: OnceLock<Vec<u8>> = OnceLock::new();

/// Name the file that backs guest memory, for the SIGBUS report: mapped `MAP_PRIVATE`, its
/// pages are read when the guest first touches them, so a file truncated meanwhile faults then.
pub fn set_guest_memory_file(path: &std::path::Path) {
    let _ = GUEST_MEMORY_FILE.set(path.as_os_str().as_encoded_bytes().to_vec());
}

extern "C" fn sigbus_handler(_: c_int, info: *mut siginfo_t, _: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo_t (SA_SIGINFO); for SIGBUS si_addr is the
    // pointer at SI_ADDR_OFFSET of its union.
    let addr =
        unsafe { std::ptr::read_unaligned((info as *const u8).add(SI_ADDR_OFFSET).cast::<u64>()) };
    let mut out = SigBuf::new();
    out.push(b"hourglass: SIGBUS reading memory at ");
    out.push_hex(addr);
    match GUEST_MEMORY_FILE.get() {
        Some(file) => {
            out.push(b": guest memory is backed by ");
            out.push(file);
            out.push(
                b" (memory_restore_mode=ondemand), which was truncated or cannot be read \
                  while the VM runs; the VM cannot go on\n",
            );
        }
        None => out.push(b"\n"),
    }
    let b = out.bytes();
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is a live local.
    unsafe {
        libc::write(2, b.as_ptr().cast(), b.len());
        libc::_exit(1);
    }
}

/// Install the SIGBUS report (once, by `hourglass`'s main thread, before any filter): a
/// non-zero exit with the faulting address and the file backing guest memory, instead of a
/// bare "Bus error".
pub fn install_sigbus_handler() -> std::io::Result<()> {
    register_signal_handler(libc::SIGBUS, sigbus_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}
