//! TscSnapshot: decode and validate state.json's clock part, then plan a thaw on an arbitrary
//! host. Nothing may panic or overflow; a snapshot that decodes must survive a round trip.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use hypervisor::tsc::{
    plan_for_actual_tsc, plan_thaw, tsc_ratio, ClockPolicy, HostSample, HostTsc, TscSnapshot,
    Vendor,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Host {
    intel: bool,
    host_khz: u32,
    kvmclock_ns: u64,
    realtime_ns: u64,
    host_tsc: u64,
    bracket_ns: u64,
    frozen: bool,
    actual_vm_tsc: u64,
}

fuzz_target!(|data: &[u8]| {
    // The first bytes pick the thaw host, the rest is the document.
    let split = data.len().min(48);
    let (head, body) = data.split_at(split);
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    let Ok(snap) = TscSnapshot::from_json(text) else {
        return;
    };
    let again = TscSnapshot::from_json(&snap.to_json()).expect("a decoded snapshot re-decodes");
    assert_eq!(again.to_json(), snap.to_json());
    let _ = snap.check_vcpus(snap.tsc_adjust().len());

    let Ok(h) = Host::arbitrary(&mut Unstructured::new(head)) else {
        return;
    };
    let vendor = if h.intel { Vendor::Intel } else { Vendor::Amd };
    let now = HostSample {
        kvmclock_ns: h.kvmclock_ns,
        realtime_ns: h.realtime_ns,
        host_tsc: h.host_tsc,
        bracket_ns: h.bracket_ns,
    };
    if let Ok(choice) = tsc_ratio(vendor, h.host_khz, snap.tsc_khz()) {
        let host = HostTsc {
            vendor,
            host_khz: h.host_khz,
            ratio: choice.ratio,
        };
        let policy = if h.frozen {
            ClockPolicy::Frozen
        } else {
            ClockPolicy::Wallclock
        };
        if let Ok(plan) = plan_thaw(&snap, &now, &host, policy) {
            assert_eq!(plan.vcpu_offsets.len(), snap.tsc_adjust().len());
        }
    }
    let _ = plan_for_actual_tsc(&snap, &now, h.actual_vm_tsc);
});
