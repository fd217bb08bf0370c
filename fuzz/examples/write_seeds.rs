//! Writes the seed corpora from the project's own code: a TscSnapshot as `capture` produces it
//! (for `tsc_snapshot`, behind the 48 bytes that pick the thaw host) and the option strings the
//! VMM's own help documents (for `cli_options`).
//!
//!     cd fuzz && cargo run --example write_seeds

use std::fs;
use std::path::Path;

use hypervisor::tsc::{capture, tsc_ratio, HostSample, HostTsc, VcpuTscReading, Vendor};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("create seed dir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (i, vendor) in [Vendor::Amd, Vendor::Intel].into_iter().enumerate() {
        let khz = 2_445_404;
        let host = HostTsc {
            vendor,
            host_khz: khz,
            ratio: tsc_ratio(vendor, khz, khz).expect("ratio").ratio,
        };
        let sample = HostSample {
            kvmclock_ns: 5_000_000_000,
            realtime_ns: 1_764_000_000_000_000_000,
            host_tsc: 123_456_789_000,
            bracket_ns: 0,
        };
        let vcpus = [
            VcpuTscReading { offset: 1 << 40, tsc_adjust: 0 },
            VcpuTscReading { offset: (1 << 40) + 7, tsc_adjust: 7 },
        ];
        let snap = capture(&sample, &host, khz, &vcpus, true, i == 0)
            .expect("capture")
            .snapshot;
        let mut seed = vec![0u8; 48];
        seed[0] = i as u8;
        seed.extend_from_slice(snap.to_json().as_bytes());
        write(&root.join("tsc_snapshot"), &format!("capture-{vendor}"), &seed);
    }
    let options = [
        "boot=4",
        "size=512M",
        "size=4G",
        "file=/tmp/serial.log",
        "tty",
        "off",
        "path=/tmp/hourglass.sock",
        "wallclock",
        "frozen",
        "source_url=file:///tmp/snap,resume=true,clock_policy=frozen",
        "destination_url=unix:/tmp/mig.sock,downtime_ms=300",
    ];
    for (i, o) in options.iter().enumerate() {
        write(&root.join("cli_options"), &format!("opt-{i}"), o.as_bytes());
    }
    println!("seeds written under {}", root.display());
}
