//! CPU vendor differences in TSC virtualisation, kept as data.
//!
//! Intel VMX and AMD SVM differ only in the fixed-point format of the TSC
//! scaling ratio: the number of fractional bits and the largest ratio the
//! hardware accepts. Both live in one table (`VENDOR_TABLE`); code elsewhere asks
//! [`Vendor::scaling`] instead of branching on the vendor.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The virtualisation extension (and so the CPU vendor) of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    /// Intel VMX: the TSC multiplier lives in the VMCS.
    Intel,
    /// AMD SVM: the TSC ratio lives in MSR 0xC0000104.
    Amd,
}

/// Fixed-point format of a vendor's TSC scaling ratio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScalingSpec {
    /// Number of fractional bits `F`: a ratio of `1 << F` means "no scaling".
    pub frac_bits: u32,
    /// Largest ratio the hardware can hold (KVM treats `>= max_ratio` as invalid
    /// when it computes a ratio, see [`crate::tsc::arith::tsc_ratio`]).
    pub max_ratio: u64,
}

/// One row per vendor: everything that differs between VMX and SVM for the TSC.
struct VendorRow {
    vendor: Vendor,
    name: &'static str,
    /// CPUID leaf 0 vendor strings of CPUs with this extension.
    cpuid_vendors: &'static [&'static [u8; 12]],
    scaling: ScalingSpec,
}

/// The vendor table (KVM: `kvm_caps.tsc_scaling_ratio_frac_bits` and
/// `kvm_caps.max_tsc_scaling_ratio` as set by vmx.c and svm.c).
const VENDOR_TABLE: [VendorRow; 2] = [
    VendorRow {
        vendor: Vendor::Intel,
        name: "intel",
        cpuid_vendors: &[b"GenuineIntel"],
        scaling: ScalingSpec {
            frac_bits: 48,
            max_ratio: u64::MAX,
        },
    },
    VendorRow {
        vendor: Vendor::Amd,
        name: "amd",
        cpuid_vendors: &[b"AuthenticAMD", b"HygonGenuine"],
        scaling: ScalingSpec {
            frac_bits: 32,
            max_ratio: 0xff_ffff_ffff,
        },
    },
];

impl Vendor {
    /// Both vendors, in table order.
    pub const ALL: [Vendor; 2] = [Vendor::Intel, Vendor::Amd];

    const fn row(self) -> &'static VendorRow {
        match self {
            Vendor::Intel => &VENDOR_TABLE[0],
            Vendor::Amd => &VENDOR_TABLE[1],
        }
    }

    /// The vendor's TSC scaling format.
    pub const fn scaling(self) -> ScalingSpec {
        self.row().scaling
    }

    /// The ratio that means "guest TSC runs at the host rate": `1 << frac_bits`.
    pub const fn default_ratio(self) -> u64 {
        1u64 << self.row().scaling.frac_bits
    }

    /// Lower-case name, as used in serialized state (`"intel"`, `"amd"`).
    pub const fn name(self) -> &'static str {
        self.row().name
    }

    /// Maps the 12-byte CPUID leaf 0 vendor string (EBX, EDX, ECX order) to a vendor
    /// (Hygon CPUs use SVM and map to [`Vendor::Amd`]).
    pub fn from_cpuid_vendor(bytes: &[u8; 12]) -> Option<Vendor> {
        VENDOR_TABLE
            .iter()
            .find(|row| row.cpuid_vendors.contains(&bytes))
            .map(|row| row.vendor)
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_match_their_vendor() {
        for v in Vendor::ALL {
            assert_eq!(v.row().vendor, v);
        }
    }

    #[test]
    fn cpuid_strings() {
        assert_eq!(
            Vendor::from_cpuid_vendor(b"GenuineIntel"),
            Some(Vendor::Intel)
        );
        assert_eq!(
            Vendor::from_cpuid_vendor(b"AuthenticAMD"),
            Some(Vendor::Amd)
        );
        assert_eq!(
            Vendor::from_cpuid_vendor(b"HygonGenuine"),
            Some(Vendor::Amd)
        );
        assert_eq!(Vendor::from_cpuid_vendor(b"CentaurHauls"), None);
    }

    #[test]
    fn scaling_formats() {
        assert_eq!(Vendor::Intel.scaling().frac_bits, 48);
        assert_eq!(Vendor::Intel.scaling().max_ratio, u64::MAX);
        assert_eq!(Vendor::Amd.scaling().frac_bits, 32);
        assert_eq!(Vendor::Amd.scaling().max_ratio, 0xff_ffff_ffff);
        assert_eq!(Vendor::Amd.default_ratio(), 1 << 32);
    }

    #[test]
    fn serde_names() {
        assert_eq!(serde_json::to_string(&Vendor::Amd).unwrap(), "\"amd\"");
        let v: Vendor = serde_json::from_str("\"intel\"").unwrap();
        assert_eq!(v, Vendor::Intel);
        assert!(serde_json::from_str::<Vendor>("\"vmx\"").is_err());
        assert_eq!(Vendor::Intel.to_string(), "intel");
    }
}
