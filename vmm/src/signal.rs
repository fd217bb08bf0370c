//! Signals: the real-time signal that kicks a vCPU thread out of `KVM_RUN`, and SIGINT/SIGTERM
//! turned into an event the main thread waits on.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

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
