//! KVM's TSC and pvclock arithmetic, reproduced bit for bit.
//!
//! Each function follows the formula KVM uses in `arch/x86/kvm/x86.c`
//! (and `pvclock_scale_delta` in the pvclock header), with 128-bit
//! intermediates where KVM uses `mul_u64_u32_div`/`mul_u64_u64_shr`.
//! Inputs on which KVM would fault or loop (a zero divisor, a shift of 64
//! or more) give a documented value instead: nothing here panics.
//! `tests/tsc_vectors.rs` checks every function against known answers.

use super::error::TscError;
use super::vendor::Vendor;

/// KVM's tolerance (`tsc_tolerance_ppm`): a guest frequency within this many
/// ppm of the host's runs unscaled.
pub const TSC_TOLERANCE_PPM: u32 = 250;

/// The scaling ratio chosen for a guest frequency on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RatioChoice {
    /// Fixed-point ratio with the vendor's fractional bits (`1 << F` = unscaled).
    pub ratio: u64,
    /// Whether hardware TSC scaling is needed (outside the 250 ppm window).
    pub scaling: bool,
}

/// What KVM's `kvm_set_tsc_khz` + `set_tsc_khz` compute, valid or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RatioOutcome {
    /// The ratio and whether scaling is needed.
    pub choice: RatioChoice,
    /// Whether the vendor's hardware can hold the ratio (KVM: `0 < ratio < max`).
    pub valid: bool,
    /// Lowest guest kHz that runs unscaled.
    pub window_lo: u32,
    /// Highest guest kHz that runs unscaled.
    pub window_hi: u32,
}

/// KVM's `adjust_tsc_khz`: `khz * (10^6 + ppm) / 10^6`, truncated to 32 bits as KVM does.
fn adjust_khz(khz: u32, ppm: i64) -> u32 {
    let v = u128::from(khz) * (1_000_000i64 + ppm) as u128 / 1_000_000;
    v as u32
}

/// The ratio KVM computes for `guest_khz` on a host at `host_khz`, and its validity.
///
/// Outside the 250 ppm window the ratio is `floor(2^F * guest / host)`
/// (a quotient beyond 64 bits saturates to `u64::MAX`, which is invalid).
/// A zero frequency gives ratio 0, invalid.
pub fn compute_ratio(vendor: Vendor, host_khz: u32, guest_khz: u32) -> RatioOutcome {
    let spec = vendor.scaling();
    let window_lo = adjust_khz(host_khz, -i64::from(TSC_TOLERANCE_PPM));
    let window_hi = adjust_khz(host_khz, i64::from(TSC_TOLERANCE_PPM));
    let scaling = guest_khz < window_lo || guest_khz > window_hi;
    let invalid = |ratio| RatioOutcome {
        choice: RatioChoice { ratio, scaling },
        valid: false,
        window_lo,
        window_hi,
    };
    if host_khz == 0 || guest_khz == 0 {
        return invalid(0);
    }
    if !scaling {
        return RatioOutcome {
            choice: RatioChoice {
                ratio: vendor.default_ratio(),
                scaling,
            },
            valid: true,
            window_lo,
            window_hi,
        };
    }
    let q = (1u128 << spec.frac_bits) * u128::from(guest_khz) / u128::from(host_khz);
    let ratio = u64::try_from(q).unwrap_or(u64::MAX);
    let valid = ratio != 0 && ratio < spec.max_ratio;
    RatioOutcome {
        choice: RatioChoice { ratio, scaling },
        valid,
        window_lo,
        window_hi,
    }
}

/// The ratio for running the guest at `guest_khz` on a `vendor` host at
/// `host_khz`, or why the hardware cannot (KVM's `kvm_set_tsc_khz`).
///
/// This assumes the host has TSC scaling; a host without it can only run
/// ratios with `scaling == false`.
pub fn tsc_ratio(vendor: Vendor, host_khz: u32, guest_khz: u32) -> Result<RatioChoice, TscError> {
    if host_khz == 0 {
        return Err(TscError::ZeroFrequency { which: "host_khz" });
    }
    if guest_khz == 0 {
        return Err(TscError::ZeroFrequency { which: "guest_khz" });
    }
    let out = compute_ratio(vendor, host_khz, guest_khz);
    if out.valid {
        return Ok(out.choice);
    }
    let spec = vendor.scaling();
    Err(TscError::FrequencyOutOfRange {
        vendor,
        host_khz,
        guest_khz,
        window_lo: out.window_lo,
        window_hi: out.window_hi,
        ratio: out.choice.ratio,
        frac_bits: spec.frac_bits,
        max_ratio: spec.max_ratio,
    })
}

/// KVM's `__scale_tsc`: `(tsc * ratio) >> frac_bits` with a 128-bit product,
/// truncated to 64 bits. `frac_bits >= 128` gives 0.
pub fn scale_tsc(tsc: u64, ratio: u64, frac_bits: u32) -> u64 {
    let product = u128::from(tsc) * u128::from(ratio);
    product.checked_shr(frac_bits).unwrap_or(0) as u64
}

/// pvclock multiplier and shift: `ns = ((delta << shift) * mul) >> 32`
/// (a negative shift shifts right).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvclockScale {
    /// 32.32 fixed-point multiplier (`tsc_to_system_mul`).
    pub mul: u32,
    /// Pre-shift (`tsc_shift`).
    pub shift: i8,
}

/// KVM's `kvm_get_time_scale`: the scale converting `base_hz` ticks into
/// `scaled_hz` ticks (for kvmclock: `scaled_hz` = 10^9, `base_hz` = TSC Hz).
///
/// Where KVM's normalising loops would never end (`base_hz == 0`,
/// `scaled_hz == 0`, or `scaled_hz >= 2^63` shifting the base down to 0)
/// this returns `{ mul: 0, shift: 0 }`, a scale that yields 0 ns.
pub fn time_scale(scaled_hz: u64, base_hz: u64) -> PvclockScale {
    const HIGH: u64 = 0xffff_ffff_0000_0000;
    const DEGENERATE: PvclockScale = PvclockScale { mul: 0, shift: 0 };
    if scaled_hz == 0 || base_hz == 0 {
        return DEGENERATE;
    }
    let mut shift: i32 = 0;
    let mut tps64 = base_hz;
    let mut scaled64 = scaled_hz;
    while tps64 > scaled64.wrapping_mul(2) || tps64 & HIGH != 0 {
        tps64 >>= 1;
        shift -= 1;
    }
    let mut tps32 = tps64 as u32;
    if tps32 == 0 {
        return DEGENERATE;
    }
    while u64::from(tps32) <= scaled64 || scaled64 & HIGH != 0 {
        if scaled64 & HIGH != 0 || tps32 & 0x8000_0000 != 0 {
            scaled64 >>= 1;
        } else {
            tps32 <<= 1;
        }
        shift += 1;
    }
    // div_frac: (scaled64 as u32) << 32 / tps32; the loop left scaled64 < tps32,
    // so the quotient fits in 32 bits.
    let mul = ((u64::from(scaled64 as u32) << 32) / u64::from(tps32)) as u32;
    PvclockScale {
        mul,
        // The loops move shift by at most 64 down and 96 up.
        shift: shift as i8,
    }
}

/// `pvclock_scale_delta`: `((delta << shift) * mul) >> 32` with a 128-bit
/// product (bits shifted out of `delta` are lost, as in KVM). A shift of 64
/// or more in either direction gives 0.
pub fn pvclock_scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let amount = u32::from(shift.unsigned_abs());
    let delta = if shift < 0 {
        delta.checked_shr(amount).unwrap_or(0)
    } else {
        delta.checked_shl(amount).unwrap_or(0)
    };
    ((u128::from(delta) * u128::from(mul)) >> 32) as u64
}

/// Nanoseconds to TSC cycles at `khz`: `floor(ns * khz / 10^6)`, computed in
/// 128 bits and reduced modulo 2^64 (TSC arithmetic is modulo 2^64).
pub fn ns_to_cycles(ns: u64, khz: u32) -> u64 {
    (u128::from(ns) * u128::from(khz) / 1_000_000) as u64
}

/// TSC cycles to nanoseconds at `khz`: `floor(cycles * 10^6 / khz)`, computed
/// in 128 bits, saturating at `u64::MAX`. `khz == 0` gives `u64::MAX` for
/// non-zero cycles (no frequency: unbounded time) and 0 for zero cycles.
pub fn cycles_to_ns(cycles: u64, khz: u32) -> u64 {
    if cycles == 0 {
        return 0;
    }
    if khz == 0 {
        return u64::MAX;
    }
    let ns = u128::from(cycles) * 1_000_000 / u128::from(khz);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_250_ppm() {
        let out = compute_ratio(Vendor::Amd, 1_000_000, 1_000_250);
        assert_eq!((out.window_lo, out.window_hi), (999_750, 1_000_250));
        assert!(!out.choice.scaling);
        assert!(
            compute_ratio(Vendor::Amd, 1_000_000, 1_000_251)
                .choice
                .scaling
        );
    }

    #[test]
    fn out_of_range_error_names_frequencies_and_rule() {
        let err = tsc_ratio(Vendor::Amd, 1_000_000, 300_000_000).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("300000000 kHz"), "{msg}");
        assert!(msg.contains("1000000 kHz"), "{msg}");
        assert!(msg.contains("250 ppm"), "{msg}");
        assert!(tsc_ratio(Vendor::Intel, 1_000_000, 300_000_000).is_ok());
        assert!(matches!(
            tsc_ratio(Vendor::Intel, 0, 1),
            Err(TscError::ZeroFrequency { which: "host_khz" })
        ));
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        assert_eq!(time_scale(0, 5).mul, 0);
        assert_eq!(time_scale(5, 0).mul, 0);
        let _ = time_scale(u64::MAX, 1);
        let _ = time_scale(1 << 63, u64::MAX);
        let _ = time_scale(1, u64::MAX);
        assert_eq!(pvclock_scale_delta(u64::MAX, u32::MAX, i8::MIN), 0);
        assert_eq!(pvclock_scale_delta(u64::MAX, u32::MAX, i8::MAX), 0);
        assert_eq!(scale_tsc(u64::MAX, u64::MAX, 200), 0);
        assert_eq!(cycles_to_ns(u64::MAX, 1), u64::MAX);
        assert_eq!(cycles_to_ns(7, 0), u64::MAX);
        let _ = ns_to_cycles(u64::MAX, u32::MAX);
        let out = compute_ratio(Vendor::Intel, 1, u32::MAX);
        assert!(!out.valid);
    }

    #[test]
    fn cycle_conversions_round_down() {
        assert_eq!(ns_to_cycles(1_000_000_000, 2_445_404), 2_445_404_000);
        assert_eq!(ns_to_cycles(1, 999_999), 0);
        assert_eq!(cycles_to_ns(2_445_404_000, 2_445_404), 1_000_000_000);
        assert_eq!(cycles_to_ns(3, 2_000_000), 1);
    }
}
