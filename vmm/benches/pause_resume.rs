//! Pause/resume latency of the built-in test guest on the real /dev/kvm, through the real API
//! server and client over a Unix socket.
//!
//! For 1, 4 and 16 vCPUs (override with `HOURGLASS_BENCH_VCPUS=1,2`), 200 cycles (override
//! with `HOURGLASS_BENCH_CYCLES`) and three guests (override with `HOURGLASS_BENCH_GUEST=idle`):
//! `busy`, the test guest's default sampling loop that keeps every vCPU thread runnable;
//! `idle`, the same guest in idle mode, each vCPU halting 10 ms between samples like an idle
//! OS on a 100 Hz tick (still busier than an idle tickless Linux, the "idle small guest" other
//! VMMs are compared on); and `idle:1000`, halting 1 ms (a 1 kHz tick: on a nested kvm_pvm host
//! a halted vCPU's wake-up costs about 100 µs of host CPU, so 16 such vCPUs keep a 2-core host
//! busy, which is not idle). `idle:N` halts N µs.
//! It measures:
//! - pause and resume as the client sees them: request sent to response received;
//! - the part of those outside `Vm::pause`/`Vm::resume` (API client, server, routing, locks,
//!   scheduling of the API threads): round trip minus the VMM's own whole pause/resume;
//! - inside the VMM (from `vm.info`'s `pause_stats`): pause request to every vCPU parked, the
//!   freeze, the thaw, the release (opening the park: the resume answers after it), and the park
//!   opened to every vCPU thread out of it;
//!
//! and prints p50/p99 in microseconds as a table. Run with `scripts/bench.sh pause`.
//!
//! The client is this program's main thread, with the scheduler's default time slice like
//! any `ch-remote`; `HOURGLASS_BENCH_CLIENT_SLICE=1` gives it the short slice the VMM's own API
//! threads ask for, to separate the client's wake-up latency on a busy host from the VMM's.

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
    pause_api: Vec<f64>,
    resume_api: Vec<f64>,
    park: Vec<f64>,
    freeze: Vec<f64>,
    thaw: Vec<f64>,
    unpark: Vec<f64>,
    released: Vec<f64>,
    /// Cycles whose vCPU threads had not all left the park when the next pause came.
    not_released: usize,
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

fn bench(vcpus: u32, idle_us: u32, cycles: usize, dir: &Path) -> Series {
    let hv = hypervisor::new().expect("open /dev/kvm");
    let (tx, _rx) = mpsc::channel::<vmm::VmmEvent>();
    let config = VmConfig {
        cpus: CpusConfig {
            boot_vcpus: vcpus,
            max_vcpus: vcpus,
        },
        memory: MemoryConfig { size: 64 << 20 },
        serial: devices::SerialOutput::Off,
        guest_idle_us: idle_us,
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
        let rtt = put(&socket, "vm.pause");
        s.pause_rtt.push(rtt);
        let st = stats(&vmm);
        s.pause_api
            .push(rtt - us(st["last_pause_ns"].as_u64().unwrap_or(0)));
        // The previous resume's release is measured by the vCPU threads themselves, after the
        // response: read it once they have all parked again.
        if i > 0 {
            match st["last_released_ns"].as_u64().unwrap_or(0) {
                0 => s.not_released += 1,
                ns => s.released.push(us(ns)),
            }
        }
        s.park.push(us(st["last_park_ns"].as_u64().unwrap_or(0)));
        s.freeze
            .push(us(st["last_freeze_ns"].as_u64().unwrap_or(0)));
        let rtt = put(&socket, "vm.resume");
        s.resume_rtt.push(rtt);
        let st = stats(&vmm);
        s.resume_api
            .push(rtt - us(st["last_resume_ns"].as_u64().unwrap_or(0)));
        s.thaw.push(us(st["last_thaw_ns"].as_u64().unwrap_or(0)));
        s.unpark
            .push(us(st["last_unpark_ns"].as_u64().unwrap_or(0)));
    }
    let info = vmm.info();
    let v = info["time_probe"]["totals"].clone();
    let viol = v["tsc_backwards"].as_u64().unwrap_or(0)
        + v["cross_vcpu"].as_u64().unwrap_or(0)
        + v["kvmclock_mismatch"].as_u64().unwrap_or(0);
    if viol != 0 {
        eprintln!(
            "WARNING: {vcpus} vCPUs, idle {idle_us} us: the guest counted {viol} violations: {v}"
        );
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
    let guests: Vec<(String, u32)> = std::env::var("HOURGLASS_BENCH_GUEST")
        .unwrap_or_else(|_| "busy,idle,idle:1000".into())
        .split(',')
        .filter_map(|g| {
            let g = g.trim();
            let idle_us = match g {
                "busy" => Some(0),
                "idle" => Some(10_000),
                _ => g.strip_prefix("idle:").and_then(|n| n.parse().ok()),
            };
            if idle_us.is_none() {
                eprintln!("HOURGLASS_BENCH_GUEST: unknown guest {g:?} (busy, idle, idle:N)");
            }
            idle_us.map(|us| (g.to_string(), us))
        })
        .collect();
    vmm::signal::install_vcpu_kick_handler().expect("vCPU kick signal");
    let short_client = std::env::var("HOURGLASS_BENCH_CLIENT_SLICE").is_ok_and(|v| v == "1");
    if short_client {
        vmm::vcpu::request_short_slice(vmm::vcpu::CONTROL_SLICE).expect("client time slice");
    }
    let dir = std::env::temp_dir().join(format!("hourglass-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    println!(
        "pause/resume latency, {cycles} cycles, microseconds (host: {} CPUs; client slice: {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if short_client { "short" } else { "default" }
    );
    let names = [
        "pause req->resp",
        "resume req->resp",
        "pause: outside Vm",
        "resume: outside Vm",
        "pause: all parked",
        "freeze",
        "thaw",
        "resume: release",
        "resume: all running",
    ];
    let mut head = format!("{:>10} {:>5}", "guest", "vCPUs");
    let mut sub = format!("{:>10} {:>5}", "", "");
    for n in names {
        head.push_str(&format!(" | {n:>17}"));
        sub.push_str(&format!(" | {:>8} {:>8}", "p50", "p99"));
    }
    println!("{head}\n{sub}");
    for (guest, idle_us) in &guests {
        for &n in &vcpu_counts {
            let mut s = bench(n, *idle_us, cycles, &dir);
            let mut row = format!("{guest:>10} {n:>5}");
            for v in [
                &mut s.pause_rtt,
                &mut s.resume_rtt,
                &mut s.pause_api,
                &mut s.resume_api,
                &mut s.park,
                &mut s.freeze,
                &mut s.thaw,
                &mut s.unpark,
                &mut s.released,
            ] {
                row.push_str(&format!(
                    " | {:>8.1} {:>8.1}",
                    percentile(v, 50.0),
                    percentile(v, 99.0)
                ));
            }
            if s.not_released > 0 {
                row.push_str(&format!(
                    "  ({} of {} resumes: the next pause came before every vCPU thread ran)",
                    s.not_released,
                    cycles.saturating_sub(1)
                ));
            }
            println!("{row}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
