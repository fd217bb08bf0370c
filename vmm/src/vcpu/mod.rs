//! vCPU threads and the pause protocol.
//!
//! Each vCPU runs on its own thread, holding its `Mutex<Box<dyn Vcpu>>` while in the guest and
//! releasing it while parked, so that the control thread can lock every vCPU once all are parked.
//!
//! Pause: set the flag, set every vCPU's immediate-exit (`VcpuKicker`) and send each thread the
//! kick signal (for a run already inside the kernel); every thread leaves `run`, drops its vCPU
//! lock, counts itself parked and sleeps in `std::thread::park`; the last thread to park wakes
//! the controller, which waits on a condition variable of its own until all are parked. Resume
//! clears the flag and unparks each thread individually. No busy wait anywhere.
//!
//! Why not one condition variable for everything: with N vCPU threads on fewer host cores,
//! every park would wake the controller (N context switches to learn "not yet"), and every
//! release would wake all N threads at once to fight over one mutex, each handing it to the
//! next through the scheduler. Measured on a 2-core host with 16 idle vCPUs, that herd more
//! than doubled the time to park them (about 550 µs against 230 µs at p50).
//!
//! Each thread also reads its own vCPU's TSC state (`Vcpu::tsc_reading`) and tells the guest
//! that it is being stopped (`KVMCLOCK_CTRL`) as it parks for a pause ([`park`]); the controller
//! hands those readings to `TscState::freeze_with_readings` ([`VcpuSet::take_park_reads`])
//! instead of doing the same per-vCPU ioctls one after the other: the threads do them side by
//! side, on their own vCPUs. On the 2-core development host this only moves the time (the
//! freeze of 16 vCPUs drops from about 235 µs to 5 µs, the park grows by as much); with free
//! cores the reads overlap.
//!
//! * [`park`]: what a thread reads at its park, and how long it holds.
//! * [`sched`]: the short time slice for threads that carry a pause or resume.
//! * [`internal`]: what a `KVM_EXIT_INTERNAL_ERROR` means, for the error that ends the VM.
//! * [`shutdown`]: which way a `KVM_EXIT_SHUTDOWN` came, from the registers after it.

pub mod internal;
mod park;
mod sched;
pub mod shutdown;

pub use park::ParkRead;
pub use sched::{request_short_slice, CONTROL_SLICE};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::probe::TimeProbe;
use devices::{BusAction, PioBus};
use hypervisor::{Vcpu, VcpuKicker, VmExit};
use log::{debug, error, info};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

use crate::signal::vcpu_kick_signal;
use park::ParkCache;

/// Why the VM stopped on its own (sent to the main thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest shut down (triple fault or shutdown exit).
    GuestShutdown(u32),
    /// The guest asked for a reset (i8042 0xFE, the ACPI reset register, or a reset exit).
    GuestReset(u32),
    /// The guest powered off (ACPI S5 through the sleep control register).
    GuestPowerOff(u32),
    /// A vCPU failed.
    VcpuError(u32, String),
}

impl std::fmt::Display for VmEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmEvent::GuestShutdown(id) => write!(f, "the guest shut down (vCPU {id})"),
            VmEvent::GuestReset(id) => write!(f, "the guest asked for a reset (vCPU {id})"),
            VmEvent::GuestPowerOff(id) => write!(f, "the guest powered off (ACPI S5, vCPU {id})"),
            VmEvent::VcpuError(id, what) => write!(f, "vCPU {id} failed: {what}"),
        }
    }
}

#[derive(Debug, Default)]
struct Ctl {
    pause: bool,
    stop: bool,
    /// vCPU threads started.
    total: u32,
    /// Per thread (by start order): it has exited.
    gone: Vec<bool>,
    parked: u32,
    halted: u32,
    exited: u32,
    /// When the latest resume released the park.
    released_at: Option<Instant>,
    /// Resume to the last running vCPU thread out of the park, ns (measured by that thread).
    last_release_ns: u64,
}

/// State shared by the controller and the vCPU threads.
pub struct Shared {
    ctl: Mutex<Ctl>,
    /// The controller waits here for "every vCPU parked"; only the thread that completes the
    /// set (or exits) notifies it. vCPU threads never wait on it.
    cv: Condvar,
    /// Fast check for the vCPU loop (mirrors `pause || stop`).
    leave: AtomicBool,
    /// Mirrors `stop`, for parked threads.
    stopping: AtomicBool,
    /// The vCPU threads, in start order, for the resume's wake-up tree.
    threads: OnceLock<Vec<std::thread::Thread>>,
    /// Guest memory (for the time probe's record reads).
    pub memory: Arc<GuestMemoryMmap>,
    /// Serial, i8042.
    pub bus: PioBus,
    /// The time-probe device.
    pub probe: Arc<TimeProbe>,
    events: Mutex<Sender<VmEvent>>,
}

impl Shared {
    /// Shared state for a VM's vCPU threads.
    pub fn new(
        memory: Arc<GuestMemoryMmap>,
        bus: PioBus,
        probe: Arc<TimeProbe>,
        events: Sender<VmEvent>,
    ) -> Self {
        Self {
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            leave: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            threads: OnceLock::new(),
            memory,
            bus,
            probe,
            events: Mutex::new(events),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, ev: VmEvent) {
        let tx = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tx.send(ev);
    }
}

/// One vCPU: the vCPU itself, its kicker and its thread.
pub struct VcpuHandle {
    /// The vCPU index.
    pub id: u32,
    /// The vCPU, locked by its thread while running.
    pub vcpu: Arc<Mutex<Box<dyn Vcpu>>>,
    kicker: Arc<dyn VcpuKicker>,
    /// What its thread read at the latest park.
    park: Arc<ParkCache>,
    thread: Option<JoinHandle<()>>,
}

/// Lock a vCPU, recovering from poisoning (its thread's panic is reported separately).
pub fn lock_vcpu(v: &Mutex<Box<dyn Vcpu>>) -> MutexGuard<'_, Box<dyn Vcpu>> {
    v.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors of the pause protocol.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// Not every vCPU thread parked in time.
    #[error("only {parked} of {expected} vCPUs parked within {timeout:?}")]
    Timeout {
        /// vCPUs parked.
        parked: u32,
        /// vCPUs expected.
        expected: u32,
        /// How long the controller waited.
        timeout: Duration,
    },
}

/// The vCPU threads of one VM.
pub struct VcpuSet {
    shared: Arc<Shared>,
    vcpus: Vec<VcpuHandle>,
}

/// How long a pause or resume may take before it is reported as failed.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuSet {
    /// Start one thread per vCPU, all running.
    pub fn start(shared: Arc<Shared>, vcpus: Vec<Box<dyn Vcpu>>) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(vcpus.len());
        {
            let mut c = shared.lock();
            c.total = u32::try_from(vcpus.len()).unwrap_or(u32::MAX);
            c.gone = vec![false; vcpus.len()];
        }
        for (index, mut v) in vcpus.into_iter().enumerate() {
            let id = v.id();
            let kicker = v.kicker();
            let park = Arc::new(ParkCache::default());
            let cache = park.clone();
            let vcpu = Arc::new(Mutex::new(v));
            let (s, vc, k) = (shared.clone(), vcpu.clone(), kicker.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu);
                    vcpu_loop(id, index, vc, k, cache, s)
                })?;
            handles.push(VcpuHandle {
                id,
                vcpu,
                kicker,
                park,
                thread: Some(thread),
            });
        }
        let threads = handles
            .iter()
            .filter_map(|h| h.thread.as_ref().map(|t| t.thread().clone()))
            .collect();
        // Only set here; a second start on the same `Shared` keeps the first list.
        let _ = shared.threads.set(threads);
        Ok(Self {
            shared,
            vcpus: handles,
        })
    }

    /// Start one thread per vCPU, all parked (a restored VM): the pause flag is set before any
    /// thread exists, so no vCPU enters the guest before [`Self::resume`], and the vCPUs can be
    /// locked at once ([`Self::lock_all`]).
    pub fn start_paused(shared: Arc<Shared>, vcpus: Vec<Box<dyn Vcpu>>) -> std::io::Result<Self> {
        {
            let mut c = shared.lock();
            c.pause = true;
            shared.leave.store(true, Ordering::SeqCst);
        }
        Self::start(shared, vcpus)
    }

    /// The vCPUs.
    pub fn handles(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn unpark_all(&self) {
        for v in &self.vcpus {
            if let Some(t) = &v.thread {
                t.thread().unpark();
            }
        }
    }

    fn kick_all(&self) {
        for v in &self.vcpus {
            v.kicker.set(true);
            if let Some(t) = &v.thread {
                if let Err(e) = t.kill(vcpu_kick_signal()) {
                    debug!("kick vCPU {}: {e}", v.id);
                }
            }
        }
    }

    /// Park every vCPU thread; returns when all are parked (or have exited).
    pub fn pause(&self) -> Result<Duration, PauseError> {
        let t0 = Instant::now();
        {
            let mut c = self.shared.lock();
            c.pause = true;
            self.shared.leave.store(true, Ordering::SeqCst);
        }
        self.kick_all();
        let n = self.vcpus.len() as u32;
        let c = self.shared.lock();
        let (c, to) = self
            .shared
            .cv
            .wait_timeout_while(c, PARK_TIMEOUT, |c| c.parked + c.exited < n)
            .unwrap_or_else(|e| e.into_inner());
        if to.timed_out() {
            let parked = c.parked + c.exited;
            drop(c);
            self.unpause();
            return Err(PauseError::Timeout {
                parked,
                expected: n,
                timeout: PARK_TIMEOUT,
            });
        }
        Ok(t0.elapsed())
    }

    fn unpause(&self) {
        let roots = {
            let mut c = self.shared.lock();
            c.pause = false;
            self.shared.leave.store(c.stop, Ordering::SeqCst);
            // Every thread is in the park (or gone): wake them as a tree, each woken thread
            // waking its two children, so that this thread answers after a wake-up or two
            // instead of one per vCPU (a wake-up costs tens of µs where the host's own CPUs
            // are virtual). Otherwise (a pause that timed out) wake each one from here.
            let all_in = c.parked + c.exited == c.total && c.gone.len() == self.vcpus.len();
            all_in.then(|| tree_roots(&c.gone))
        };
        // Each thread re-checks the flag under the lock before it leaves, and an unpark that
        // comes before its park makes that park return at once: no wake-up is lost.
        match roots {
            Some(roots) => {
                for i in roots {
                    if let Some(t) = self.vcpus.get(i).and_then(|v| v.thread.as_ref()) {
                        t.thread().unpark();
                    }
                }
            }
            None => self.unpark_all(),
        }
    }

    /// Release every parked vCPU and return at once.
    ///
    /// There is nothing to wait for: `parked` counts the threads that are inside the park loop
    /// at this moment (a thread decrements it only as it leaves), so a pause that follows at
    /// once still sees exactly the threads that never left. How long the threads take to be
    /// scheduled out of the park is measured by the last of them ([`Self::last_release`]).
    pub fn resume(&self) -> Duration {
        let t0 = Instant::now();
        {
            let mut c = self.shared.lock();
            c.released_at = Some(t0);
            c.last_release_ns = 0;
        }
        self.unpause();
        t0.elapsed()
    }

    /// Resume to every vCPU thread out of the park, for the latest resume (0 until its threads
    /// have all left: a pause that comes first keeps the rest parked).
    pub fn last_release(&self) -> Duration {
        Duration::from_nanos(self.shared.lock().last_release_ns)
    }

    /// What each vCPU's thread read as it parked for this pause (in vCPU order), once: a
    /// second call, or a call after the vCPUs ran, gives `ParkRead::default()` for it. Call
    /// while paused; pass the readings to `TscState::freeze_with_readings` and tell only the
    /// guests whose `clock_paused` is false.
    pub fn take_park_reads(&self) -> Vec<ParkRead> {
        self.vcpus.iter().map(|v| v.park.take()).collect()
    }

    /// Lock every vCPU (call while paused, when no thread holds one).
    pub fn lock_all(&self) -> Vec<MutexGuard<'_, Box<dyn Vcpu>>> {
        self.vcpus.iter().map(|v| lock_vcpu(&v.vcpu)).collect()
    }

    /// Stop and join every vCPU thread.
    pub fn stop(&mut self) {
        {
            let mut c = self.shared.lock();
            c.stop = true;
            self.shared.leave.store(true, Ordering::SeqCst);
            self.shared.stopping.store(true, Ordering::SeqCst);
        }
        self.kick_all();
        self.unpark_all();
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                if t.join().is_err() {
                    error!("vCPU {} thread panicked", v.id);
                }
            }
        }
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one run of the inner loop ended with.
enum Leave {
    /// Pause or stop requested: go to the park point.
    Park,
    /// The guest halted with no way to wake (interrupts off).
    Halted,
    /// This vCPU is done (shutdown, reset, error).
    Exit,
}

/// Threads the resume wakes itself: the root of the wake-up tree (thread `i` wakes `2i + 1` and
/// `2i + 2`) and every live thread whose parent has exited (no one else would wake it).
fn tree_roots(gone: &[bool]) -> Vec<usize> {
    (0..gone.len())
        .filter(|&i| !gone[i] && (i == 0 || gone[(i - 1) / 2]))
        .collect()
}

/// Pass a wake-up on to this thread's children in the tree.
fn wake_children(index: usize, shared: &Shared) {
    if let Some(threads) = shared.threads.get() {
        for child in [2 * index + 1, 2 * index + 2] {
            if let Some(t) = threads.get(child) {
                t.unpark();
            }
        }
    }
}

fn vcpu_loop(
    id: u32,
    index: usize,
    vcpu: Arc<Mutex<Box<dyn Vcpu>>>,
    kicker: Arc<dyn VcpuKicker>,
    cache: Arc<ParkCache>,
    shared: Arc<Shared>,
) {
    debug!("vCPU {id} thread started");
    let mut halted = false;
    loop {
        {
            let mut c = shared.lock();
            if c.stop {
                break;
            }
            if c.pause || halted {
                c.parked += 1;
                if halted {
                    c.halted += 1;
                }
                if c.parked + c.exited == c.total {
                    shared.cv.notify_all();
                }
                // A halted vCPU stays parked until the VM stops.
                while (c.pause || halted) && !c.stop {
                    drop(c);
                    // Sleep until the flags may let this thread go; `leave` is set before any
                    // wake-up that means "stay" and cleared before the resume's wake-up, so
                    // the lock is only taken when it is worth it (threads woken by a kick or a
                    // resume that was already followed by the next pause would otherwise all
                    // queue on it, and on the controller's way).
                    loop {
                        std::thread::park();
                        wake_children(index, &shared);
                        if !shared.leave.load(Ordering::SeqCst)
                            || shared.stopping.load(Ordering::SeqCst)
                            || halted
                        {
                            break;
                        }
                    }
                    c = shared.lock();
                }
                c.parked -= 1;
                if halted {
                    c.halted -= 1;
                }
                if c.parked == c.halted {
                    if let Some(t) = c.released_at.take() {
                        c.last_release_ns =
                            u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    }
                }
                // Clear the immediate exit only now, under the lock: the kick of this pause may
                // have landed after this thread parked (it saw the flag first), and a later
                // pause sets the flag under this lock before it kicks again.
                kicker.set(false);
                continue;
            }
        }
        // What was read at the park is only good while the vCPU stays stopped: drop it before
        // the vCPU runs. (A thread that left the park and meets the next pause before running
        // keeps it: nothing ran or was written since.)
        cache.clear();
        let leave = {
            let mut guard = lock_vcpu(&vcpu);
            let leave = run_until_leave(id, guard.as_mut(), &shared);
            if matches!(leave, Leave::Park) {
                let pausing = {
                    let c = shared.lock();
                    c.pause && !c.stop
                };
                if pausing {
                    cache.read_at_park(id, guard.as_ref());
                }
            }
            leave
        };
        match leave {
            Leave::Park => {}
            Leave::Halted => {
                info!("vCPU {id} halted with no way to wake; parking it");
                halted = true;
            }
            Leave::Exit => break,
        }
    }
    let mut c = shared.lock();
    c.exited += 1;
    if let Some(g) = c.gone.get_mut(index) {
        *g = true;
    }
    shared.cv.notify_all();
    debug!("vCPU {id} thread exits");
}

fn run_until_leave(id: u32, vcpu: &mut dyn Vcpu, shared: &Shared) -> Leave {
    loop {
        if shared.leave.load(Ordering::SeqCst) {
            return Leave::Park;
        }
        match vcpu.run() {
            Ok(VmExit::IoIn { port, data }) => {
                if !shared.probe.pio_read(port, data) && !shared.bus.read(port, data) {
                    debug!("vCPU {id}: read of unhandled port {port:#x}");
                }
            }
            Ok(VmExit::IoOut { port, data }) => {
                if shared.probe.pio_write(port, data, shared.memory.as_ref()) {
                    continue;
                }
                match shared.bus.write(port, data) {
                    Some(BusAction::Reset) => {
                        info!("vCPU {id}: the guest asked for a reset (i8042)");
                        shared.send(VmEvent::GuestReset(id));
                        return Leave::Exit;
                    }
                    Some(BusAction::PowerOff) => {
                        info!("vCPU {id}: the guest powered off (ACPI S5)");
                        shared.send(VmEvent::GuestPowerOff(id));
                        return Leave::Exit;
                    }
                    Some(BusAction::None) => {}
                    None => debug!("vCPU {id}: write to unhandled port {port:#x}"),
                }
            }
            Ok(VmExit::MmioRead { addr, data }) => {
                debug!("vCPU {id}: MMIO read at {addr:#x} (no device)");
                data.fill(0xff);
            }
            Ok(VmExit::MmioWrite { addr, .. }) => {
                debug!("vCPU {id}: MMIO write at {addr:#x} (no device)");
            }
            Ok(VmExit::Interrupted) => {}
            Ok(VmExit::Hlt) => return Leave::Halted,
            Ok(VmExit::Shutdown) => {
                let regs = vcpu.regs().ok();
                let sregs = vcpu.sregs().ok();
                info!(
                    "vCPU {id}: guest shutdown; {}",
                    shutdown::describe(regs.as_ref(), sregs.as_ref())
                );
                shared.send(VmEvent::GuestShutdown(id));
                return Leave::Exit;
            }
            Ok(VmExit::Reset) => {
                info!("vCPU {id}: guest reset");
                shared.send(VmEvent::GuestReset(id));
                return Leave::Exit;
            }
            Ok(VmExit::InternalError { suberror, data }) => {
                let rip = vcpu.regs().ok().map(|r| r.rip);
                let what = internal::describe(suberror, &data, rip);
                error!("vCPU {id}: {what}");
                shared.send(VmEvent::VcpuError(id, what));
                return Leave::Exit;
            }
            Ok(VmExit::Other(what)) => {
                error!("vCPU {id}: unexpected exit: {what}");
                shared.send(VmEvent::VcpuError(id, what));
                return Leave::Exit;
            }
            Err(e) => {
                error!("vCPU {id}: run failed: {e}");
                shared.send(VmEvent::VcpuError(id, e.to_string()));
                return Leave::Exit;
            }
        }
    }
}

#[cfg(test)]
mod tests;
