//! What a thaw did to the guest's clock, for `vm.info` and the log.

use super::plan::{ClockPolicy, ThawPlan};
use super::vendor::Vendor;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The policy a thaw could actually apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppliedPolicy {
    /// Real elapsed time shown to the guest, offsets written and verified.
    Wallclock,
    /// No time shown to the guest, offsets written and verified.
    Frozen,
    /// The host ignored the offsets: the guest saw the host TSC, and kvmclock
    /// was made to agree with it.
    HostTsc,
}

impl AppliedPolicy {
    /// The name serde writes (`wallclock`, `frozen`, `host_tsc`); the first two are the names of
    /// the [`ClockPolicy`] they apply.
    pub const fn name(self) -> &'static str {
        match self {
            AppliedPolicy::Wallclock => ClockPolicy::Wallclock.name(),
            AppliedPolicy::Frozen => ClockPolicy::Frozen.name(),
            AppliedPolicy::HostTsc => "host_tsc",
        }
    }
}

impl fmt::Display for AppliedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The clock section of `vm.info`: requested vs applied policy and the numbers behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockReport {
    /// Policy the operator asked for.
    pub policy_requested: ClockPolicy,
    /// Policy that took effect.
    pub policy_applied: AppliedPolicy,
    /// Guest TSC frequency, kHz.
    pub tsc_khz: u32,
    /// Host vendor.
    pub vendor: Vendor,
    /// VM-wide offset `O'` the plan wanted.
    pub vm_offset_planned: u64,
    /// Offset read back from the host, if it could be read.
    pub vm_offset_applied: Option<u64>,
    /// Whether the host honoured the offset.
    pub offsets_honoured: bool,
    /// Elapsed time shown to the guest, ns.
    pub elapsed_ns: u64,
    /// kvmclock written, ns.
    pub kvmclock_ns: u64,
    /// Largest error, ns, of `elapsed_ns` against what the applied policy means to show, as
    /// far as the hosts' samples can tell ([`error_bound_ns`](super::plan::error_bound_ns)):
    /// the samples' realtime/TSC brackets and cycle rounding. A migration or snapshot that
    /// crossed hosts under `wallclock` is further off by however much the two hosts' realtime
    /// clocks disagree.
    #[serde(default)]
    pub error_bound_ns: u64,
    /// Warnings from planning and verification.
    pub warnings: Vec<String>,
    /// Why the clock was restored (absent from reports of builds before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<super::origin::ThawOrigin>,
    /// kvmclock against the guest's TSC as read back after the thaw set it (absent where
    /// the backend does not measure it, and in reports of builds before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvmclock_check: Option<KvmclockCheck>,
    /// The guest's TSC at the freeze (`G`) and at the thaw's host sample (`G'`): with the VM
    /// offsets before and after, they place the freeze and the thaw in host TSC time (`G - O`,
    /// `G' - O'` where the TSC is not scaled), so that a tester can tell how long the guest's
    /// clock ran on either side of an outage. Absent in reports of builds before them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_guest_tsc: Option<u64>,
    /// The guest's TSC at the thaw's host sample (`G'`); see `freeze_guest_tsc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thaw_guest_tsc: Option<u64>,
}

/// How well kvmclock agreed with the guest's TSC once a thaw had set it: one `KVM_GET_CLOCK`
/// (kvmclock and host TSC of one instant) against `k + (G_now - G) / f_g`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmclockCheck {
    /// kvmclock minus what the TSC implies, ns, at the last read-back (positive: ahead).
    pub error_ns: i64,
    /// The same after the first call, which asked for the plan itself: the delay KVM adds.
    pub first_error_ns: i64,
    /// `KVM_SET_CLOCK` calls it took to get there.
    pub attempts: u32,
}

impl ClockReport {
    /// Builds a report for `plan` (the plan actually applied: a
    /// [`plan_for_actual_tsc`](super::plan::plan_for_actual_tsc) plan when the
    /// host ignored offsets). `vm_offset_planned` is the offset of the plan
    /// first attempted; `vm_offset_applied` what the host read back.
    pub fn from_plan(
        requested: ClockPolicy,
        plan: &ThawPlan,
        vendor: Vendor,
        tsc_khz: u32,
        vm_offset_planned: u64,
        vm_offset_applied: Option<u64>,
        offsets_honoured: bool,
    ) -> Self {
        let policy_applied = match (offsets_honoured, plan.policy) {
            (false, _) => AppliedPolicy::HostTsc,
            (true, ClockPolicy::Wallclock) => AppliedPolicy::Wallclock,
            (true, ClockPolicy::Frozen) => AppliedPolicy::Frozen,
        };
        ClockReport {
            policy_requested: requested,
            policy_applied,
            tsc_khz,
            vendor,
            vm_offset_planned,
            vm_offset_applied,
            offsets_honoured,
            elapsed_ns: plan.elapsed_ns,
            kvmclock_ns: plan.set_clock.clock_ns,
            error_bound_ns: plan.error_bound_ns,
            warnings: plan.warnings.clone(),
            origin: None,
            kvmclock_check: None,
            freeze_guest_tsc: Some(plan.guest_tsc.wrapping_sub(plan.elapsed_cycles)),
            thaw_guest_tsc: Some(plan.guest_tsc),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_stable_names() {
        let r = ClockReport {
            policy_requested: ClockPolicy::Frozen,
            policy_applied: AppliedPolicy::HostTsc,
            tsc_khz: 2445404,
            vendor: Vendor::Amd,
            vm_offset_planned: 7,
            vm_offset_applied: Some(0),
            offsets_honoured: false,
            elapsed_ns: 5,
            kvmclock_ns: 9,
            error_bound_ns: 1,
            warnings: vec!["w".into()],
            origin: None,
            kvmclock_check: Some(KvmclockCheck {
                error_ns: -3,
                first_error_ns: 3_000,
                attempts: 2,
            }),
            freeze_guest_tsc: Some(1_000),
            thaw_guest_tsc: Some(1_600),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["freeze_guest_tsc"], 1_000);
        assert_eq!(v["thaw_guest_tsc"], 1_600);
        assert_eq!(v["policy_requested"], "frozen");
        assert_eq!(v["policy_applied"], "host_tsc");
        for p in [
            AppliedPolicy::Wallclock,
            AppliedPolicy::Frozen,
            AppliedPolicy::HostTsc,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!(AppliedPolicy::Frozen.name(), ClockPolicy::Frozen.name());
        assert_eq!(v["vendor"], "amd");
        assert_eq!(v["kvmclock_check"]["error_ns"], -3);
        assert_eq!(v["kvmclock_check"]["attempts"], 2);
        let back: ClockReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
