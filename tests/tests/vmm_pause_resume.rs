//! Pause/resume of the built-in test guest through the real `hourglass` and `ch-remote`
//! binaries on the real /dev/kvm: the guest keeps running, its violation counters stay 0, and
//! the clock report tells the truth about what the host could apply.

mod vmm_support;

use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_support::*;

/// The guest is running: every vCPU has reported and the heartbeat is on the serial port.
fn wait_healthy(h: &mut Hourglass, cpus: usize) {
    h.wait_until(
        "every vCPU reporting samples",
        Duration::from_secs(20),
        |h| {
            let info = h.info();
            let s = vcpu_samples(&info);
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
fn wait_progress(h: &mut Hourglass, before: &[u64], what: &str) {
    let before = before.to_vec();
    h.wait_until(what, Duration::from_secs(10), move |h| {
        let now = vcpu_samples(&h.info());
        now.len() == before.len() && now.iter().zip(&before).all(|(a, b)| a > b)
    });
}

fn max_jump_ns(info: &Value) -> u64 {
    totals(info, "max_jump_ns")
}

fn assert_no_violations(info: &Value) {
    for f in ["tsc_backwards", "cross_vcpu", "kvmclock_mismatch"] {
        assert_eq!(totals(info, f), 0, "{f} violations: {}", info["time_probe"]);
    }
    assert_eq!(
        info["time_probe"]["bad_doorbells"].as_u64(),
        Some(0),
        "{}",
        info["time_probe"]
    );
}

fn ch_remote_ok(h: &Hourglass, cmd: &str) {
    let out = h.ch_remote(&[cmd]);
    assert!(
        out.status.success(),
        "ch-remote {cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Boot, pause for 2 s with `ch-remote`, resume; check the guest and the clock report.
fn pause_two_seconds(cpus: u32) {
    let _x = exclusive();
    if skip(&format!("pause_two_seconds({cpus})")) {
        return;
    }
    let mut h = Hourglass::start(&format!("pr{cpus}"), cpus, &[]);
    wait_healthy(&mut h, cpus as usize);
    let info = h.info();
    assert_eq!(info["state"], "Running");
    assert_no_violations(&info);
    let jump_before = max_jump_ns(&info);
    assert!(
        jump_before < 1_000_000_000,
        "the guest already saw a {jump_before} ns TSC step before any pause"
    );

    let t_pause_sent = Instant::now();
    // SAFETY: RDTSC has no side effects.
    let tsc_pause_sent = unsafe { core::arch::x86_64::_rdtsc() };
    ch_remote_ok(&h, "pause");
    let t_paused = Instant::now();
    let paused = h.info();
    // How long before the pause request each vCPU's last sample was taken. On a host that
    // ignores TSC offsets the guest TSC is the host TSC, so this is exact; a vCPU thread
    // descheduled just before the request (a loaded host) can have waited longer than any step
    // the guest had seen so far.
    let gap_before = if paused["clock"]["offsets_honoured"] == false {
        let khz = paused["clock"]["tsc_khz"].as_u64().expect("tsc_khz");
        paused["time_probe"]["vcpus"]
            .as_array()
            .expect("vcpus")
            .iter()
            .map(|v| v["last_tsc"].as_u64().expect("last_tsc"))
            .map(|last| tsc_pause_sent.saturating_sub(last) * 1_000_000 / khz)
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    assert_eq!(paused["state"], "Paused");
    let samples_paused = vcpu_samples(&paused);
    // Condition-free wait: the pause length is what is measured.
    std::thread::sleep(Duration::from_secs(2));
    let still = h.info();
    assert_eq!(
        vcpu_samples(&still),
        samples_paused,
        "samples changed while paused"
    );
    let t_resume_sent = Instant::now();
    ch_remote_ok(&h, "resume");
    let t_resumed = Instant::now();

    wait_progress(
        &mut h,
        &samples_paused,
        "every vCPU sampling again after resume",
    );
    // Every vCPU's first sample after the resume was taken before this instant.
    let t_progress = Instant::now();
    // Let every vCPU take a few more reports so the jump across the pause is recorded.
    let after = h.info();
    assert_eq!(after["state"], "Running");
    assert_no_violations(&after);

    // The guest's largest TSC step is the pause: at least the interval during which the VM was
    // surely paused (-1 ms); at most the interval from the pause request to the moment the test
    // saw every vCPU sampling again (a vCPU thread may wait for a core after the resume on a
    // host with fewer cores than vCPUs) plus the largest scheduling gap the guest saw before the
    // pause (a vCPU descheduled just before the pause request took its last sample that much
    // earlier, or, where the guest TSC is the host's, exactly as long before as its last
    // sample shows), +1 ms.
    let inner = (t_resume_sent - t_paused).as_nanos() as u64;
    let outer = (t_resumed - t_pause_sent).as_nanos() as u64;
    let seen = (t_progress - t_pause_sent).as_nanos() as u64;
    let jump = max_jump_ns(&after);
    println!(
        "{cpus} vCPU(s): guest TSC step {jump} ns; paused for sure {inner} ns, at most {outer} ns; \
         largest step before the pause {jump_before} ns"
    );
    assert!(
        jump + 1_000_000 >= inner,
        "guest TSC step across the pause {jump} ns < paused interval {inner} ns - 1 ms"
    );
    let before = jump_before.max(gap_before);
    assert!(
        jump <= seen + 1_000_000 + before,
        "guest TSC step across the pause {jump} ns > {seen} ns + 1 ms + {before} ns \
         (largest step before {jump_before} ns, last sample {gap_before} ns before the request)"
    );
    // kvmclock agreed with the TSC on every pair of samples (the guest checks it to 1 us).
    assert!(
        totals(&after, "kvmclock_mismatch_worst_ns") <= 1_000,
        "kvmclock/TSC disagreement {} ns",
        totals(&after, "kvmclock_mismatch_worst_ns")
    );

    // The clock report: what the thaw did.
    let clock = &after["clock"];
    assert_eq!(clock["policy_requested"], "wallclock", "{clock}");
    let applied = clock["policy_applied"].as_str().expect("policy_applied");
    let elapsed = clock["last_elapsed_ns"].as_u64().expect("last_elapsed_ns");
    // Under wallclock (or host_tsc, where the host TSC ran on and kvmclock was advanced to agree
    // with it) the time shown to the guest is the pause, as the test saw it, +-1 ms.
    assert!(
        elapsed + 1_000_000 >= inner && elapsed <= outer + 1_000_000,
        "elapsed shown {elapsed} ns, pause [{inner}, {outer}] ns: {clock}"
    );
    match applied {
        "wallclock" => {}
        "host_tsc" => assert!(
            clock["warnings"].as_array().is_some_and(|w| !w.is_empty()),
            "host_tsc applied without a warning: {clock}"
        ),
        other => panic!("unexpected policy_applied {other}: {clock}"),
    }
    // The guest's kvmclock pages after the thaw, as vm.info reads them from guest memory: one
    // per vCPU, at the address each vCPU wrote to MSR_KVM_SYSTEM_TIME_NEW (read as it parked),
    // written by KVM (a version), and computed from the master clock exactly when KVM says it
    // keeps one.
    let pages = clock["guest_kvmclock"].as_array().expect("guest_kvmclock");
    assert_eq!(pages.len(), cpus as usize, "{clock}");
    let mut gpas: Vec<u64> = pages.iter().map(|p| p["gpa"].as_u64().unwrap()).collect();
    gpas.dedup();
    assert_eq!(gpas.len(), cpus as usize, "one page per vCPU: {clock}");
    for p in pages {
        assert!(p["version"].as_u64().unwrap() > 0, "never written: {p}");
        if let Some(master) = clock["master_clock"].as_bool() {
            assert_eq!(p["tsc_stable"], master, "{p}, master clock {master}");
        }
    }
    let stats = &after["pause_stats"];
    assert_eq!(stats["pauses"], 1);
    assert_eq!(stats["resumes"], 1);
    assert!(stats["last_park_ns"].as_u64().unwrap() > 0);
    let _ = h.api("PUT", "vmm.shutdown", None);
    assert!(h.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn pause_resume_one_vcpu() {
    pause_two_seconds(1);
}

#[test]
fn pause_resume_four_vcpus() {
    pause_two_seconds(4);
}

/// `frozen` asked on a host that ignores TSC offsets is reported as not applied, with a warning;
/// on a host that honours them, the guest sees (almost) no time pass.
#[test]
fn frozen_policy_is_reported_truthfully() {
    let _x = exclusive();
    if skip("frozen_policy_is_reported_truthfully") {
        return;
    }
    let mut h = Hourglass::start("frozen", 2, &["--clock-policy", "frozen"]);
    wait_healthy(&mut h, 2);
    let (c, b) = h.api("PUT", "vm.pause", None);
    assert_eq!(c, 204, "{b}");
    let t0 = Instant::now();
    h.wait_until("500 ms of pause", Duration::from_secs(2), |_| {
        t0.elapsed() >= Duration::from_millis(500)
    });
    let before = vcpu_samples(&h.info());
    let (c, b) = h.api("PUT", "vm.resume", None);
    assert_eq!(c, 204, "{b}");
    wait_progress(&mut h, &before, "sampling after a frozen resume");
    let info = h.info();
    assert_no_violations(&info);
    let clock = &info["clock"];
    assert_eq!(clock["policy_requested"], "frozen", "{clock}");
    let honoured = clock["offsets_honoured"].as_bool();
    match clock["policy_applied"].as_str() {
        Some("frozen") => {
            assert_eq!(honoured, Some(true), "{clock}");
            assert!(
                max_jump_ns(&info) < 400_000_000,
                "frozen yet the guest saw the pause"
            );
        }
        Some("host_tsc") => {
            assert_eq!(honoured, Some(false), "{clock}");
            let warnings = clock["warnings"].as_array().expect("warnings");
            assert!(
                warnings.iter().any(|w| w
                    .as_str()
                    .is_some_and(|s| s.to_lowercase().contains("offset"))),
                "no warning about ignored offsets: {clock}"
            );
        }
        other => panic!("frozen reported as {other:?}: {clock}"),
    }
}

/// 100 pause/resume cycles in a row leave the guest running and healthy.
#[test]
fn hundred_cycles() {
    let _x = exclusive();
    if skip("hundred_cycles") {
        return;
    }
    let mut h = Hourglass::start("cycles", 2, &[]);
    wait_healthy(&mut h, 2);
    for i in 0..100 {
        let (c, b) = h.api("PUT", "vm.pause", None);
        assert_eq!(c, 204, "pause {i}: {b}");
        let (c, b) = h.api("PUT", "vm.resume", None);
        assert_eq!(c, 204, "resume {i}: {b}");
    }
    let before = vcpu_samples(&h.info());
    wait_progress(&mut h, &before, "sampling after 100 cycles");
    let info = h.info();
    assert_eq!(info["state"], "Running");
    assert_no_violations(&info);
    assert_eq!(info["pause_stats"]["pauses"], 100);
    assert_eq!(info["pause_stats"]["resumes"], 100);
    assert!(h.serial_text().contains("heartbeat"));
    // A clock warning (a host that ignores offsets warns at every thaw) is logged once per VM,
    // not once per resume: with --serial tty it would land in the guest's console.
    let stderr = h.stderr();
    let clock_warnings = stderr
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("clock: "))
        .count();
    assert!(
        clock_warnings <= 1,
        "{clock_warnings} clock warnings:\n{stderr}"
    );
}
