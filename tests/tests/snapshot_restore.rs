//! Snapshot and restore with the real `hourglass` and `ch-remote` on the real /dev/kvm: the
//! test guest continues in a new process from where it stopped, its violation counters stay 0,
//! the clock report says what was applied, and the snapshot is never modified.

mod snapshot_support;
mod vmm_support;

use std::time::{Duration, Instant};

use serde_json::Value;
use snapshot_support::*;
use vmm_support::*;

/// The clock report of a thaw after a stop of at least `inner` and at most `outer` ns.
fn check_clock(info: &Value, inner: u64, outer: u64, jump_before: u64) {
    let clock = &info["clock"];
    assert_eq!(clock["policy_requested"], "wallclock", "{clock}");
    let elapsed = clock["last_elapsed_ns"].as_u64().expect("last_elapsed_ns");
    assert!(
        elapsed + 1_000_000 >= inner && elapsed <= outer + 1_000_000,
        "elapsed shown {elapsed} ns, stop [{inner}, {outer}] ns: {clock}"
    );
    match clock["policy_applied"].as_str() {
        Some("wallclock") => {}
        Some("host_tsc") => assert!(
            clock["warnings"].as_array().is_some_and(|w| !w.is_empty()),
            "host_tsc applied without a warning: {clock}"
        ),
        other => panic!("unexpected policy_applied {other:?}: {clock}"),
    }
    // The guest's largest TSC step is the stop, as the test saw it.
    let jump = totals(info, "max_jump_ns");
    assert!(
        jump + 1_000_000 >= inner,
        "guest TSC step {jump} ns < stopped interval {inner} ns - 1 ms"
    );
    assert!(
        jump <= outer + 1_000_000 + jump_before,
        "guest TSC step {jump} ns > {outer} ns + 1 ms + {jump_before} ns"
    );
}

#[test]
fn restore_in_a_new_process_continues_the_guest() {
    let _x = exclusive();
    if skip("restore_in_a_new_process_continues_the_guest") {
        return;
    }
    let snap = temp_dir("snap-main").join("snap");
    let mut src = Hourglass::start("snap-src", 2, &[]);
    wait_healthy(&mut src, 2);
    let jump_before = totals(&src.info(), "max_jump_ns");

    let t_pause_sent = Instant::now();
    ch_remote_ok(&src, &["pause"]);
    let t_paused = Instant::now();
    let paused = src.info();
    assert_eq!(paused["state"], "Paused");
    let samples = vcpu_samples(&paused);
    ch_remote_ok(&src, &["snapshot", &url(&snap)]);
    for f in ["config.json", "state.json", "memory.bin", "checksums.json"] {
        assert!(snap.join(f).is_file(), "{f} missing from the snapshot");
    }
    // Kill the VMM (SIGKILL: nothing is flushed or cleaned up on the way out).
    src.child.kill().expect("kill the source VMM");
    src.child.wait().expect("reap the source VMM");
    drop(src);
    // The stopped interval the restored guest must be shown (condition-free: it is measured).
    std::thread::sleep(Duration::from_secs(3));

    let mut dst = restore_cli("snap-dst", &snap, "");
    let info = dst.info();
    assert_eq!(
        info["state"], "Paused",
        "a restore without resume=true stays paused"
    );
    assert_eq!(
        vcpu_samples(&info),
        samples,
        "the restored guest's counters are not those of the snapshot"
    );
    assert_eq!(
        info["clock"]["restored_from"]["source"].as_str(),
        Some(snap.to_str().unwrap()),
        "{}",
        info["clock"]
    );
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2);

    let t_resume_sent = Instant::now();
    ch_remote_ok(&dst, &["resume"]);
    let t_resumed = Instant::now();
    wait_progress(
        &mut dst,
        &samples,
        "every vCPU sampling again after the restore",
    );
    dst.wait_until(
        "a heartbeat from the restored guest",
        Duration::from_secs(20),
        |h| h.serial_text().contains("heartbeat"),
    );
    let after = dst.info();
    assert_eq!(after["state"], "Running");
    assert_no_violations(&after);
    let inner = (t_resume_sent - t_paused).as_nanos() as u64;
    let outer = (t_resumed - t_pause_sent).as_nanos() as u64;
    println!(
        "restore: guest TSC step {} ns, stopped for sure {inner} ns, at most {outer} ns; clock {}",
        totals(&after, "max_jump_ns"),
        after["clock"]["last_report"]
    );
    assert!(inner >= 3_000_000_000);
    check_clock(&after, inner, outer, jump_before);

    let _ = dst.api("PUT", "vmm.shutdown", None);
    assert!(dst.wait_exit(Duration::from_secs(10)).success());
    let _ = std::fs::remove_dir_all(snap.parent().unwrap());
}

/// Cloud Hypervisor's client sends every field of `RestoreConfig`, fds as null.
fn ch_restore_body(dir: &std::path::Path, mode: &str, resume: bool) -> String {
    serde_json::json!({
        "source_url": url(dir),
        "prefault": false,
        "memory_restore_mode": mode,
        "resume": resume,
        "net_fds": null,
        "vfio_fds": null,
        "iommufd_fd": null,
        "zone_updates": null,
    })
    .to_string()
}

#[test]
fn the_same_snapshot_restores_twice_and_is_never_modified() {
    let _x = exclusive();
    if skip("the_same_snapshot_restores_twice_and_is_never_modified") {
        return;
    }
    let g = golden();
    let before = fingerprint(&g.dir);

    // 1: the command line, memory mapped copy-on-write, running at once.
    let mut a = restore_cli(
        "twice-a",
        &g.dir,
        "resume=true,memory_restore_mode=ondemand",
    );
    let info = a.info();
    assert_eq!(info["state"], "Running");
    assert_eq!(
        info["clock"]["restored_from"]["memory_mode"], "OnDemand",
        "{}",
        info["clock"]
    );
    let first = vcpu_samples(&info);
    assert!(
        first.iter().zip(&g.samples).all(|(a, b)| a >= b),
        "counters went back: {first:?} < {:?}",
        g.samples
    );
    wait_progress(&mut a, &first, "the first restore running");
    assert_no_violations(&a.info());
    let _ = a.api("PUT", "vmm.shutdown", None);
    assert!(a.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(
        fingerprint(&g.dir),
        before,
        "a MAP_PRIVATE restore modified the snapshot"
    );

    // 2: an hourglass with only --api-socket, restored by Cloud Hypervisor's request body.
    let mut b = start_serving("twice-b", &[]);
    // Cloud Hypervisor's codes, which its client understands: 404 for vm.info without a VM,
    // 500 for an action without one.
    let (code, body) = b.api("GET", "vm.info", None);
    assert_eq!(code, 404, "vm.info without a VM: {body}");
    let (code, body) = b.api("PUT", "vm.pause", None);
    assert_eq!(code, 500, "vm.pause without a VM: {body}");
    let (code, body) = b.api(
        "PUT",
        "vm.restore",
        Some(&ch_restore_body(&g.dir, "Copy", false)),
    );
    assert_eq!(code, 204, "vm.restore: {body}\n{}", b.stderr());
    let info = b.info();
    assert_eq!(info["state"], "Paused");
    assert_eq!(
        vcpu_samples(&info),
        g.samples,
        "the second restore does not start where the snapshot stopped"
    );
    assert_eq!(info["clock"]["restored_from"]["memory_mode"], "Copy");
    // One VM per process.
    let (code, body) = b.api(
        "PUT",
        "vm.restore",
        Some(&ch_restore_body(&g.dir, "Copy", false)),
    );
    assert_eq!(
        code, 500,
        "a second vm.restore (Cloud Hypervisor's code): {body}"
    );
    ch_remote_ok(&b, &["resume"]);
    wait_progress(&mut b, &g.samples, "the second restore running");
    let info = b.info();
    assert_eq!(info["state"], "Running");
    assert_no_violations(&info);
    let _ = b.api("PUT", "vmm.shutdown", None);
    assert!(b.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(
        fingerprint(&g.dir),
        before,
        "a restore modified the snapshot"
    );
}

#[test]
fn ch_remote_restore_with_a_clock_policy() {
    let _x = exclusive();
    if skip("ch_remote_restore_with_a_clock_policy") {
        return;
    }
    let g = golden();
    let mut h = start_serving("chr-restore", &[]);
    let src = format!("source_url={},resume=true,clock_policy=frozen", url(&g.dir));
    ch_remote_ok(&h, &["restore", &src]);
    let info = h.info();
    assert_eq!(info["state"], "Running");
    let clock = &info["clock"];
    assert_eq!(clock["policy_requested"], "frozen", "{clock}");
    // Frozen is applied where offsets are honoured; elsewhere the report says host_tsc.
    match (
        clock["policy_applied"].as_str(),
        clock["offsets_honoured"].as_bool(),
    ) {
        (Some("frozen"), Some(true)) => {
            assert_eq!(clock["last_elapsed_ns"], 0, "{clock}");
        }
        (Some("host_tsc"), Some(false)) => {
            assert!(
                clock["warnings"].as_array().is_some_and(|w| !w.is_empty()),
                "{clock}"
            );
        }
        other => panic!("frozen restore reported as {other:?}: {clock}"),
    }
    let first = vcpu_samples(&info);
    wait_progress(&mut h, &first, "running after a frozen restore");
    assert_no_violations(&h.info());
    let _ = h.api("PUT", "vmm.shutdown", None);
    assert!(h.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn a_running_vm_is_not_snapshotted() {
    let _x = exclusive();
    if skip("a_running_vm_is_not_snapshotted") {
        return;
    }
    let mut h = Hourglass::start("snap-running", 1, &[]);
    wait_healthy(&mut h, 1);
    let dest = temp_dir("snap-running-dest").join("snap");
    let body = serde_json::json!({ "destination_url": url(&dest) }).to_string();
    let (code, resp) = h.api("PUT", "vm.snapshot", Some(&body));
    assert_eq!(
        code, 500,
        "Cloud Hypervisor's code (its client knows no 409): {resp}"
    );
    assert!(resp.contains("paused"), "{resp}");
    let out = h.ch_remote(&["snapshot", &url(&dest)]);
    assert!(
        !out.status.success(),
        "ch-remote snapshot of a running VM succeeded"
    );
    assert!(!dest.exists(), "a refused snapshot left {}", dest.display());
    assert_eq!(h.info()["state"], "Running");
    // Paused, the same request succeeds.
    ch_remote_ok(&h, &["pause"]);
    let (code, resp) = h.api("PUT", "vm.snapshot", Some(&body));
    assert_eq!(code, 204, "{resp}");
    assert!(dest.join("checksums.json").is_file());
    let _ = std::fs::remove_dir_all(dest.parent().unwrap());
}

/// A restored VM that never ran snapshots to the same machine state, and that snapshot runs.
#[test]
fn a_restored_paused_vm_snapshots_again() {
    let _x = exclusive();
    if skip("a_restored_paused_vm_snapshots_again") {
        return;
    }
    let g = golden();
    let again = temp_dir("again").join("snap");
    let mut a = restore_cli("again-a", &g.dir, "");
    assert_eq!(a.info()["state"], "Paused");
    ch_remote_ok(&a, &["snapshot", &url(&again)]);
    let _ = a.api("PUT", "vmm.shutdown", None);
    assert!(a.wait_exit(Duration::from_secs(10)).success());
    let read = |d: &std::path::Path| -> Value {
        serde_json::from_slice(&std::fs::read(d.join("state.json")).unwrap()).unwrap()
    };
    let (s1, s2) = (read(&g.dir), read(&again));
    for k in ["tsc", "vcpus", "devices", "memory"] {
        assert_eq!(
            s1[k], s2[k],
            "state.json's {k} changed across restore + snapshot"
        );
    }
    // Guest memory is not compared: restoring the kvmclock MSRs makes KVM rewrite the guest's
    // pvclock page (its version and flags) before the guest runs again.
    let mut b = restore_cli("again-b", &again, "resume=true");
    let first = vcpu_samples(&b.info());
    wait_progress(&mut b, &first, "the second-generation snapshot running");
    assert_no_violations(&b.info());
    let _ = b.api("PUT", "vmm.shutdown", None);
    assert!(b.wait_exit(Duration::from_secs(10)).success());
    let _ = std::fs::remove_dir_all(again.parent().unwrap());
}

/// A VM restored `ondemand` reads its memory from the snapshot's `memory.bin` as the guest
/// touches it; truncating that file under the running VM must end the VMM with a non-zero exit
/// that names the file, not a clean exit reported as a guest shutdown (nor a bare "Bus error").
#[test]
fn a_backing_file_cut_under_an_ondemand_vm_is_named_with_a_nonzero_exit() {
    let _x = exclusive();
    if skip("a_backing_file_cut_under_an_ondemand_vm_is_named_with_a_nonzero_exit") {
        return;
    }
    let g = golden();
    let copy = copy_snapshot(&g.dir, "cut-backing");
    let mut h = restore_cli(
        "cut-backing",
        &copy,
        "resume=true,memory_restore_mode=ondemand",
    );
    wait_healthy(&mut h, 2);
    std::fs::OpenOptions::new()
        .write(true)
        .open(copy.join("memory.bin"))
        .and_then(|f| f.set_len(0))
        .expect("truncate memory.bin");
    let st = h.wait_exit(Duration::from_secs(20));
    let err = h.stderr();
    assert!(
        !st.success(),
        "the VMM exited {st} after its memory file was cut:\n{err}"
    );
    assert!(
        err.contains("memory.bin") && err.contains("truncated"),
        "the cause is not named:\n{err}"
    );
}
