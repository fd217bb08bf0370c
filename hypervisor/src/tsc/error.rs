//! Errors of the time model's arithmetic and planning.

use super::vendor::Vendor;
use thiserror::Error;

/// Why a TSC frequency, capture or thaw cannot be planned.
///
/// Every message names the values involved so that an operator can tell
/// which host, frequency or vCPU was the problem.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TscError {
    /// A frequency of 0 kHz was given.
    #[error("{which}: TSC frequency must be non-zero (got 0 kHz)")]
    ZeroFrequency {
        /// Which frequency: "host_khz" or "guest_khz".
        which: &'static str,
    },
    /// The guest frequency needs TSC scaling and the ratio KVM would compute
    /// is outside what the vendor's hardware can hold.
    #[error(
        "guest TSC frequency {guest_khz} kHz cannot run on this {vendor} host at {host_khz} kHz: \
         it is outside the 250 ppm window [{window_lo}, {window_hi}] kHz that runs unscaled, and the \
         scaling ratio it needs ({ratio}, {frac_bits} fractional bits) is outside 1..{max_ratio}"
    )]
    FrequencyOutOfRange {
        /// Host vendor.
        vendor: Vendor,
        /// Host TSC frequency in kHz.
        host_khz: u32,
        /// Requested guest TSC frequency in kHz.
        guest_khz: u32,
        /// Lowest guest kHz that runs without scaling.
        window_lo: u32,
        /// Highest guest kHz that runs without scaling.
        window_hi: u32,
        /// The ratio KVM would compute.
        ratio: u64,
        /// Fractional bits of the ratio.
        frac_bits: u32,
        /// The vendor's (exclusive) ratio limit.
        max_ratio: u64,
    },
    /// A host's scaling ratio is not one its vendor's hardware can hold.
    #[error("host TSC ratio {ratio} is invalid for {vendor} (must be 1..={max_ratio})")]
    InvalidRatio {
        /// Host vendor.
        vendor: Vendor,
        /// The ratio given.
        ratio: u64,
        /// The vendor's largest ratio.
        max_ratio: u64,
    },
    /// The host's scaling ratio is not the one KVM computes for the guest frequency.
    #[error(
        "host TSC ratio {actual} does not run the guest at {guest_khz} kHz on a {vendor} host \
         at {host_khz} kHz (KVM computes ratio {expected})"
    )]
    RatioMismatch {
        /// Host vendor.
        vendor: Vendor,
        /// Host TSC frequency in kHz.
        host_khz: u32,
        /// Guest TSC frequency in kHz.
        guest_khz: u32,
        /// Ratio KVM computes for these frequencies.
        expected: u64,
        /// Ratio the host reported.
        actual: u64,
    },
    /// The thaw would move the guest TSC backwards.
    #[error(
        "thaw refused: the guest TSC would go backwards (snapshot VM TSC {planned}, \
         the host gives {actual}, {} cycles behind)", planned.wrapping_sub(*actual)
    )]
    Backwards {
        /// The VM TSC stored at the freeze.
        planned: u64,
        /// The VM TSC the host actually gives the guest.
        actual: u64,
    },
    /// The elapsed time does not fit kvmclock's 64-bit nanoseconds.
    #[error("elapsed time of {cycles} cycles at {tsc_khz} kHz exceeds 2^64 ns")]
    ElapsedOutOfRange {
        /// Elapsed guest TSC cycles.
        cycles: u64,
        /// Guest TSC frequency, kHz.
        tsc_khz: u32,
    },
    /// The number of vCPUs does not match the snapshot.
    #[error("vCPU count mismatch: the snapshot has {snapshot} vCPUs, the VM has {vm}")]
    VcpuCountMismatch {
        /// vCPUs in the snapshot.
        snapshot: usize,
        /// vCPUs in the VM.
        vm: usize,
    },
    /// A capture was attempted with no vCPU readings.
    #[error("capture needs at least one vCPU TSC reading, got none")]
    NoVcpus,
    /// Elapsed time from the host TSC was requested but the host is not the same.
    #[error("elapsed time from the host TSC needs the same host, boot and frequency: {reason}")]
    NotSameHost {
        /// What differs.
        reason: String,
    },
}
