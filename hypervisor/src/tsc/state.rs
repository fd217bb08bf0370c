//! The serialized TSC state (`state.json`'s `tsc_snapshot`), parsed into a
//! type that can only hold valid values.
//!
//! [`RawTscSnapshot`] is the plain serde form; [`TscSnapshot`] is built from
//! it by [`TryFrom`], which checks every field and names the one that is wrong.

use super::vendor::Vendor;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version of the [`TscSnapshot`] format written by this build.
pub const TSC_SNAPSHOT_VERSION: u32 = 1;

/// Where a snapshot was captured: the host-side TSC parameters.
///
/// Informational for a thaw (the snapshot itself is host independent), and
/// used to decide whether elapsed time may be measured by the host TSC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TscSource {
    /// Vendor of the capturing host.
    pub vendor: Vendor,
    /// Host TSC frequency in kHz.
    pub host_tsc_khz: u32,
    /// Scaling ratio the VM ran with.
    pub ratio: u64,
    /// Fractional bits of `ratio` (must match `vendor`).
    pub frac_bits: u32,
    /// Whether the host honoured TSC offsets (if not, the guest saw the host TSC).
    pub offsets_honoured: bool,
    /// Spread of the per-vCPU VM offsets found at capture (0 when consistent).
    pub skew_cycles: u64,
    /// Host TSC at the capture sample (for same-host elapsed time).
    #[serde(default)]
    pub host_tsc: u64,
    /// Width of the realtime/TSC bracket of the capture sample in ns
    /// (0 when KVM gave both atomically).
    #[serde(default)]
    pub bracket_ns: u64,
}

/// The stored form of a [`TscSnapshot`]: plain fields, no checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTscSnapshot {
    /// Format version ([`TSC_SNAPSHOT_VERSION`]).
    pub version: u32,
    /// Guest TSC frequency `f_g` in kHz.
    pub tsc_khz: u32,
    /// VM TSC `G = scale(H) + O` at the freeze instant.
    pub vm_tsc: u64,
    /// Per-vCPU IA32_TSC_ADJUST `A_i`, one per vCPU.
    pub tsc_adjust: Vec<u64>,
    /// kvmclock `k` at the freeze instant, ns.
    pub kvmclock_ns: u64,
    /// Host CLOCK_REALTIME `T` at the freeze instant, ns.
    pub realtime_ns: u64,
    /// Whether KVM reported a stable TSC-based kvmclock at capture.
    pub tsc_stable: bool,
    /// Host parameters at capture.
    pub source: TscSource,
}

/// A validated, host-independent capture of the guest's time at a freeze.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTscSnapshot", into = "RawTscSnapshot")]
pub struct TscSnapshot {
    tsc_khz: u32,
    vm_tsc: u64,
    tsc_adjust: Vec<u64>,
    kvmclock_ns: u64,
    realtime_ns: u64,
    tsc_stable: bool,
    source: TscSource,
}

/// A `tsc_snapshot` that cannot be used; every variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StateError {
    /// The text is not a well-formed snapshot (syntax, type or missing field).
    #[error("tsc_snapshot: {0}")]
    Json(String),
    /// A version this build cannot read.
    #[error("tsc_snapshot.version: unsupported version {found} (this build reads {supported})")]
    Version {
        /// Version found.
        found: u32,
        /// Version supported.
        supported: u32,
    },
    /// A field holds a value that is not allowed.
    #[error("tsc_snapshot.{field}: {reason}")]
    Field {
        /// Dotted field path below `tsc_snapshot`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The snapshot is for a different number of vCPUs than the VM has.
    #[error("tsc_snapshot.tsc_adjust: holds {stored} vCPUs but the VM has {requested}")]
    VcpuCount {
        /// vCPUs in the snapshot.
        stored: usize,
        /// vCPUs in the VM.
        requested: usize,
    },
}

fn field(field: &'static str, reason: impl Into<String>) -> StateError {
    StateError::Field {
        field,
        reason: reason.into(),
    }
}

impl TryFrom<RawTscSnapshot> for TscSnapshot {
    type Error = StateError;

    fn try_from(raw: RawTscSnapshot) -> Result<Self, StateError> {
        if raw.version != TSC_SNAPSHOT_VERSION {
            return Err(StateError::Version {
                found: raw.version,
                supported: TSC_SNAPSHOT_VERSION,
            });
        }
        if raw.tsc_khz == 0 {
            return Err(field("tsc_khz", "must be non-zero"));
        }
        if raw.tsc_adjust.is_empty() {
            return Err(field(
                "tsc_adjust",
                "must hold one value per vCPU, found none",
            ));
        }
        let src = &raw.source;
        let spec = src.vendor.scaling();
        if src.host_tsc_khz == 0 {
            return Err(field("source.host_tsc_khz", "must be non-zero"));
        }
        if src.frac_bits != spec.frac_bits {
            return Err(field(
                "source.frac_bits",
                format!(
                    "{} does not match vendor {} ({} fractional bits)",
                    src.frac_bits, src.vendor, spec.frac_bits
                ),
            ));
        }
        if src.ratio == 0 || src.ratio > spec.max_ratio {
            return Err(field(
                "source.ratio",
                format!(
                    "{} is outside 1..={} for vendor {}",
                    src.ratio, spec.max_ratio, src.vendor
                ),
            ));
        }
        Ok(TscSnapshot {
            tsc_khz: raw.tsc_khz,
            vm_tsc: raw.vm_tsc,
            tsc_adjust: raw.tsc_adjust,
            kvmclock_ns: raw.kvmclock_ns,
            realtime_ns: raw.realtime_ns,
            tsc_stable: raw.tsc_stable,
            source: raw.source,
        })
    }
}

impl From<TscSnapshot> for RawTscSnapshot {
    fn from(s: TscSnapshot) -> Self {
        RawTscSnapshot {
            version: TSC_SNAPSHOT_VERSION,
            tsc_khz: s.tsc_khz,
            vm_tsc: s.vm_tsc,
            tsc_adjust: s.tsc_adjust,
            kvmclock_ns: s.kvmclock_ns,
            realtime_ns: s.realtime_ns,
            tsc_stable: s.tsc_stable,
            source: s.source,
        }
    }
}

impl TscSnapshot {
    /// Builds a snapshot from values the caller has already checked
    /// (capture validates frequencies, ratio and vCPU count first).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn from_parts(
        tsc_khz: u32,
        vm_tsc: u64,
        tsc_adjust: Vec<u64>,
        kvmclock_ns: u64,
        realtime_ns: u64,
        tsc_stable: bool,
        source: TscSource,
    ) -> Self {
        TscSnapshot {
            tsc_khz,
            vm_tsc,
            tsc_adjust,
            kvmclock_ns,
            realtime_ns,
            tsc_stable,
            source,
        }
    }

    /// Parses and validates a snapshot from JSON.
    pub fn from_json(s: &str) -> Result<Self, StateError> {
        let raw: RawTscSnapshot =
            serde_json::from_str(s).map_err(|e| StateError::Json(e.to_string()))?;
        Self::try_from(raw)
    }

    /// Serializes the snapshot to JSON (the [`RawTscSnapshot`] form).
    pub fn to_json(&self) -> String {
        let raw = RawTscSnapshot::from(self.clone());
        // A struct of integers, bools, strings and a Vec always serializes.
        serde_json::to_string(&raw).unwrap_or_default()
    }

    /// Checks that the snapshot holds exactly `n` vCPUs.
    pub fn check_vcpus(&self, n: usize) -> Result<(), StateError> {
        if self.tsc_adjust.len() == n {
            Ok(())
        } else {
            Err(StateError::VcpuCount {
                stored: self.tsc_adjust.len(),
                requested: n,
            })
        }
    }

    /// Format version (always [`TSC_SNAPSHOT_VERSION`] once parsed).
    pub fn version(&self) -> u32 {
        TSC_SNAPSHOT_VERSION
    }
    /// Guest TSC frequency `f_g`, kHz (non-zero).
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }
    /// VM TSC `G` at the freeze instant.
    pub fn vm_tsc(&self) -> u64 {
        self.vm_tsc
    }
    /// Per-vCPU TSC_ADJUST values `A_i` (at least one).
    pub fn tsc_adjust(&self) -> &[u64] {
        &self.tsc_adjust
    }
    /// kvmclock `k` at the freeze instant, ns.
    pub fn kvmclock_ns(&self) -> u64 {
        self.kvmclock_ns
    }
    /// Host realtime `T` at the freeze instant, ns.
    pub fn realtime_ns(&self) -> u64 {
        self.realtime_ns
    }
    /// Whether KVM reported a stable TSC at capture.
    pub fn tsc_stable(&self) -> bool {
        self.tsc_stable
    }
    /// Host parameters at capture.
    pub fn source(&self) -> &TscSource {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn good() -> serde_json::Value {
        serde_json::json!({
            "version": 1, "tsc_khz": 2445404, "vm_tsc": 123456789u64,
            "tsc_adjust": [0, 5], "kvmclock_ns": 1000, "realtime_ns": 1700000000000000000u64,
            "tsc_stable": true,
            "source": { "vendor": "amd", "host_tsc_khz": 2445404, "ratio": 4294967296u64,
                        "frac_bits": 32, "offsets_honoured": true, "skew_cycles": 0 }
        })
    }

    fn parse(v: &serde_json::Value) -> Result<TscSnapshot, StateError> {
        TscSnapshot::from_json(&v.to_string())
    }

    /// Sets `path` (dotted) in the good snapshot to `value`, parses, returns the message.
    fn error_for(path: &str, value: serde_json::Value) -> String {
        let mut v = good();
        let mut cur = &mut v;
        let parts: Vec<&str> = path.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            cur = cur.get_mut(*p).unwrap();
        }
        cur[parts[parts.len() - 1]] = value;
        parse(&v).expect_err(path).to_string()
    }

    #[test]
    fn good_snapshot_parses_and_round_trips() {
        let s = parse(&good()).unwrap();
        assert_eq!(s.tsc_khz(), 2445404);
        assert_eq!(s.vm_tsc(), 123456789);
        assert_eq!(s.tsc_adjust(), &[0, 5]);
        assert_eq!(s.source().vendor, Vendor::Amd);
        assert_eq!(s.version(), 1);
        assert_eq!(TscSnapshot::from_json(&s.to_json()).unwrap(), s);
        let via_serde: TscSnapshot = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(via_serde, s);
        assert!(s.check_vcpus(2).is_ok());
        let e = s.check_vcpus(3).unwrap_err().to_string();
        assert!(
            e.contains("tsc_snapshot.tsc_adjust") && e.contains('3'),
            "{e}"
        );
    }

    #[test]
    fn each_validation_error_names_its_field() {
        let cases = [
            ("version", serde_json::json!(2), "tsc_snapshot.version"),
            ("version", serde_json::json!(0), "tsc_snapshot.version"),
            (
                "tsc_khz",
                serde_json::json!(0),
                "tsc_snapshot.tsc_khz: must be non-zero",
            ),
            (
                "tsc_adjust",
                serde_json::json!([]),
                "tsc_snapshot.tsc_adjust",
            ),
            (
                "source.host_tsc_khz",
                serde_json::json!(0),
                "tsc_snapshot.source.host_tsc_khz",
            ),
            (
                "source.frac_bits",
                serde_json::json!(48),
                "tsc_snapshot.source.frac_bits",
            ),
            (
                "source.ratio",
                serde_json::json!(0),
                "tsc_snapshot.source.ratio",
            ),
            (
                "source.ratio",
                serde_json::json!(1u64 << 40),
                "tsc_snapshot.source.ratio",
            ),
        ];
        for (path, value, want) in cases {
            let msg = error_for(path, value);
            assert!(msg.contains(want), "{path}: {msg}");
        }
    }

    #[test]
    fn type_errors_name_the_field() {
        let msg = error_for("tsc_khz", serde_json::json!("fast"));
        assert!(
            msg.starts_with("tsc_snapshot: ") && msg.contains("string"),
            "{msg}"
        );
        let msg = error_for("source.vendor", serde_json::json!("via"));
        assert!(msg.contains("via"), "{msg}");
        let mut v = good();
        v.as_object_mut().unwrap().remove("vm_tsc");
        let msg = parse(&v).unwrap_err().to_string();
        assert!(msg.contains("vm_tsc"), "{msg}");
        let msg = error_for("surprise", serde_json::json!(1));
        assert!(msg.contains("surprise"), "{msg}");
    }

    #[test]
    fn garbage_and_truncated_input_is_an_error() {
        let text = good().to_string();
        for cut in 0..text.len() {
            if text.is_char_boundary(cut) {
                assert!(
                    TscSnapshot::from_json(&text[..cut]).is_err(),
                    "cut at {cut}"
                );
            }
        }
        for bad in ["", "null", "[]", "{}", "1", "\"\"", "{\"version\": -1}"] {
            assert!(TscSnapshot::from_json(bad).is_err(), "{bad}");
        }
        let msg = error_for("tsc_khz", serde_json::json!(1u64 << 40));
        assert!(msg.starts_with("tsc_snapshot: "), "{msg}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,200}") {
            let _ = TscSnapshot::from_json(&s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let s = String::from_utf8_lossy(&b);
            let _ = TscSnapshot::from_json(&s);
            let _ = serde_json::from_slice::<TscSnapshot>(&b);
        }

        #[test]
        fn mutated_good_json_never_panics(pos in 0usize..400, byte in any::<u8>()) {
            let mut b = good().to_string().into_bytes();
            let i = pos % b.len();
            b[i] = byte;
            let _ = serde_json::from_slice::<TscSnapshot>(&b);
        }
    }
}
