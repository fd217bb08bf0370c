//! Per-thread seccomp filters of the real `hourglass` on the real /dev/kvm (`--seccomp
//! true|false|log`, default on).
//!
//! The test hook `HOURGLASS_SECCOMP_SELFTEST=<kind>` makes the first thread of that kind issue
//! one `sysinfo(2)` right after installing its filter, a call no filter allows. Per kind:
//! under `true` (and by default) the process ends by SIGSYS and its stderr names the thread and
//! the syscall; under `log` the VMM keeps running, the guest keeps sampling without violations
//! and the kernel log shows the logged call (where dmesg is readable); under `false` nothing
//! happens. The migration kinds drive a migration. `--seccomp bogus` is refused.

mod snapshot_support;
mod vmm_support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snapshot_support::*;
use vmm_support::*;

/// An API request under way in a thread: its status and body, or why no answer came.
type Pending = JoinHandle<Result<(u16, String), String>>;

/// The syscall the test hook issues (and that no filter allows).
const SYSINFO: i64 = libc::SYS_sysinfo;

/// Start `hourglass` with `--seccomp mode` (none: the default), the test hook set to
/// `selftest` (or cleared), and a 2-vCPU test guest when `boot`; waits for nothing.
fn spawn_with(tag: &str, mode: Option<&str>, selftest: Option<&str>, boot: bool) -> Hourglass {
    let mut cmd = Command::new(binary("hourglass"));
    if let Some(m) = mode {
        cmd.arg("--seccomp").arg(m);
    }
    if boot {
        cmd.args(["--cpus", "boot=2", "--memory", "size=64M"]);
    }
    match selftest {
        Some(k) => cmd.env("HOURGLASS_SECCOMP_SELFTEST", k),
        None => cmd.env_remove("HOURGLASS_SECCOMP_SELFTEST"),
    };
    Hourglass::spawn_cmd(cmd, tag)
}

/// [`spawn_with`] without a VM, waiting until the API answers `vmm.ping`.
fn serving(tag: &str, mode: &str, selftest: Option<&str>) -> Hourglass {
    let mut h = spawn_with(tag, Some(mode), selftest, false);
    h.wait_serving(Duration::from_secs(20));
    h
}

/// The thread names a kind's first thread may have.
fn thread_names(kind: &str) -> &'static [&'static str] {
    match kind {
        "vcpu" => &["vcpu0", "vcpu1"],
        "api" => &["hg-api", "hg-api-conn"],
        "control" => &["main"],
        "signal" => &["signals", "vmm-events", "vm-events"],
        "migration-send" => &["migration-send"],
        "migration-recv" => &["migration-recv"],
        other => panic!("unknown kind {other}"),
    }
}

/// The process ends by SIGSYS and its stderr names a thread of `kind` and sysinfo.
fn expect_sigsys(h: &mut Hourglass, kind: &str) {
    let st = h.wait_exit(Duration::from_secs(20));
    let err = h.stderr();
    assert_eq!(
        st.signal(),
        Some(libc::SIGSYS),
        "{kind}: hourglass ended with {st}, not by SIGSYS:\n{err}"
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("hourglass: seccomp: thread "))
        .unwrap_or_else(|| panic!("{kind}: no seccomp report on stderr:\n{err}"));
    assert!(
        line.ends_with(&format!(" made syscall {SYSINFO}")),
        "{kind}: the report does not name sysinfo ({SYSINFO}): {line}"
    );
    assert!(
        thread_names(kind)
            .iter()
            .any(|n| line.contains(&format!("thread {n} made"))),
        "{kind}: the report names another thread: {line}"
    );
}

/// The hook ran in a thread of `kind` (its warning is on stderr).
fn wait_hook_ran(h: &mut Hourglass, kind: &str) {
    let needle = format!("seccomp self-test: {kind} thread issued sysinfo");
    h.wait_until(
        &format!("the {kind} self-test"),
        Duration::from_secs(20),
        move |h| h.stderr().contains(&needle),
    );
}

/// The VM runs on: every vCPU keeps sampling, no violation, the process alive.
fn check_runs_on(h: &mut Hourglass) {
    wait_healthy(h, 2);
    let before = vcpu_samples(&h.info());
    wait_progress(h, &before, "every vCPU sampling after the self-test");
    assert_no_violations(&h.info());
    assert!(
        matches!(h.child.try_wait(), Ok(None)),
        "hourglass exited:\n{}",
        h.stderr()
    );
}

/// Why the kernel log cannot show seccomp's logged calls here, if it cannot.
fn kernel_log_unavailable() -> Option<String> {
    match std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_logged") {
        Ok(s) if !s.split_whitespace().any(|a| a == "log") => {
            return Some(format!("kernel.seccomp.actions_logged is {:?}", s.trim()))
        }
        Err(e) => return Some(format!("cannot read actions_logged: {e}")),
        Ok(_) => {}
    }
    match Command::new("dmesg").output() {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => None,
        Ok(o) => Some(format!(
            "dmesg is not readable ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run dmesg: {e}")),
    }
}

/// Under `log`, the kernel log shows process `pid`'s sysinfo (audit type 1326), where dmesg is
/// readable.
fn check_kernel_logged(pid: u32, what: &str) {
    if let Some(why) = kernel_log_unavailable() {
        println!("{what}: kernel-log check skipped: {why}");
        return;
    }
    let pid_field = format!(" pid={pid} ");
    let sys_field = format!(" syscall={SYSINFO} ");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new("dmesg").output().expect("dmesg");
        let text = String::from_utf8_lossy(&out.stdout);
        if text
            .lines()
            .any(|l| l.contains("type=1326") && l.contains(&pid_field) && l.contains(&sys_field))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the kernel log has no seccomp record of syscall {SYSINFO} for pid {pid}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `PUT` `endpoint` with `body` on `api` in a thread (a migration answers when it is over; a
/// connection cut by the VMM's end is an `Err`).
fn put_async(api: &Path, endpoint: &'static str, body: String) -> Pending {
    let api = api.to_path_buf();
    std::thread::spawn(move || {
        vmm::api::client::api_request(&api, "PUT", endpoint, Some(&body)).map_err(|e| e.to_string())
    })
}

/// Start receiving on `dst` over a Unix socket in its directory; returns the URL and the
/// pending answer, once the receiver listens.
fn receive(dst: &mut Hourglass) -> (String, Pending) {
    let sock = dst.dir.join("rx.sock");
    let url = format!("unix:{}", sock.display());
    let rx = put_async(
        &dst.socket,
        "vm.receive-migration",
        serde_json::json!({ "receiver_url": url }).to_string(),
    );
    dst.wait_until(
        "the receiver listening",
        Duration::from_secs(20),
        move |_| sock.exists(),
    );
    (url, rx)
}

fn send(src: &Hourglass, url: &str) -> Pending {
    put_async(
        &src.socket,
        "vm.send-migration",
        serde_json::json!({ "destination_url": url }).to_string(),
    )
}

#[test]
fn seccomp_bogus_is_refused_naming_the_value() {
    let out = Command::new(binary("hourglass"))
        .args(["--seccomp", "bogus", "--serial", "off"])
        .output()
        .expect("run hourglass");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "hourglass accepted --seccomp bogus");
    assert!(
        err.contains("bogus"),
        "the error does not name the value: {err}"
    );
}

#[test]
fn seccomp_true_ends_the_process_by_sigsys_per_startup_kind() {
    let _x = exclusive();
    if skip("seccomp_true_ends_the_process_by_sigsys_per_startup_kind") {
        return;
    }
    for kind in ["vcpu", "api", "control", "signal"] {
        // The control kind runs with the default mode: seccomp is on unless asked otherwise.
        let mode = (kind != "control").then_some("true");
        let mut h = spawn_with(&format!("sc-true-{kind}"), mode, Some(kind), true);
        expect_sigsys(&mut h, kind);
    }
}

#[test]
fn seccomp_log_keeps_the_vmm_and_guest_running_per_startup_kind() {
    let _x = exclusive();
    if skip("seccomp_log_keeps_the_vmm_and_guest_running_per_startup_kind") {
        return;
    }
    for kind in ["vcpu", "api", "control", "signal"] {
        let mut h = spawn_with(&format!("sc-log-{kind}"), Some("log"), Some(kind), true);
        h.wait_until("vm.info", Duration::from_secs(20), |h| {
            h.try_info().is_some()
        });
        wait_hook_ran(&mut h, kind);
        check_runs_on(&mut h);
        check_kernel_logged(h.child.id(), kind);
    }
}

#[test]
fn seccomp_false_installs_no_filter() {
    let _x = exclusive();
    if skip("seccomp_false_installs_no_filter") {
        return;
    }
    for kind in ["vcpu", "control"] {
        let mut h = spawn_with(&format!("sc-false-{kind}"), Some("false"), Some(kind), true);
        h.wait_until("vm.info", Duration::from_secs(20), |h| {
            h.try_info().is_some()
        });
        wait_hook_ran(&mut h, kind);
        check_runs_on(&mut h);
    }
}

#[test]
fn seccomp_true_migration_sender_ends_by_sigsys() {
    let _x = exclusive();
    if skip("seccomp_true_migration_sender_ends_by_sigsys") {
        return;
    }
    let mut src = spawn_with("sc-true-send", Some("true"), Some("migration-send"), true);
    src.wait_until("vm.info", Duration::from_secs(20), |h| {
        h.try_info().is_some()
    });
    wait_healthy(&mut src, 2);
    let mut dst = serving("sc-true-send-dst", "true", None);
    let (url, rx) = receive(&mut dst);
    let tx = send(&src, &url);
    expect_sigsys(&mut src, "migration-send");
    // The sender's connection was cut by its end, not answered with a success.
    let answer = tx.join().expect("send thread");
    assert!(
        !matches!(answer, Ok((204, _))),
        "send-migration succeeded: {answer:?}"
    );
    // The sender ended before it connected: the destination still waits, and answers.
    assert!(matches!(dst.child.try_wait(), Ok(None)), "{}", dst.stderr());
    let (code, _) = dst.api("GET", "vmm.ping", None);
    assert_eq!(code, 200, "{}", dst.stderr());
    dst.child.kill().expect("kill the destination");
    dst.child.wait().expect("reap the destination");
    let answer = rx.join().expect("receive thread");
    assert!(
        !matches!(answer, Ok((204, _))),
        "receive-migration succeeded: {answer:?}"
    );
}

#[test]
fn seccomp_true_migration_receiver_ends_by_sigsys() {
    let _x = exclusive();
    if skip("seccomp_true_migration_receiver_ends_by_sigsys") {
        return;
    }
    let mut dst = serving("sc-true-recv", "true", Some("migration-recv"));
    let rx = put_async(
        &dst.socket,
        "vm.receive-migration",
        serde_json::json!({ "receiver_url": format!("unix:{}", dst.dir.join("rx.sock").display()) })
            .to_string(),
    );
    expect_sigsys(&mut dst, "migration-recv");
    let answer = rx.join().expect("receive thread");
    assert!(
        !matches!(answer, Ok((204, _))),
        "receive-migration succeeded: {answer:?}"
    );
}

#[test]
fn seccomp_log_migration_completes_and_the_guest_continues() {
    let _x = exclusive();
    if skip("seccomp_log_migration_completes_and_the_guest_continues") {
        return;
    }
    let mut src = spawn_with("sc-log-send", Some("log"), Some("migration-send"), true);
    src.wait_until("vm.info", Duration::from_secs(20), |h| {
        h.try_info().is_some()
    });
    wait_healthy(&mut src, 2);
    let mut dst = serving("sc-log-recv", "log", Some("migration-recv"));
    let (url, rx) = receive(&mut dst);
    let tx = send(&src, &url);
    let sent = tx.join().expect("send thread");
    assert!(
        matches!(sent, Ok((204, _))),
        "send-migration: {sent:?}\n{}",
        src.stderr()
    );
    let got = rx.join().expect("receive thread");
    assert!(
        matches!(got, Ok((204, _))),
        "receive-migration: {got:?}\n{}",
        dst.stderr()
    );
    wait_hook_ran(&mut src, "migration-send");
    wait_hook_ran(&mut dst, "migration-recv");
    check_runs_on(&mut dst);
    check_kernel_logged(src.child.id(), "migration-send");
    check_kernel_logged(dst.child.id(), "migration-recv");
}

/// What Ctrl-Z and `fg` do (and attaching `strace -p`): SIGSTOP then SIGCONT, while API
/// requests are under way and the vCPUs run. Every thread in a sleep then resumes it through
/// restart_syscall(2), which the kernel issues itself: no filter may refuse it.
#[test]
fn seccomp_true_survives_stop_and_continue() {
    if skip("seccomp_true_survives_stop_and_continue") {
        return;
    }
    let _one = exclusive();
    let mut h = spawn_with("seccomp-stop-cont", Some("true"), None, true);
    h.wait_serving(Duration::from_secs(20));
    wait_healthy(&mut h, 2);
    let api = h.socket.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let requests = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut answered = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Answers may be slow while the VMM is stopped; only a VMM that died ends this.
                if let Ok((200, _)) = vmm::api::client::api_request(&api, "GET", "vm.info", None) {
                    answered += 1;
                }
            }
            answered
        })
    };
    for round in 0..3 {
        h.signal(libc::SIGSTOP);
        // How long the VMM stays stopped (not a synchronisation: any length shows the bug).
        std::thread::sleep(Duration::from_millis(300));
        h.signal(libc::SIGCONT);
        let before = vcpu_samples(&h.info());
        wait_progress(
            &mut h,
            &before,
            &format!("every vCPU sampling after continue {round}"),
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = requests.join().expect("request thread");
    assert!(answered > 0, "no vm.info answered during the stops");
    assert_no_violations(&h.info());
    assert!(
        matches!(h.child.try_wait(), Ok(None)),
        "hourglass exited after SIGSTOP/SIGCONT:\n{}",
        h.stderr()
    );
}
