//! The VMM's time claims, shown with the built-in test guest on a KVM that honours TSC offsets:
//! the nested kvm_amd host of `scripts/nested-kvm.sh` (`HOURGLASS_NESTED=1`).
//!
//! Each test boots the real `hourglass` binary with 2 or 4 vCPUs and 64 MiB under one clock
//! policy, makes a first pause/resume (which gives the first clock report: the VM-wide offset `O`
//! and whether the host honoured it), then
//! 1. [`CYCLES`] pause/resume cycles, each followed by a report from every vCPU, and
//! 2. one pause of [`LONG_PAUSE`],
//!
//! and checks after each: the guest's own violation counters (TSC backwards, cross-vCPU order,
//! kvmclock/TSC disagreement) are 0; every vCPU's latest guest TSC sample, minus its TSC_ADJUST
//! and the reported VM offset, is a host TSC value read between the resume and the read-out
//! (the test runs on the same host as the VMM and reads that host's TSC; there is no TSC scaling,
//! so guest TSC = host TSC + O exactly): one offset is in force on every vCPU (a vCPU left on the
//! old offset would be off by the whole pause under `frozen`);
//! - `wallclock`: the offset did not move (O' = O), so the guest TSC advanced by exactly the real
//!   time, and across the long pause every vCPU's TSC advanced by at least the interval during
//!   which the VM was surely paused;
//! - `frozen`: the policy applied is `frozen`, the offset moved back by the paused time (between
//!   the test's inner and outer brackets of the pause), and the guest saw no pause: its largest
//!   forward TSC step between two samples stays below [`FROZEN_MAX_JUMP_NS`].
//!
//! Across the long pause the test also measures, per vCPU, how much of the pause the guest saw:
//! its TSC advance between its last sample before the pause and its latest after, less the time
//! the VM surely ran in between (from that sample to the pause request, and from the resume's
//! answer to the later sample; each sample's host instant is its TSC less the offset in force).
//! `wallclock`: between the test's inner and outer brackets of the pause; `frozen`: at most the
//! two API calls' latency (outer - inner), i.e. nothing of the 2 s.
//!
//! vm.info reports one VM offset (vCPU 0's read-back); the thaw itself compares every vCPU's
//! read-back with the plan and falls back to `host_tsc` if one differs, and the guest-sample
//! check above shows the offset from the guest's side on every vCPU.
//!
//! On a host whose KVM ignores offsets (the developer machine's kvm_pvm) the same runs are made
//! and measured (the policy applied there is `host_tsc`), the offset checks are skipped with a
//! message naming `scripts/nested-kvm.sh`; inside the nested host that is a failure.
//!
//! Each run prints one machine-readable line per operation,
//! `HOURGLASS-TIME-ERROR op=... policy=... host=... ...` (fields: [`Figures::line`]), and appends
//! it to `$HOURGLASS_TIME_ERRORS` (default `target/time-errors.tsv`); `scripts/nested-table.sh`
//! turns those lines (and the nested console's) into the README's table.

mod vmm_support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_support::*;

const SKIP: &str = "skipped: this host's KVM ignores TSC offsets; run scripts/nested-kvm.sh";

/// Pause/resume cycles per test: the 100 the issue asks for. Measured inside the nested host
/// (QEMU TCG on the 2-core developer machine, shared with builds): a cycle (pause, vm.info while
/// paused, resume, two reports from every vCPU, vm.info) takes 35-120 ms, a whole test 7-21 s,
/// the four together 30-80 s: well within the 3-minute budget.
const CYCLES: u32 = 100;

/// The long pause: the interval during which the guest must see nothing (`frozen`) or
/// everything (`wallclock`).
const LONG_PAUSE: Duration = Duration::from_secs(2);

/// Under `frozen`, the largest forward TSC step the guest may see between two of its samples
/// over the whole run (a pause shown to the guest would be [`LONG_PAUSE`]). The arithmetic is
/// exact (the offset moves back by exactly the host cycles between freeze and thaw); what the
/// guest sees besides is scheduling: on the emulated host a vCPU thread (4 guest vCPUs on 2
/// emulated CPUs, themselves threads of a loaded 2-core machine) is measured to go up to 313 ms
/// without running even under `wallclock` with pauses of a few ms, so the bound is the pause's
/// half; the precise per-pause figure is the "pause seen" check (see the module documentation).
const FROZEN_MAX_JUMP_NS: u64 = 1_000_000_000;

/// Slack on the host-TSC brackets, in µs: the emulated host's CPUs read the real host's TSC at
/// slightly different moments from the vCPU threads' point of view (QEMU computes the TSC per
/// emulated CPU); on real hardware the TSC is synchronised to well below this.
const BRACKET_SLACK_US: u64 = 100;

/// This host's TSC, read now.
fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Timeouts are stretched this much inside the emulated host.
fn slow() -> u32 {
    if in_nested_host() {
        8
    } else {
        1
    }
}

/// The host's name in the figures: `HOURGLASS_TIME_HOST` if set, else what the test can tell.
fn host_label(honoured: bool) -> String {
    if let Ok(l) = std::env::var("HOURGLASS_TIME_HOST") {
        return l;
    }
    if in_nested_host() {
        "nested-kvm_amd".into()
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm".into()
    } else if honoured {
        "kvm".into()
    } else {
        "kvm-offsets-ignored".into()
    }
}

/// Signed difference `a - b` of two values that live modulo 2^64.
fn sdiff(a: u64, b: u64) -> i64 {
    a.wrapping_sub(b) as i64
}

/// `cycles` at `khz`, in ns.
fn cycles_ns(cycles: i128, khz: u64) -> i64 {
    (cycles * 1_000_000 / i128::from(khz.max(1))) as i64
}

/// One vCPU's latest report.
#[derive(Debug, Clone, Copy)]
struct Sample {
    samples: u64,
    /// The guest's report sequence number.
    seq: u64,
    tsc: u64,
    kvmclock_ns: u64,
    tsc_adjust: u64,
}

fn vcpus(info: &Value) -> Vec<Sample> {
    info["time_probe"]["vcpus"]
        .as_array()
        .unwrap_or_else(|| panic!("time_probe.vcpus missing in {info}"))
        .iter()
        .map(|v| {
            let f = |k: &str| {
                v[k].as_u64()
                    .unwrap_or_else(|| panic!("time_probe.vcpus[].{k} missing in {v}"))
            };
            Sample {
                samples: f("samples"),
                seq: f("seq"),
                tsc: f("last_tsc"),
                kvmclock_ns: f("last_kvmclock_ns"),
                tsc_adjust: f("last_tsc_adjust"),
            }
        })
        .collect()
}

/// What vm.info's `clock` says.
#[derive(Debug, Clone)]
struct Clock {
    requested: String,
    applied: String,
    honoured: Option<bool>,
    vm_offset: u64,
    tsc_khz: u64,
    host_tsc_khz: u64,
    warnings: usize,
}

impl Clock {
    fn of(info: &Value) -> Clock {
        let c = &info["clock"];
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        let u = |v: &Value, k: &str| {
            v.as_u64()
                .unwrap_or_else(|| panic!("clock.{k} missing after a resume: {c}"))
        };
        Clock {
            requested: s("policy_requested"),
            applied: s("policy_applied"),
            honoured: c["offsets_honoured"].as_bool(),
            vm_offset: u(&c["vm_offset"], "vm_offset"),
            tsc_khz: u(&c["tsc_khz"], "tsc_khz"),
            host_tsc_khz: u(
                &c["capabilities"]["host_tsc_khz"],
                "capabilities.host_tsc_khz",
            ),
            warnings: c["warnings"].as_array().map_or(0, Vec::len),
        }
    }
}

/// On a host that ignores TSC offsets the VMM cannot place the TSC; it reads the guest's TSC
/// back through MSR_IA32_TSC brackets of a few µs and anchors kvmclock on that estimate, so a
/// thaw there may leave kvmclock up to this far from the TSC (measured: 1.25 µs, once or twice in
/// 100 cycles) where the guest's own bound is 1 µs. On the nested kvm_amd the bound is the
/// guest's: no disagreement may be counted at all.
const IGNORED_OFFSETS_KVMCLOCK_NS: u64 = 2_000;

fn assert_no_violations(info: &Value, when: &str, honoured: bool) {
    for f in ["tsc_backwards", "cross_vcpu", "kvmclock_mismatch"] {
        let n = totals(info, f);
        if f == "kvmclock_mismatch" && !honoured && n > 0 {
            let worst = totals(info, "kvmclock_mismatch_worst_ns");
            assert!(
                worst <= IGNORED_OFFSETS_KVMCLOCK_NS,
                "{n} kvmclock/TSC disagreements {when}, worst {worst} ns: {}",
                info["time_probe"]
            );
            println!(
                "note: {n} kvmclock/TSC disagreement(s) {when}, worst {worst} ns (above the \
                 guest's 1 µs bound; tolerated up to {IGNORED_OFFSETS_KVMCLOCK_NS} ns on a host \
                 that ignores TSC offsets)"
            );
            continue;
        }
        assert_eq!(n, 0, "{f} violations {when}: {}", info["time_probe"]);
    }
    assert_eq!(
        info["time_probe"]["bad_doorbells"].as_u64(),
        Some(0),
        "bad doorbells {when}: {}",
        info["time_probe"]
    );
}

/// Every vCPU has reported and the heartbeat is on the serial port.
fn wait_healthy(h: &mut Hourglass, cpus: usize, slow: u32) {
    h.wait_until(
        "every vCPU reporting samples",
        Duration::from_secs(20) * slow,
        |h| {
            let s = vcpu_samples(&h.info());
            s.len() == cpus && s.iter().all(|&n| n > 0)
        },
    );
    h.wait_until(
        "a heartbeat on the serial port",
        Duration::from_secs(20) * slow,
        |h| h.serial_text().contains("heartbeat"),
    );
}

/// Wait until every vCPU has reported a sample taken after the resume, `before` being the
/// reports read while the VM was paused.
///
/// That takes two reports: a vCPU stopped by the pause between taking a sample and ringing the
/// doorbell delivers that (older) sample in its first report after the resume; the sample of
/// its second report was taken after the first report was delivered, hence after the resume.
fn wait_progress(h: &mut Hourglass, before: &[Sample], what: &str, slow: u32) {
    let before: Vec<u64> = before.iter().map(|s| s.seq).collect();
    h.wait_until(what, Duration::from_secs(10) * slow, move |h| {
        let now = vcpus(&h.info());
        now.len() == before.len() && now.iter().zip(&before).all(|(a, b)| a.seq >= b + 2)
    });
}

fn put(h: &Hourglass, path: &str) {
    let (code, body) = h.api("PUT", path, None);
    assert_eq!(code, 204, "{path}: {body}\n{}", h.stderr());
}

/// Every vCPU's latest sample, less its TSC_ADJUST and the VM offset `o`, must be a host TSC
/// value of `[lo, hi]` (± [`BRACKET_SLACK_US`]): the guest really runs on `host TSC + o`.
/// Returns the bracket width in ns.
fn assert_on_offset(after: &[Sample], o: u64, lo: u64, hi: u64, khz: u64, when: &str) -> i64 {
    let slack = BRACKET_SLACK_US * khz / 1000;
    for (i, s) in after.iter().enumerate() {
        let host = s.tsc.wrapping_sub(s.tsc_adjust).wrapping_sub(o);
        let below = sdiff(lo, host);
        let above = sdiff(host, hi);
        assert!(
            below <= slack as i64 && above <= slack as i64,
            "{when}: vCPU {i}'s TSC {} (TSC_ADJUST {}) is not host TSC + the VM offset {o}: it \
             stands for host TSC {host}, outside [{lo}, {hi}] by {} ns",
            s.tsc,
            s.tsc_adjust,
            cycles_ns(i128::from(below.max(above)), khz)
        );
    }
    cycles_ns(i128::from(sdiff(hi, lo)), khz)
}

/// `Δkvmclock - ΔTSC` (ns) between two samples of the same vCPU: the value of largest magnitude
/// over all vCPUs (positive: kvmclock ran ahead of the TSC).
fn kvmclock_divergence(before: &[Sample], after: &[Sample], khz: u64) -> i64 {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| b.kvmclock_ns != 0 && a.kvmclock_ns != 0)
        .map(|(b, a)| {
            let dk = i128::from(a.kvmclock_ns) - i128::from(b.kvmclock_ns);
            let dt = i128::from(sdiff(
                a.tsc.wrapping_sub(a.tsc_adjust),
                b.tsc.wrapping_sub(b.tsc_adjust),
            ));
            (dk - i128::from(cycles_ns(dt, khz))) as i64
        })
        .max_by_key(|d| d.unsigned_abs())
        .unwrap_or(0)
}

/// The divergence across an operation: the guest's samples' own, or the guest's worst
/// consecutive-sample value if that is larger in magnitude.
fn divergence(before: &[Sample], after: &[Sample], khz: u64, info: &Value) -> i64 {
    let d = kvmclock_divergence(before, after, khz);
    let worst = totals(info, "kvmclock_mismatch_worst_ns");
    if worst > d.unsigned_abs() {
        worst as i64
    } else {
        d
    }
}

/// Host TSC values around one pause: `h0` before the pause request, `h1` after its answer, `h2`
/// before the resume request, `h3` after its answer.
#[derive(Debug, Clone, Copy)]
struct PauseBracket {
    h0: u64,
    h1: u64,
    h2: u64,
    h3: u64,
}

impl PauseBracket {
    /// Cycles during which the VM was surely paused.
    fn inner(&self) -> u64 {
        self.h2.wrapping_sub(self.h1)
    }

    /// Cycles from the pause request to the resume's answer.
    fn outer(&self) -> u64 {
        self.h3.wrapping_sub(self.h0)
    }
}

/// How much of one pause the guest saw, worst vCPU, in cycles: each vCPU's TSC advance between
/// a sample taken before the pause (under offset `ob`) and a sample after it (under `oa`), less
/// the time the VM surely ran in between (the first sample's host instant to `h0`, `h3` to the
/// second's). Checked against what `policy` promises (`None`: nothing, offsets ignored):
/// `wallclock` the whole pause, within `[inner, outer]`; `frozen` nothing of it but the API
/// calls' latency, within `[0, outer - inner]`.
fn pause_seen(
    (vb, ob): (&[Sample], u64),
    (va, oa): (&[Sample], u64),
    p: PauseBracket,
    policy: Option<&str>,
    slack: u64,
    khz: u64,
    when: &str,
) -> i64 {
    let (inner, outer) = (p.inner() as i64, p.outer() as i64);
    let (lo, hi) = match policy {
        Some("wallclock") => (inner, outer),
        Some("frozen") => (0, outer - inner),
        _ => (i64::MIN / 2, i64::MAX / 2),
    };
    let slack = slack as i64;
    let mut worst = i64::MIN;
    for (i, (b, a)) in vb.iter().zip(va).enumerate() {
        let gb = b.tsc.wrapping_sub(b.tsc_adjust);
        let ga = a.tsc.wrapping_sub(a.tsc_adjust);
        let hb = gb.wrapping_sub(ob);
        let ha = ga.wrapping_sub(oa);
        let s = sdiff(ga, gb) - sdiff(p.h0, hb) - sdiff(ha, p.h3);
        assert!(
            s + slack >= lo && s <= hi + slack,
            "{when}: vCPU {i} saw {s} cycles ({} ns) of the pause, not within [{lo}, {hi}] \
             cycles ({policy:?})",
            cycles_ns(i128::from(s), khz)
        );
        worst = worst.max(s);
    }
    worst
}

/// The measured time errors of one operation.
struct Figures {
    op: &'static str,
    policy: String,
    applied: String,
    host: String,
    cpus: u32,
    cycles: u32,
    test: String,
    /// Real time during which the VM was surely paused (of the cycles: the longest), ns.
    pause_ns: u64,
    /// The guest's largest forward TSC step between two samples, over the run so far, ns.
    max_jump_ns: u64,
    /// kvmclock/TSC disagreement across the operation (guest samples; [`divergence`]), ns.
    kvmclock_div_ns: i64,
    /// The guest's worst cross-vCPU order violation, ns (0: none seen).
    cross_vcpu_ns: u64,
    /// How far the operation (all the cycles) put the guest's TSC behind the host's time, ns:
    /// `(O_before - O_after) / f`. `wallclock`: 0 is exact; `frozen`: the paused time, by design.
    behind_ns: i64,
    /// How much of the pause the guest saw, worst vCPU (see the module documentation), ns.
    pause_seen_ns: i64,
    /// Width of the host-TSC bracket that confirmed the offset from the guest's samples, ns.
    bracket_ns: i64,
}

impl Figures {
    fn line(&self) -> String {
        format!(
            "HOURGLASS-TIME-ERROR op={} policy={} applied={} host={} cpus={} cycles={} \
             pause_ns={} pause_seen_ns={} max_tsc_jump_ns={} kvmclock_tsc_divergence_ns={} \
             cross_vcpu_skew_ns={} wallclock_error_ns={} offset_bracket_ns={} test={}",
            self.op,
            self.policy,
            self.applied,
            self.host,
            self.cpus,
            self.cycles,
            self.pause_ns,
            self.pause_seen_ns,
            self.max_jump_ns,
            self.kvmclock_div_ns,
            self.cross_vcpu_ns,
            self.behind_ns,
            self.bracket_ns,
            self.test
        )
    }

    /// Print the line and append it to the figures file (best effort: the console line is what
    /// the nested host gives back).
    fn emit(&self) {
        let line = self.line();
        println!("{line}");
        let path = std::env::var_os("HOURGLASS_TIME_ERRORS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                bin_dir()
                    .parent()
                    .map_or_else(|| PathBuf::from("time-errors.tsv"), Path::to_path_buf)
                    .join("time-errors.tsv")
            });
        let tsv = line.split(' ').collect::<Vec<_>>().join("\t");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{tsv}"));
        if let Err(e) = written {
            println!("note: figures not appended to {}: {e}", path.display());
        }
    }
}

/// The whole test: see the module documentation.
fn run(cpus: u32, policy: &str) {
    let test = format!("nested_vmm_{policy}_{cpus}_vcpus");
    let _x = exclusive();
    if let Some(r) = skip_reason() {
        assert!(!in_nested_host(), "HOURGLASS_NESTED=1 but {r}");
        println!("SKIPPED {test}: {r}");
        return;
    }
    let slow = slow();
    let t_start = Instant::now();
    let mut h = Hourglass::start_anywhere(
        &format!("nv{policy}{cpus}"),
        cpus,
        &["--clock-policy", policy],
        slow,
    );
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        exercise(&mut h, &test, cpus, policy, slow, t_start)
    }));
    if let Err(e) = outcome {
        // The guest's serial output goes with the VMM's temporary directory: show its end.
        let serial = h.serial_text();
        let tail: Vec<&str> = serial.lines().rev().take(20).collect();
        println!(
            "{test} failed; the guest's serial output ended with:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        // The VMM's own log: why it stopped, if it did.
        let stderr = h.stderr();
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
        println!(
            "{test}: the VMM's stderr ended with:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        // And what the VMM still says about each vCPU (which one stopped reporting, if any).
        if let Some(info) = h.try_info() {
            let per_vcpu: Vec<String> = info["time_probe"]["vcpus"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .map(|r| {
                            format!(
                                "vCPU {}: seq {} samples {} last_tsc {} halted {}",
                                r["vcpu"], r["seq"], r["samples"], r["last_tsc"], r["halted"]
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "state {}, pause_stats {}, host TSC now {}\n{}",
                info["state"],
                info["pause_stats"],
                host_tsc(),
                per_vcpu.join("\n")
            );
        }
        std::panic::resume_unwind(e);
    }
}

/// Everything [`run`] does once `hourglass` answers.
fn exercise(h: &mut Hourglass, test: &str, cpus: u32, policy: &str, slow: u32, t_start: Instant) {
    progress("hourglass answers");
    wait_healthy(h, cpus as usize, slow);
    let t_booted = Instant::now();
    progress("guest healthy");

    // A first cycle: the clock report gives the VM offset and whether the host honoured it.
    put(h, "vm.pause");
    let before = vcpus(&h.info());
    put(h, "vm.resume");
    wait_progress(
        h,
        &before,
        "every vCPU sampling after the first resume",
        slow,
    );
    let info = h.info();
    assert_no_violations(
        &info,
        "after the first cycle",
        info["clock"]["offsets_honoured"] == true,
    );
    let c = Clock::of(&info);
    assert_eq!(c.requested, policy, "{}", info["clock"]);
    let honoured = c.honoured == Some(true);
    if honoured {
        assert_eq!(c.applied, policy, "{}", info["clock"]);
    } else {
        assert_eq!(c.applied, "host_tsc", "{}", info["clock"]);
        assert!(
            c.warnings > 0,
            "host_tsc without a warning: {}",
            info["clock"]
        );
    }
    assert!(
        honoured || !in_nested_host(),
        "HOURGLASS_NESTED=1 but the VMM found TSC offsets ignored: {}",
        info["clock"]
    );
    // No TSC scaling on either host: guest TSC = host TSC + O.
    assert_eq!(
        c.tsc_khz, c.host_tsc_khz,
        "guest and host TSC rates differ: {}",
        info["clock"]
    );
    let khz = c.tsc_khz;
    let host = host_label(honoured);
    let frozen = honoured && policy == "frozen";
    let wallclock = honoured && policy == "wallclock";
    let slack = BRACKET_SLACK_US * khz / 1000;

    // 1. CYCLES pause/resume cycles, each followed by a report from every vCPU.
    let info0 = h.info();
    let o0 = Clock::of(&info0).vm_offset;
    let v0 = vcpus(&info0);
    let checked = honoured.then_some(policy);
    let (mut inner, mut outer, mut longest) = (0u64, 0u64, 0u64);
    let mut seen_worst = i64::MIN;
    let mut prev = info0.clone();
    let mut last_resume_sent = 0;
    let mut h_read = 0;
    // Where the guest first counted a kvmclock/TSC disagreement (issue 18's evidence: across a
    // thaw, with the thaw's own warnings, or while the guest ran).
    let mut first_mismatch: Option<String> = None;
    let t_cycles = Instant::now();
    for i in 0..CYCLES {
        let ob = Clock::of(&prev).vm_offset;
        let h0 = host_tsc();
        put(h, "vm.pause");
        let h1 = host_tsc();
        // The samples the vCPUs had delivered when they stopped (under the offset `ob`).
        let vb = vcpus(&h.info());
        let h2 = host_tsc();
        put(h, "vm.resume");
        let h3 = host_tsc();
        let p = PauseBracket { h0, h1, h2, h3 };
        inner += p.inner();
        longest = longest.max(p.inner());
        outer += p.outer();
        last_resume_sent = h2;
        let when = format!("cycle {i}");
        progress(&when);
        wait_progress(h, &vb, &format!("every vCPU sampling after {when}"), slow);
        prev = h.info();
        h_read = host_tsc();
        let va = vcpus(&prev);
        let oa = Clock::of(&prev).vm_offset;
        assert_on_offset(&va, oa, h2, h_read, khz, &when);
        let seen = pause_seen((&vb, ob), (&va, oa), p, checked, slack, khz, &when);
        seen_worst = seen_worst.max(seen);
        if first_mismatch.is_none() && totals(&prev, "kvmclock_mismatch") > 0 {
            first_mismatch = Some(format!(
                "{when}: Δkvmclock - ΔTSC across the pause {} ns (the guest's worst {} ns), \
                 the thaw's warnings {}",
                kvmclock_divergence(&vb, &va, khz),
                totals(&prev, "kvmclock_mismatch_worst_ns"),
                prev["clock"]["warnings"]
            ));
        }
    }
    if let Some(m) = &first_mismatch {
        println!("first kvmclock/TSC disagreement counted by the guest: {m}");
    }
    let cycles_s = t_cycles.elapsed().as_secs_f64();
    let info1 = prev;
    assert_eq!(info1["state"], "Running");
    assert_no_violations(&info1, &format!("after {CYCLES} cycles"), honoured);
    assert_eq!(info1["pause_stats"]["pauses"], CYCLES + 1);
    assert_eq!(info1["pause_stats"]["resumes"], CYCLES + 1);
    let c1 = Clock::of(&info1);
    assert_eq!(c1.applied, c.applied, "{}", info1["clock"]);
    let v1 = vcpus(&info1);
    let bracket = assert_on_offset(
        &v1,
        c1.vm_offset,
        last_resume_sent,
        h_read,
        khz,
        &format!("after {CYCLES} cycles"),
    );
    let shift = sdiff(o0, c1.vm_offset);
    if wallclock {
        assert_eq!(
            c1.vm_offset,
            o0,
            "wallclock: the VM offset moved over {CYCLES} cycles (the guest lost or gained \
             {} ns)",
            cycles_ns(i128::from(shift), khz)
        );
    }
    if frozen {
        assert!(
            shift + slack as i64 >= inner as i64 && shift <= (outer + slack) as i64,
            "frozen: over {CYCLES} cycles the offset moved back {shift} cycles, not within the \
             paused time [{inner}, {outer}] cycles"
        );
        assert!(
            max_jump(&info1) < FROZEN_MAX_JUMP_NS,
            "frozen, yet the guest saw a {} ns TSC step over {CYCLES} cycles",
            max_jump(&info1)
        );
    }
    Figures {
        op: "pause-resume-cycles",
        policy: policy.into(),
        applied: c1.applied.clone(),
        host: host.clone(),
        cpus,
        cycles: CYCLES,
        test: test.to_string(),
        pause_ns: cycles_ns(i128::from(longest), khz) as u64,
        pause_seen_ns: cycles_ns(i128::from(seen_worst), khz),
        max_jump_ns: max_jump(&info1),
        kvmclock_div_ns: divergence(&v0, &v1, khz, &info1),
        cross_vcpu_ns: cycles_ns(i128::from(totals(&info1, "cross_vcpu_worst")), khz) as u64,
        behind_ns: cycles_ns(i128::from(shift), khz),
        bracket_ns: bracket,
    }
    .emit();

    // 2. One long pause.
    progress("long pause");
    let o_before = c1.vm_offset;
    let jump_before = max_jump(&info1);
    let h0 = host_tsc();
    put(h, "vm.pause");
    let h1 = host_tsc();
    let paused = h.info();
    assert_eq!(paused["state"], "Paused");
    let vb = vcpus(&paused);
    // Condition-free wait: the pause length is what is measured.
    std::thread::sleep(LONG_PAUSE);
    let still = h.info();
    assert_eq!(
        vcpus(&still).iter().map(|s| s.samples).collect::<Vec<_>>(),
        vb.iter().map(|s| s.samples).collect::<Vec<_>>(),
        "samples changed while paused"
    );
    let h2 = host_tsc();
    put(h, "vm.resume");
    let h3 = host_tsc();
    wait_progress(h, &vb, "every vCPU sampling after the long pause", slow);
    let after = h.info();
    let h4 = host_tsc();
    assert_eq!(after["state"], "Running");
    assert_no_violations(&after, "after the long pause", honoured);
    let c2 = Clock::of(&after);
    assert_eq!(c2.applied, c.applied, "{}", after["clock"]);
    let va = vcpus(&after);
    let inner = h2.wrapping_sub(h1);
    let outer = h3.wrapping_sub(h0);
    let bracket = assert_on_offset(&va, c2.vm_offset, h2, h4, khz, "after the long pause");
    let shift = sdiff(o_before, c2.vm_offset);
    let jump = max_jump(&after);
    let p = PauseBracket { h0, h1, h2, h3 };
    let seen = cycles_ns(
        i128::from(pause_seen(
            (&vb, o_before),
            (&va, c2.vm_offset),
            p,
            checked,
            slack,
            khz,
            "the long pause",
        )),
        khz,
    );
    if wallclock {
        assert_eq!(
            c2.vm_offset,
            o_before,
            "wallclock: the VM offset moved across the pause (the guest lost or gained {} ns)",
            cycles_ns(i128::from(shift), khz)
        );
        for (i, (b, a)) in vb.iter().zip(&va).enumerate() {
            let advanced = a.tsc.wrapping_sub(b.tsc);
            assert!(
                advanced + slack >= inner,
                "wallclock: vCPU {i}'s TSC advanced {advanced} cycles across a pause of at \
                 least {inner}"
            );
        }
        assert!(
            jump + BRACKET_SLACK_US * 1000 >= cycles_ns(i128::from(inner), khz) as u64,
            "wallclock: the guest's largest TSC step {jump} ns is shorter than the pause"
        );
    }
    if frozen {
        assert!(
            shift + slack as i64 >= inner as i64 && shift <= (outer + slack) as i64,
            "frozen: across the pause the offset moved back {shift} cycles, not within the \
             paused time [{inner}, {outer}] cycles"
        );
        assert!(
            jump < FROZEN_MAX_JUMP_NS,
            "frozen, yet the guest saw a {jump} ns TSC step across a {} ns pause",
            cycles_ns(i128::from(inner), khz)
        );
    }
    Figures {
        op: "pause-2s",
        policy: policy.into(),
        applied: c2.applied.clone(),
        host,
        cpus,
        cycles: 1,
        test: test.to_string(),
        pause_ns: cycles_ns(i128::from(inner), khz) as u64,
        pause_seen_ns: seen,
        max_jump_ns: jump,
        kvmclock_div_ns: divergence(&vb, &va, khz, &after),
        cross_vcpu_ns: cycles_ns(i128::from(totals(&after, "cross_vcpu_worst")), khz) as u64,
        behind_ns: cycles_ns(i128::from(shift), khz),
        bracket_ns: bracket,
    }
    .emit();
    println!(
        "{test}: boot {:.1} s, {CYCLES} cycles {cycles_s:.1} s ({:.0} ms each), whole test \
         {:.1} s; largest guest TSC step before the long pause {jump_before} ns",
        (t_booted - t_start).as_secs_f64(),
        cycles_s * 1000.0 / f64::from(CYCLES),
        t_start.elapsed().as_secs_f64()
    );

    let _ = h.api("PUT", "vmm.shutdown", None);
    assert!(h.wait_exit(Duration::from_secs(10) * slow).success());
    if !honoured {
        println!(
            "{SKIP} (the offset checks: policy {policy} applied as {}; the figures above are \
             this host's)",
            c.applied
        );
    }
}

/// Where the test is, printed inside the emulated host only (its console is the only trace when
/// the emulated host stalls).
fn progress(what: &str) {
    if in_nested_host() {
        let up = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
        println!(
            "progress: {what} (uptime {})",
            up.split_whitespace().next().unwrap_or("?")
        );
    }
}

fn max_jump(info: &Value) -> u64 {
    totals(info, "max_jump_ns")
}

#[test]
fn nested_vmm_wallclock_2_vcpus() {
    run(2, "wallclock");
}

#[test]
fn nested_vmm_frozen_2_vcpus() {
    run(2, "frozen");
}

#[test]
fn nested_vmm_wallclock_4_vcpus() {
    run(4, "wallclock");
}

#[test]
fn nested_vmm_frozen_4_vcpus() {
    run(4, "frozen");
}
