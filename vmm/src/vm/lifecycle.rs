//! Pause and resume: park the vCPUs and freeze guest time; thaw it and release them.
//!
//! A paused VM holds [`Frozen`]: the time capture, why it is frozen ([`ThawOrigin`]: this VM's
//! own pause, a restored snapshot, an incoming migration) and the clock policy asked for it
//! when it was frozen (a restore's or a migration's `clock_policy`). Which policy a resume
//! applies is decided in one place, [`Vm::thaw_policy`]: the resume's own, else the one asked
//! at the freeze, else the VM's configured default.

use std::time::Instant;

use hypervisor::tsc::{Capture, ClockPolicy, ClockReport, ThawOrigin};
use hypervisor::Vcpu;
use log::{debug, info, warn};

use super::{hv_err, ns, RunState, Vm, VmError};

/// Guest time frozen in a paused VM, waiting for the resume that thaws it.
#[derive(Clone, Debug)]
pub(crate) struct Frozen {
    /// The freeze's capture (a snapshot's or migration's TSC state for an incoming VM).
    pub capture: Capture,
    /// Where the frozen time comes from.
    pub origin: ThawOrigin,
    /// The policy asked for when it was frozen; `None`: the VM's default.
    pub policy: Option<ClockPolicy>,
}

impl Vm {
    /// Park every vCPU, then freeze guest time from one host sample and tell each vCPU's guest
    /// (KVMCLOCK_CTRL) that the host stopped it.
    pub fn pause(&mut self) -> Result<(), VmError> {
        match self.state {
            RunState::Running => {}
            RunState::Paused => {
                return Err(VmError::InvalidState("the VM is already paused".into()))
            }
            RunState::Shutdown => return Err(VmError::InvalidState("the VM is shut down".into())),
        }
        let t0 = Instant::now();
        let park = self.vcpus.pause()?;
        let f0 = Instant::now();
        let capture = {
            let guards = self.vcpus.lock_all();
            let refs: Vec<&dyn Vcpu> = guards.iter().map(|g| g.as_ref()).collect();
            // What each vCPU thread read from its own vCPU as it parked (its TSC offset and
            // TSC_ADJUST, and whether it already told the guest with KVMCLOCK_CTRL).
            let park = self.vcpus.take_park_reads();
            for (known, p) in self.kvmclock_msrs.iter_mut().zip(&park) {
                *known = p.system_time.or(*known);
            }
            let readings: Vec<_> = park.iter().map(|p| p.reading).collect();
            // The guest stopped when its last vCPU did (known only if every thread said when).
            let stopped_at = park
                .iter()
                .map(|p| p.stopped_at)
                .collect::<Option<Vec<_>>>()
                .and_then(|v| v.into_iter().max());
            match self.vm.freeze_stopped_at(&refs, &readings, stopped_at) {
                Ok(c) => {
                    let told = park.iter().map(|p| p.clock_paused);
                    for v in refs.iter().zip(told).filter(|(_, t)| !t).map(|(v, _)| v) {
                        if let Err(e) = v.notify_guest_clock_paused() {
                            // EINVAL until the guest has enabled kvmclock: not an error.
                            log::debug!("vCPU {}: KVMCLOCK_CTRL: {e}", v.id());
                        }
                    }
                    c
                }
                Err(e) => {
                    drop(refs);
                    drop(guards);
                    self.vcpus.resume();
                    return Err(VmError::Hypervisor {
                        what: "freeze guest time".into(),
                        source: e,
                    });
                }
            }
        };
        if capture.skew_cycles != 0 {
            warn!(
                "vCPU TSC offsets differed by {} cycles at freeze; the thaw writes one VM offset",
                capture.skew_cycles
            );
        }
        self.frozen = Some(Frozen {
            capture,
            origin: ThawOrigin::OwnFreeze,
            policy: None,
        });
        self.state = RunState::Paused;
        self.stats.pauses += 1;
        self.stats.last_park_ns = ns(park);
        self.stats.last_freeze_ns = ns(f0.elapsed());
        self.stats.last_pause_ns = ns(t0.elapsed());
        info!(
            "paused: vCPUs parked in {:?}, time frozen in {:?}",
            park,
            f0.elapsed()
        );
        Ok(())
    }

    /// The clock policy a resume applies: `requested` (the resume's own), else the one asked
    /// when the time was frozen (a restore's or an incoming migration's), else the VM's default
    /// (`--clock-policy`).
    pub fn thaw_policy(&self, requested: Option<ClockPolicy>) -> ClockPolicy {
        requested
            .or(self.frozen.as_ref().and_then(|f| f.policy))
            .unwrap_or(self.config.clock_policy)
    }

    /// Thaw guest time before any vCPU runs (under [`Vm::thaw_policy`]`(requested)`), then
    /// release the vCPUs.
    pub fn resume(&mut self, requested: Option<ClockPolicy>) -> Result<&ClockReport, VmError> {
        match self.state {
            RunState::Paused => {}
            RunState::Running => return Err(VmError::InvalidState("the VM is not paused".into())),
            RunState::Shutdown => return Err(VmError::InvalidState("the VM is shut down".into())),
        }
        let t0 = Instant::now();
        let policy = self.thaw_policy(requested);
        let frozen = self
            .frozen
            .as_ref()
            .ok_or_else(|| VmError::InvalidState("paused without a time capture".into()))?;
        let report = {
            let guards = self.vcpus.lock_all();
            let refs: Vec<&dyn Vcpu> = guards.iter().map(|g| g.as_ref()).collect();
            self.vm
                .thaw(&refs, &frozen.capture.snapshot, frozen.origin, policy)
                .map_err(hv_err(format!("thaw guest time ({policy})")))?
        };
        let thaw = t0.elapsed();
        for w in &report.warnings {
            // Once per VM for each kind of warning (the same text but its numbers): a host that
            // ignores offsets says so at every resume, and with `--serial tty` each line would
            // land in the guest's console. vm.info's `clock.warnings` keeps the latest.
            if self.warned.insert(warning_kind(w)) {
                warn!("clock: {w} (said once per VM; see vm.info clock.warnings)");
            } else {
                debug!("clock: {w}");
            }
        }
        if report.policy_applied.name() != policy.name() {
            info!(
                "clock policy requested {policy}, applied {:?}",
                report.policy_applied
            );
        }
        self.restored_vcpus = None;
        self.last_report = Some(report);
        self.frozen = None;
        // The vCPUs are released whatever happens next; a thread slow to be scheduled again is
        // worth a warning, not a VM left half paused.
        let unpark = self.vcpus.resume();
        self.state = RunState::Running;
        self.stats.resumes += 1;
        self.stats.last_thaw_ns = ns(thaw);
        self.stats.last_unpark_ns = ns(unpark);
        self.stats.last_resume_ns = ns(t0.elapsed());
        info!("resumed: time thawed in {thaw:?}, vCPUs released in {unpark:?}");
        Ok(self.last_report.as_ref().expect("set above"))
    }
}

/// A warning without its numbers: what makes two warnings the same kind.
fn warning_kind(w: &str) -> String {
    w.chars().filter(|c| !c.is_ascii_digit()).collect()
}

#[cfg(test)]
mod tests {
    use super::warning_kind;

    #[test]
    fn warnings_differing_only_in_numbers_are_one_kind() {
        let a = "host ignores TSC offsets: kvmclock advanced 3843881 ns to agree";
        let b = "host ignores TSC offsets: kvmclock advanced 29 ns to agree";
        assert_eq!(warning_kind(a), warning_kind(b));
        assert_ne!(
            warning_kind(a),
            warning_kind("kvmclock disagrees with the TSC by 5 ns")
        );
    }
}
