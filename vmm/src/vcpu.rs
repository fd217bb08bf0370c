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
//! next through the scheduler. Measured on a 2-core host with 16 vCPUs, that herd was most of
//! the pause and resume latency.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::probe::TimeProbe;
use devices::{BusAction, PioBus};
use hypervisor::{Vcpu, VcpuKicker, VmExit};
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
        shared.lock().total = u32::try_from(vcpus.len()).unwrap_or(u32::MAX);
        for mut v in vcpus {
            let id = v.id();
            let kicker = v.kicker();
            let vcpu = Arc::new(Mutex::new(v));
            let (s, vc, k) = (shared.clone(), vcpu.clone(), kicker.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_loop(id, vc, k, s))?;
            handles.push(VcpuHandle {
                id,
                vcpu,
                kicker,
                thread: Some(thread),
            });
        }
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
        {
            let mut c = self.shared.lock();
            c.pause = false;
            self.shared.leave.store(c.stop, Ordering::SeqCst);
        }
        // Each thread re-checks the flag under the lock before it leaves, and an unpark that
        // comes before its park makes that park return at once: no wake-up is lost.
        self.unpark_all();
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

/// What one run of the inner loop ended with.
enum Leave {
    /// Pause or stop requested: go to the park point.
    Park,
    /// The guest halted with no way to wake (interrupts off).
    Halted,
    /// This vCPU is done (shutdown, reset, error).
    Exit,
}

fn vcpu_loop(
    id: u32,
    vcpu: Arc<Mutex<Box<dyn Vcpu>>>,
    kicker: Arc<dyn VcpuKicker>,
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
                    std::thread::park();
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
        let leave = {
            let mut guard = lock_vcpu(&vcpu);
            run_until_leave(id, guard.as_mut(), &shared)
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
            Ok(())
        }
        fn tsc_reading(&self) -> Result<VcpuTscReading, HypervisorError> {
            unsupported()
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
