//! Proof of the two-host mechanism of `scripts/nested-kvm.sh --two-hosts`: host A's share reaches
//! host B, and the two hosts run on different TSC bases (B booted later).
//!
//! Role A records a sample (its TSC, CLOCK_REALTIME, its KVM's TSC kHz) in the share; role B reads
//! it and computes, for each host, the wall-clock instant at which that host's TSC was 0. Their
//! difference must match the boot gap that the script measured between starting A and B.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use kvm_ioctls::Kvm;

const PROBE_FILE: &str = "xhost-probe.json";
/// Allowed error of the TSC-base difference below the boot gap: each guest's wall clock comes from
/// the RTC at boot, which has 1 s granularity.
const TOLERANCE_MS: i64 = 1500;
/// Allowed error above the boot gap: the RTC's 1 s plus the time QEMU takes from being started to
/// resetting host B's vCPUs, which on a loaded 2-core CI machine has been seen at 1.6 s more than
/// on an idle one. Only later, never earlier: the script's gap is taken before QEMU is started.
const LATE_TOLERANCE_MS: i64 = 5000;

/// One host's (TSC, realtime) sample and its TSC rate.
struct Sample {
    tsc: u64,
    realtime_ns: u128,
    tsc_khz: u32,
}

impl Sample {
    fn take() -> Sample {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let tsc_khz = vcpu.get_tsc_khz().expect("KVM_GET_TSC_KHZ");
        // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
        let tsc = unsafe { core::arch::x86_64::_rdtsc() };
        let realtime_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("realtime after 1970")
            .as_nanos();
        Sample {
            tsc,
            realtime_ns,
            tsc_khz,
        }
    }

    /// The wall-clock instant (ms since the epoch) at which this host's TSC read 0.
    fn tsc_zero_ms(&self) -> i64 {
        let tsc_ms = u128::from(self.tsc) / u128::from(self.tsc_khz);
        (self.realtime_ns / 1_000_000) as i64 - tsc_ms as i64
    }

    fn to_json(&self) -> String {
        serde_json::json!({
            "tsc": self.tsc,
            "realtime_ns": self.realtime_ns.to_string(),
            "tsc_khz": self.tsc_khz,
        })
        .to_string()
    }

    fn from_json(text: &str) -> Sample {
        let v: serde_json::Value = serde_json::from_str(text).expect("probe file is JSON");
        Sample {
            tsc: v["tsc"].as_u64().expect("probe field tsc"),
            realtime_ns: v["realtime_ns"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("probe field realtime_ns"),
            tsc_khz: v["tsc_khz"]
                .as_u64()
                .and_then(|k| u32::try_from(k).ok())
                .expect("probe field tsc_khz"),
        }
    }
}

#[test]
fn nested_xhost_share_and_tsc_bases() {
    let role = std::env::var("HOURGLASS_NESTED_ROLE").unwrap_or_default();
    let share = std::env::var("HOURGLASS_NESTED_SHARE").map(PathBuf::from);
    let (role, share) = match (role.as_str(), share) {
        ("A" | "B", Ok(share)) => (role, share),
        _ => {
            if std::env::var("HOURGLASS_NESTED").is_ok_and(|v| v == "1") {
                panic!("HOURGLASS_NESTED=1 without a role and a share: run with --two-hosts");
            }
            println!("skipped: needs two nested hosts; run scripts/nested-kvm.sh --two-hosts");
            return;
        }
    };
    let path = share.join(PROBE_FILE);
    let here = Sample::take();
    println!(
        "role {role}: TSC {:#x} at realtime {} ns, {} kHz: TSC was 0 at {} ms",
        here.tsc,
        here.realtime_ns,
        here.tsc_khz,
        here.tsc_zero_ms()
    );
    if role == "A" {
        std::fs::write(&path, here.to_json()).expect("write the probe into the share");
        return;
    }
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} did not come from host A: {e}", path.display()));
    let a = Sample::from_json(&text);
    let gap_ms: i64 = std::env::var("HOURGLASS_NESTED_BOOT_GAP_MS")
        .expect("HOURGLASS_NESTED_BOOT_GAP_MS is set on host B")
        .parse()
        .expect("HOURGLASS_NESTED_BOOT_GAP_MS is an integer");
    let measured = here.tsc_zero_ms() - a.tsc_zero_ms();
    println!(
        "host A's TSC was 0 at {} ms, host B's at {} ms: B's base is {measured} ms later; \
         the script started B {gap_ms} ms after A",
        a.tsc_zero_ms(),
        here.tsc_zero_ms()
    );
    assert!(
        gap_ms > 2 * TOLERANCE_MS,
        "boot gap {gap_ms} ms too short to tell the bases apart"
    );
    assert!(
        measured > gap_ms - TOLERANCE_MS && measured < gap_ms + LATE_TOLERANCE_MS,
        "TSC bases differ by {measured} ms, expected the boot gap {gap_ms} ms \
         (-{TOLERANCE_MS}/+{LATE_TOLERANCE_MS})"
    );
}
