//! End to end: boot the test guest on the real /dev/kvm with a tiny VMM
//! (this file), two vCPUs, the 16550 reduced to "THR + LSR", and the real
//! `devices::probe::TimeProbe`. The vCPU setup functions here are the
//! reference for the VMM's `arch` crate.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use devices::probe::{ProbeReport, TimeProbe};
use kvm_bindings::{kvm_cpuid_entry2, kvm_segment, kvm_userspace_memory_region, CpuId};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const VCPUS: u32 = 2;
const COM1: u16 = 0x3f8;
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_CPUID_TSC_KHZ: u32 = 0x4000_0010;

/// Flat 32-bit segment: code (`type_` 0xb) or data (`type_` 0x3).
fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts a vCPU in the PVH 32-bit entry state: flat protected mode, paging
/// off, interrupts off, EIP = `entry`, EBX = `start_info`.
fn setup_pvh_entry(vcpu: &VcpuFd, entry: u32, start_info: u32) -> Result<(), String> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs = flat_segment(0x08, 0xb);
    let data = flat_segment(0x10, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = u64::from(entry);
    regs.rflags = 2;
    regs.rbx = u64::from(start_info);
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))
}

/// The guest CPUID of vCPU `index`: the host's supported set with leaf 1's
/// initial APIC ID = `index`, and KVM leaf 0x40000010 EAX = `tsc_khz`.
fn guest_cpuid(supported: &CpuId, index: u32, tsc_khz: u32) -> Result<CpuId, String> {
    let mut cpuid = supported.clone();
    let mut has_khz_leaf = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => e.edx = index,
            KVM_CPUID_SIGNATURE => e.eax = e.eax.max(KVM_CPUID_TSC_KHZ),
            KVM_CPUID_TSC_KHZ => {
                e.eax = tsc_khz;
                has_khz_leaf = true;
            }
            _ => {}
        }
    }
    if !cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == KVM_CPUID_SIGNATURE)
    {
        return Err("KVM_GET_SUPPORTED_CPUID has no KVM signature leaf".into());
    }
    if !has_khz_leaf {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: KVM_CPUID_TSC_KHZ,
                eax: tsc_khz,
                ..Default::default()
            })
            .map_err(|e| format!("adding CPUID leaf 0x40000010: {e:?}"))?;
    }
    Ok(cpuid)
}

/// Guest memory from 0, registered as slot 0, with the guest's segments loaded.
fn guest_memory(vm: &VmFd, size: u64) -> Result<(GuestMemoryMmap, u32), String> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|e| format!("guest memory: {e}"))?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| format!("host address: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` maps `size` bytes owned by `mem`, which the caller keeps
    // alive for as long as the VM runs.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    for seg in guest::load_segments(guest::GUEST_ELF).map_err(|e| e.to_string())? {
        mem.write_slice(seg.data, GuestAddress(seg.paddr))
            .map_err(|e| format!("loading segment at {:#x}: {e}", seg.paddr))?;
    }
    let entry = guest::guest_pvh_entry().map_err(|e| e.to_string())?;
    Ok((mem, entry))
}

/// Runs one vCPU until it halts; any other stop is an error.
fn run_vcpu(
    mut vcpu: VcpuFd,
    probe: &TimeProbe,
    mem: &GuestMemoryMmap,
    serial: &Mutex<Vec<u8>>,
) -> Result<(), String> {
    loop {
        match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::IoOut(port, data) => {
                if port == COM1 {
                    serial
                        .lock()
                        .map_err(|e| e.to_string())?
                        .extend_from_slice(data);
                } else {
                    probe.pio_write(port, data, mem);
                }
            }
            VcpuExit::IoIn(port, data) => {
                if !probe.pio_read(port, data) {
                    let v = if port == COM1 + 5 { 0x60 } else { 0xff };
                    data.fill(v);
                }
            }
            VcpuExit::Hlt => return Ok(()),
            other => return Err(format!("unexpected exit {other:?}")),
        }
    }
}

fn wait_for(
    what: &str,
    deadline: Instant,
    probe: &TimeProbe,
    exits: &mpsc::Receiver<(u32, Result<(), String>)>,
    serial: &Mutex<Vec<u8>>,
    done: impl Fn(&ProbeReport, &str) -> bool,
) -> ProbeReport {
    loop {
        if let Ok((i, r)) = exits.try_recv() {
            panic!("vCPU {i} stopped early while waiting for {what}: {r:?}");
        }
        let report = probe.report();
        let text = String::from_utf8_lossy(&serial.lock().expect("serial")).into_owned();
        if done(&report, &text) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; report {report:#?}; serial:\n{text}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn guest_boots_on_kvm_and_reports_from_every_vcpu() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP guest_boots_on_kvm_and_reports_from_every_vcpu: /dev/kvm is absent");
        return;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let (mem, entry) = guest_memory(&vm, guest::min_ram_bytes(1)).expect("memory");
    let mem = Arc::new(mem);
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");

    let mut vcpus = Vec::new();
    let mut tsc_khz = 0;
    for i in 0..VCPUS {
        let vcpu = vm.create_vcpu(u64::from(i)).expect("KVM_CREATE_VCPU");
        tsc_khz = vcpu.get_tsc_khz().expect("KVM_GET_TSC_KHZ");
        let cpuid = guest_cpuid(&supported, i, tsc_khz).expect("cpuid");
        vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        setup_pvh_entry(&vcpu, entry, 0).expect("registers");
        vcpus.push(vcpu);
    }
    let probe = Arc::new(TimeProbe::new(VCPUS, 1, tsc_khz));
    let serial = Arc::new(Mutex::new(Vec::new()));
    let (tx, exits) = mpsc::channel();
    for (i, vcpu) in (0u32..).zip(vcpus) {
        let (probe, mem, serial, tx) = (probe.clone(), mem.clone(), serial.clone(), tx.clone());
        thread::spawn(move || {
            let r = run_vcpu(vcpu, &probe, &mem, &serial);
            let _ = tx.send((i, r));
        });
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    let first = wait_for(
        "samples from every vCPU",
        deadline,
        &probe,
        &exits,
        &serial,
        |r, _| r.totals.min_samples >= 1000 && r.vcpus.iter().all(|v| v.reports >= 3),
    );

    // Ask vCPU 1 to write TSC_ADJUST; a later report must show the value.
    const ADJUST: u64 = 0x1234_5678;
    probe.request_tsc_adjust(1, ADJUST).expect("vCPU 1");
    wait_for(
        "the TSC_ADJUST write",
        deadline,
        &probe,
        &exits,
        &serial,
        |r, _| r.vcpus[1].adjust_writes == 1 && r.vcpus[1].last_tsc_adjust == ADJUST,
    );

    let second = wait_for(
        "a heartbeat and more samples",
        deadline,
        &probe,
        &exits,
        &serial,
        |r, s| {
            s.contains("hourglass-guest: heartbeat 1 ")
                && r.vcpus
                    .iter()
                    .zip(&first.vcpus)
                    .all(|(b, a)| b.reports > a.reports + 2)
        },
    );
    for (a, b) in first.vcpus.iter().zip(&second.vcpus) {
        assert!(
            b.samples > a.samples,
            "vCPU {} samples did not increase",
            a.vcpu
        );
        assert!(
            b.last_tsc > a.last_tsc,
            "vCPU {} TSC did not increase",
            a.vcpu
        );
        assert!(
            b.last_kvmclock_ns > a.last_kvmclock_ns,
            "vCPU {} kvmclock did not increase",
            a.vcpu
        );
        assert_eq!(
            b.tsc_khz,
            u64::from(tsc_khz),
            "the guest took tsc_khz from CPUID"
        );
        assert!(b.flags & guest::FLAG_KVMCLOCK != 0, "kvmclock enabled");
        assert!(b.flags & guest::FLAG_KHZ_CPUID != 0, "tsc_khz from CPUID");
    }
    assert!(
        second.vcpus[0].dirty_passes >= 1,
        "vCPU 0 dirtied its 1 MiB"
    );

    // So far the guest saw no violation of any kind.
    assert_eq!(second.bad_doorbells, 0, "{:?}", second.last_error);
    assert_eq!(
        second.totals.violations(),
        0,
        "violations: {:#?}",
        second.totals
    );

    // The kvmclock check can fail: move kvmclock 1 s ahead of the TSC
    // (KVM_SET_CLOCK while running) and both vCPUs must see it, once.
    let mut clock = vm.get_clock().expect("KVM_GET_CLOCK");
    clock.clock += 1_000_000_000;
    clock.flags = 0;
    vm.set_clock(&clock).expect("KVM_SET_CLOCK");
    let third = wait_for(
        "the kvmclock jump",
        deadline,
        &probe,
        &exits,
        &serial,
        |r, _| r.vcpus.iter().all(|v| v.kvmclock_mismatch >= 1),
    );
    for v in &third.vcpus {
        assert!(
            (900_000_000..1_100_000_000).contains(&v.kvmclock_mismatch_worst_ns),
            "vCPU {} saw a kvmclock jump of {} ns, expected about 1 s",
            v.vcpu,
            v.kvmclock_mismatch_worst_ns
        );
    }

    // The TSC checks can fail: vCPU 1 pretends its TSC stepped back by 10^9
    // cycles. It must count one backwards step of about that size, and
    // cross-vCPU violations against what vCPU 0 published; vCPU 0 none.
    const SKEW: u64 = 1_000_000_000;
    probe.request_simulated_skew(1, SKEW).expect("vCPU 1");
    let fourth = wait_for(
        "the simulated skew",
        deadline,
        &probe,
        &exits,
        &serial,
        |r, _| r.vcpus[1].tsc_backwards >= 1 && r.vcpus[1].cross_vcpu >= 1,
    );
    let v1 = &fourth.vcpus[1];
    assert_eq!(v1.simulated_skew, SKEW);
    assert_eq!(v1.tsc_backwards, 1);
    assert!(
        (SKEW / 2..=SKEW).contains(&v1.tsc_backwards_worst),
        "backwards step {} for a skew of {SKEW}",
        v1.tsc_backwards_worst
    );
    assert!(
        (SKEW / 2..=SKEW * 2).contains(&v1.cross_vcpu_worst),
        "cross-vCPU violation {} for a skew of {SKEW}",
        v1.cross_vcpu_worst
    );
    assert_eq!(
        fourth.vcpus[0].tsc_backwards + fourth.vcpus[0].cross_vcpu,
        0
    );

    probe.request_stop();
    for _ in 0..VCPUS {
        let (i, r) = exits
            .recv_timeout(Duration::from_secs(10))
            .expect("every vCPU halts after the stop request");
        assert_eq!(r, Ok(()), "vCPU {i}");
    }
    let last = probe.report();
    let text = String::from_utf8_lossy(&serial.lock().expect("serial")).into_owned();
    eprintln!("serial:\n{text}\nfinal totals: {:#?}", last.totals);
    assert!(text.contains("hourglass-guest: banner vcpus=2 probe=yes dirty_mib=1"));
    assert!(last.totals.all_halted);
    assert_eq!(last.bad_doorbells, 0, "{:?}", last.last_error);
    // Only the simulated step: one backwards step, on vCPU 1.
    assert_eq!(last.totals.tsc_backwards, 1, "{:#?}", last.totals);
    assert_eq!(last.vcpus[0].cross_vcpu, 0, "{:#?}", last.totals);
    // One kvmclock jump, seen once per vCPU.
    assert_eq!(
        last.totals.kvmclock_mismatch,
        u64::from(VCPUS),
        "{:#?}",
        last.totals
    );
}
