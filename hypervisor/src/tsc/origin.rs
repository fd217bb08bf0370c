//! Why a clock is being restored.
//!
//! A thaw needs to know whether the snapshot it is given came from this very VM's last freeze
//! on this host and boot: only then may the `wallclock` policy measure the pause with the host
//! TSC (`Elapsed::SameHostTsc`, `O' = O`), which is exact and immune to a stepped
//! CLOCK_REALTIME. The caller knows where the snapshot came from; comparing snapshots by value
//! cannot tell a resume from a restore of an identical copy, so the caller says it.

use serde::{Deserialize, Serialize};

/// Why a clock is being restored (the caller's word, not a guess).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThawOrigin {
    /// Resume of this VM's last freeze, on the same host and boot (pause/resume).
    OwnFreeze,
    /// Restore from a snapshot (possibly written on another host or boot).
    Snapshot,
    /// The destination of a live migration.
    Migration,
}

impl ThawOrigin {
    /// Whether the host TSC may measure the time since the freeze (same host and boot).
    pub fn same_host(self) -> bool {
        matches!(self, ThawOrigin::OwnFreeze)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_snake_case_and_only_own_freeze_is_same_host() {
        for (o, name, same) in [
            (ThawOrigin::OwnFreeze, "own_freeze", true),
            (ThawOrigin::Snapshot, "snapshot", false),
            (ThawOrigin::Migration, "migration", false),
        ] {
            assert_eq!(serde_json::to_value(o).unwrap(), name);
            assert_eq!(
                serde_json::from_value::<ThawOrigin>(name.into()).unwrap(),
                o
            );
            assert_eq!(o.same_host(), same);
        }
    }

    #[test]
    fn a_report_without_origin_still_reads_and_one_with_it_round_trips() {
        use crate::tsc::{AppliedPolicy, ClockPolicy, ClockReport, Vendor};
        let old = serde_json::json!({
            "policy_requested": "wallclock", "policy_applied": "host_tsc", "tsc_khz": 1,
            "vendor": "amd", "vm_offset_planned": 0, "vm_offset_applied": null,
            "offsets_honoured": false, "elapsed_ns": 0, "kvmclock_ns": 0, "warnings": []
        });
        let mut r: ClockReport = serde_json::from_value(old).unwrap();
        assert_eq!(r.origin, None);
        assert_eq!(r.policy_applied, AppliedPolicy::HostTsc);
        assert_eq!(r.vendor, Vendor::Amd);
        assert_eq!(r.policy_requested, ClockPolicy::Wallclock);
        assert!(serde_json::to_value(&r).unwrap().get("origin").is_none());
        r.origin = Some(ThawOrigin::Migration);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["origin"], "migration");
        assert_eq!(serde_json::from_value::<ClockReport>(v).unwrap(), r);
    }
}
