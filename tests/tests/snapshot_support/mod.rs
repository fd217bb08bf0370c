//! Helpers of the `snapshot_*` integration tests: start `hourglass` to restore (or with no VM),
//! make a snapshot of a running test guest, copy and edit snapshots, fingerprint them.

#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::vmm_support::*;

/// `file://` URL of a directory.
pub fn url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Start `hourglass` with `args` (plus an API socket, a serial file and `-v`), without
/// waiting for anything.
pub fn spawn(tag: &str, args: &[String]) -> Hourglass {
    let mut cmd = Command::new(binary("hourglass"));
    cmd.args(args);
    Hourglass::spawn_cmd(cmd, tag)
}

/// Start `hourglass` and wait until its API answers `vmm.ping` (there may be no VM).
pub fn start_serving(tag: &str, args: &[String]) -> Hourglass {
    let mut h = spawn(tag, args);
    h.wait_serving(Duration::from_secs(20));
    h
}

/// `hourglass --restore source_url=file://DIR[,OPTIONS]`, waiting until vm.info answers.
pub fn restore_cli(tag: &str, dir: &Path, options: &str) -> Hourglass {
    let mut r = format!("source_url={}", url(dir));
    if !options.is_empty() {
        r.push(',');
        r.push_str(options);
    }
    let mut h = spawn(tag, &["--restore".into(), r]);
    h.wait_until(
        "the restored VM answers vm.info",
        Duration::from_secs(20),
        |h| h.try_info().is_some(),
    );
    h
}

/// The guest is running: every vCPU has reported and the heartbeat is on the serial port.
pub fn wait_healthy(h: &mut Hourglass, cpus: usize) {
    h.wait_until(
        "every vCPU reporting samples",
        Duration::from_secs(20),
        |h| {
            let s = vcpu_samples(&h.info());
            s.len() == cpus && s.iter().all(|&n| n > 0)
        },
    );
    h.wait_until(
        "a heartbeat on the serial port",
        Duration::from_secs(20),
        |h| h.serial_text().contains("heartbeat"),
    );
}

/// Wait until every vCPU's sample counter is above `before`'s.
pub fn wait_progress(h: &mut Hourglass, before: &[u64], what: &str) {
    let before = before.to_vec();
    h.wait_until(what, Duration::from_secs(20), move |h| {
        let now = vcpu_samples(&h.info());
        now.len() == before.len() && now.iter().zip(&before).all(|(a, b)| a > b)
    });
}

/// The guest's own violation counters are all 0, and every doorbell was good.
pub fn assert_no_violations(info: &Value) {
    for f in ["tsc_backwards", "cross_vcpu", "kvmclock_mismatch"] {
        assert_eq!(totals(info, f), 0, "{f} violations: {}", info["time_probe"]);
    }
    assert_eq!(
        info["time_probe"]["bad_doorbells"].as_u64(),
        Some(0),
        "{}",
        info["time_probe"]
    );
    assert!(
        totals(info, "kvmclock_mismatch_worst_ns") <= 1_000,
        "kvmclock/TSC disagreement {} ns",
        totals(info, "kvmclock_mismatch_worst_ns")
    );
}

/// Run `ch-remote` with `args` against `h`, asserting success.
pub fn ch_remote_ok(h: &Hourglass, args: &[&str]) {
    let out = h.ch_remote(args);
    assert!(
        out.status.success(),
        "ch-remote {args:?}: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        h.stderr()
    );
}

/// A snapshot of a running 2-vCPU test guest, made once per test process: the directory and
/// the per-vCPU sample counters at the pause. Call with [`exclusive`] held.
pub struct Golden {
    /// The snapshot directory (never modified by the tests; they copy it).
    pub dir: PathBuf,
    /// Per-vCPU sample counters when the VM was paused.
    pub samples: Vec<u64>,
    /// vm.info's `clock.capabilities` of the source VMM.
    pub capabilities: Value,
}

/// See [`Golden`].
pub fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        let mut h = Hourglass::start("golden-src", 2, &[]);
        wait_healthy(&mut h, 2);
        ch_remote_ok(&h, &["pause"]);
        let info = h.info();
        let dir = temp_dir("golden").join("snap");
        ch_remote_ok(&h, &["snapshot", &url(&dir)]);
        Golden {
            dir,
            samples: vcpu_samples(&info),
            capabilities: info["clock"]["capabilities"].clone(),
        }
    })
}

/// A copy of the snapshot in `src` (holes of `memory.bin` may be filled; content is equal).
pub fn copy_snapshot(src: &Path, tag: &str) -> PathBuf {
    let d = temp_dir(tag).join("snap");
    std::fs::create_dir(&d).expect("create the copy");
    for e in std::fs::read_dir(src).expect("list the snapshot") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), d.join(e.file_name())).expect("copy a snapshot file");
    }
    d
}

/// Every file's name, size, content hash and mtime.
pub fn fingerprint(dir: &Path) -> Vec<(String, u64, u64, i64, i64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("list the snapshot")
        .map(|e| {
            let e = e.expect("entry");
            let m = e.metadata().expect("stat");
            let bytes = std::fs::read(e.path()).expect("read");
            (
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                vmm::snapshot::hash_bytes(&bytes),
                m.mtime(),
                m.mtime_nsec(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Edit the JSON file `name` and record its new checksum in `checksums.json`, so that the
/// only thing wrong is the edit.
pub fn rewrite_consistently(dir: &Path, name: &str, f: impl FnOnce(&mut Value)) {
    let p = dir.join(name);
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("snapshot JSON");
    f(&mut v);
    let bytes = serde_json::to_vec(&v).expect("serialise");
    std::fs::write(&p, &bytes).expect("write");
    let sp = dir.join("checksums.json");
    let mut sums: Value =
        serde_json::from_slice(&std::fs::read(&sp).expect("read")).expect("checksums JSON");
    sums["files"][name] = serde_json::json!({
        "size": bytes.len(),
        "hg64": format!("{:016x}", vmm::snapshot::hash_bytes(&bytes)),
    });
    std::fs::write(&sp, serde_json::to_vec(&sums).expect("serialise")).expect("write");
}
