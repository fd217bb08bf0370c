//! A Linux guest's own clocks across pause/resume, snapshot → kill → restore and live migration
//! to a second `hourglass` in the same host (issue 14), on
//! the nested kvm_amd host (Debian's kernel as the guest, 2 vCPUs), for each guest clocksource
//! (`tsc`, which the guest picks itself here, and `kvm-clock`) and each policy. The same
//! measurement across two hosts: nested_xhost_live_linux.rs. The probe's console and the check
//! are in tests/tests/clock_support.
//!
//! The guest's `/init` is the clock probe (tests/tests/linux_support/clock_probe.c): it reads
//! CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME and the TSC in a tight loop and keeps the
//! 16 largest MONOTONIC steps between consecutive readings since the last mark (the mark's
//! own reading included), so the window a mark after an outage closes holds the guest's own
//! step across it: the one whose TSCs straddle the freeze and the thaw (under `frozen` not
//! always the largest: the outage is as short as the guest's clock ran). Its REALTIME is compared with this
//! host's by marks: the test notes its realtime, asks for a mark (one byte on the console), and
//! notes its realtime again when the answer arrives; the guest read its clock in between. A
//! bracket is a console round trip, ±4-12 ms on one emulated CPU, wider than the bound, so
//! each reading is also placed in host time by the guest's TSC, read beside its clocks: the
//! host's TSC was the guest's less the VM offset `vm.info` reports, and the host's realtime
//! runs with its TSC. That placement must fall inside the reading's own bracket (so a wrong
//! offset fails the test rather than the arithmetic), and the median over fifteen marks before
//! and after an outage gives the change of (guest − host) REALTIME, its uncertainty half the
//! marks' spread on each side; the narrowest brackets' own figure must agree with it within
//! their width. The same placement puts the freeze and the thaw in host time: `vm.info`'s
//! clock report gives the guest's TSC at each (`freeze_guest_tsc`, `thaw_guest_tsc`), less
//! the VM offset on that side; each must fall between what the test saw around it (the freeze
//! after the guest's last reading and before the pause surely ended, the thaw after the resume,
//! restore or migration began and before the guest's first reading). That is what ties the
//! reported freeze and thaw to what happened, and how tightly depends on the operation: after
//! a pause the thaw's window is the resume request's few ms, after a restore the new process's
//! start (about 2.5 s here); within it, what `frozen` is checked on below (MONOTONIC against
//! the guest's TSC, the TSC standing still from freeze to thaw) follows from the report. The
//! probe reads the TSC just before and just after its clocks, so a reading's clocks are placed
//! in an interval, and what each policy promises for the MONOTONIC step is one too (a vCPU
//! that lost the one emulated CPU between its TSC read and its clock reads once made a single
//! TSC read 24 ms off). What is asserted, each case:
//!
//! - `wallclock`: the guest's REALTIME − the host's changed by at most 5 ms, and its MONOTONIC
//!   stepped across the outage as its REALTIME did and as the real time between the two
//!   readings (within 5 ms each): by the real outage, at least the time the VM was surely
//!   paused.
//! - `frozen`: MONOTONIC advanced by the time the guest's clock ran, within 5 ms: from its
//!   last reading to the freeze plus from the thaw to its first reading, in host time. That
//!   second part is the resume's own latency (the guest's time runs from the thaw's sample on,
//!   whether or not its vCPU has entered yet): 0.1-0.3 ms on a real host, tens to a hundred ms
//!   under the emulator, printed. REALTIME lags the host by the outage (within the outage's
//!   bracket ±5 ms), as `vm.info` says (`policy_applied` `frozen`).
//! - always: the clocksource is the one the guest booted with, its two vCPUs' TSCs read back in
//!   order (400 reads alternating CPUs), KVM keeps its master clock (`clock.master_clock`) and
//!   both vCPUs' kvmclock pages have PVCLOCK_TSC_STABLE_BIT, and the kernel printed none of
//!   [`CLOCK_COMPLAINTS`].
//!
//! Each test prints its rows of the README's table "a Linux guest's view".

mod linux_support;
mod vmm_support;
mod xhost_support;

mod clock_support;

use std::sync::MutexGuard;
use std::time::Duration;

use clock_support::*;
use linux_support::*;
use vmm_support::*;
use xhost_support::realtime_ns;

/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(10);

/// Boot the probe with `extra_cmdline` and `policy`; pause for [`OUTAGE`] and resume; then
/// snapshot, kill, wait [`OUTAGE`], restore in a new process. Check each (see the module doc).
fn clocks_across_outages(test: &str, extra_cmdline: &str, clocksource: &str, policy: &str) {
    let _x: MutexGuard<'_, ()> = exclusive();
    if skip(test) {
        return;
    }
    let Some(kernel) = nested_kernel("vmlinux").or_else(|| nested_kernel("vmlinuz")) else {
        return;
    };
    let dir = temp_dir(test);
    let mut p = boot_probe(test, &dir, &kernel, extra_cmdline, clocksource, policy);
    let mut rows = Vec::new();

    // Pause, OUTAGE, resume.
    let before = p.reading();
    let t0 = realtime_ns();
    p.put("vm.pause", None);
    let t1 = realtime_ns();
    // The outage is the subject of the test, not a wait for something.
    std::thread::sleep(OUTAGE);
    let t2 = realtime_ns();
    p.put("vm.resume", None);
    let t3 = realtime_ns();
    rows.push(check(
        policy,
        clocksource,
        &mut p,
        &before,
        &Outage::on_one_host("pause 10 s, resume", (t2 - t1, t3 - t0), (t1, t2)),
    ));

    // Snapshot, kill, OUTAGE, restore in a new process.
    let before = p.reading();
    let snap = dir.join("snap");
    let t0 = realtime_ns();
    p.put("vm.pause", None);
    let t1 = realtime_ns();
    let body = serde_json::json!({ "destination_url": format!("file://{}", snap.display()) });
    p.put("vm.snapshot", Some(&body.to_string()));
    let seq = p.seq;
    let old_console = p.console();
    drop(p);
    std::thread::sleep(OUTAGE);
    let t2 = realtime_ns();
    let source = format!(
        "source_url=file://{},resume=true,clock_policy={policy}",
        snap.display()
    );
    let mut p = Probe::spawn(&format!("{test}-restored"), &["--restore", &source], seq);
    let t3 = realtime_ns();
    rows.push(check(
        policy,
        clocksource,
        &mut p,
        &before,
        &Outage::on_one_host(
            "snapshot, kill, 10 s, restore",
            (t2 - t1, t3 - t0),
            (t1, t2),
        ),
    ));
    for bad in CLOCK_COMPLAINTS {
        assert!(!old_console.contains(bad), "before the restore: {bad}");
    }

    // Live migration to a second hourglass in this host (serving, then receiving).
    let before = p.reading();
    let sock = dir.join("mig.sock");
    let url = format!("unix:{}", sock.display());
    let (mut dst, rx) =
        Probe::receiving(&format!("{test}-dst"), p.seq, &url, || sock.exists()).unwrap();
    let t0 = realtime_ns();
    p.put(
        "vm.send-migration",
        Some(&serde_json::json!({ "destination_url": url }).to_string()),
    );
    let t1 = realtime_ns();
    let (code, body) = rx.join().expect("receiver").expect("receive-migration");
    assert_eq!(code, 204, "receive-migration: {body}");
    let source_console = p.console();
    // The source's own measure of the downtime: from its pause to the destination's answer.
    let downtime_ns = downtime_ns(&p.info()["migration"]);
    assert!(downtime_ns <= t1 - t0, "downtime {downtime_ns} ns");
    drop(p);
    for bad in CLOCK_COMPLAINTS {
        assert!(!source_console.contains(bad), "before the migration: {bad}");
    }
    rows.push(check(
        policy,
        clocksource,
        &mut dst,
        &before,
        &Outage::on_one_host("live migration (same host)", (0, downtime_ns), (t1, t0)),
    ));

    for o in &rows {
        println!("{}", o.row(clocksource, policy));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nested_linux_clock_tsc_wallclock() {
    clocks_across_outages("nested_linux_clock_tsc_wallclock", "", "tsc", "wallclock");
}

#[test]
fn nested_linux_clock_tsc_frozen() {
    clocks_across_outages("nested_linux_clock_tsc_frozen", "", "tsc", "frozen");
}

#[test]
fn nested_linux_clock_kvmclock_wallclock() {
    clocks_across_outages(
        "nested_linux_clock_kvmclock_wallclock",
        "clocksource=kvm-clock",
        "kvm-clock",
        "wallclock",
    );
}

#[test]
fn nested_linux_clock_kvmclock_frozen() {
    clocks_across_outages(
        "nested_linux_clock_kvmclock_frozen",
        "clocksource=kvm-clock",
        "kvm-clock",
        "frozen",
    );
}
