//! What the two-host nested tests (`nested_xhost_*`) share: the guest's per-vCPU samples from
//! vm.info, host-TSC reads, and an `hourglass` that waits for a VM (restore or migration).

#![allow(dead_code)]

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::vmm_support::*;

/// Emulated hosts are slow: stretch every wait this much.
pub const SLOW: u32 = 8;
/// Slack on host-TSC brackets, µs: QEMU computes the TSC per emulated CPU, so two of them read
/// the real host's TSC at slightly different moments (as in nested_vmm).
pub const BRACKET_SLACK_US: u64 = 100;

/// This host's TSC, read now.
pub fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Signed difference `a - b` of two values that live modulo 2^64.
pub fn sdiff(a: u64, b: u64) -> i64 {
    a.wrapping_sub(b) as i64
}

/// One vCPU's latest report.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// The guest's report sequence number.
    pub seq: u64,
    pub tsc: u64,
    pub tsc_adjust: u64,
}

/// Every vCPU's latest report in `info`.
pub fn vcpus(info: &Value) -> Vec<Sample> {
    info["time_probe"]["vcpus"]
        .as_array()
        .unwrap_or_else(|| panic!("time_probe.vcpus missing in {info}"))
        .iter()
        .map(|v| {
            let f = |k: &str| {
                v[k].as_u64()
                    .unwrap_or_else(|| panic!("{k} missing in {v}"))
            };
            Sample {
                seq: f("seq"),
                tsc: f("last_tsc"),
                tsc_adjust: f("last_tsc_adjust"),
            }
        })
        .collect()
}

/// Wait until every vCPU has reported twice since `before`: the first report after a resume
/// may carry a sample taken before the pause; the second's was taken after it.
pub fn wait_progress(h: &mut Hourglass, before: &[Sample], what: &str) {
    let before: Vec<u64> = before.iter().map(|s| s.seq).collect();
    h.wait_until(what, Duration::from_secs(10) * SLOW, move |h| {
        let now = vcpus(&h.info());
        now.len() == before.len() && now.iter().zip(&before).all(|(a, b)| a.seq >= b + 2)
    });
}

/// The guest's own violation counters are 0.
pub fn assert_clean(info: &Value, when: &str) {
    for f in ["tsc_backwards", "cross_vcpu", "kvmclock_mismatch"] {
        assert_eq!(totals(info, f), 0, "{f} {when}: {}", info["time_probe"]);
    }
}

/// The VM offset `vm.info` reports.
pub fn vm_offset(info: &Value) -> u64 {
    info["clock"]["vm_offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no vm_offset: {}", info["clock"]))
}

/// An `hourglass` with only an API socket (waits for vm.restore or a migration), from the
/// prebuilt binary.
pub fn serve(tag: &str) -> Hourglass {
    let mut h = Hourglass::spawn_cmd(Command::new(prebuilt_or_built("hourglass")), tag);
    h.wait_serving(Duration::from_secs(20) * SLOW);
    h
}
