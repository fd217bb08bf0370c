//! API server throughput and latency under concurrent clients, on the real /dev/kvm: the real
//! `hourglass` binary (built by cargo for this bench) boots the test guest with 2 vCPUs, and
//! `clients` threads send `requests` requests (`vm.info` and `vmm.ping` alternating), one per
//! connection, over its API socket. Prints a table: clients, requests, req/s, p50 and p99
//! latency (connect to last byte), failures; and warns if the guest counted a time violation.
//!
//! `HOURGLASS_BENCH_API_CLIENTS` (default `1,8,32,64`) and `HOURGLASS_BENCH_API_REQUESTS`
//! (default 10000) override the defaults; `HOURGLASS_BENCH_API_SECCOMP=true|false|log` passes
//! `--seccomp` to `hourglass` (default: its own default). Run with `scripts/bench.sh api`.
//!
//! The load client is the one the `vmm_api_robust` integration test uses
//! (`tests/tests/vmm_support/load.rs`), included here by path.

#[path = "../../tests/tests/vmm_support/load.rs"]
mod load;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A `hourglass` process serving `socket`; SIGTERM-ed and reaped on drop.
struct Vmm {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Vmm {
    fn start(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("hg-bench-api-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let socket = dir.join("api.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hourglass"));
        if let Ok(mode) = std::env::var("HOURGLASS_BENCH_API_SECCOMP") {
            cmd.arg("--seccomp").arg(mode);
        }
        let log = dir.join("stderr.log");
        let child = cmd
            .args([
                "--cpus", "boot=2", "--memory", "size=64M", "--serial", "off",
            ])
            .arg("--api-socket")
            .arg(format!("path={}", socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?,
            ))
            .spawn()
            .context("spawn hourglass")?;
        let mut vmm = Vmm { child, dir, socket };
        let t0 = Instant::now();
        loop {
            if let Some(info) = vmm.info() {
                if info["time_probe"]["totals"]["vcpus_reporting"].as_u64() == Some(2) {
                    return Ok(vmm);
                }
            }
            if let Some(st) = vmm.child.try_wait()? {
                bail!(
                    "hourglass exited ({st}) before its guest came up:\n{}",
                    vmm.stderr()
                );
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the guest did not come up within 30 s:\n{}", vmm.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn info(&self) -> Option<serde_json::Value> {
        match vmm::api::client::api_request(&self.socket, "GET", "vm.info", None) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// What `hourglass` logged (warnings and errors).
    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn list(var: &str, default: &str) -> Result<Vec<usize>> {
    let text = std::env::var(var).unwrap_or_else(|_| default.to_string());
    text.split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("{var}: `{s}` is not a positive number"))
        })
        .collect()
}

fn main() -> Result<()> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        println!("skipped: /dev/kvm cannot be opened ({e})");
        return Ok(());
    }
    let clients = list("HOURGLASS_BENCH_API_CLIENTS", "1,8,32,64")?;
    let requests = list("HOURGLASS_BENCH_API_REQUESTS", "10000")?;
    let Some(&requests) = requests.first() else {
        bail!("HOURGLASS_BENCH_API_REQUESTS is empty");
    };
    println!(
        "API load: 2-vCPU test guest, vm.info and vmm.ping alternating, one request per connection"
    );
    println!("{}", load::LoadReport::header());
    for &n in &clients {
        let vmm = Vmm::start(&n.to_string())?;
        let report = load::run_load(vmm.socket(), n, requests);
        println!("{}", report.row());
        if !report.failure_samples.is_empty() {
            eprintln!("  failures, e.g.: {:?}", report.failure_samples);
            eprintln!("  hourglass said:\n{}", vmm.stderr());
        }
        let Some(info) = vmm.info() else {
            bail!("{n} clients: no vm.info after the load:\n{}", vmm.stderr());
        };
        let t = &info["time_probe"]["totals"];
        let violations: u64 = ["tsc_backwards", "cross_vcpu", "kvmclock_mismatch"]
            .iter()
            .map(|f| t[f].as_u64().unwrap_or(0))
            .sum();
        if violations != 0 {
            eprintln!("WARNING: {n} clients: the guest counted {violations} violations: {t}");
        }
    }
    Ok(())
}
