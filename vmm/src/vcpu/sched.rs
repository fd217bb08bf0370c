//! Scheduling attributes for the threads that carry a pause or resume.

use std::time::Duration;

/// The time slice [`request_short_slice`] asks for on the pause/resume control path.
pub const CONTROL_SLICE: Duration = Duration::from_micros(100);

/// Ask the scheduler for a short time slice for the calling thread (`sched_setattr` with
/// `sched_runtime`, which Linux's EEVDF scheduler reads as the thread's slice since 6.12; older
/// kernels accept and ignore it). A thread with a short slice gets an early deadline when it
/// wakes, so it runs soon after its wake-up even when every core is busy (vCPU threads of a busy
/// guest, other VMs), instead of waiting for the running thread's slice to end. Meant for the
/// threads that carry a pause or resume request: they run for microseconds and then sleep, so
/// this costs the rest of the host nothing. A thread under a real-time policy is left alone.
pub fn request_short_slice(slice: Duration) -> std::io::Result<()> {
    let size = std::mem::size_of::<libc::sched_attr>() as u32;
    let mut attr = libc::sched_attr {
        size,
        sched_policy: 0,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: 0,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_getattr(2) on the calling thread (pid 0) writes at most `size` bytes into
    // `attr`, a live local of exactly that size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut libc::sched_attr,
            size,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if attr.sched_policy != libc::SCHED_OTHER as u32 {
        return Ok(());
    }
    attr.size = size;
    attr.sched_flags = 0;
    attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: sched_setattr(2) on the calling thread reads `size` bytes from `attr`, a live,
    // initialised local; it keeps the policy and nice value read above.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
