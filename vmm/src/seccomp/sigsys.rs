//! The SIGSYS handler: names the thread and the syscall that broke its filter, with
//! async-signal-safe writes only.

use std::cell::Cell;

use libc::{c_int, c_void, siginfo_t};

use super::{SeccompError, ThreadKind};
use crate::signal::SigBuf;

thread_local! {
    /// The thread's name for the SIGSYS report (fixed size: read from a signal handler).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

pub(super) fn remember_thread_name(kind: ThreadKind) {
    let mut buf = [0u8; 16];
    let cur = std::thread::current();
    let name = cur.name().unwrap_or(kind.name());
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|c| c.set(buf));
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` (x86_64: after signo, errno, code, padding
/// and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn sigsys_handler(_: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS (SA_SIGINFO); si_syscall is the
    // int at SI_SYSCALL_OFFSET of its union.
    let nr = unsafe {
        std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET).cast::<i32>())
    };
    let mut out = SigBuf::new();
    out.push(b"hourglass: seccomp: thread ");
    let mut name = THREAD_NAME.with(|c| c.get());
    if name[0] == 0 {
        // A thread that did not install a filter itself (it runs under its spawner's): ask the
        // kernel for its name.
        // SAFETY: prctl(PR_GET_NAME) writes at most 16 bytes into `name`, which has 16.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    }
    let n = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    out.push(if n == 0 { b"?" } else { &name[..n] });
    out.push(b" made syscall ");
    out.push_dec(u64::from(nr as u32));
    #[cfg(target_arch = "x86_64")]
    if i64::from(nr) == libc::SYS_ioctl && !ctx.is_null() {
        // SAFETY: with SA_SIGINFO the third argument is the interrupted context; RSI holds the
        // ioctl request.
        let req = unsafe {
            (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RSI as usize]
        };
        out.push(b" (ioctl request ");
        out.push_hex(req as u64 & 0xffff_ffff);
        out.push(b")");
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ctx;
    out.push(b"\n");
    // SAFETY: write(2), signal(2), raise(3) and pthread_sigmask(3) are async-signal-safe; the
    // buffer is a live local. SIGSYS is reset to its default action (end the process), raised
    // (pending while the handler runs) and unblocked, so the process ends by SIGSYS.
    unsafe {
        libc::write(2, out.bytes().as_ptr().cast(), out.bytes().len());
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, set.as_ptr(), std::ptr::null_mut());
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Install the SIGSYS handler that reports a violation under [`SeccompMode::Trap`] (once, by
/// `hourglass`'s main thread, before any filter).
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e.errno())))
}
