//! A VMM that owns its kvm-ioctls descriptors adopts the time logic with two calls: build a VM
//! with plain kvm-ioctls (VM, irqchip, two vCPUs; nothing runs), freeze its time with
//! `hypervisor::kvm::tsc::freeze`, thaw it with `hypervisor::kvm::tsc::thaw`, print the report.
//!
//! `cargo run -p hourglass-hypervisor --example borrowed_fds`
//!
//! On a host that ignores TSC offsets the report says `host_tsc`; a thaw that would move the
//! guest TSC backwards is refused. Both are printed, and both exit 0.

use hypervisor::tsc::{ClockPolicy, ThawOrigin};
use kvm_ioctls::{Kvm, VcpuFd};

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("skipped: /dev/kvm is absent on this host, nothing to freeze");
        return;
    }
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // What the embedding VMM already has.
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    vm.create_irq_chip()?;
    let vcpus = [vm.create_vcpu(0)?, vm.create_vcpu(1)?];
    let refs: Vec<&VcpuFd> = vcpus.iter().collect();

    // The two calls.
    let capture = hypervisor::kvm::tsc::freeze(&vm, &refs)?;
    let snap = &capture.snapshot;
    println!(
        "frozen: VM TSC {} at kvmclock {} ns, guest {} kHz, TSC_ADJUST {:?}, skew {} cycles",
        snap.vm_tsc(),
        snap.kvmclock_ns(),
        snap.tsc_khz(),
        snap.tsc_adjust(),
        capture.skew_cycles
    );
    match hypervisor::kvm::tsc::thaw(&vm, &refs, snap, ThawOrigin::OwnFreeze, ClockPolicy::Frozen) {
        Ok(report) => println!(
            "thawed (now write TSC_DEADLINE, if the VMM saved one):\n{}",
            serde_json::to_string_pretty(&report)?
        ),
        Err(e) => println!("thaw refused, nothing changed: {e}"),
    }
    Ok(())
}
