//! Checking what the host really did: the guest TSC a vCPU really has, and kvmclock set until
//! it agrees with that TSC.
//!
//! Apart from the engine because none of it decides anything: it measures (bracketed
//! host-initiated `MSR_IA32_TSC` reads, `KVM_GET_CLOCK`) and corrects (`KVM_SET_CLOCK` again).

use kvm_ioctls::{VcpuFd, VmFd};

use crate::error::HypervisorError;
use crate::host::rdtsc;
use crate::kvm::{bracketed_guest_tsc, clock};
use crate::tsc::{cycles_to_ns, scale_tsc, HostSample, HostTsc, ThawPlan, TscSnapshot};

/// kvmclock and the TSC must agree within this after a thaw (DESIGN.md: 1 µs).
pub(super) const CLOCK_TOLERANCE_NS: u64 = 1_000;
/// The error a thaw aims for: thaws' errors add up in a guest that does not sample between
/// them, so each is driven well below [`CLOCK_TOLERANCE_NS`].
const CLOCK_AIM_NS: u64 = 20;
/// `KVM_SET_CLOCK` tries before the report warns instead.
const CLOCK_SET_ATTEMPTS: usize = 8;

/// The offset the guest's TSC really has against `scale(host TSC)` on `vcpu`.
///
/// A host-initiated MSR_IA32_TSC read takes several microseconds and KVM samples the TSC at
/// an unknown point inside it, so one bracket only bounds the offset to
/// `[g - scale(h1), g - scale(h0)]`. Several reads are intersected; if the offset the host
/// reports (`hint`, the attribute read-back) lies inside the result it is taken as exact,
/// otherwise the middle of the interval.
pub(super) fn effective_offset(
    vcpu: &VcpuFd,
    host: &HostTsc,
    hint: Option<u64>,
) -> Result<u64, HypervisorError> {
    const READS: usize = 5;
    let fb = host.vendor.scaling().frac_bits;
    let mut base: Option<u64> = None;
    let (mut lo, mut hi) = (i128::MIN, i128::MAX);
    for _ in 0..READS {
        let (h0, g, h1) = bracketed_guest_tsc(vcpu)?;
        let d_hi = g.wrapping_sub(scale_tsc(h0, host.ratio, fb));
        let d_lo = g.wrapping_sub(scale_tsc(h1, host.ratio, fb));
        let b = *base.get_or_insert(d_lo);
        lo = lo.max(i128::from(d_lo.wrapping_sub(b) as i64));
        hi = hi.min(i128::from(d_hi.wrapping_sub(b) as i64));
    }
    let b = base.unwrap_or(0);
    if let Some(h) = hint {
        let rel = i128::from(h.wrapping_sub(b) as i64);
        if lo <= rel && rel <= hi {
            return Ok(h);
        }
    }
    let mid = if lo <= hi { lo + (hi - lo) / 2 } else { lo };
    Ok(b.wrapping_add(mid as u64))
}

/// `KVM_SET_CLOCK` from the plan, then verify: read `KVM_GET_CLOCK` (kvmclock and host TSC
/// of one instant) and compare kvmclock with what the VM TSC implies,
/// `k + (G_now - G) / f_g`. KVM anchors the value at its master-clock update and adds the
/// realtime since `T'` a moment later; the few instructions between the two cost ~0.2 µs on
/// real hardware but up to tens of µs, varying from call to call, on an emulated host, and
/// always push kvmclock *ahead* of the TSC. That bias must not be left in place: the next
/// freeze reads kvmclock back as `k`, so every thaw's error is inherited by the next one and
/// a guest whose two samples straddle several quick pause/resume cycles sees their sum
/// (measured on this host's kvm_pvm: +140..+580 ns per thaw, 2-6 µs across one guest
/// sample pair in 100 fast cycles). So the measured error is subtracted from the value
/// set, and `KVM_SET_CLOCK` is repeated (up to [`CLOCK_SET_ATTEMPTS`]) until the error is
/// within [`CLOCK_AIM_NS`], leaving only the call-to-call jitter, of either sign; a
/// remaining error beyond [`CLOCK_TOLERANCE_NS`] makes the report carry a warning.
/// kvmclock is never set below the frozen `k`.
/// Returns the remaining error in ns.
pub(super) fn set_clock_verified(
    vm: &VmFd,
    clock_realtime: bool,
    snap: &TscSnapshot,
    plan: &ThawPlan,
    now: &HostSample,
    host: &HostTsc,
) -> Result<Option<i64>, HypervisorError> {
    let fb = host.vendor.scaling().frac_bits;
    let eff = plan
        .guest_tsc
        .wrapping_sub(scale_tsc(now.host_tsc, host.ratio, fb));
    // What KVM is asked for: the plan's value less the error measured so far.
    let mut target = plan.set_clock.clock_ns;
    let mut err = None;
    for _ in 0..CLOCK_SET_ATTEMPTS {
        clock::set_clock(vm, target, plan.set_clock.realtime_ns, clock_realtime)?;
        let h0 = rdtsc();
        let d = vm
            .get_clock()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_CLOCK", e.errno()))?;
        let h1 = rdtsc();
        // Without KVM's own host TSC (no master clock: e.g. vCPUs with different
        // TSC_ADJUST), the middle of a bracket stands in, and the tolerance widens by half
        // its width.
        let (h, slack) = if d.flags & kvm_bindings::KVM_CLOCK_HOST_TSC != 0 {
            (d.host_tsc, 0)
        } else {
            let span = h1.wrapping_sub(h0);
            (
                h0.wrapping_add(span / 2),
                cycles_to_ns(span / 2, host.host_khz),
            )
        };
        let vm_tsc = scale_tsc(h, host.ratio, fb).wrapping_add(eff);
        let cycles = vm_tsc.wrapping_sub(snap.vm_tsc());
        let predicted = if (cycles as i64) >= 0 {
            snap.kvmclock_ns()
                .wrapping_add(cycles_to_ns(cycles, snap.tsc_khz()))
        } else {
            snap.kvmclock_ns()
                .wrapping_sub(cycles_to_ns(cycles.wrapping_neg(), snap.tsc_khz()))
        };
        let e = d.clock.wrapping_sub(predicted) as i64;
        err = Some(e);
        if e.unsigned_abs() <= CLOCK_AIM_NS + slack {
            break;
        }
        // KVM's error for the same request varies little from call to call: ask for the
        // value minus what it added, never for less than the guest last saw.
        target = target.wrapping_sub(e as u64);
        if (target.wrapping_sub(snap.kvmclock_ns()) as i64) < 0 {
            target = snap.kvmclock_ns();
        }
    }
    Ok(err)
}

/// A report warning when kvmclock still disagrees with the TSC by more than the tolerance.
pub(super) fn clock_error_warning(err: Option<i64>) -> Option<String> {
    match err {
        Some(e) if e.unsigned_abs() > CLOCK_TOLERANCE_NS => Some(format!(
            "kvmclock disagrees with the TSC by {e} ns after the thaw (tolerance {CLOCK_TOLERANCE_NS} ns)"
        )),
        _ => None,
    }
}

/// Whether `g` lies within `[lo, hi]` widened by `slack` (mod 2^64).
pub(super) fn within(g: u64, lo: u64, hi: u64, slack: u64) -> bool {
    g.wrapping_sub(lo.wrapping_sub(slack)) <= hi.wrapping_sub(lo).saturating_add(2 * slack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_handles_slack_and_wrap() {
        assert!(within(105, 100, 110, 0));
        assert!(!within(111, 100, 110, 0));
        assert!(within(95, 100, 110, 5));
        assert!(!within(94, 100, 110, 5));
        assert!(within(3, u64::MAX - 2, 5, 0));
        assert!(!within(1 << 40, 100, 110, 1000));
    }

    #[test]
    fn clock_warning_only_beyond_tolerance() {
        assert_eq!(clock_error_warning(None), None);
        assert_eq!(clock_error_warning(Some(-1_000)), None);
        let w = clock_error_warning(Some(-1_001)).unwrap();
        assert!(w.contains("-1001 ns"), "{w}");
    }
}
