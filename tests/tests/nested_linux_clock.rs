//! A Linux guest's own clocks across pause/resume, snapshot → kill → restore and live migration
//! to a second `hourglass` in the same host (issue 14), on
//! the nested kvm_amd host (Debian's kernel as the guest, 2 vCPUs), for each guest clocksource
//! (`tsc`, which the guest picks itself here, and `kvm-clock`) and each policy.
//!
//! The guest's `/init` is the clock probe (tests/tests/linux_support/clock_probe.c): it reads
//! CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME and the TSC in a tight loop and keeps the
//! two consecutive readings with the largest MONOTONIC step since the last mark, so a report
//! after an outage holds the guest's own step across it. Its REALTIME is compared with this
//! host's by marks: the test notes its realtime, asks for a mark (one byte on the console), and
//! notes its realtime again when the answer arrives; the guest read its clock in between. The
//! narrowest of fifteen marks before and after an outage gives the change of (guest − host)
//! REALTIME, its uncertainty the two brackets' half widths. What is asserted, each case:
//!
//! - `wallclock`: the guest's REALTIME − the host's changed by at most 5 ms, and its MONOTONIC
//!   stepped across the outage as its REALTIME did (within 5 ms): by the real outage, which is
//!   at least the time the VM was surely paused.
//! - `frozen`: the MONOTONIC step is not the outage but the resume's own latency (the guest's
//!   time runs from the thaw's sample on, whether or not its vCPU has entered yet); asserted
//!   under 1% of the outage (under the lag, for a migration), printed with `vm.info`'s
//!   `pause_stats`, because under the emulator that latency is 10-140 ms (see `check`);
//!   REALTIME lags the host by the
//!   outage (within the outage's bracket ±5 ms), as `vm.info` says (`policy_applied`
//!   `frozen`).
//! - always: the clocksource is the one the guest booted with, its two vCPUs' TSCs read back in
//!   order (400 reads alternating CPUs), KVM keeps its master clock (`clock.master_clock`) and
//!   both vCPUs' kvmclock pages have PVCLOCK_TSC_STABLE_BIT, and the kernel printed none of
//!   [`CLOCK_COMPLAINTS`].
//!
//! Each test prints its rows of the README's table "a Linux guest's view".

mod linux_support;
mod vmm_support;

use std::io::Write;
use std::process::{ChildStdin, Stdio};
use std::sync::MutexGuard;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use linux_support::*;
use serde_json::Value;
use vmm_support::console::Console;
use vmm_support::*;

/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(10);
/// The bound of the issue, ns.
const BOUND_NS: i128 = 5_000_000;
/// Marks taken before and after an outage (the narrowest bracket counts). Fifteen, not five:
/// on one emulated CPU with the host's periodic tick a console round trip is slower than on
/// two, and the narrowest of five left a reading ±6.9-12.1 ms (median 9.1 over 12), more than
/// the bound it checks; fifteen gave ±3.9-10.5 (median 7.5 over 11). A mark is a round trip.
const MARKS: usize = 15;

fn host_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as i128
}

/// One reading of the guest's clocks, ns (the TSC in cycles).
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    rt: i128,
    mono: i128,
    boot: i128,
    tsc: i128,
}

impl Sample {
    fn from(v: &[i128]) -> Self {
        Sample {
            rt: v[0],
            mono: v[1],
            boot: v[2],
            tsc: v[3],
        }
    }
}

/// A mark: the host's realtime before asking and when the answer came, the guest's reading in
/// between, and the largest MONOTONIC step of the window the mark closed.
#[derive(Clone, Copy, Debug)]
struct Mark {
    h0: i128,
    h1: i128,
    now: Sample,
    step: (Sample, Sample),
}

impl Mark {
    /// Guest REALTIME − host realtime, with the bracket's midpoint for the host's.
    fn offset(&self) -> i128 {
        self.now.rt - (self.h0 + self.h1) / 2
    }

    fn half_width(&self) -> i128 {
        (self.h1 - self.h0) / 2
    }
}

/// The guest's console: hourglass's stdin and stdout.
struct Probe {
    c: Console,
    keys: ChildStdin,
    /// Where in stdout the next answer is looked for.
    at: usize,
    /// The last mark's number (the guest counts them too, across restores).
    seq: u64,
}

impl Probe {
    /// `hourglass` with `args`; `seq` marks taken so far. With no arguments it only serves
    /// (a migration's destination).
    fn spawn(tag: &str, args: &[&str], seq: u64) -> Self {
        let mut c = Console::spawn(tag, args, Stdio::piped());
        let path = if args.is_empty() {
            "vmm.ping"
        } else {
            "vm.info"
        };
        c.wait_answer(path, Duration::from_secs(120));
        let keys = c.child.stdin.take().expect("stdin");
        Probe {
            c,
            keys,
            at: 0,
            seq,
        }
    }

    fn send(&mut self, what: &[u8]) {
        self.keys
            .write_all(what)
            .expect("write to hourglass's stdin");
    }

    /// The line that starts with `prefix` (after [`Probe::at`]), without it; moves past it.
    fn line(&mut self, prefix: &str) -> String {
        let start = self.c.wait_stdout(self.at, prefix, Duration::from_secs(60));
        let end = self.c.wait_stdout(start, "\n", Duration::from_secs(60));
        self.at = end;
        String::from_utf8_lossy(&self.c.seen[start..end])
            .trim()
            .to_owned()
    }

    fn mark(&mut self) -> Mark {
        self.seq += 1;
        let h0 = host_ns();
        self.send(b"M");
        // The guest writes one ACK byte right after its reading, before anything else.
        self.at = self
            .c
            .wait_stdout(self.at, "\u{6}", Duration::from_secs(60));
        let h1 = host_ns();
        let rt = self.line(&format!("HG-T {} ", self.seq));
        let detail = self.line(&format!("HG-MARK {} ", self.seq));
        let nums: Vec<i128> = detail
            .split_whitespace()
            .filter(|w| *w != "GAP")
            .map(|w| w.parse().unwrap_or_else(|_| panic!("mark {detail:?}")))
            .collect();
        assert_eq!(nums.len(), 12, "mark {detail:?}");
        assert_eq!(
            rt.parse::<i128>().ok(),
            Some(nums[0]),
            "{rt:?} / {detail:?}"
        );
        Mark {
            h0,
            h1,
            now: Sample::from(&nums[0..4]),
            step: (Sample::from(&nums[4..8]), Sample::from(&nums[8..12])),
        }
    }

    /// [`MARKS`] marks; the one with the narrowest bracket.
    fn best_mark(&mut self) -> Mark {
        (0..MARKS)
            .map(|_| self.mark())
            .min_by_key(Mark::half_width)
            .expect("marks")
    }

    fn clocksource(&mut self) -> String {
        self.send(b"C");
        self.line("HG-CS ")
    }

    /// (reads, backwards steps, largest backwards step in cycles).
    fn tsc_sync(&mut self) -> (u64, u64, u64) {
        self.send(b"S");
        let l = self.line("HG-TSCSYNC ");
        let v: Vec<u64> = l
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(v.len(), 3, "{l:?}");
        (v[0], v[1], v[2])
    }

    fn info(&self) -> Value {
        let (code, body) = self.c.api("GET", "vm.info", None);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("vm.info is JSON")
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&self.c.seen).into_owned()
    }
}

/// What an outage did to the guest's clocks; one row of the README's table.
struct Outcome {
    op: &'static str,
    /// The outage as the test bracketed it: surely stopped, at most stopped, ns.
    outage: (i128, i128),
    /// Change of guest − host REALTIME, ns, and its uncertainty.
    rt_change: i128,
    rt_uncertainty: i128,
    /// The guest's MONOTONIC and BOOTTIME steps across the outage, ns; TSC cycles.
    mono_step: i128,
    rt_step: i128,
    boot_step: i128,
    tsc_step: i128,
    clocksource: String,
    master_clock: bool,
    /// The resume's thaw plus the release of the vCPU threads (`vm.info` `pause_stats`), ns.
    resume_latency: i128,
}

fn ms(ns: i128) -> f64 {
    ns as f64 / 1e6
}

/// Check one outage (see the module doc) and return its row.
#[allow(clippy::too_many_arguments)]
fn check(
    op: &'static str,
    policy: &str,
    clocksource: &str,
    p: &mut Probe,
    before: &Mark,
    outage: (i128, i128),
) -> Outcome {
    // The first mark after the outage closes the window that holds it.
    let first = p.mark();
    let rest = p.best_mark();
    let after = if first.half_width() < rest.half_width() {
        first
    } else {
        rest
    };
    let (a, b) = first.step;
    let info = p.info();
    let clock = &info["clock"];
    let elapsed_shown = clock["last_elapsed_ns"].as_i64().expect("last_elapsed_ns") as i128;
    let o = Outcome {
        op,
        outage,
        rt_change: after.offset() - before.offset(),
        rt_uncertainty: after.half_width() + before.half_width(),
        mono_step: b.mono - a.mono,
        rt_step: b.rt - a.rt,
        boot_step: b.boot - a.boot,
        tsc_step: b.tsc - a.tsc,
        clocksource: p.clocksource(),
        master_clock: clock["master_clock"] == true,
        resume_latency: ["last_thaw_ns", "last_released_ns"]
            .iter()
            .map(|k| info["pause_stats"][k].as_i64().unwrap_or(0) as i128)
            .sum(),
    };
    let what = format!(
        "{op}, {clocksource}, {policy}: outage {:.3}..{:.3} ms, REALTIME change {:.3} ms \
         (±{:.3}), MONOTONIC step {:.3} ms, BOOTTIME step {:.3} ms, TSC step {} cycles, elapsed \
         shown {:.3} ms; pause_stats {}; clock {clock}",
        ms(outage.0),
        ms(outage.1),
        ms(o.rt_change),
        ms(o.rt_uncertainty),
        ms(o.mono_step),
        ms(o.boot_step),
        o.tsc_step,
        ms(elapsed_shown),
        info["pause_stats"],
    );
    println!("{what}");
    assert_eq!(clock["policy_applied"], policy, "{what}");
    match policy {
        "wallclock" => {
            // REALTIME kept the host's, and MONOTONIC stepped as REALTIME did: it advanced by
            // the real outage (from this vCPU's stop to its first run after), at least the
            // time the VM was surely paused.
            assert!(o.rt_change.abs() <= BOUND_NS, "REALTIME moved: {what}");
            assert!(
                (o.mono_step - o.rt_step).abs() <= BOUND_NS,
                "MONOTONIC and REALTIME stepped differently: {what}"
            );
            assert!(
                o.mono_step >= outage.0 - BOUND_NS,
                "MONOTONIC advanced less than the outage: {what}"
            );
        }
        "frozen" => {
            // The guest's time runs again from the thaw's sample, so what it sees is the
            // resume's own latency: from that sample to its vCPU's first entry, then to the
            // probe's next reading. On a real host that is the thaw and release (about 0.1-
            // 0.3 ms, docs/design.md §5); under the emulator the thaw and release alone take
            // 10-25 ms (vm.info pause_stats, printed above) and the emulated host's scheduling
            // and a restored guest's first-touch faults add tens of ms more (README, "a Linux
            // guest's view"). So the issue's 5 ms cannot be asserted here; what is asserted is
            // that the outage stays hidden: REALTIME (below) lags by all of it, and the step
            // is under 1% of an outage of seconds (a pause, a restore), or under the lag for
            // a migration's outage of a few hundred ms (seen 36-139 ms, the destination's
            // first run faulting its memory in).
            if outage.0 >= 1_000_000_000 {
                assert!(
                    o.mono_step <= outage.0 / 100,
                    "MONOTONIC saw the outage: {what}"
                );
            } else {
                assert!(
                    o.mono_step < -o.rt_change,
                    "MONOTONIC saw the outage: {what}"
                );
            }
            assert!(
                -o.rt_change >= outage.0 - BOUND_NS && -o.rt_change <= outage.1 + BOUND_NS,
                "REALTIME does not lag by the outage: {what}"
            );
        }
        other => panic!("policy {other}"),
    }
    assert_eq!(
        o.clocksource, clocksource,
        "the clocksource changed: {what}"
    );
    let (reads, back, worst) = p.tsc_sync();
    assert_eq!(
        back, 0,
        "{back} of {reads} TSC reads across vCPUs went backwards (by up to {worst} cycles)"
    );
    assert!(o.master_clock, "KVM's master clock is off: {what}");
    let pages = clock["guest_kvmclock"].as_array().expect("guest_kvmclock");
    assert_eq!(pages.len(), 2, "{what}");
    assert!(
        pages.iter().all(|pg| pg["tsc_stable"] == true),
        "a kvmclock page without PVCLOCK_TSC_STABLE_BIT: {what}"
    );
    let console = p.console();
    for bad in CLOCK_COMPLAINTS.into_iter().chain(["TSC synchronization"]) {
        assert!(
            !console.contains(bad),
            "the kernel said {bad:?}:\n{console}"
        );
    }
    o
}

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
    let archive = dir.join("initramfs.cpio");
    std::fs::write(&archive, initramfs(Init::ClockProbe)).expect("write the initramfs");
    let cmdline = format!("console=ttyS0 panic=0 {extra_cmdline}");
    let args = [
        vec!["--cpus".into(), "boot=2".into()],
        linux_args(&kernel, &archive, cmdline.trim_end()),
        vec!["--clock-policy".into(), policy.into()],
    ]
    .concat();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = Probe::spawn(test, &args, 0);
    p.line("HG-PROBE-READY");
    assert_eq!(p.clocksource(), clocksource, "at boot");
    let (reads, back, worst) = p.tsc_sync();
    assert_eq!(
        back, 0,
        "at boot: {back} of {reads} backwards, up to {worst}"
    );
    let mut rows = Vec::new();

    // Pause, OUTAGE, resume.
    let before = p.best_mark();
    let t0 = host_ns();
    let (code, body) = p.c.api("PUT", "vm.pause", None);
    assert_eq!(code, 204, "{body}");
    let t1 = host_ns();
    // The outage is the subject of the test, not a wait for something.
    std::thread::sleep(OUTAGE);
    let t2 = host_ns();
    let (code, body) = p.c.api("PUT", "vm.resume", None);
    assert_eq!(code, 204, "{body}");
    let t3 = host_ns();
    rows.push(check(
        "pause 10 s, resume",
        policy,
        clocksource,
        &mut p,
        &before,
        (t2 - t1, t3 - t0),
    ));

    // Snapshot, kill, OUTAGE, restore in a new process.
    let before = p.best_mark();
    let snap = dir.join("snap");
    let t0 = host_ns();
    let (code, body) = p.c.api("PUT", "vm.pause", None);
    assert_eq!(code, 204, "{body}");
    let t1 = host_ns();
    let body = serde_json::json!({ "destination_url": format!("file://{}", snap.display()) });
    let (code, body) = p.c.api("PUT", "vm.snapshot", Some(&body.to_string()));
    assert_eq!(code, 204, "vm.snapshot: {body}");
    let seq = p.seq;
    let old_console = p.console();
    drop(p);
    std::thread::sleep(OUTAGE);
    let t2 = host_ns();
    let source = format!(
        "source_url=file://{},resume=true,clock_policy={policy}",
        snap.display()
    );
    let mut p = Probe::spawn(&format!("{test}-restored"), &["--restore", &source], seq);
    let t3 = host_ns();
    rows.push(check(
        "snapshot, kill, 10 s, restore",
        policy,
        clocksource,
        &mut p,
        &before,
        (t2 - t1, t3 - t0),
    ));
    for bad in CLOCK_COMPLAINTS {
        assert!(!old_console.contains(bad), "before the restore: {bad}");
    }

    // Live migration to a second hourglass in this host (serving, then receiving).
    let before = p.best_mark();
    let mut dst = Probe::spawn(&format!("{test}-dst"), &[], p.seq);
    let sock = dir.join("mig.sock");
    let url = format!("unix:{}", sock.display());
    let dst_api = dst.c.socket.clone();
    let body = serde_json::json!({ "receiver_url": url }).to_string();
    let rx = std::thread::spawn(move || {
        vmm::api::client::api_request(&dst_api, "PUT", "vm.receive-migration", Some(&body))
            .map_err(|e| e.to_string())
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the receiver never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = host_ns();
    let (code, body) = p.c.api(
        "PUT",
        "vm.send-migration",
        Some(&serde_json::json!({ "destination_url": url }).to_string()),
    );
    assert_eq!(code, 204, "send-migration: {body}");
    let t1 = host_ns();
    let (code, body) = rx.join().expect("receiver").expect("receive-migration");
    assert_eq!(code, 204, "receive-migration: {body}");
    let source_console = p.console();
    // The source's own measure of the downtime: from its pause to the destination's answer.
    let downtime_ns = (p.info()["migration"]["downtime_ms"]
        .as_f64()
        .expect("migration.downtime_ms")
        * 1e6) as i128;
    assert!(downtime_ns <= t1 - t0, "downtime {downtime_ns} ns");
    drop(p);
    for bad in CLOCK_COMPLAINTS {
        assert!(!source_console.contains(bad), "before the migration: {bad}");
    }
    rows.push(check(
        "live migration (same host)",
        policy,
        clocksource,
        &mut dst,
        &before,
        (0, downtime_ns),
    ));

    // The README's rows: operation, clocksource, policy, outage (surely..at most), change of
    // guest − host REALTIME (± the marks' uncertainty), MONOTONIC step, the resume's thaw +
    // release, clocksource after, master clock after, kernel complaints.
    for o in &rows {
        println!(
            "| {} | {clocksource} | {policy} | {:.3}-{:.3} s | {:+.3} ms (±{:.1}) | {:.1} ms | \
             {:.1} ms | {} | {} | none |",
            o.op,
            ms(o.outage.0) / 1e3,
            ms(o.outage.1) / 1e3,
            ms(o.rt_change),
            ms(o.rt_uncertainty),
            ms(o.mono_step),
            ms(o.resume_latency),
            o.clocksource,
            if o.master_clock { "kept" } else { "lost" },
        );
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
