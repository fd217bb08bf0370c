//! Capture (freeze) and thaw planning: the time model's formulas.
//!
//! Guest TSC on vCPU i is `G_i = scale(H) + O + A_i (mod 2^64)` with one
//! VM-wide offset `O` and per-vCPU TSC_ADJUST `A_i`. A capture stores the VM
//! TSC `G = scale(H) + O` at one host sample; a thaw computes the new offset
//! `O' = G' - scale'(H')` from one new sample, and the kvmclock value that
//! agrees with it. All arithmetic is modulo 2^64 with 128-bit intermediates.

use super::arith::{cycles_to_ns, ns_to_cycles, scale_tsc, tsc_ratio};
use super::error::TscError;
use super::state::{TscSnapshot, TscSource};
use super::vendor::Vendor;
use serde::{Deserialize, Serialize};

pub use super::policy::ClockPolicy;

/// One host time sample (one `KVM_GET_CLOCK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostSample {
    /// kvmclock, ns.
    pub kvmclock_ns: u64,
    /// Host CLOCK_REALTIME, ns.
    pub realtime_ns: u64,
    /// Host TSC.
    pub host_tsc: u64,
    /// Width of the realtime/TSC bracket in ns; 0 when KVM gave
    /// REALTIME|HOST_TSC atomically.
    pub bracket_ns: u64,
}

impl HostSample {
    /// The same sample moved back to the instant the host TSC read `host_tsc` (host TSC at
    /// `host_khz`): kvmclock and realtime earlier by the cycles between, converted to ns. Used
    /// to take a freeze at the moment the last vCPU stopped rather than at the later
    /// `KVM_GET_CLOCK`: the guest saw no time between, so `frozen` must not show it any. `None`
    /// when `host_tsc` is after the sample, or more than a second before it (not a moment of
    /// this freeze), or when a clock would go below zero.
    pub fn rewound_to(&self, host_tsc: u64, host_khz: u32) -> Option<HostSample> {
        let cycles = self.host_tsc.checked_sub(host_tsc)?;
        if cycles > u64::from(host_khz) * 1000 {
            return None;
        }
        let ns = super::arith::cycles_to_ns(cycles, host_khz);
        Some(HostSample {
            kvmclock_ns: self.kvmclock_ns.checked_sub(ns)?,
            realtime_ns: self.realtime_ns.checked_sub(ns)?,
            host_tsc,
            bracket_ns: self.bracket_ns,
        })
    }
}

/// The host-side TSC parameters at a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostTsc {
    /// Host vendor.
    pub vendor: Vendor,
    /// Host TSC frequency, kHz.
    pub host_khz: u32,
    /// Scaling ratio the VM runs with on this host.
    pub ratio: u64,
}

/// One vCPU's TSC state as KVM reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuTscReading {
    /// `KVM_VCPU_TSC_OFFSET`, which holds `O + A_i`.
    pub offset: u64,
    /// IA32_TSC_ADJUST, `A_i`.
    pub tsc_adjust: u64,
}

/// The result of a capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    /// The host-independent snapshot.
    pub snapshot: TscSnapshot,
    /// Spread (max - min) of the per-vCPU offsets `O_i`, taken as signed
    /// differences from vCPU 0's; the snapshot uses vCPU 0's.
    pub skew_cycles: u64,
}

/// How the elapsed time of a thaw is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Elapsed {
    /// `max(0, T' - T)` from host realtime (the `wallclock` policy).
    Realtime,
    /// `scale(H') - scale(H)` on the same host, boot and frequency: `O' = O`.
    SameHostTsc,
    /// No time passes (the `frozen` policy).
    Zero,
    /// From the TSC the guest actually has (hosts that ignore offsets); made by
    /// [`plan_for_actual_tsc`]. Given to [`plan_thaw_elapsed`] it measures
    /// like [`Elapsed::SameHostTsc`].
    ActualTsc,
}

/// `KVM_SET_CLOCK` arguments, used with the `KVM_CLOCK_REALTIME` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetClock {
    /// kvmclock value at the sample: `k + elapsed_ns`.
    pub clock_ns: u64,
    /// Host realtime of the sample, `T'`; KVM adds the time since then.
    pub realtime_ns: u64,
}

/// Everything a backend writes to thaw a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThawPlan {
    /// The policy the plan implements.
    pub policy: ClockPolicy,
    /// How elapsed time was measured.
    pub elapsed: Elapsed,
    /// Elapsed time the guest sees, ns.
    pub elapsed_ns: u64,
    /// Elapsed time the guest sees, guest TSC cycles (`G' - G`).
    pub elapsed_cycles: u64,
    /// VM TSC `G'` at the sample.
    pub guest_tsc: u64,
    /// VM-wide offset `O'`.
    pub vm_offset: u64,
    /// Per vCPU `O' + A_i`: what `KVM_VCPU_TSC_OFFSET` gets.
    pub vcpu_offsets: Vec<u64>,
    /// Per vCPU `A_i`: host-initiated TSC_ADJUST writes.
    pub tsc_adjust: Vec<u64>,
    /// The `KVM_SET_CLOCK` arguments.
    pub set_clock: SetClock,
    /// Things an operator should know (clock stepped back, skew fixed, ...).
    pub warnings: Vec<String>,
    /// Largest error, ns, of `elapsed_ns` against the time the policy means to show, from what
    /// the samples can know (see [`error_bound_ns`]).
    pub error_bound_ns: u64,
}

/// The largest error, ns, of a thaw's elapsed time against what its policy means to show.
///
/// - [`Elapsed::Zero`], [`Elapsed::SameHostTsc`], [`Elapsed::ActualTsc`]: the guest TSC is
///   computed exactly from TSC readings; what is left is the rounding of one guest cycle (and of
///   the ns/cycle conversion of kvmclock): two guest cycles, rounded up to whole ns.
/// - [`Elapsed::Realtime`]: the realtime/TSC bracket of each sample (0 where KVM gave
///   `KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC` atomically) plus the same rounding. Not included,
///   because no host can know it: how far the capturing host's realtime clock was from this
///   host's (NTP disagreement when the snapshot or migration crossed hosts). That error reaches
///   the guest one for one; the time model's definition of `wallclock` accepts it.
pub fn error_bound_ns(
    elapsed: Elapsed,
    capture_bracket_ns: u64,
    thaw_bracket_ns: u64,
    tsc_khz: u32,
) -> u64 {
    // ceil(2 cycles in ns); tsc_khz is never 0 here (validated), but stay total.
    let rounding = 2_000_000u64.div_ceil(u64::from(tsc_khz.max(1)));
    match elapsed {
        Elapsed::Realtime => capture_bracket_ns
            .saturating_add(thaw_bracket_ns)
            .saturating_add(rounding),
        Elapsed::Zero | Elapsed::SameHostTsc | Elapsed::ActualTsc => rounding,
    }
}

impl ThawPlan {
    /// Per vCPU guest TSC `G' + A_i` at the sample: what a host-initiated
    /// `MSR_IA32_TSC` write gets on kernels without `KVM_VCPU_TSC_OFFSET`,
    /// and what a read-back of `MSR_IA32_TSC` should be near.
    pub fn vcpu_tsc(&self) -> Vec<u64> {
        self.tsc_adjust
            .iter()
            .map(|a| self.guest_tsc.wrapping_add(*a))
            .collect()
    }
}

/// Checks that the host's parameters are possible for its vendor.
fn check_host(host: &HostTsc) -> Result<(), TscError> {
    if host.host_khz == 0 {
        return Err(TscError::ZeroFrequency { which: "host_khz" });
    }
    let max_ratio = host.vendor.scaling().max_ratio;
    if host.ratio == 0 || host.ratio > max_ratio {
        return Err(TscError::InvalidRatio {
            vendor: host.vendor,
            ratio: host.ratio,
            max_ratio,
        });
    }
    Ok(())
}

fn scale_on(host: &HostTsc, tsc: u64) -> u64 {
    scale_tsc(tsc, host.ratio, host.vendor.scaling().frac_bits)
}

/// Freeze: derives the host-independent [`TscSnapshot`] from one sample.
///
/// `O_i = offset_i - A_i`; the snapshot stores `G = scale(H) + O_0`. Where the
/// host ignores offsets (`offsets_honoured == false`) the guest sees
/// `scale(H)` whatever the readings say, so each effective offset is 0 and
/// `O_i = -A_i`.
pub fn capture(
    sample: &HostSample,
    host: &HostTsc,
    guest_khz: u32,
    vcpus: &[VcpuTscReading],
    tsc_stable: bool,
    offsets_honoured: bool,
) -> Result<Capture, TscError> {
    check_host(host)?;
    if guest_khz == 0 {
        return Err(TscError::ZeroFrequency { which: "guest_khz" });
    }
    let first = vcpus.first().ok_or(TscError::NoVcpus)?;
    let vm_offset_of = |r: &VcpuTscReading| {
        let effective = if offsets_honoured { r.offset } else { 0 };
        effective.wrapping_sub(r.tsc_adjust)
    };
    let o0 = vm_offset_of(first);
    let (mut lo, mut hi) = (0i64, 0i64);
    for r in vcpus {
        let d = vm_offset_of(r).wrapping_sub(o0) as i64;
        lo = lo.min(d);
        hi = hi.max(d);
    }
    // hi >= 0 >= lo, so the spread fits in u64.
    let skew_cycles = (i128::from(hi) - i128::from(lo)) as u64;
    let source = TscSource {
        vendor: host.vendor,
        host_tsc_khz: host.host_khz,
        ratio: host.ratio,
        frac_bits: host.vendor.scaling().frac_bits,
        offsets_honoured,
        skew_cycles,
        host_tsc: sample.host_tsc,
        bracket_ns: sample.bracket_ns,
    };
    let snapshot = TscSnapshot::from_parts(
        guest_khz,
        scale_on(host, sample.host_tsc).wrapping_add(o0),
        vcpus.iter().map(|r| r.tsc_adjust).collect(),
        sample.kvmclock_ns,
        sample.realtime_ns,
        tsc_stable,
        source,
    );
    Ok(Capture {
        snapshot,
        skew_cycles,
    })
}

/// [`cycles_to_ns`] that refuses instead of saturating (kvmclock could not agree).
fn checked_cycles_to_ns(cycles: u64, tsc_khz: u32) -> Result<u64, TscError> {
    let ns = cycles_to_ns(cycles, tsc_khz);
    if ns == u64::MAX {
        return Err(TscError::ElapsedOutOfRange { cycles, tsc_khz });
    }
    Ok(ns)
}

/// Thaw under `policy`: `wallclock` measures elapsed time by realtime,
/// `frozen` lets none pass. See [`plan_thaw_elapsed`].
pub fn plan_thaw(
    snap: &TscSnapshot,
    now: &HostSample,
    host: &HostTsc,
    policy: ClockPolicy,
) -> Result<ThawPlan, TscError> {
    let elapsed = match policy {
        ClockPolicy::Wallclock => Elapsed::Realtime,
        ClockPolicy::Frozen => Elapsed::Zero,
    };
    plan_thaw_elapsed(snap, now, host, elapsed)
}

fn same_host_cycles(src: &TscSource, now: &HostSample, host: &HostTsc) -> Result<u64, TscError> {
    let differs = |what: &str, was: String, is: String| TscError::NotSameHost {
        reason: format!("{what} was {was} at capture, is {is} now"),
    };
    if src.vendor != host.vendor {
        return Err(differs(
            "vendor",
            src.vendor.to_string(),
            host.vendor.to_string(),
        ));
    }
    if src.host_tsc_khz != host.host_khz {
        return Err(differs(
            "host kHz",
            src.host_tsc_khz.to_string(),
            host.host_khz.to_string(),
        ));
    }
    if src.ratio != host.ratio {
        return Err(differs(
            "ratio",
            src.ratio.to_string(),
            host.ratio.to_string(),
        ));
    }
    if now.host_tsc < src.host_tsc {
        return Err(differs(
            "host TSC",
            src.host_tsc.to_string(),
            now.host_tsc.to_string(),
        ));
    }
    Ok(scale_on(host, now.host_tsc).wrapping_sub(scale_on(host, src.host_tsc)))
}

/// Thaw with an explicit way of measuring elapsed time
/// ([`Elapsed::Zero`] is the `frozen` policy, any other `wallclock`).
///
/// Refuses, before anything is changed, a host that cannot run the guest at
/// the snapshot's frequency (the ratio KVM computes must be the host's).
pub fn plan_thaw_elapsed(
    snap: &TscSnapshot,
    now: &HostSample,
    host: &HostTsc,
    elapsed: Elapsed,
) -> Result<ThawPlan, TscError> {
    check_host(host)?;
    let f_g = snap.tsc_khz();
    let expected = tsc_ratio(host.vendor, host.host_khz, f_g)?;
    if expected.ratio != host.ratio {
        return Err(TscError::RatioMismatch {
            vendor: host.vendor,
            host_khz: host.host_khz,
            guest_khz: f_g,
            expected: expected.ratio,
            actual: host.ratio,
        });
    }
    let mut warnings = Vec::new();
    let (elapsed_ns, elapsed_cycles) = match elapsed {
        Elapsed::Zero => (0, 0),
        Elapsed::Realtime => {
            let ns = now.realtime_ns.saturating_sub(snap.realtime_ns());
            if now.realtime_ns < snap.realtime_ns() {
                warnings.push(format!(
                    "host realtime is {} ns behind the freeze; elapsed time taken as 0",
                    snap.realtime_ns() - now.realtime_ns
                ));
            }
            (ns, ns_to_cycles(ns, f_g))
        }
        Elapsed::SameHostTsc | Elapsed::ActualTsc => {
            let cycles = same_host_cycles(snap.source(), now, host)?;
            (checked_cycles_to_ns(cycles, f_g)?, cycles)
        }
    };
    let guest_tsc = snap.vm_tsc().wrapping_add(elapsed_cycles);
    let vm_offset = guest_tsc.wrapping_sub(scale_on(host, now.host_tsc));
    if snap.source().skew_cycles != 0 {
        warnings.push(format!(
            "vCPU TSC offsets differed by {} cycles at capture; every vCPU now gets vCPU 0's",
            snap.source().skew_cycles
        ));
    }
    let policy = match elapsed {
        Elapsed::Zero => ClockPolicy::Frozen,
        _ => ClockPolicy::Wallclock,
    };
    Ok(finish(
        snap,
        now,
        policy,
        elapsed,
        elapsed_ns,
        elapsed_cycles,
        vm_offset,
        warnings,
    ))
}

#[allow(clippy::too_many_arguments)]
fn finish(
    snap: &TscSnapshot,
    now: &HostSample,
    policy: ClockPolicy,
    elapsed: Elapsed,
    elapsed_ns: u64,
    elapsed_cycles: u64,
    vm_offset: u64,
    warnings: Vec<String>,
) -> ThawPlan {
    ThawPlan {
        policy,
        elapsed,
        elapsed_ns,
        elapsed_cycles,
        guest_tsc: snap.vm_tsc().wrapping_add(elapsed_cycles),
        vm_offset,
        vcpu_offsets: snap
            .tsc_adjust()
            .iter()
            .map(|a| vm_offset.wrapping_add(*a))
            .collect(),
        tsc_adjust: snap.tsc_adjust().to_vec(),
        set_clock: SetClock {
            clock_ns: snap.kvmclock_ns().wrapping_add(elapsed_ns),
            realtime_ns: now.realtime_ns,
        },
        warnings,
        error_bound_ns: error_bound_ns(
            elapsed,
            snap.source().bracket_ns,
            now.bracket_ns,
            snap.tsc_khz(),
        ),
    }
}

/// For hosts that ignore TSC offsets: makes kvmclock agree with the VM TSC
/// the guest really has at the sample (`actual_vm_tsc`, vCPU 0's TSC minus
/// its TSC_ADJUST), and refuses if that is behind the snapshot's.
///
/// "Behind" is the signed 64-bit difference `actual - G` being negative, so
/// a TSC that wrapped past 2^64 still counts as forward. The plan's
/// `vm_offset` is the offset the guest effectively has against the raw host
/// TSC (`actual - H'`), for reporting; nothing needs writing but the clock.
pub fn plan_for_actual_tsc(
    snap: &TscSnapshot,
    now: &HostSample,
    actual_vm_tsc: u64,
) -> Result<ThawPlan, TscError> {
    let cycles = actual_vm_tsc.wrapping_sub(snap.vm_tsc());
    if (cycles as i64) < 0 {
        return Err(TscError::Backwards {
            planned: snap.vm_tsc(),
            actual: actual_vm_tsc,
        });
    }
    let elapsed_ns = checked_cycles_to_ns(cycles, snap.tsc_khz())?;
    let warnings = vec![format!(
        "host ignores TSC offsets: the guest keeps the host TSC; kvmclock advanced {elapsed_ns} ns to agree"
    )];
    Ok(finish(
        snap,
        now,
        ClockPolicy::Wallclock,
        Elapsed::ActualTsc,
        elapsed_ns,
        cycles,
        actual_vm_tsc.wrapping_sub(now.host_tsc),
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::HostSample;

    const SAMPLE: HostSample = HostSample {
        kvmclock_ns: 50_000_000_000,
        realtime_ns: 1_700_000_000_000_000_000,
        host_tsc: 1_000_000_000_000,
        bracket_ns: 40,
    };

    #[test]
    fn rewinding_moves_every_clock_back_by_the_same_time() {
        // 3 GHz: 7.5 M cycles are 2.5 ms.
        let r = SAMPLE
            .rewound_to(SAMPLE.host_tsc - 7_500_000, 3_000_000)
            .expect("within a second");
        assert_eq!(r.host_tsc, SAMPLE.host_tsc - 7_500_000);
        assert_eq!(r.kvmclock_ns, SAMPLE.kvmclock_ns - 2_500_000);
        assert_eq!(r.realtime_ns, SAMPLE.realtime_ns - 2_500_000);
        assert_eq!(r.bracket_ns, SAMPLE.bracket_ns);
        assert_eq!(SAMPLE.rewound_to(SAMPLE.host_tsc, 3_000_000), Some(SAMPLE));
    }

    #[test]
    fn rewinding_refuses_instants_that_are_not_this_freeze() {
        assert_eq!(SAMPLE.rewound_to(SAMPLE.host_tsc + 1, 3_000_000), None);
        assert_eq!(
            SAMPLE.rewound_to(SAMPLE.host_tsc - 3_000_000_001, 3_000_000),
            None
        );
        let young = HostSample {
            kvmclock_ns: 1_000,
            ..SAMPLE
        };
        assert_eq!(
            young.rewound_to(SAMPLE.host_tsc - 3_000_000, 3_000_000),
            None
        );
    }
}
