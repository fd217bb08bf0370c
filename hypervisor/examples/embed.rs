//! Embedding the hypervisor crate: create a VM with two vCPUs, freeze its time, thaw it under
//! the `frozen` policy, and print what the host really applied.
//!
//! `cargo run -p hourglass-hypervisor --example embed`

use hypervisor::cpu::Vcpu;
use hypervisor::tsc::{ClockPolicy, ThawOrigin};

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() && !std::path::Path::new("/dev/mshv").exists() {
        println!("skipped: neither /dev/kvm nor /dev/mshv exists on this host");
        return;
    }
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), hypervisor::HypervisorError> {
    let hv = hypervisor::new()?;
    let vm = hv.create_vm()?;
    let caps = vm.tsc_capabilities();
    println!(
        "backend {} ({}), TSC capabilities:\n{}",
        hv.name(),
        hv.vendor(),
        serde_json::to_string_pretty(&caps).unwrap_or_default()
    );
    let vcpus: Vec<Box<dyn Vcpu>> = (0..2)
        .map(|i| vm.create_vcpu(i))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&dyn Vcpu> = vcpus.iter().map(|v| v.as_ref()).collect();

    let capture = vm.freeze(&refs)?;
    println!(
        "frozen: VM TSC {} at kvmclock {} ns (skew {} cycles)",
        capture.snapshot.vm_tsc(),
        capture.snapshot.kvmclock_ns(),
        capture.skew_cycles
    );
    match vm.thaw(
        &refs,
        &capture.snapshot,
        ThawOrigin::OwnFreeze,
        ClockPolicy::Frozen,
    ) {
        Ok(report) => println!(
            "thawed:\n{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        Err(e) => println!("thaw refused: {e}"),
    }
    Ok(())
}
