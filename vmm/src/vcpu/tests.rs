//! The pause protocol with fake vCPUs (no /dev/kvm needed): a fake `run` does a little
//! "guest work" and returns a port write, or returns `Interrupted` at once while its kicker
//! is set, as KVM does with `immediate_exit`.

use super::*;
use hypervisor::arch::{CpuIdEntry, MsrEntry, SpecialRegisters, StandardRegisters};
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
    fn state(&self) -> Result<VcpuState, HypervisorError> {
        unsupported()
    }
    fn set_state(&self, _: &VcpuState) -> Result<(), HypervisorError> {
        unsupported()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
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
fn the_freeze_gets_what_each_thread_read_at_its_park_once() {
    let (mut set, c, _rx) = start(&[(u64::MAX, Then::Work); 2]);
    wait_all_above(&c, &[0, 0]);
    let mut seen = Vec::new();
    for _ in 0..3 {
        set.pause().unwrap();
        let frozen = snapshot(&c);
        let reads = set.take_park_reads();
        assert_eq!(reads.len(), 2);
        for (i, (r, runs)) in reads.iter().zip(&frozen).enumerate() {
            let reading = r.reading.expect("read at the park");
            // Read after the vCPU's last run, then the guest was told (one call each).
            assert_eq!(reading.offset, *runs, "read after the vCPU's last run");
            assert!(r.clock_paused, "KVMCLOCK_CTRL done at the park");
            seen.push((i, reading.tsc_adjust));
        }
        // Taken once: a second take (e.g. a freeze after a thaw wrote new offsets) reads again.
        assert_eq!(set.take_park_reads(), vec![ParkRead::default(); 2]);
        // Nobody called the vCPUs since the park: their call counters are where the thread
        // left them (the reading was call k, the notice call k + 1).
        let guards = set.lock_all();
        for (g, r) in guards.iter().zip(&reads) {
            let next = g.tsc_reading().unwrap().tsc_adjust;
            assert_eq!(next, r.reading.unwrap().tsc_adjust + 2);
        }
        drop(guards);
        set.resume();
        wait_all_above(&c, &frozen);
    }
    // Fresh readings at every park, never one kept from the park before.
    let mut uniq = seen.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), seen.len(), "a reading was reused: {seen:?}");
    set.stop();
}

#[test]
fn a_vcpu_that_halted_has_nothing_read_at_the_park() {
    let (mut set, c, _rx) = start(&[(u64::MAX, Then::Work), (3, Then::Halt)]);
    wait_all_above(&c, &[0, 3]);
    set.pause().unwrap();
    let reads = set.take_park_reads();
    assert!(reads[0].reading.is_some());
    // The halted vCPU parked without a pause: the freeze reads it itself.
    assert_eq!(reads[1], ParkRead::default());
    set.resume();
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
    let (mut set, c, rx) = start(&[(u64::MAX, Then::Work), (5, Then::Halt), (5, Then::Shutdown)]);
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
