//! What the two-host nested tests (`nested_xhost_*`) share: the guest's per-vCPU samples from
//! vm.info, host-TSC reads, and an `hourglass` that waits for a VM (restore or migration).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::vmm_support::*;

/// Host B's control service port (the `nested_xhost_live_*` tests, one at a time).
pub const SERVICE: u16 = 7000;

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

/// This host's realtime, ns since the epoch.
pub fn realtime_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("realtime after 1970")
        .as_nanos() as i128
}

/// Whether /proc/net/tcp has a socket on local `port` in `state` (0A listen, 01 established).
pub fn tcp_state(port: u16, state: &str) -> bool {
    // The receiver listens on `[::]` (IPv6, the link's addresses being link-local ones).
    let want = format!(":{port:04X}");
    ["/proc/net/tcp6", "/proc/net/tcp"].iter().any(|table| {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        text.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == state
        })
    })
}

/// One command to B's service. The first waits up to 10 minutes for B to boot; later ones give
/// up after 60 s (B's side of the test has failed).
pub fn ask(peer: &str, cmd: &str) -> String {
    ask_with(peer, cmd, |_| {})
}

/// [`ask`], with `payload` writing more after the command's line (a file, say).
pub fn ask_with(peer: &str, cmd: &str, payload: impl FnOnce(&mut TcpStream)) -> String {
    static CONTACT: AtomicBool = AtomicBool::new(false);
    let wait = if CONTACT.load(Ordering::SeqCst) {
        60
    } else {
        600
    };
    // `peer` is `fe80::...%eth0`: link-local, with its interface.
    let addr = vmm::migration::transport::resolve(peer, SERVICE).expect("B's address")[0];
    let deadline = Instant::now() + Duration::from_secs(wait);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                CONTACT.store(true, Ordering::SeqCst);
                s.write_all(format!("{cmd}\n").as_bytes()).expect("send");
                payload(&mut s);
                let mut out = String::new();
                s.read_to_string(&mut out).expect("read the reply");
                return out;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("host B's service at {addr} did not answer {cmd:?}: {e}"),
        }
    }
}

/// B's realtime minus A's, ns, and its uncertainty (half the best round trip).
pub fn clock_disagreement(peer: &str) -> (i128, i128) {
    (0..7)
        .map(|_| {
            let t1 = realtime_ns();
            let tb: i128 = ask(peer, "time").trim().parse().expect("B's time");
            let t2 = realtime_ns();
            (tb - (t1 + t2) / 2, (t2 - t1) / 2)
        })
        .min_by_key(|&(_, unc)| unc)
        .expect("samples")
}
