//! The CPUID a vCPU sees: the host's supported CPUID, with the per-vCPU topology and the time
//! leaves a guest needs to trust its TSC and find kvmclock.

use hypervisor::arch::CpuIdEntry;

use crate::{Error, Result};

/// KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the entry is selected by leaf and subleaf.
pub const CPUID_FLAG_SIGNIFICANT_INDEX: u32 = 1;
/// The KVM paravirtual signature leaf.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// The KVM paravirtual feature leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// The timing leaf (TSC and APIC bus frequencies in kHz), as VMware and KVM define it.
pub const KVM_CPUID_TIMING: u32 = 0x4000_0010;
/// KVM_FEATURE_CLOCKSOURCE2: kvmclock at MSR 0x4b564d01.
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: the pvclock stable bit may be trusted.
pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
/// CPUID.80000007H:EDX[8]: invariant TSC.
pub const INVARIANT_TSC_EDX: u32 = 1 << 8;
/// CPUID.01H:ECX[31]: running under a hypervisor.
pub const HYPERVISOR_ECX: u32 = 1 << 31;
/// The APIC timer frequency KVM emulates (1 GHz), reported in leaf 0x40000010 EBX, in kHz.
pub const KVM_APIC_BUS_KHZ: u32 = 1_000_000;

/// What varies per vCPU and per VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidConfig {
    /// This vCPU's index, which is also its APIC ID.
    pub vcpu_id: u32,
    /// The number of vCPUs in the VM.
    pub vcpu_count: u32,
    /// The guest TSC frequency in kHz (the same on every vCPU).
    pub tsc_khz: u32,
}

fn find(entries: &[CpuIdEntry], function: u32, index: u32) -> Option<usize> {
    entries
        .iter()
        .position(|e| e.function == function && e.index == index)
}

fn upsert(entries: &mut Vec<CpuIdEntry>, entry: CpuIdEntry) {
    match find(entries, entry.function, entry.index) {
        Some(i) => entries[i] = entry,
        None => entries.push(entry),
    }
}

fn bits_for(count: u32) -> u32 {
    // Width of the APIC-ID field that holds `count` distinct values.
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// The CPUID leaf 0x15 values `(eax, ebx, ecx)` = (denominator, numerator, crystal Hz) that
/// describe a TSC of `tsc_khz`: TSC Hz = ecx * ebx / eax, exactly.
pub fn leaf_0x15(tsc_khz: u32) -> (u32, u32, u32) {
    let hz = u64::from(tsc_khz) * 1000;
    match u32::try_from(hz) {
        // A crystal at the TSC frequency itself.
        Ok(hz) => (1, 1, hz),
        // Above 4.29 GHz: a crystal of `tsc_khz` Hz times 1000 (still exact).
        Err(_) => (1, 1000, tsc_khz),
    }
}

/// Build the CPUID for one vCPU from the host's supported CPUID.
///
/// - leaf 1: EBX[31:24] = APIC ID, EBX[23:16] = logical processor count, ECX[31] hypervisor;
/// - leaves 0xB and 0x1F (where the host has them): x2APIC topology, one thread per core;
/// - leaf 0x80000007 EDX[8]: invariant TSC (the VMM keeps one VM-wide TSC);
/// - leaves 0x15/0x16 where the host's maximum basic leaf reaches them: the TSC frequency;
/// - 0x40000000 "KVMKVMKVM" with max leaf 0x40000010, 0x40000001 with kvmclock
///   (CLOCKSOURCE2 and the stable bit) and 0x40000010 EAX = TSC kHz, EBX = APIC bus kHz.
pub fn build_cpuid(host: &[CpuIdEntry], cfg: &CpuidConfig) -> Result<Vec<CpuIdEntry>> {
    if cfg.vcpu_count == 0 || cfg.vcpu_id >= cfg.vcpu_count {
        return Err(Error::Cpuid(format!(
            "vCPU id {} out of range for {} vCPUs",
            cfg.vcpu_id, cfg.vcpu_count
        )));
    }
    if cfg.vcpu_count > 255 {
        return Err(Error::Cpuid(format!(
            "{} vCPUs exceed the 255 that xAPIC IDs can name",
            cfg.vcpu_count
        )));
    }
    let mut out: Vec<CpuIdEntry> = host.to_vec();
    let leaf0 = find(&out, 0, 0)
        .map(|i| out[i])
        .ok_or_else(|| Error::Cpuid("no leaf 0".into()))?;
    let max_basic = leaf0.eax;

    // Leaf 1: APIC ID and logical count.
    let i = find(&out, 1, 0).ok_or_else(|| Error::Cpuid("no leaf 1".into()))?;
    let e = &mut out[i];
    e.ebx = (e.ebx & 0x0000_ffff) | (cfg.vcpu_id << 24) | (cfg.vcpu_count << 16);
    e.ecx |= HYPERVISOR_ECX;
    // HTT: more than one logical processor per package.
    if cfg.vcpu_count > 1 {
        e.edx |= 1 << 28;
    }

    // Extended topology leaves: subleaf 0 = SMT level (1 thread), 1 = core level (all vCPUs).
    for leaf in [0xbu32, 0x1f] {
        if max_basic < leaf || !out.iter().any(|e| e.function == leaf) {
            continue;
        }
        out.retain(|e| e.function != leaf);
        let shift = bits_for(cfg.vcpu_count);
        for (sub, eax, ebx, level_type) in [
            (0u32, 0u32, 1u32, 1u32),
            (1, shift, cfg.vcpu_count, 2),
            (2, 0, 0, 0),
        ] {
            out.push(CpuIdEntry {
                function: leaf,
                index: sub,
                flags: CPUID_FLAG_SIGNIFICANT_INDEX,
                eax,
                ebx,
                ecx: sub | (level_type << 8),
                edx: cfg.vcpu_id,
            });
        }
    }

    // Deterministic cache parameters (Intel leaf 4): all vCPUs are cores of one package, one
    // thread per core; the last-level cache (highest level) is shared by all of them.
    let max_level = out
        .iter()
        .filter(|e| e.function == 4)
        .map(|e| (e.eax >> 5) & 7)
        .max()
        .unwrap_or(0);
    let cores_m1 = (cfg.vcpu_count - 1).min(63);
    for e in out.iter_mut().filter(|e| e.function == 4) {
        let level = (e.eax >> 5) & 7;
        let sharing = if level == max_level && level > 1 {
            cores_m1.min(0xfff)
        } else {
            0
        };
        e.eax = (e.eax & 0x3fff) | (sharing << 14) | (cores_m1 << 26);
    }

    // AMD topology: 0x80000008 ECX (cores per package) and 0x8000001E (extended APIC ID).
    if let Some(i) = find(&out, 0x8000_0008, 0) {
        let size = bits_for(cfg.vcpu_count);
        out[i].ecx = (out[i].ecx & !0xf0ff) | (size << 12) | (cfg.vcpu_count - 1);
    }
    if let Some(i) = find(&out, 0x8000_001e, 0) {
        out[i].eax = cfg.vcpu_id;
        out[i].ebx = (out[i].ebx & !0xffff) | (cfg.vcpu_id & 0xff);
        out[i].ecx &= !0xff;
    }

    // Invariant TSC.
    let max_ext = find(&out, 0x8000_0000, 0).map(|i| out[i].eax).unwrap_or(0);
    if max_ext >= 0x8000_0007 {
        match find(&out, 0x8000_0007, 0) {
            Some(i) => out[i].edx |= INVARIANT_TSC_EDX,
            None => out.push(CpuIdEntry {
                function: 0x8000_0007,
                edx: INVARIANT_TSC_EDX,
                ..Default::default()
            }),
        }
    }

    // TSC / crystal frequency leaves, only where the host's basic range reaches them.
    if max_basic >= 0x15 && cfg.tsc_khz != 0 {
        let (eax, ebx, ecx) = leaf_0x15(cfg.tsc_khz);
        upsert(
            &mut out,
            CpuIdEntry {
                function: 0x15,
                eax,
                ebx,
                ecx,
                ..Default::default()
            },
        );
    }
    if max_basic >= 0x16 && cfg.tsc_khz != 0 {
        let old = find(&out, 0x16, 0).map(|i| out[i]).unwrap_or_default();
        upsert(
            &mut out,
            CpuIdEntry {
                function: 0x16,
                eax: cfg.tsc_khz / 1000,
                ..old
            },
        );
    }

    // KVM paravirtual leaves.
    let sig = b"KVMKVMKVM\0\0\0";
    let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    upsert(
        &mut out,
        CpuIdEntry {
            function: KVM_CPUID_SIGNATURE,
            eax: KVM_CPUID_TIMING,
            ebx: word(0),
            ecx: word(4),
            edx: word(8),
            ..Default::default()
        },
    );
    let host_features = find(host, KVM_CPUID_FEATURES, 0)
        .map(|i| host[i])
        .unwrap_or_default();
    upsert(
        &mut out,
        CpuIdEntry {
            function: KVM_CPUID_FEATURES,
            eax: host_features.eax | KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
            ..host_features
        },
    );
    upsert(
        &mut out,
        CpuIdEntry {
            function: KVM_CPUID_TIMING,
            eax: cfg.tsc_khz,
            ebx: KVM_APIC_BUS_KHZ,
            ..Default::default()
        },
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuIdEntry {
        CpuIdEntry {
            function,
            index,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    fn host(max_basic: u32) -> Vec<CpuIdEntry> {
        vec![
            e(0, 0, max_basic, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            e(1, 0, 0x00a0_0f11, 0x0000_0800, 0x7ed8_320b, 0x178b_fbff),
            e(0xb, 0, 1, 2, 0x100, 7),
            e(0xb, 1, 7, 16, 0x201, 7),
            e(0x16, 0, 2000, 3000, 100, 0),
            e(0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
            e(0x8000_0007, 0, 0, 0, 0, 0), // host without invariant TSC
            e(
                KVM_CPUID_FEATURES,
                0,
                0x0100_7afb & !KVM_FEATURE_CLOCKSOURCE2,
                0,
                0,
                0,
            ),
        ]
    }

    fn get(v: &[CpuIdEntry], f: u32, i: u32) -> CpuIdEntry {
        v[find(v, f, i).unwrap_or_else(|| panic!("leaf {f:#x}/{i} missing"))]
    }

    #[test]
    fn apic_id_and_count_in_leaf_1() {
        let cfg = CpuidConfig {
            vcpu_id: 3,
            vcpu_count: 4,
            tsc_khz: 2_445_404,
        };
        let out = build_cpuid(&host(0x16), &cfg).unwrap();
        let l1 = get(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "low EBX bits kept from the host");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
    }

    #[test]
    fn x2apic_topology_names_the_vcpu() {
        let cfg = CpuidConfig {
            vcpu_id: 2,
            vcpu_count: 4,
            tsc_khz: 1_000_000,
        };
        let out = build_cpuid(&host(0x16), &cfg).unwrap();
        let s0 = get(&out, 0xb, 0);
        let s1 = get(&out, 0xb, 1);
        assert_eq!((s0.eax, s0.ebx, s0.ecx, s0.edx), (0, 1, 0x100, 2));
        assert_eq!((s1.eax, s1.ebx, s1.ecx, s1.edx), (2, 4, 0x201, 2));
        assert_eq!(s0.flags, CPUID_FLAG_SIGNIFICANT_INDEX);
        assert!(find(&out, 0x1f, 0).is_none(), "0x1f not added when absent");
    }

    #[test]
    fn time_leaves() {
        let cfg = CpuidConfig {
            vcpu_id: 0,
            vcpu_count: 1,
            tsc_khz: 2_445_404,
        };
        let out = build_cpuid(&host(0x16), &cfg).unwrap();
        assert_ne!(get(&out, 0x8000_0007, 0).edx & (1 << 8), 0);
        let sig = get(&out, 0x4000_0000, 0);
        assert_eq!(sig.eax, 0x4000_0010);
        let mut name = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            name.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&name, b"KVMKVMKVM\0\0\0");
        let feat = get(&out, 0x4000_0001, 0);
        assert_ne!(feat.eax & (1 << 3), 0, "kvmclock (CLOCKSOURCE2)");
        assert_ne!(feat.eax & (1 << 24), 0, "stable bit");
        assert_eq!(feat.eax & 0x7af0, 0x7af0, "host features kept");
        let timing = get(&out, 0x4000_0010, 0);
        assert_eq!((timing.eax, timing.ebx), (2_445_404, 1_000_000));
        let l15 = get(&out, 0x15, 0);
        assert_eq!(
            u64::from(l15.ecx) * u64::from(l15.ebx) / u64::from(l15.eax),
            2_445_404_000
        );
        let l16 = get(&out, 0x16, 0);
        assert_eq!((l16.eax, l16.ebx, l16.ecx), (2445, 3000, 100));
    }

    #[test]
    fn cache_and_amd_topology_match_the_vcpu_count() {
        let mut h = host(0x16);
        // L1d (level 1), L2 (level 2), L3 (level 3) as a host with 32 cores reports them.
        h.push(e(4, 0, (31 << 26) | (1 << 14) | (1 << 5) | 0x21, 0, 63, 0));
        h.push(e(
            4,
            1,
            (31 << 26) | (1 << 14) | (2 << 5) | 0x43,
            0,
            1023,
            0,
        ));
        h.push(e(
            4,
            2,
            (31 << 26) | (63 << 14) | (3 << 5) | 0x63,
            0,
            8191,
            0,
        ));
        h.push(e(0x8000_0008, 0, 0x3030, 0, 0x703f, 0));
        h.push(e(0x8000_001e, 0, 7, 0x0107, 0x0303, 0));
        let cfg = CpuidConfig {
            vcpu_id: 2,
            vcpu_count: 4,
            tsc_khz: 1,
        };
        let out = build_cpuid(&h, &cfg).unwrap();
        for sub in 0..3 {
            let l4 = get(&out, 4, sub);
            assert_eq!(l4.eax >> 26, 3, "cores per package - 1 (subleaf {sub})");
            assert_eq!(
                l4.eax & 0x3fff,
                h[8 + sub as usize].eax & 0x3fff,
                "cache type kept"
            );
        }
        assert_eq!((get(&out, 4, 0).eax >> 14) & 0xfff, 0, "L1 private");
        assert_eq!((get(&out, 4, 2).eax >> 14) & 0xfff, 3, "L3 shared by all 4");
        let l88 = get(&out, 0x8000_0008, 0);
        assert_eq!(l88.ecx & 0xff, 3);
        assert_eq!((l88.ecx >> 12) & 0xf, 2);
        let l1e = get(&out, 0x8000_001e, 0);
        assert_eq!((l1e.eax, l1e.ebx & 0xffff, l1e.ecx & 0xff), (2, 2, 0));
    }

    #[test]
    fn no_0x15_when_host_basic_range_is_short() {
        let cfg = CpuidConfig {
            vcpu_id: 0,
            vcpu_count: 1,
            tsc_khz: 2_000_000,
        };
        let out = build_cpuid(&host(0xd), &cfg).unwrap();
        assert!(find(&out, 0x15, 0).is_none());
        assert!(find(&out, 0xb, 0).is_some(), "0xb kept (max basic 0xd)");
    }

    #[test]
    fn leaf_0x15_is_exact_for_high_frequencies() {
        for khz in [1u32, 999_999, 2_445_404, 4_294_967, 5_000_000, u32::MAX] {
            let (a, b, c) = leaf_0x15(khz);
            assert_eq!(
                u64::from(c) * u64::from(b) / u64::from(a),
                u64::from(khz) * 1000,
                "{khz}"
            );
        }
    }

    #[test]
    fn bad_configs_are_errors() {
        let bad = CpuidConfig {
            vcpu_id: 4,
            vcpu_count: 4,
            tsc_khz: 1,
        };
        assert!(build_cpuid(&host(0x16), &bad).is_err());
        let ok = CpuidConfig {
            vcpu_id: 0,
            vcpu_count: 1,
            tsc_khz: 1,
        };
        assert!(build_cpuid(&[], &ok).is_err());
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
        assert_eq!(bits_for(16), 4);
    }
}
