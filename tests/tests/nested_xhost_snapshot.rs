//! Snapshot on one nested kvm_amd host, restore on another (`scripts/nested-kvm.sh --two-hosts`):
//! host B was booted seconds after host A, so its TSC base differs from A's by that much, and a
//! guest moved without a VM-wide offset would see B's raw TSC.
//!
//! Host A boots the test guest (2 vCPUs, 32 MiB), makes a first pause/resume (the clock report
//! gives the VM offset `O_A`), pauses between host TSC reads `h0`/`h1`, snapshots into the share
//! and writes beside it what it saw: every vCPU's last sample and `O_A`, `h0`, `h1`. It then
//! restores the same snapshot on A itself under `frozen`. Host B restores it under `frozen` and
//! under `wallclock`. After each restore, resumed between `h2`/`h3`, the checks are:
//! - every vCPU's new samples are this host's TSC + the one reported VM offset (each sample's
//!   TSC less its TSC_ADJUST and the offset lies between `h3` and a host TSC read after it);
//! - the guest's TSC advance across the move, less the time the VM surely ran on either side
//!   (from its last sample to `h0` on A, from `h3` to its new sample), is what the policy
//!   promises: `frozen` 0 up to the two API calls' latency (`h1 - h0 + h3 - h2`), `wallclock` the
//!   elapsed time the clock report states (the two hosts' realtime gap) up to the same latency;
//! - the guest's own violation counters stay 0 and kvmclock agrees with the TSC (its counter).
//!
//! Outside the two-host run it prints why it is skipped.

mod vmm_support;
mod xhost_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use vmm_support::*;
use xhost_support::*;

/// What host A leaves for host B beside the snapshot.
const HANDOFF: &str = "xhost-snapshot.json";
/// The snapshot directory inside the share.
const SNAP: &str = "xhost-snap";

fn to_json(s: &[Sample]) -> Value {
    s.iter()
        .map(|s| json!({"seq": s.seq, "tsc": s.tsc.to_string(), "tsc_adjust": s.tsc_adjust.to_string()}))
        .collect()
}

fn from_json(v: &Value) -> Vec<Sample> {
    let u = |x: &Value| -> u64 {
        x.as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad number {x}"))
    };
    v.as_array()
        .expect("samples")
        .iter()
        .map(|s| Sample {
            seq: s["seq"].as_u64().expect("seq"),
            tsc: u(&s["tsc"]),
            tsc_adjust: u(&s["tsc_adjust"]),
        })
        .collect()
}

fn put(h: &Hourglass, path: &str, body: Option<&str>) {
    let (code, text) = h.api("PUT", path, body);
    assert_eq!(code, 204, "{path}: {text}\n{}", h.stderr());
}

/// What A saw at the pause that preceded the snapshot.
struct Before {
    samples: Vec<Sample>,
    offset: u64,
    h0: u64,
    h1: u64,
}

/// Restore `snap` under `policy` on this host and check the guest's time (module docs).
fn restore_and_check(snap: &Path, before: &Before, policy: &str, where_: &str) {
    let mut h = serve(&format!("xr-{policy}"));
    let body = json!({"source_url": format!("file://{}", snap.display()), "resume": false});
    put(&h, "vm.restore", Some(&body.to_string()));
    let resume = json!({ "clock_policy": policy }).to_string();
    let h2 = host_tsc();
    put(&h, "vm.resume", Some(&resume));
    let h3 = host_tsc();
    wait_progress(
        &mut h,
        &before.samples,
        "every vCPU sampling after the restore",
    );
    let info = h.info();
    let h4 = host_tsc();
    assert_clean(&info, &format!("after the restore on {where_} ({policy})"));
    let c = &info["clock"];
    assert_eq!(c["offsets_honoured"], true, "{c}");
    assert_eq!(c["policy_applied"], policy, "{c}");
    let khz = c["tsc_khz"].as_u64().expect("tsc_khz");
    let o = vm_offset(&info);
    let slack = (BRACKET_SLACK_US * khz / 1000) as i64;
    let after = vcpus(&info);
    // One offset, in force on every vCPU.
    for (i, s) in after.iter().enumerate() {
        let host = s.tsc.wrapping_sub(s.tsc_adjust).wrapping_sub(o);
        assert!(
            sdiff(host, h3) >= -slack && sdiff(h4, host) >= -slack,
            "{where_} ({policy}): vCPU {i}'s sample is not host TSC + the VM offset {o}: it \
             stands for host TSC {host}, outside [{h3}, {h4}]"
        );
    }
    // How much of the move the guest saw.
    let latency = sdiff(before.h1, before.h0) + sdiff(h3, h2);
    let (lo, hi, elapsed) = match policy {
        "frozen" => (0, latency, 0),
        _ => {
            let ns = c["last_elapsed_ns"].as_u64().expect("last_elapsed_ns");
            let cycles = (u128::from(ns) * u128::from(khz) / 1_000_000) as i64;
            (cycles, cycles + latency, ns)
        }
    };
    for (i, (b, a)) in before.samples.iter().zip(&after).enumerate() {
        let gb = b.tsc.wrapping_sub(b.tsc_adjust);
        let ga = a.tsc.wrapping_sub(a.tsc_adjust);
        let ran_before = sdiff(before.h0, gb.wrapping_sub(before.offset));
        let ran_after = sdiff(ga.wrapping_sub(o), h3);
        let seen = sdiff(ga, gb) - ran_before - ran_after;
        println!(
            "{where_} ({policy}): vCPU {i} saw {seen} cycles of the move (allowed [{lo}, {hi}] \
             +- {slack}; elapsed shown {elapsed} ns; error bound {} ns)",
            c["error_bound_ns"]
        );
        assert!(
            seen >= lo - slack && seen <= hi + slack,
            "{where_} ({policy}): vCPU {i} saw {seen} cycles of the move, not in [{lo}, {hi}]"
        );
    }
    if policy == "wallclock" {
        assert!(elapsed > 0, "wallclock restore showed no elapsed time: {c}");
    }
    // Still running, still clean.
    let later = vcpus(&h.info());
    wait_progress(&mut h, &later, "the restored guest keeps sampling");
    assert_clean(&h.info(), &format!("later on {where_} ({policy})"));
}

fn role_a(share: &Path) {
    let mut h = Hourglass::start_anywhere("xa", 2, &["--memory", "size=32M"], SLOW);
    h.wait_until(
        "every vCPU reporting and a heartbeat",
        Duration::from_secs(20) * SLOW,
        |h| {
            let s = vcpu_samples(&h.info());
            s.len() == 2 && s.iter().all(|&n| n > 0) && h.serial_text().contains("heartbeat")
        },
    );
    // A first cycle gives the clock report (VM offset, offsets honoured).
    put(&h, "vm.pause", None);
    let first = vcpus(&h.info());
    put(&h, "vm.resume", None);
    wait_progress(&mut h, &first, "every vCPU sampling after the first resume");
    let info = h.info();
    assert_eq!(info["clock"]["offsets_honoured"], true, "{}", info["clock"]);
    let offset = vm_offset(&info);
    let h0 = host_tsc();
    put(&h, "vm.pause", None);
    let h1 = host_tsc();
    let paused = h.info();
    assert_clean(&paused, "on A before the snapshot");
    let samples = vcpus(&paused);
    let snap = share.join(SNAP);
    let body = json!({"destination_url": format!("file://{}", snap.display())});
    put(&h, "vm.snapshot", Some(&body.to_string()));
    drop(h);
    let handoff = json!({
        "samples": to_json(&samples),
        "offset": offset.to_string(),
        "h0": h0.to_string(),
        "h1": h1.to_string(),
    });
    std::fs::write(share.join(HANDOFF), handoff.to_string()).expect("write the handoff");
    println!("A: snapshot in {}, VM offset {offset}", snap.display());
    let before = Before {
        samples,
        offset,
        h0,
        h1,
    };
    restore_and_check(&snap, &before, "frozen", "host A again");
}

fn role_b(share: &Path) {
    let text = std::fs::read_to_string(share.join(HANDOFF))
        .unwrap_or_else(|e| panic!("host A left no {HANDOFF}: {e}"));
    let v: Value = serde_json::from_str(&text).expect("handoff JSON");
    let n = |k: &str| -> u64 {
        v[k].as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("handoff.{k}"))
    };
    let before = Before {
        samples: from_json(&v["samples"]),
        offset: n("offset"),
        h0: n("h0"),
        h1: n("h1"),
    };
    let snap = share.join(SNAP);
    restore_and_check(&snap, &before, "frozen", "host B");
    restore_and_check(&snap, &before, "wallclock", "host B");
}

#[test]
fn nested_xhost_snapshot_restore() {
    let role = std::env::var("HOURGLASS_NESTED_ROLE").unwrap_or_default();
    let share = std::env::var("HOURGLASS_NESTED_SHARE").map(PathBuf::from);
    match (role.as_str(), share) {
        ("A", Ok(share)) => role_a(&share),
        ("B", Ok(share)) => role_b(&share),
        _ => {
            assert!(
                !in_nested_host(),
                "HOURGLASS_NESTED=1 without a role and a share: run with --two-hosts"
            );
            println!("skipped: needs two nested hosts; run scripts/nested-kvm.sh --two-hosts");
        }
    }
}
