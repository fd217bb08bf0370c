//! The host's own clocks and CPU, read without any hypervisor.
//!
//! Every backend needs the same few host facts (the TSC, CLOCK_REALTIME, the CPU vendor and,
//! where no hypervisor reports it, the TSC frequency); they live here so that no backend reaches
//! into another for them.

use crate::tsc::Vendor;

/// The host TSC now.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Host CLOCK_REALTIME now, in ns.
pub fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes it.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The host CPU's vendor from CPUID leaf 0, or `None` for a CPU that is neither Intel nor AMD.
pub fn host_vendor() -> Option<Vendor> {
    // CPUID leaf 0 is available on every x86_64 CPU and has no side effects.
    let r = core::arch::x86_64::__cpuid(0);
    let mut s = [0u8; 12];
    s[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    s[4..8].copy_from_slice(&r.edx.to_le_bytes());
    s[8..12].copy_from_slice(&r.ecx.to_le_bytes());
    Vendor::from_cpuid_vendor(&s)
}

/// Host TSC kHz from CPUID leaf 0x15 (crystal clock and ratio) when the leaf is complete, else
/// `None` (AMD CPUs and many hypervisors leave it empty; KVM_GET_TSC_KHZ is the better source).
pub fn cpuid_tsc_khz() -> Option<u32> {
    let max = core::arch::x86_64::__cpuid(0).eax;
    if max < 0x15 {
        return None;
    }
    let r = core::arch::x86_64::__cpuid(0x15);
    if r.eax == 0 || r.ebx == 0 || r.ecx == 0 {
        return None;
    }
    u32::try_from(u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax) / 1000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host_has_a_known_vendor() {
        // Every machine this project runs on is Intel or AMD; a None here is a table bug.
        assert!(host_vendor().is_some(), "CPUID vendor not in the table");
    }

    #[test]
    fn clocks_move_forward() {
        let (t0, h0) = (realtime_ns(), rdtsc());
        let (t1, h1) = (realtime_ns(), rdtsc());
        assert!(t1 >= t0 && t0 > 1_600_000_000_000_000_000, "{t0} {t1}");
        assert!(h1.wrapping_sub(h0) < 1 << 40, "{h0} {h1}");
    }
}
