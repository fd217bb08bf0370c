//! [`TscState`] for [`KvmVm`]: the DESIGN.md time model on KVM.
//!
//! **Freeze**: one `KVM_GET_CLOCK` sample `(k, T, H)`, then per vCPU `KVM_VCPU_TSC_OFFSET`
//! (`O + A_i`) and TSC_ADJUST (`A_i`), handed to [`tsc::capture`].
//!
//! **Thaw**: one new sample `(k', T', H')` -> [`tsc::plan_thaw`] -> per vCPU
//! `KVM_VCPU_TSC_OFFSET = O' + A_i` and a host-initiated TSC_ADJUST write of `A_i` (then any
//! TSC_DEADLINE held back by `set_state`) -> read back the offset and `MSR_IA32_TSC` -> if the host
//! honoured them, `KVM_SET_CLOCK { k + elapsed, T', REALTIME }`.
//!
//! **Resume on the same host**: when the snapshot is the one this VM itself froze last, the
//! `wallclock` policy measures the pause with the host TSC (`scale(H') - scale(H)`, so `O' = O`)
//! instead of realtime, which is exact and immune to a coarse or stepped CLOCK_REALTIME.
//!
//! **Hosts that ignore offsets** (accept the write, keep the guest on the host TSC): detected by
//! the read-back (and by a probe at hypervisor creation, so later thaws skip the futile writes).
//! kvmclock is then made to agree with the TSC the guest really has
//! ([`tsc::plan_for_actual_tsc`]); the report says `host_tsc` and warns. A thaw that would move the
//! guest TSC backwards is refused and whatever was written is put back.
//!
//! **Kernels without `KVM_VCPU_TSC_OFFSET`** (before 5.16): host-initiated `MSR_IA32_TSC` writes of
//! `G' + A_i`, all computed for one instant, and the report says so.

use std::sync::atomic::Ordering;

use crate::arch::{msr, MsrEntry};
use crate::cpu::Vcpu;
use crate::kvm::clock::{self, ClockSample};
use crate::kvm::KvmVm;
use crate::tsc::{
    self, capture, compute_ratio, cycles_to_ns, plan_for_actual_tsc, plan_thaw, plan_thaw_elapsed,
    scale_tsc, tsc_ratio, Capture, ClockPolicy, ClockReport, Elapsed, HostSample, HostTsc,
    ThawPlan, TscSnapshot,
};
use crate::vm::TscState;
use crate::{HypervisorError, TscCapabilities};

/// The warning every report on a host that ignores offsets carries.
pub const IGNORED_OFFSETS_WARNING: &str =
    "this host ignores TSC offsets: the guest keeps the host TSC and kvmclock was made to agree with it";

impl From<&ClockSample> for HostSample {
    fn from(s: &ClockSample) -> Self {
        HostSample {
            kvmclock_ns: s.kvmclock_ns,
            realtime_ns: s.realtime_ns,
            host_tsc: s.host_tsc,
            bracket_ns: s.bracket_ns,
        }
    }
}

/// A guest TSC read through the trait (host-initiated MSR_IA32_TSC), bracketed by host RDTSC.
fn bracketed(vcpu: &dyn Vcpu) -> Result<(u64, u64, u64), HypervisorError> {
    let h0 = clock::rdtsc();
    let m = vcpu.msrs(&[msr::IA32_TSC])?;
    let h1 = clock::rdtsc();
    let g = m
        .first()
        .map(|e| e.data)
        .ok_or_else(|| HypervisorError::Unsupported("MSR_IA32_TSC not readable".into()))?;
    Ok((h0, g, h1))
}

impl KvmVm {
    fn frac_bits(&self) -> u32 {
        self.caps.vendor.scaling().frac_bits
    }

    /// The host's TSC parameters for the current guest frequency.
    fn host_tsc(&self) -> Result<HostTsc, HypervisorError> {
        let choice = tsc_ratio(
            self.caps.vendor,
            self.caps.host_tsc_khz,
            self.guest_khz_now(),
        )?;
        Ok(HostTsc {
            vendor: self.caps.vendor,
            host_khz: self.caps.host_tsc_khz,
            ratio: choice.ratio,
        })
    }

    /// What is known about offsets taking effect: the last thaw's read-back, else the probe.
    fn offsets_honoured(&self) -> Option<bool> {
        let seen = *self.offsets_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.or(self.caps.offsets_honoured)
    }

    fn remember_offsets(&self, honoured: bool) {
        *self.offsets_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(honoured);
    }

    /// The offset the guest's TSC really has against `scale(host TSC)` on `vcpu`.
    ///
    /// A host-initiated MSR_IA32_TSC read takes several microseconds and KVM samples the TSC at
    /// an unknown point inside it, so one bracket only bounds the offset to
    /// `[g - scale(h1), g - scale(h0)]`. Several reads are intersected; if the offset the host
    /// reports (`hint`, the attribute read-back) lies inside the result it is taken as exact,
    /// otherwise the middle of the interval.
    fn effective_offset(
        &self,
        vcpu: &dyn Vcpu,
        host: &HostTsc,
        hint: Option<u64>,
    ) -> Result<u64, HypervisorError> {
        const READS: usize = 5;
        let fb = self.frac_bits();
        let mut base: Option<u64> = None;
        let (mut lo, mut hi) = (i128::MIN, i128::MAX);
        for _ in 0..READS {
            let (h0, g, h1) = bracketed(vcpu)?;
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

    /// The VM TSC (`G`, without TSC_ADJUST) the guest really has at the sample instant:
    /// `scale(H') + effective offset of vCPU 0 - A_0`.
    fn actual_vm_tsc(
        &self,
        vcpu0: &dyn Vcpu,
        now: &HostSample,
        host: &HostTsc,
        a0: u64,
    ) -> Result<u64, HypervisorError> {
        let hint = vcpu0.tsc_reading().ok().map(|r| r.offset);
        let eff = self.effective_offset(vcpu0, host, hint)?;
        Ok(scale_tsc(now.host_tsc, host.ratio, self.frac_bits())
            .wrapping_add(eff)
            .wrapping_sub(a0))
    }

    /// Thaw where offsets are not honoured: no offset writes, kvmclock follows the real TSC.
    fn thaw_host_tsc(
        &self,
        vcpus: &[&dyn Vcpu],
        snap: &TscSnapshot,
        policy: ClockPolicy,
        now: &HostSample,
        host: &HostTsc,
        planned_vm_offset: u64,
    ) -> Result<ClockReport, HypervisorError> {
        let actual = self.actual_vm_tsc(vcpus[0], now, host, snap.tsc_adjust()[0])?;
        // Refused before anything is written.
        let plan = plan_for_actual_tsc(snap, now, actual)?;
        for (v, a) in vcpus.iter().zip(&plan.tsc_adjust) {
            v.set_msrs(&[MsrEntry {
                index: msr::IA32_TSC_ADJUST,
                data: *a,
            }])?;
        }
        let err = self.set_clock_verified(snap, &plan, now, host)?;
        let mut report = ClockReport::from_plan(
            policy,
            &plan,
            self.caps.vendor,
            snap.tsc_khz(),
            planned_vm_offset,
            Some(plan.vm_offset),
            false,
        );
        // The plan (tsc::plan_for_actual_tsc) already carries the "host ignores TSC offsets"
        // warning with the elapsed time it gave kvmclock; one warning per fact.
        report.warnings.extend(clock_error_warning(err));
        Ok(report)
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
    fn set_clock_verified(
        &self,
        snap: &TscSnapshot,
        plan: &ThawPlan,
        now: &HostSample,
        host: &HostTsc,
    ) -> Result<Option<i64>, HypervisorError> {
        let fb = self.frac_bits();
        let eff = plan
            .guest_tsc
            .wrapping_sub(scale_tsc(now.host_tsc, host.ratio, fb));
        let clock_ns = plan.set_clock.clock_ns;
        // What KVM is asked for: the plan's value less the error measured so far.
        let mut target = clock_ns;
        let mut err = None;
        for _ in 0..CLOCK_SET_ATTEMPTS {
            clock::set_clock(
                &self.fd,
                target,
                plan.set_clock.realtime_ns,
                self.caps.clock_realtime,
            )?;
            let h0 = clock::rdtsc();
            let d = self
                .fd
                .get_clock()
                .map_err(|e| HypervisorError::ioctl("KVM_GET_CLOCK", e.errno()))?;
            let h1 = clock::rdtsc();
            // Without KVM's own host TSC (no master clock: e.g. vCPUs with different
            // TSC_ADJUST), the middle of a bracket stands in, and the tolerance widens by half
            // its width.
            let (h, slack) = if d.flags & kvm_bindings::KVM_CLOCK_HOST_TSC != 0 {
                (d.host_tsc, 0)
            } else {
                let span = h1.wrapping_sub(h0);
                (
                    h0.wrapping_add(span / 2),
                    cycles_to_ns(span / 2, self.caps.host_tsc_khz),
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

    /// Kernels without KVM_VCPU_TSC_OFFSET: MSR_IA32_TSC = G' + A_i, computed for one instant.
    fn write_tsc_msrs(
        &self,
        vcpus: &[&dyn Vcpu],
        plan: &ThawPlan,
        now: &HostSample,
        host: &HostTsc,
    ) -> Result<(), HypervisorError> {
        let fb = self.frac_bits();
        let h = clock::rdtsc();
        let g_now =
            plan.guest_tsc
                .wrapping_add(scale_tsc(h, host.ratio, fb).wrapping_sub(scale_tsc(
                    now.host_tsc,
                    host.ratio,
                    fb,
                )));
        for (v, a) in vcpus.iter().zip(&plan.tsc_adjust) {
            v.set_msrs(&[
                MsrEntry {
                    index: msr::IA32_TSC,
                    data: g_now.wrapping_add(*a),
                },
                MsrEntry {
                    index: msr::IA32_TSC_ADJUST,
                    data: *a,
                },
            ])?;
        }
        Ok(())
    }
}

/// kvmclock and the TSC must agree within this after a thaw (DESIGN.md: 1 µs).
const CLOCK_TOLERANCE_NS: u64 = 1_000;
/// The error a thaw aims for: thaws' errors add up in a guest that does not sample between
/// them, so each is driven well below [`CLOCK_TOLERANCE_NS`].
const CLOCK_AIM_NS: u64 = 20;
/// `KVM_SET_CLOCK` tries before the report warns instead.
const CLOCK_SET_ATTEMPTS: usize = 8;

/// A report warning when kvmclock still disagrees with the TSC by more than the tolerance.
fn clock_error_warning(err: Option<i64>) -> Option<String> {
    match err {
        Some(e) if e.unsigned_abs() > CLOCK_TOLERANCE_NS => Some(format!(
            "kvmclock disagrees with the TSC by {e} ns after the thaw (tolerance {CLOCK_TOLERANCE_NS} ns)"
        )),
        _ => None,
    }
}

/// Whether `g` lies within `[lo, hi]` widened by `slack` (mod 2^64).
fn within(g: u64, lo: u64, hi: u64, slack: u64) -> bool {
    g.wrapping_sub(lo.wrapping_sub(slack)) <= hi.wrapping_sub(lo).saturating_add(2 * slack)
}

impl TscState for KvmVm {
    fn tsc_capabilities(&self) -> TscCapabilities {
        let mut c = self.caps.clone();
        c.offsets_honoured = self.offsets_honoured();
        c
    }

    fn set_guest_tsc_khz(&self, vcpus: &[&dyn Vcpu], khz: u32) -> Result<(), HypervisorError> {
        let host_khz = self.caps.host_tsc_khz;
        if khz == 0 {
            return Err(tsc::TscError::ZeroFrequency { which: "guest_khz" }.into());
        }
        let outcome = compute_ratio(self.caps.vendor, host_khz, khz);
        if outcome.choice.scaling && !self.caps.tsc_scaling {
            return Err(HypervisorError::TscFrequencyRefused {
                host_khz,
                guest_khz: khz,
                window_lo: outcome.window_lo,
                window_hi: outcome.window_hi,
            });
        }
        // Refuses a ratio the vendor's hardware cannot hold, naming the window.
        tsc_ratio(self.caps.vendor, host_khz, khz)?;
        let old = self.guest_khz_now();
        for (i, v) in vcpus.iter().enumerate() {
            if let Err(e) = v.set_tsc_khz(khz) {
                // Put back the ones already changed; KVM_GET_TSC_KHZ is not trusted here.
                for w in &vcpus[..i] {
                    let _ = w.set_tsc_khz(old);
                }
                return Err(e);
            }
        }
        for v in vcpus {
            let got = v.tsc_khz()?;
            if got != khz {
                for w in vcpus {
                    let _ = w.set_tsc_khz(old);
                }
                return Err(HypervisorError::ReadBack {
                    what: format!("vCPU {} TSC kHz", v.id()),
                    wrote: u64::from(khz),
                    read: u64::from(got),
                });
            }
        }
        self.guest_khz.store(khz, Ordering::SeqCst);
        Ok(())
    }

    fn guest_tsc_khz(&self) -> u32 {
        self.guest_khz_now()
    }

    fn freeze(&self, vcpus: &[&dyn Vcpu]) -> Result<Capture, HypervisorError> {
        let host = self.host_tsc()?;
        let sample = clock::sample(&self.fd)?;
        let readings = vcpus
            .iter()
            .map(|v| v.tsc_reading())
            .collect::<Result<Vec<_>, _>>()?;
        let honoured = self.offsets_honoured().unwrap_or(true);
        let c = capture(
            &HostSample::from(&sample),
            &host,
            self.guest_khz_now(),
            &readings,
            sample.tsc_stable(),
            honoured,
        )?;
        *self.last_capture.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.snapshot.clone());
        Ok(c)
    }

    fn thaw(
        &self,
        vcpus: &[&dyn Vcpu],
        snap: &TscSnapshot,
        policy: ClockPolicy,
    ) -> Result<ClockReport, HypervisorError> {
        snap.check_vcpus(vcpus.len())?;
        if snap.tsc_khz() != self.guest_khz_now() {
            // Refused here, before anything else changes, when the host cannot run it.
            self.set_guest_tsc_khz(vcpus, snap.tsc_khz())?;
        }
        let host = self.host_tsc()?;
        let sample = clock::sample(&self.fd)?;
        let now = HostSample::from(&sample);
        let own = self
            .last_capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            == Some(snap);
        let plan = match policy {
            // Resuming our own freeze: the host TSC measures the pause exactly (O' = O).
            ClockPolicy::Wallclock if own => {
                plan_thaw_elapsed(snap, &now, &host, Elapsed::SameHostTsc)
                    .or_else(|_| plan_thaw(snap, &now, &host, policy))?
            }
            _ => plan_thaw(snap, &now, &host, policy)?,
        };

        if self.offsets_honoured() == Some(false) {
            return self.thaw_host_tsc(vcpus, snap, policy, &now, &host, plan.vm_offset);
        }

        // Keep what is there, to put it back if the thaw has to be refused.
        let before = vcpus
            .iter()
            .map(|v| v.tsc_reading())
            .collect::<Result<Vec<_>, _>>()?;
        let fb = self.frac_bits();
        let slack = u64::from(snap.tsc_khz()); // 1 ms of cycles
        let mut honoured = true;
        let mut warnings = Vec::new();
        let mut applied = None;
        if self.caps.tsc_offset_attr {
            for (i, v) in vcpus.iter().enumerate() {
                let wb = v.set_tsc(plan.vcpu_offsets[i], plan.tsc_adjust[i])?;
                let lo = scale_tsc(wb.host_tsc_before, host.ratio, fb)
                    .wrapping_add(plan.vcpu_offsets[i]);
                let hi =
                    scale_tsc(wb.host_tsc_after, host.ratio, fb).wrapping_add(plan.vcpu_offsets[i]);
                if wb.offset_read_back != plan.vcpu_offsets[i]
                    || !within(wb.guest_tsc, lo, hi, slack)
                {
                    honoured = false;
                }
                if i == 0 {
                    applied = Some(wb.offset_read_back.wrapping_sub(plan.tsc_adjust[0]));
                }
            }
        } else {
            self.write_tsc_msrs(vcpus, &plan, &now, &host)?;
            warnings.push(
                "KVM_VCPU_TSC_OFFSET is missing on this kernel: the TSC was restored by \
                 MSR_IA32_TSC writes computed for one instant (vCPUs written later lag by the \
                 write latency)"
                    .to_string(),
            );
            let h = clock::rdtsc();
            let expect =
                plan.guest_tsc
                    .wrapping_add(scale_tsc(h, host.ratio, fb).wrapping_sub(scale_tsc(
                        now.host_tsc,
                        host.ratio,
                        fb,
                    )));
            for (i, v) in vcpus.iter().enumerate() {
                let (_, g, h1) = bracketed(*v)?;
                let upper = expect
                    .wrapping_add(
                        scale_tsc(h1, host.ratio, fb).wrapping_sub(scale_tsc(h, host.ratio, fb)),
                    )
                    .wrapping_add(plan.tsc_adjust[i]);
                if !within(g, expect.wrapping_add(plan.tsc_adjust[i]), upper, slack) {
                    honoured = false;
                }
            }
            applied = Some(plan.vm_offset);
        }
        self.remember_offsets(honoured);

        if !honoured {
            log::warn!("{IGNORED_OFFSETS_WARNING}");
            match self.thaw_host_tsc(vcpus, snap, policy, &now, &host, plan.vm_offset) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    // Put the offsets and TSC_ADJUST back as they were.
                    for (v, b) in vcpus.iter().zip(&before) {
                        if self.caps.tsc_offset_attr {
                            let _ = v.set_tsc(b.offset, b.tsc_adjust);
                        } else {
                            let _ = v.set_msrs(&[MsrEntry {
                                index: msr::IA32_TSC_ADJUST,
                                data: b.tsc_adjust,
                            }]);
                        }
                    }
                    return Err(e);
                }
            }
        }

        let err = self.set_clock_verified(snap, &plan, &now, &host)?;
        let mut report = ClockReport::from_plan(
            policy,
            &plan,
            self.caps.vendor,
            snap.tsc_khz(),
            plan.vm_offset,
            applied,
            true,
        );
        report.warnings.extend(warnings);
        report.warnings.extend(clock_error_warning(err));
        Ok(report)
    }
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
}
