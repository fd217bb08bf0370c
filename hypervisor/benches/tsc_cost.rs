//! Capture (freeze) and thaw cost per vCPU on the real device, for 1, 8 and 64 vCPUs.
//!
//! `cargo bench -p hourglass-hypervisor --bench tsc_cost` prints p50/p99 over 200 iterations.

use std::time::Instant;

use hypervisor::cpu::Vcpu;
use hypervisor::kvm::KvmHypervisor;
use hypervisor::tsc::{ClockPolicy, ThawOrigin};
use hypervisor::vm::{TscState, Vm};

const ITERATIONS: usize = 200;

fn percentile(sorted: &[u64], p: usize) -> u64 {
    sorted[(sorted.len() - 1) * p / 100]
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("skipped: /dev/kvm is absent on this host");
        return;
    }
    let hv = KvmHypervisor::new().expect("open /dev/kvm");
    let caps = hv.tsc_capabilities().clone();
    println!(
        "host: {} TSC {} kHz, offsets honoured {:?}, KVM_VCPU_TSC_OFFSET {}",
        caps.vendor, caps.host_tsc_khz, caps.offsets_honoured, caps.tsc_offset_attr
    );
    println!(
        "{:>6} | {:>12} {:>12} {:>12} | {:>12} {:>12} {:>12} | applied",
        "vCPUs", "freeze p50", "freeze p99", "p50/vCPU", "thaw p50", "thaw p99", "p50/vCPU"
    );
    // Guest: `out %al,$0x10; jmp .-2` at 0x1000, so vCPU 0 runs once (KVM's master clock then
    // gives REALTIME|HOST_TSC samples, as in a real VM).
    let code = [0xe6u8, 0x10, 0xeb, 0xfc];
    for n in [1u32, 8, 64] {
        let vm = hv.create_kvm_vm().expect("VM");
        // SAFETY: anonymous mapping, checked, unmapped below after the VM and vCPUs are gone.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                0x2000,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        // SAFETY: 0x1000 + 4 bytes lie inside the 0x2000-byte mapping.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>().add(0x1000), 4) };
        // SAFETY: the mapping outlives the VM (unmapped after `vm` is dropped).
        unsafe { vm.set_user_memory_region(0, 0, 0x2000, mem as u64, false) }.expect("memory");
        let mut vcpus: Vec<_> = (0..n)
            .map(|i| vm.create_kvm_vcpu(i).expect("vCPU"))
            .collect();
        {
            let v = &mut vcpus[0];
            let mut s = v.sregs().unwrap();
            s.cs.base = 0;
            s.cs.selector = 0;
            v.set_sregs(&s).unwrap();
            let mut r = v.regs().unwrap();
            r.rip = 0x1000;
            r.rflags = 2;
            v.set_regs(&r).unwrap();
            v.run().expect("run vCPU 0 once");
        }
        let refs: Vec<&dyn Vcpu> = vcpus.iter().map(|v| v as &dyn Vcpu).collect();
        let mut freeze = Vec::with_capacity(ITERATIONS);
        let mut thaw = Vec::with_capacity(ITERATIONS);
        let mut applied = None;
        for _ in 0..ITERATIONS {
            let t = Instant::now();
            let cap = vm.freeze(&refs).expect("freeze");
            freeze.push(t.elapsed().as_nanos() as u64);
            let t = Instant::now();
            let r = vm
                .thaw(
                    &refs,
                    &cap.snapshot,
                    ThawOrigin::OwnFreeze,
                    ClockPolicy::Wallclock,
                )
                .expect("thaw");
            thaw.push(t.elapsed().as_nanos() as u64);
            applied = Some(r.policy_applied);
        }
        freeze.sort_unstable();
        thaw.sort_unstable();
        let us = |ns: u64| format!("{:.1} us", ns as f64 / 1000.0);
        println!(
            "{:>6} | {:>12} {:>12} {:>12} | {:>12} {:>12} {:>12} | {:?}",
            n,
            us(percentile(&freeze, 50)),
            us(percentile(&freeze, 99)),
            us(percentile(&freeze, 50) / u64::from(n)),
            us(percentile(&thaw, 50)),
            us(percentile(&thaw, 99)),
            us(percentile(&thaw, 50) / u64::from(n)),
            applied.unwrap()
        );
        drop(refs);
        drop(vcpus);
        drop(vm);
        // SAFETY: the mapping made above; the VM using it is gone.
        unsafe { libc::munmap(mem, 0x2000) };
    }
}
