//! The pure time model: guest TSC and kvmclock across freeze and thaw.
//!
//! No ioctls here: backends feed in what KVM reported and write out what a
//! plan says. The model (see the project's DESIGN.md, "The time model"):
//!
//! ```text
//! G_i = scale(H) + O + A_i   (mod 2^64)    one VM-wide offset O, per-vCPU TSC_ADJUST A_i
//! freeze: G = scale(H) + O at one host sample (k, T, H)
//! thaw:   elapsed = wallclock ? max(0, T' - T) : 0
//!         G' = G + elapsed * f_g / 10^6,  O' = G' - scale'(H'),  vCPU i offset = O' + A_i
//!         KVM_SET_CLOCK { clock: k + elapsed, realtime: T' }
//! ```
//!
//! * [`vendor`]: VMX/SVM differences as one table.
//! * [`arith`]: KVM's ratio, scaling and pvclock arithmetic, bit for bit.
//! * [`plan`]: [`capture`] and [`plan_thaw`] (and [`plan_for_actual_tsc`] for
//!   hosts that ignore offsets).
//! * [`origin`]: [`ThawOrigin`], why a clock is being restored.
//! * [`state`]: [`TscSnapshot`], parsed and validated from `state.json`.
//! * [`report`]: [`ClockReport`], what a thaw actually did.
//!
//! A frozen thaw on another host keeps every vCPU's TSC where it stopped:
//!
//! ```
//! use hypervisor::tsc::*;
//!
//! let f_g = 2_445_404; // guest TSC kHz
//! let a = HostTsc { vendor: Vendor::Amd, host_khz: f_g, ratio: tsc_ratio(Vendor::Amd, f_g, f_g)?.ratio };
//! let freeze = HostSample { kvmclock_ns: 5_000, realtime_ns: 1_000_000, host_tsc: 900_000, bracket_ns: 0 };
//! // Two vCPUs with VM offset 100; vCPU 1 has TSC_ADJUST 7.
//! let vcpus = [VcpuTscReading { offset: 100, tsc_adjust: 0 }, VcpuTscReading { offset: 107, tsc_adjust: 7 }];
//! let snap = capture(&freeze, &a, f_g, &vcpus, true, true)?.snapshot;
//! assert_eq!(snap.vm_tsc(), 900_100);
//!
//! // Thaw on an Intel host at another frequency, one minute later.
//! let b_khz = 3_000_000;
//! let b = HostTsc { vendor: Vendor::Intel, host_khz: b_khz, ratio: tsc_ratio(Vendor::Intel, b_khz, f_g)?.ratio };
//! let now = HostSample { kvmclock_ns: 1, realtime_ns: 61_000_000, host_tsc: 42, bracket_ns: 0 };
//! let plan = plan_thaw(&snap, &now, &b, ClockPolicy::Frozen)?;
//! for (i, off) in plan.vcpu_offsets.iter().enumerate() {
//!     // What host b's hardware gives vCPU i: scale(H') + offset.
//!     let g = scale_tsc(now.host_tsc, b.ratio, Vendor::Intel.scaling().frac_bits).wrapping_add(*off);
//!     assert_eq!(g, 900_100 + vcpus[i].tsc_adjust);
//! }
//! assert_eq!(plan.set_clock, SetClock { clock_ns: 5_000, realtime_ns: 61_000_000 });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod arith;
pub mod error;
pub mod origin;
pub mod plan;
pub mod policy;
pub mod report;
pub mod state;
pub mod vendor;

pub use arith::{
    compute_ratio, cycles_to_ns, ns_to_cycles, pvclock_scale_delta, scale_tsc, time_scale,
    tsc_ratio, PvclockScale, RatioChoice, RatioOutcome, TSC_TOLERANCE_PPM,
};
pub use error::TscError;
pub use origin::ThawOrigin;
pub use plan::{
    capture, error_bound_ns, plan_for_actual_tsc, plan_thaw, plan_thaw_elapsed, Capture, Elapsed,
    HostSample, HostTsc, SetClock, ThawPlan, VcpuTscReading,
};
pub use policy::{ClockPolicy, ParsePolicyError};
pub use report::{AppliedPolicy, ClockReport, KvmclockCheck};
pub use state::{RawTscSnapshot, StateError, TscSnapshot, TscSource, TSC_SNAPSHOT_VERSION};
pub use vendor::{ScalingSpec, Vendor};
