//! Pause/resume latency of the built-in test guest on the real /dev/kvm, through the real API
//! server and client over a Unix socket.
//!
//! For 1, 4 and 16 vCPUs (override with `HOURGLASS_BENCH_VCPUS=1,2`) and 200 cycles (override
//! with `HOURGLASS_BENCH_CYCLES`), it measures:
//! - pause and resume as the client sees them: request sent to response received;
//! - inside the VMM (from `vm.info`'s `pause_stats`): pause request to every vCPU parked, the
//!   freeze, the thaw, and thaw done to every vCPU released;
//!
//! and prints p50/p99 in microseconds as a table. Run with `scripts/bench.sh`.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use vmm::api::client::api_request;
use vmm::api::start_api_server;
use vmm::config::{CpusConfig, MemoryConfig, VmConfig};
use vmm::Vmm;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[idx.min(v.len() - 1)]
}

#[derive(Default)]
struct Series {
    pause_rtt: Vec<f64>,
    resume_rtt: Vec<f64>,
    park: Vec<f64>,
    freeze: Vec<f64>,
    thaw: Vec<f64>,
    released: Vec<f64>,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn put(socket: &Path, path: &str) -> f64 {
    let t = Instant::now();
    let (code, body) = api_request(socket, "PUT", path, None).expect("API request");
    let d = t.elapsed().as_secs_f64() * 1e6;
    assert_eq!(code, 204, "{path}: {body}");
    d
}

fn stats(vmm: &Vmm) -> serde_json::Value {
    vmm.info()["pause_stats"].clone()
}

fn bench(vcpus: u32, cycles: usize, dir: &Path) -> Series {
    let hv = hypervisor::new().expect("open /dev/kvm");
    let (tx, _rx) = mpsc::channel();
    let config = VmConfig {
        cpus: CpusConfig {
            boot_vcpus: vcpus,
            max_vcpus: vcpus,
        },
        memory: MemoryConfig { size: 64 << 20 },
        serial: devices::SerialOutput::Off,
        ..VmConfig::default()
    };
    let vmm = Arc::new(Vmm::boot(hv, config, tx).expect("boot"));
    let socket: PathBuf = dir.join(format!("bench-{vcpus}.sock"));
    let server = start_api_server(&socket, vmm.clone()).expect("API server");
    // Wait until every vCPU has reported once (the guest is up).
    let t0 = Instant::now();
    loop {
        let info = vmm.info();
        if info["time_probe"]["totals"]["vcpus_reporting"].as_u64() == Some(u64::from(vcpus)) {
            break;
        }
        assert!(t0.elapsed().as_secs() < 30, "guest did not come up: {info}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut s = Series::default();
    for i in 0..cycles {
        s.pause_rtt.push(put(&socket, "vm.pause"));
        let st = stats(&vmm);
        // The previous resume's release is measured by the vCPU threads themselves, after the
        // response: read it once they have all parked again.
        if i > 0 {
            s.released
                .push(us(st["last_released_ns"].as_u64().unwrap_or(0)));
        }
        s.park.push(us(st["last_park_ns"].as_u64().unwrap_or(0)));
        s.freeze
            .push(us(st["last_freeze_ns"].as_u64().unwrap_or(0)));
        s.resume_rtt.push(put(&socket, "vm.resume"));
        let st = stats(&vmm);
        s.thaw.push(us(st["last_thaw_ns"].as_u64().unwrap_or(0)));
    }
    let info = vmm.info();
    let v = info["time_probe"]["totals"].clone();
    let viol = v["tsc_backwards"].as_u64().unwrap_or(0)
        + v["cross_vcpu"].as_u64().unwrap_or(0)
        + v["kvmclock_mismatch"].as_u64().unwrap_or(0);
    if viol != 0 {
        eprintln!("WARNING: {vcpus} vCPUs: the guest counted {viol} violations: {v}");
    }
    server.shutdown();
    vmm.shutdown_vm();
    s
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        println!("skipped: /dev/kvm is absent");
        return;
    }
    let vcpu_counts: Vec<u32> = std::env::var("HOURGLASS_BENCH_VCPUS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16]);
    let cycles: usize = std::env::var("HOURGLASS_BENCH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    vmm::signal::install_vcpu_kick_handler().expect("vCPU kick signal");
    let dir = std::env::temp_dir().join(format!("hourglass-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    println!(
        "pause/resume latency, {cycles} cycles, microseconds (host: {} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>6} | {:>21} | {:>21} | {:>21} | {:>21} | {:>21} | {:>21}",
        "vCPUs",
        "pause req->resp",
        "resume req->resp",
        "pause: all parked",
        "freeze",
        "thaw",
        "resume: all running"
    );
    println!(
        "{:>6} | {:>10} {:>10} | {:>10} {:>10} | {:>10} {:>10} | {:>10} {:>10} | {:>10} {:>10} | {:>10} {:>10}",
        "", "p50", "p99", "p50", "p99", "p50", "p99", "p50", "p99", "p50", "p99", "p50", "p99"
    );
    for n in vcpu_counts {
        let mut s = bench(n, cycles, &dir);
        let mut cols = Vec::new();
        for v in [
            &mut s.pause_rtt,
            &mut s.resume_rtt,
            &mut s.park,
            &mut s.freeze,
            &mut s.thaw,
            &mut s.released,
        ] {
            cols.push(format!(
                "{:>10.1} {:>10.1}",
                percentile(v, 50.0),
                percentile(v, 99.0)
            ));
        }
        println!("{n:>6} | {}", cols.join(" | "));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
