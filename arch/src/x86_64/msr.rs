//! Which MSRs a vCPU's state includes, and their values at boot.
//!
//! The TSC itself (0x10) and IA32_TSC_ADJUST (0x3b) are not in the list: guest time is saved and
//! restored through the hypervisor crate's `TscState`, from one host sample. IA32_TSC_DEADLINE
//! comes last, so that it is restored only after the TSC is in place.

use hypervisor::arch::MsrEntry;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_ADJUST.
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
/// IA32_TSC_DEADLINE.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_PAT.
pub const MSR_IA32_PAT: u32 = 0x277;
/// TSC_AUX (RDTSCP/RDPID value), saved per vCPU on both vendors.
pub const MSR_TSC_AUX: u32 = 0xc000_0103;
/// kvmclock system time (new).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// kvmclock wall clock (new).
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;

/// The MSRs Hourglass saves, in restore order, when the host lists them.
const SAVED: &[u32] = &[
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    MSR_TSC_AUX,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_PAT,
    0x2ff, // MTRR default type
    MSR_KVM_WALL_CLOCK_NEW,
    MSR_KVM_SYSTEM_TIME_NEW,
    0x4b56_4d02, // async page fault
    0x4b56_4d03, // steal time
    0x4b56_4d04, // PV EOI
    MSR_IA32_TSC_DEADLINE,
];

/// The MSRs to save for a vCPU: those of Hourglass's list that the host's index list
/// (`KVM_GET_MSR_INDEX_LIST`) contains, in restore order (TSC_DEADLINE last; TSC and TSC_ADJUST
/// never, they belong to `TscState`).
pub fn msrs_to_save(host_index_list: &[u32]) -> Vec<u32> {
    SAVED
        .iter()
        .copied()
        .filter(|m| host_index_list.contains(m))
        .collect()
}

/// MSR values for a vCPU at boot: fast strings on and the power-on PAT.
pub fn boot_msrs() -> Vec<MsrEntry> {
    vec![
        MsrEntry {
            index: MSR_IA32_MISC_ENABLE,
            data: 1, // fast-string enable
        },
        MsrEntry {
            index: MSR_IA32_PAT,
            data: 0x0007_0406_0007_0406,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_host_list_and_keeps_order() {
        let host = [
            MSR_IA32_TSC_DEADLINE,
            MSR_IA32_TSC,
            MSR_IA32_TSC_ADJUST,
            0xc000_0082,
            MSR_TSC_AUX,
            0x174,
            0xdead,
        ];
        let got = msrs_to_save(&host);
        assert_eq!(
            got,
            vec![0x174, 0xc000_0082, MSR_TSC_AUX, MSR_IA32_TSC_DEADLINE]
        );
    }

    #[test]
    fn tsc_msrs_never_saved_here() {
        let all: Vec<u32> = (0..0x1000).chain(0x4b56_4d00..0x4b56_4d10).collect();
        let got = msrs_to_save(&all);
        assert!(!got.contains(&MSR_IA32_TSC));
        assert!(!got.contains(&MSR_IA32_TSC_ADJUST));
        assert_eq!(got.last(), Some(&MSR_IA32_TSC_DEADLINE));
        assert!(msrs_to_save(&[]).is_empty());
    }

    #[test]
    fn boot_values() {
        let m = boot_msrs();
        assert!(m
            .iter()
            .any(|e| e.index == MSR_IA32_PAT && e.data == 0x0007_0406_0007_0406));
        assert!(m.iter().all(|e| e.index != MSR_IA32_TSC));
    }
}
