//! Shared helpers for the `vmm_*` integration tests: locate and build the real binaries, start
//! `hourglass` on a temporary API socket, poll its API with deadlines.

#![allow(dead_code)]

pub mod console;
pub mod load;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Tests that boot VMs run one at a time (the machine has few cores; timing checks need them).
static SERIAL: Mutex<()> = Mutex::new(());

/// Take the lock that keeps VM-booting tests from running at once.
pub fn exclusive() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why the test cannot run here, if it cannot.
pub fn skip_reason() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened ({e})")),
    }
}

/// Print the skip reason and return true when /dev/kvm is unusable.
pub fn skip(test: &str) -> bool {
    match skip_reason() {
        Some(r) => {
            println!("SKIPPED {test}: {r}");
            true
        }
        None => false,
    }
}

/// The target directory holding the test executable's sibling binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

static BUILD: Once = Once::new();

/// Path of a binary of the `vmm` package, built (once per test process) if needed.
pub fn binary(name: &str) -> PathBuf {
    BUILD.call_once(|| {
        let dir = bin_dir();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "vmm", "--bins"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if release {
            cmd.arg("--release");
        }
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let status = cmd.status().expect("run cargo build for the vmm binaries");
        assert!(status.success(), "cargo build -p vmm --bins failed");
    });
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// A fresh temporary directory for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("hg-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// A running `hourglass`, killed on drop.
pub struct Hourglass {
    pub child: Child,
    pub socket: PathBuf,
    pub serial: PathBuf,
    pub dir: PathBuf,
}

impl Hourglass {
    /// Start `hourglass` with `cpus` vCPUs and extra arguments; waits until the API answers
    /// vm.info (the VM is booted).
    pub fn start(tag: &str, cpus: u32, extra: &[&str]) -> Self {
        Self::start_exe(
            &binary("hourglass"),
            tag,
            cpus,
            extra,
            Duration::from_secs(20),
        )
    }

    /// The VMM's stderr so far (for failure messages).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// Poll `cond` every 10 ms until it holds or `timeout` passes (then panic with `what`).
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Self) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "hourglass exited ({st}) while waiting for {what}:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One API request.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        vmm::api::client::api_request(&self.socket, method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.stderr()))
    }

    /// vm.snapshot into `dest` (the VM must be paused) and its `state.json`, parsed; the error
    /// says what failed.
    pub fn snapshot_state(&self, dest: &Path) -> Result<Value, String> {
        let body = format!(r#"{{"destination_url":"file://{}"}}"#, dest.display());
        let (code, answer) = self.api("PUT", "vm.snapshot", Some(&body));
        if code != 204 {
            return Err(format!("vm.snapshot answered {code}: {answer}"));
        }
        let bytes =
            std::fs::read(dest.join("state.json")).map_err(|e| format!("state.json: {e}"))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("state.json is not JSON: {e}"))
    }

    /// vm.info, or None while the API is not up.
    pub fn try_info(&self) -> Option<Value> {
        match vmm::api::client::api_request(&self.socket, "GET", "vm.info", None) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// vm.info (must succeed).
    pub fn info(&self) -> Value {
        let (code, body) = self.api("GET", "vm.info", None);
        assert_eq!(code, 200, "vm.info: {body}");
        serde_json::from_str(&body).expect("vm.info is JSON")
    }

    /// Run our `ch-remote` against this VMM.
    pub fn ch_remote(&self, args: &[&str]) -> Output {
        Command::new(binary("ch-remote"))
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run ch-remote")
    }

    /// The serial output so far.
    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Wait for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "hourglass did not exit within {timeout:?}:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Hourglass {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `time_probe.totals.<field>` of a vm.info.
pub fn totals(info: &Value, field: &str) -> u64 {
    info["time_probe"]["totals"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("time_probe.totals.{field} missing in {info}"))
}

/// Per-vCPU sample counters.
pub fn vcpu_samples(info: &Value) -> Vec<u64> {
    info["time_probe"]["vcpus"]
        .as_array()
        .expect("time_probe.vcpus")
        .iter()
        .map(|v| v["samples"].as_u64().unwrap_or(0))
        .collect()
}

/// Whether this test runs inside the nested kvm_amd host of `scripts/nested-kvm.sh`
/// (`HOURGLASS_NESTED=1`), where there is no cargo and the binaries are already built.
pub fn in_nested_host() -> bool {
    std::env::var("HOURGLASS_NESTED").is_ok_and(|v| v == "1")
}

/// Path of a binary of the `vmm` package: inside the nested host the one `scripts/nested-kvm.sh`
/// built and packed beside the test executable (there is no cargo there to build it); elsewhere
/// [`binary`], which builds it if needed.
pub fn prebuilt_or_built(name: &str) -> PathBuf {
    if in_nested_host() {
        let p = bin_dir().join(name);
        assert!(
            p.exists(),
            "{} is missing from the nested host (scripts/nested-kvm.sh packs every `bins` binary)",
            p.display()
        );
        p
    } else {
        binary(name)
    }
}

impl Hourglass {
    /// Like [`Hourglass::start`], but with the `hourglass` binary at `exe` and `boot_timeout` for
    /// the API to answer vm.info (an emulated host boots more slowly).
    pub fn start_exe(
        exe: &Path,
        tag: &str,
        cpus: u32,
        extra: &[&str],
        boot_timeout: Duration,
    ) -> Self {
        let mut cmd = Command::new(exe);
        cmd.arg("--cpus").arg(format!("boot={cpus}"));
        // 64 MiB unless the test asks for its own size.
        if !extra.contains(&"--memory") {
            cmd.arg("--memory").arg("size=64M");
        }
        cmd.args(extra);
        let mut h = Self::spawn_cmd(cmd, tag);
        h.wait_until("the API answers vm.info", boot_timeout, |h| {
            h.try_info().is_some()
        });
        h
    }

    /// Spawn `cmd` (an `hourglass` with its own arguments) with an API socket, a serial file and
    /// `-v` in a fresh temporary directory named after `tag`; waits for nothing.
    pub fn spawn_cmd(mut cmd: Command, tag: &str) -> Self {
        let dir = temp_dir(tag);
        let socket = dir.join("api.sock");
        let serial = dir.join("serial.log");
        let child = cmd
            .arg("--api-socket")
            .arg(format!("path={}", socket.display()))
            .arg("--serial")
            .arg(format!("file={}", serial.display()))
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("stderr.log")).expect("stderr log"),
            ))
            .spawn()
            .expect("spawn hourglass");
        Hourglass {
            child,
            socket,
            serial,
            dir,
        }
    }

    /// Wait until the API answers `vmm.ping` (there may be no VM).
    pub fn wait_serving(&mut self, timeout: Duration) {
        self.wait_until("the API answers vmm.ping", timeout, |h| {
            matches!(
                vmm::api::client::api_request(&h.socket, "GET", "vmm.ping", None),
                Ok((200, _))
            )
        });
    }

    /// [`Hourglass::start`] that also works inside the nested host (see [`prebuilt_or_built`]),
    /// with timeouts stretched there by `slow`.
    pub fn start_anywhere(tag: &str, cpus: u32, extra: &[&str], slow: u32) -> Self {
        Self::start_exe(
            &prebuilt_or_built("hourglass"),
            tag,
            cpus,
            extra,
            Duration::from_secs(20) * slow,
        )
    }
}

impl Hourglass {
    /// Send `signal` (e.g. `libc::SIGTERM`) to the VMM process.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: kill(2) with our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }
}
