//! Intel VMX and AMD SVM under KVM, as one table.
//!
//! Everything that differs between the two and that code acts on lives in [`PROFILES`], as
//! data: the scaling format (taken from [`crate::tsc::Vendor::scaling`]) and the vendor-specific
//! MSRs saved with a vCPU. Code elsewhere asks [`profile`] instead of branching on the vendor.
//! Descriptive columns that no code read (the extension's name, where the hardware keeps ratio
//! and offset) and a restore-order table that only its own test read were deleted rather than
//! kept as documentation that could drift: the restore order is code, in one place
//! ([`AFTER_TSC_MSRS`] is held back by `KvmVcpu::set_state` and written by the TSC engine right
//! after the TSC, because KVM converts TSC_DEADLINE against the current guest TSC).
//!
//! Both vendors save TSC_AUX (0xC0000103) per vCPU.

use crate::arch::msr;
use crate::tsc::{ScalingSpec, Vendor};

/// MSRs written only after the TSC is restored.
pub const AFTER_TSC_MSRS: &[u32] = &[msr::IA32_TSC_DEADLINE];

/// MSRs saved on both vendors (filtered by the host's KVM_GET_MSR_INDEX_LIST).
pub const COMMON_MSRS: &[u32] = &[
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0x2ff,       // IA32_MTRR_DEF_TYPE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    msr::TSC_AUX,
    msr::IA32_TSC_DEADLINE,
    0xda0, // IA32_XSS
    msr::KVM_WALL_CLOCK_NEW,
    msr::KVM_SYSTEM_TIME_NEW,
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
    0x4b56_4d05, // MSR_KVM_POLL_CONTROL
    0x4b56_4d06, // MSR_KVM_ASYNC_PF_INT
];

/// MSRs on a host's list that are never saved with a vCPU: the TSC's own (the TSC snapshot owns
/// them), and kvmclock's legacy pair (0x11 wall clock, 0x12 system time), which alias the new
/// pair in [`COMMON_MSRS`]: a guest uses one pair, and writing the other's saved 0 would turn
/// its kvmclock off.
pub const NEVER_SAVED_MSRS: &[u32] = &[msr::IA32_TSC, msr::IA32_TSC_ADJUST, 0x11, 0x12];

/// MSRs saved even when the host's index list omits them (a host may hide RDTSCP from the
/// guest CPUID and so leave TSC_AUX off its list while still reading and writing it); each is
/// skipped if the read fails.
pub const ALWAYS_TRY_MSRS: &[u32] = &[msr::TSC_AUX];

/// One vendor's row.
#[derive(Debug)]
pub struct VendorProfile {
    /// The vendor.
    pub vendor: Vendor,
    /// MSRs saved only on this vendor (filtered by the host's list like [`COMMON_MSRS`]).
    pub extra_msrs: &'static [u32],
}

/// The table.
pub const PROFILES: [VendorProfile; 2] = [
    VendorProfile {
        vendor: Vendor::Intel,
        extra_msrs: &[
            0x3a,  // IA32_FEATURE_CONTROL
            0xe1,  // IA32_UMWAIT_CONTROL
            0x122, // IA32_TSX_CTRL
        ],
    },
    VendorProfile {
        vendor: Vendor::Amd,
        extra_msrs: &[
            0xc001_0015, // HWCR
            0xc001_011f, // VIRT_SPEC_CTRL
        ],
    },
];

/// The row of `vendor`.
pub fn profile(vendor: Vendor) -> &'static VendorProfile {
    match vendor {
        Vendor::Intel => &PROFILES[0],
        Vendor::Amd => &PROFILES[1],
    }
}

impl VendorProfile {
    /// The vendor's scaling format.
    pub fn scaling(&self) -> ScalingSpec {
        self.vendor.scaling()
    }

    /// The MSRs to save for a vCPU: first common + vendor extras that `host_list` contains, in
    /// table order (the restore order this crate knows matters), then every other MSR the host
    /// lists as saveable (`KVM_GET_MSR_INDEX_LIST`: what the guest can write, SPEC_CTRL, MTRRs,
    /// machine-check and performance-counter MSRs...) in the host's order; never
    /// [`NEVER_SAVED_MSRS`]. What a vCPU cannot read is skipped when its state is read; what a
    /// destination cannot write refuses the restore, naming the MSR.
    pub fn saved_msrs(&self, host_list: &[u32]) -> Vec<u32> {
        let mut v: Vec<u32> = COMMON_MSRS
            .iter()
            .chain(self.extra_msrs)
            .copied()
            .filter(|m| {
                (host_list.contains(m) || ALWAYS_TRY_MSRS.contains(m))
                    && !NEVER_SAVED_MSRS.contains(m)
            })
            .collect();
        for m in host_list {
            if !v.contains(m) && !NEVER_SAVED_MSRS.contains(m) {
                v.push(*m);
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_match_their_vendor_and_scaling() {
        for v in Vendor::ALL {
            let p = profile(v);
            assert_eq!(p.vendor, v);
            assert_eq!(p.scaling(), v.scaling());
        }
        assert_eq!(profile(Vendor::Intel).scaling().frac_bits, 48);
        assert_eq!(profile(Vendor::Amd).scaling().frac_bits, 32);
    }

    #[test]
    fn saved_msrs_keep_tsc_aux_drop_tsc_and_follow_host_list() {
        let host = [
            0x48, // SPEC_CTRL: on no table, saved because the host lists it
            0x174,
            msr::IA32_TSC,
            msr::IA32_TSC_ADJUST,
            0x3a,
            0x12, // legacy kvmclock
            0xc001_0015,
        ];
        // Known ones first in table order, then the host's others in its order.
        let intel = profile(Vendor::Intel).saved_msrs(&host);
        assert_eq!(intel, vec![0x174, msr::TSC_AUX, 0x3a, 0x48, 0xc001_0015]);
        let amd = profile(Vendor::Amd).saved_msrs(&host);
        assert_eq!(amd, vec![0x174, msr::TSC_AUX, 0xc001_0015, 0x48, 0x3a]);
    }

    #[test]
    fn deadline_held_back_and_tsc_aux_saved() {
        assert!(AFTER_TSC_MSRS.contains(&msr::IA32_TSC_DEADLINE));
        assert!(COMMON_MSRS.contains(&msr::TSC_AUX));
    }
}
