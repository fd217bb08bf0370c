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
//! that it is being stopped (`KVMCLOCK_CTRL`) as it parks for a pause, and the freeze that
//! follows uses those ([`ParkReads`]) instead of doing the same per-vCPU ioctls one after the
//! other on the controller thread: the threads do them side by side, on their own vCPUs. The
//! values cannot change while the vCPU is stopped, and any write through the vCPU drops them.
//! On the 2-core development host this only moves the time (the freeze of 16 vCPUs drops from
//! about 235 µs to 5 µs, the park grows by as much); with free cores the reads overlap.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::probe::TimeProbe;
use devices::{BusAction, PioBus};
use hypervisor::arch::{CpuIdEntry, MsrEntry, SpecialRegisters, StandardRegisters};
use hypervisor::cpu::TscWriteBack;
use hypervisor::tsc::VcpuTscReading;
use hypervisor::{HypervisorError, Vcpu, VcpuKicker, VcpuState, VmExit};
use log::{debug, error, info};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

use crate::signal::vcpu_kick_signal;

/// Why the VM stopped on its own (sent to the main thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest shut down (triple fault or shutdown exit).
    GuestShutdown(u32),
    /// The guest asked for a reset (i8042 0xFE or a reset exit); Hourglass does not reboot.
    GuestReset(u32),
    /// A vCPU failed.
    VcpuError(u32, String),
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
            let cache = Arc::new(Mutex::new(ParkCache::default()));
            let v: Box<dyn Vcpu> = Box::new(ParkReads {
                inner: v,
                cache: cache.clone(),
            });
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

/// What a vCPU thread read from its own vCPU as it parked for a pause.
#[derive(Debug, Default)]
struct ParkCache {
    /// `Vcpu::tsc_reading`, taken after the vCPU left `KVM_RUN`.
    reading: Option<VcpuTscReading>,
    /// `KVMCLOCK_CTRL` succeeded for this stop.
    clock_paused: bool,
}

fn lock_cache(c: &Mutex<ParkCache>) -> MutexGuard<'_, ParkCache> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// On the vCPU's own thread, stopped for a pause: the per-vCPU half of the freeze.
fn read_at_park(id: u32, vcpu: &dyn Vcpu, cache: &Mutex<ParkCache>) {
    let reading = vcpu.tsc_reading();
    let clock = vcpu.notify_guest_clock_paused();
    if let Err(e) = &clock {
        // EINVAL until the guest has enabled kvmclock; the controller tries again.
        debug!("vCPU {id}: KVMCLOCK_CTRL at park: {e}");
    }
    let mut c = lock_cache(cache);
    c.reading = reading.ok();
    c.clock_paused = clock.is_ok();
}

/// A vCPU as the rest of the VMM sees it: the hypervisor's vCPU, except that while it is
/// parked for a pause, [`Vcpu::tsc_reading`] answers what its thread read at the park and
/// [`Vcpu::notify_guest_clock_paused`] knows the thread already told the guest. Every write
/// through it drops both first (a thaw reads the offsets back after writing them).
struct ParkReads {
    inner: Box<dyn Vcpu>,
    cache: Arc<Mutex<ParkCache>>,
}

impl ParkReads {
    fn forget(&self) {
        *lock_cache(&self.cache) = ParkCache::default();
    }
}

impl Vcpu for ParkReads {
    fn id(&self) -> u32 {
        self.inner.id()
    }
    fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
        self.inner.run()
    }
    fn kicker(&mut self) -> Arc<dyn VcpuKicker> {
        self.inner.kicker()
    }
    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<(), HypervisorError> {
        self.forget();
        self.inner.set_cpuid(entries)
    }
    fn regs(&self) -> Result<StandardRegisters, HypervisorError> {
        self.inner.regs()
    }
    fn set_regs(&self, regs: &StandardRegisters) -> Result<(), HypervisorError> {
        self.forget();
        self.inner.set_regs(regs)
    }
    fn sregs(&self) -> Result<SpecialRegisters, HypervisorError> {
        self.inner.sregs()
    }
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<(), HypervisorError> {
        self.forget();
        self.inner.set_sregs(sregs)
    }
    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>, HypervisorError> {
        self.inner.msrs(indices)
    }
    fn set_msrs(&self, entries: &[MsrEntry]) -> Result<(), HypervisorError> {
        self.forget();
        self.inner.set_msrs(entries)
    }
    fn notify_guest_clock_paused(&self) -> Result<(), HypervisorError> {
        if std::mem::take(&mut lock_cache(&self.cache).clock_paused) {
            return Ok(());
        }
        self.inner.notify_guest_clock_paused()
    }
    fn tsc_reading(&self) -> Result<VcpuTscReading, HypervisorError> {
        if let Some(r) = lock_cache(&self.cache).reading {
            return Ok(r);
        }
        self.inner.tsc_reading()
    }
    fn set_tsc(&self, offset: u64, tsc_adjust: u64) -> Result<TscWriteBack, HypervisorError> {
        self.forget();
        self.inner.set_tsc(offset, tsc_adjust)
    }
    fn tsc_khz(&self) -> Result<u32, HypervisorError> {
        self.inner.tsc_khz()
    }
    fn set_tsc_khz(&self, khz: u32) -> Result<(), HypervisorError> {
        self.forget();
        self.inner.set_tsc_khz(khz)
    }
    fn state(&self) -> Result<VcpuState, HypervisorError> {
        self.inner.state()
    }
    fn set_state(&self, state: &VcpuState) -> Result<(), HypervisorError> {
        self.forget();
        self.inner.set_state(state)
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
    cache: Arc<Mutex<ParkCache>>,
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
        *lock_cache(&cache) = ParkCache::default();
        let leave = {
            let mut guard = lock_vcpu(&vcpu);
            let leave = run_until_leave(id, guard.as_mut(), &shared);
            if matches!(leave, Leave::Park) {
                let pausing = {
                    let c = shared.lock();
                    c.pause && !c.stop
                };
                if pausing {
                    read_at_park(id, guard.as_ref(), &cache);
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
                info!("vCPU {id}: guest shutdown");
                shared.send(VmEvent::GuestShutdown(id));
                return Leave::Exit;
            }
            Ok(VmExit::Reset) => {
                info!("vCPU {id}: guest reset");
                shared.send(VmEvent::GuestReset(id));
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
mod tests {
    //! The pause protocol with fake vCPUs (no /dev/kvm needed): a fake `run` does a little
    //! "guest work" and returns a port write, or returns `Interrupted` at once while its kicker
    //! is set, as KVM does with `immediate_exit`.

    use super::*;
    use hypervisor::arch::{CpuIdEntry, MsrEntry, SpecialRegisters, StandardRegisters};
    use hypervisor::cpu::TscWriteBack;
    use hypervisor::tsc::VcpuTscReading;
    use hypervisor::{HypervisorError, VcpuState};
    use std::sync::atomic::AtomicU64;
    use std::sync::mpsc;
    use vm_memory::GuestAddress;

    struct FlagKicker(AtomicBool);
    impl VcpuKicker for FlagKicker {
        fn set(&self, exit: bool) {
            self.0.store(exit, Ordering::SeqCst);
        }
    }

    /// What the fake guest does once it has run `after` times.
    #[derive(Clone, Copy)]
    enum Then {
        Work,
        Halt,
        Shutdown,
    }

    struct FakeVcpu {
        id: u32,
        kicker: Arc<FlagKicker>,
        runs: Arc<AtomicU64>,
        after: u64,
        then: Then,
        buf: [u8; 1],
        /// Calls of `tsc_reading` and `notify_guest_clock_paused` so far.
        calls: AtomicU64,
    }

    fn unsupported<T>() -> Result<T, HypervisorError> {
        Err(HypervisorError::Unsupported("fake vCPU".into()))
    }

    impl Vcpu for FakeVcpu {
        fn id(&self) -> u32 {
            self.id
        }
        fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
            if self.kicker.0.load(Ordering::SeqCst) {
                return Ok(VmExit::Interrupted);
            }
            let n = self.runs.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(50));
            match (self.then, n >= self.after) {
                (Then::Halt, true) => Ok(VmExit::Hlt),
                (Then::Shutdown, true) => Ok(VmExit::Shutdown),
                _ => Ok(VmExit::IoOut {
                    port: 0x80,
                    data: &self.buf,
                }),
            }
        }
        fn kicker(&mut self) -> Arc<dyn VcpuKicker> {
            self.kicker.clone()
        }
        fn set_cpuid(&self, _: &[CpuIdEntry]) -> Result<(), HypervisorError> {
            Ok(())
        }
        fn regs(&self) -> Result<StandardRegisters, HypervisorError> {
            Ok(StandardRegisters::default())
        }
        fn set_regs(&self, _: &StandardRegisters) -> Result<(), HypervisorError> {
            Ok(())
        }
        fn sregs(&self) -> Result<SpecialRegisters, HypervisorError> {
            Ok(SpecialRegisters::default())
        }
        fn set_sregs(&self, _: &SpecialRegisters) -> Result<(), HypervisorError> {
            Ok(())
        }
        fn msrs(&self, _: &[u32]) -> Result<Vec<MsrEntry>, HypervisorError> {
            Ok(Vec::new())
        }
        fn set_msrs(&self, _: &[MsrEntry]) -> Result<(), HypervisorError> {
            Ok(())
        }
        fn notify_guest_clock_paused(&self) -> Result<(), HypervisorError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        /// The runs so far, and in `tsc_adjust` the number of earlier calls (to tell a fresh
        /// reading from a kept one).
        fn tsc_reading(&self) -> Result<VcpuTscReading, HypervisorError> {
            Ok(VcpuTscReading {
                offset: self.runs.load(Ordering::SeqCst),
                tsc_adjust: self.calls.fetch_add(1, Ordering::SeqCst),
            })
        }
        fn set_tsc(&self, _: u64, _: u64) -> Result<TscWriteBack, HypervisorError> {
            unsupported()
        }
        fn tsc_khz(&self) -> Result<u32, HypervisorError> {
            unsupported()
        }
        fn set_tsc_khz(&self, _: u32) -> Result<(), HypervisorError> {
            unsupported()
        }
        fn state(&self) -> Result<VcpuState, HypervisorError> {
            unsupported()
        }
        fn set_state(&self, _: &VcpuState) -> Result<(), HypervisorError> {
            unsupported()
        }
    }

    fn start(plan: &[(u64, Then)]) -> (VcpuSet, Vec<Arc<AtomicU64>>, mpsc::Receiver<VmEvent>) {
        crate::signal::install_vcpu_kick_handler().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::new(
            Arc::new(mem),
            PioBus::new(),
            Arc::new(TimeProbe::new(plan.len() as u32, 0, 0)),
            tx,
        ));
        let mut counters = Vec::new();
        let mut vcpus: Vec<Box<dyn Vcpu>> = Vec::new();
        for (i, (after, then)) in plan.iter().enumerate() {
            let runs = Arc::new(AtomicU64::new(0));
            counters.push(runs.clone());
            vcpus.push(Box::new(FakeVcpu {
                id: i as u32,
                kicker: Arc::new(FlagKicker(AtomicBool::new(false))),
                runs,
                after: *after,
                then: *then,
                buf: [0],
                calls: AtomicU64::new(0),
            }));
        }
        (VcpuSet::start(shared, vcpus).unwrap(), counters, rx)
    }

    fn snapshot(c: &[Arc<AtomicU64>]) -> Vec<u64> {
        c.iter().map(|a| a.load(Ordering::SeqCst)).collect()
    }

    fn wait_all_above(c: &[Arc<AtomicU64>], base: &[u64]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while snapshot(c).iter().zip(base).any(|(a, b)| a <= b) {
            assert!(
                Instant::now() < deadline,
                "vCPUs did not run: {:?}",
                snapshot(c)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn pause_parks_every_vcpu_and_resume_releases_them() {
        let (mut set, c, _rx) = start(&[(u64::MAX, Then::Work); 3]);
        wait_all_above(&c, &[0, 0, 0]);
        for _ in 0..100 {
            set.pause().unwrap();
            // Every vCPU lock is free: the threads are parked, not running.
            let guards = set.lock_all();
            assert_eq!(guards.len(), 3);
            let frozen = snapshot(&c);
            drop(guards);
            // Parked threads do not run the vCPU (observed over a short window).
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(snapshot(&c), frozen, "a vCPU ran while paused");
            set.resume();
            wait_all_above(&c, &frozen);
        }
        set.stop();
    }

    #[test]
    fn the_freeze_uses_what_each_thread_read_at_its_park() {
        let (mut set, c, _rx) = start(&[(u64::MAX, Then::Work); 2]);
        wait_all_above(&c, &[0, 0]);
        for _ in 0..3 {
            set.pause().unwrap();
            let frozen = snapshot(&c);
            let guards = set.lock_all();
            for (g, runs) in guards.iter().zip(&frozen) {
                // The thread read at its park (call k) and told the guest (call k + 1).
                let r = g.tsc_reading().unwrap();
                assert_eq!(r.offset, *runs, "read after the vCPU's last run");
                assert_eq!(g.tsc_reading().unwrap(), r, "kept, not read again");
                g.notify_guest_clock_paused().unwrap(); // already done: no call
                g.set_regs(&StandardRegisters::default()).unwrap(); // a write drops it all
                let fresh = g.tsc_reading().unwrap();
                assert_eq!(
                    fresh.tsc_adjust,
                    r.tsc_adjust + 2,
                    "one fresh call after the write"
                );
                // KVMCLOCK_CTRL again after a write goes to the vCPU.
                g.notify_guest_clock_paused().unwrap();
                assert_eq!(g.tsc_reading().unwrap().tsc_adjust, r.tsc_adjust + 4);
            }
            drop(guards);
            set.resume();
            wait_all_above(&c, &frozen);
        }
        set.stop();
    }

    #[test]
    fn the_wake_up_tree_starts_below_every_exited_thread() {
        assert_eq!(tree_roots(&[false; 5]), vec![0]);
        // 0 gone: its children 1 and 2 are woken directly; 1 gone too: 3 and 4 as well.
        assert_eq!(tree_roots(&[true, false, false, false, false]), vec![1, 2]);
        assert_eq!(
            tree_roots(&[true, true, false, false, false]),
            vec![2, 3, 4]
        );
        assert_eq!(tree_roots(&[true; 3]), Vec::<usize>::new());
    }

    #[test]
    fn resume_reaches_every_thread_when_the_tree_root_exited() {
        let plan = [
            (5, Then::Shutdown),
            (u64::MAX, Then::Work),
            (u64::MAX, Then::Work),
            (u64::MAX, Then::Work),
            (u64::MAX, Then::Work),
        ];
        let (mut set, c, rx) = start(&plan);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            VmEvent::GuestShutdown(0)
        );
        for _ in 0..20 {
            set.pause().unwrap();
            let frozen = snapshot(&c);
            set.resume();
            wait_all_above(&c[1..], &frozen[1..]);
        }
        set.stop();
    }

    #[test]
    fn halted_and_exited_vcpus_do_not_block_pause() {
        let (mut set, c, rx) =
            start(&[(u64::MAX, Then::Work), (5, Then::Halt), (5, Then::Shutdown)]);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            VmEvent::GuestShutdown(2)
        );
        wait_all_above(&c, &[0, 5, 5]);
        set.pause().unwrap();
        let guards = set.lock_all();
        assert_eq!(guards.len(), 3);
        drop(guards);
        set.resume();
        let before = snapshot(&c);
        wait_all_above(&c[..1], &before[..1]);
        set.stop();
    }
}
