//! kvmclock: one host time sample (`KVM_GET_CLOCK`) and setting the clock (`KVM_SET_CLOCK`).
//!
//! A sample gives kvmclock `k`, host CLOCK_REALTIME `T` and host TSC `H` for one instant. Modern
//! KVM does that itself (flags `KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC`, only while its master
//! clock is in use). Where the flags are missing, CLOCK_REALTIME and the TSC are read back to back
//! around the ioctl and the width of that bracket is recorded, so the caller knows how precise the
//! sample is.

use kvm_bindings::{kvm_clock_data, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE};
use kvm_ioctls::VmFd;

use crate::error::HypervisorError;
use crate::host::{rdtsc, realtime_ns};

/// One host time sample as KVM (or the bracket fallback) gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockSample {
    /// kvmclock in ns.
    pub kvmclock_ns: u64,
    /// Host CLOCK_REALTIME in ns.
    pub realtime_ns: u64,
    /// Host TSC (raw, unscaled).
    pub host_tsc: u64,
    /// Width in ns of the bracket around the sample; 0 when KVM gave all three atomically.
    pub bracket_ns: u64,
    /// The flags KVM_GET_CLOCK returned.
    pub flags: u32,
}

impl ClockSample {
    /// Whether KVM reported a stable, TSC-based (master clock) kvmclock.
    pub fn tsc_stable(&self) -> bool {
        self.flags & KVM_CLOCK_TSC_STABLE != 0
    }

    /// Whether KVM gave realtime and host TSC itself (no bracket).
    pub fn atomic(&self) -> bool {
        self.flags & (KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC)
            == (KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC)
    }
}

/// How many bracketed tries the fallback makes, keeping the narrowest.
const BRACKET_TRIES: usize = 5;

/// Take one host time sample for `vm`.
pub fn sample(vm: &VmFd) -> Result<ClockSample, HypervisorError> {
    let data = vm
        .get_clock()
        .map_err(|e| HypervisorError::ioctl("KVM_GET_CLOCK", e.errno()))?;
    let flags = data.flags;
    if flags & (KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC)
        == (KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC)
    {
        return Ok(ClockSample {
            kvmclock_ns: data.clock,
            realtime_ns: data.realtime,
            host_tsc: data.host_tsc,
            bracket_ns: 0,
            flags,
        });
    }
    let mut best: Option<ClockSample> = None;
    for _ in 0..BRACKET_TRIES {
        let t0 = realtime_ns();
        let h0 = rdtsc();
        let data = vm
            .get_clock()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_CLOCK", e.errno()))?;
        let h1 = rdtsc();
        let t1 = realtime_ns();
        let s = ClockSample {
            kvmclock_ns: data.clock,
            realtime_ns: t0 + t1.saturating_sub(t0) / 2,
            host_tsc: h0.wrapping_add(h1.wrapping_sub(h0) / 2),
            bracket_ns: t1.saturating_sub(t0),
            flags: data.flags,
        };
        if best.map_or(true, |b| s.bracket_ns < b.bracket_ns) {
            best = Some(s);
        }
    }
    // BRACKET_TRIES > 0, so `best` is set.
    best.ok_or_else(|| HypervisorError::Unsupported("no clock sample taken".into()))
}

/// Set kvmclock to `clock_ns` as of host realtime `realtime_ns` (from the thaw's sample).
///
/// With `KVM_CLOCK_REALTIME` KVM itself adds the realtime elapsed since `realtime_ns` (if
/// positive: x86.c `kvm_vm_ioctl_set_clock`), so the clock stays anchored to the sample's instant.
/// Where KVM lacks the flag (`realtime_flag == false`), the same addition is done here just
/// before the ioctl, which is less exact by the ioctl's own latency.
pub fn set_clock(
    vm: &VmFd,
    clock_ns: u64,
    realtime_ns_at: u64,
    realtime_flag: bool,
) -> Result<(), HypervisorError> {
    let mut data = kvm_clock_data {
        clock: clock_ns,
        ..Default::default()
    };
    if realtime_flag {
        data.flags = KVM_CLOCK_REALTIME;
        data.realtime = realtime_ns_at;
    } else {
        data.clock = clock_ns.saturating_add(realtime_ns().saturating_sub(realtime_ns_at));
    }
    vm.set_clock(&data)
        .map_err(|e| HypervisorError::ioctl("KVM_SET_CLOCK", e.errno()))
}
