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

/// MSRs owned by the TSC snapshot, never saved in a vCPU state.
pub const TSC_MSRS: &[u32] = &[msr::IA32_TSC, msr::IA32_TSC_ADJUST];

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

    /// The MSRs to save for a vCPU: common + vendor extras that `host_list` contains, in table
    /// order, never the TSC MSRs.
    pub fn saved_msrs(&self, host_list: &[u32]) -> Vec<u32> {
        COMMON_MSRS
            .iter()
            .chain(self.extra_msrs)
            .copied()
            .filter(|m| {
                (host_list.contains(m) || ALWAYS_TRY_MSRS.contains(m)) && !TSC_MSRS.contains(m)
            })
            .collect()
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
            0x174,
            msr::IA32_TSC,
            msr::IA32_TSC_ADJUST,
            0x3a,
            0xc001_0015,
        ];
        let intel = profile(Vendor::Intel).saved_msrs(&host);
        assert_eq!(intel, vec![0x174, msr::TSC_AUX, 0x3a]);
        let amd = profile(Vendor::Amd).saved_msrs(&host);
        assert_eq!(amd, vec![0x174, msr::TSC_AUX, 0xc001_0015]);
    }

    #[test]
    fn deadline_held_back_and_tsc_aux_saved() {
        assert!(AFTER_TSC_MSRS.contains(&msr::IA32_TSC_DEADLINE));
        assert!(COMMON_MSRS.contains(&msr::TSC_AUX));
    }
}
