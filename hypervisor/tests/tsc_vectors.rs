//! Known answers from a line-by-line port of KVM's x86.c arithmetic
//! (`tests/data/kvm-tsc-arith.json`, a byte-identical copy of the shared
//! vectors): every vector must match bit for bit.

use hypervisor::tsc::{
    compute_ratio, pvclock_scale_delta, scale_tsc, time_scale, tsc_ratio, PvclockScale, Vendor,
};
use serde_json::Value;
use std::path::Path;

fn vectors() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kvm-tsc-arith.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("vector field {key} is not a u64: {v}"))
}

fn u32_of(v: &Value, key: &str) -> u32 {
    u32::try_from(u64_of(v, key)).unwrap_or_else(|_| panic!("vector field {key} exceeds u32: {v}"))
}

fn vendor_of(v: &Value) -> Vendor {
    match v["vendor"].as_str() {
        Some("vmx") => Vendor::Intel,
        Some("svm") => Vendor::Amd,
        other => panic!("unknown vendor {other:?} in {v}"),
    }
}

fn section<'a>(all: &'a Value, name: &str) -> &'a [Value] {
    let s = all[name]
        .as_array()
        .unwrap_or_else(|| panic!("section {name} missing"));
    assert!(!s.is_empty(), "section {name} is empty");
    s
}

/// Runs `check` over a section and fails listing every mismatch.
fn check_all(all: &Value, name: &str, check: impl Fn(&Value) -> Option<String>) -> usize {
    let vs = section(all, name);
    let bad: Vec<String> = vs.iter().filter_map(&check).collect();
    assert!(
        bad.is_empty(),
        "{} of {} {name} vectors mismatch:\n{}",
        bad.len(),
        vs.len(),
        bad.join("\n")
    );
    vs.len()
}

#[test]
fn vendor_table_matches_vectors() {
    let all = vectors();
    for (key, vendor) in [("vmx", Vendor::Intel), ("svm", Vendor::Amd)] {
        let v = &all["vendors"][key];
        let spec = vendor.scaling();
        assert_eq!(u64::from(spec.frac_bits), u64_of(v, "frac_bits"), "{key}");
        assert_eq!(spec.max_ratio, u64_of(v, "max_ratio"), "{key}");
    }
}

#[test]
fn ratio_vectors() {
    let all = vectors();
    let n = check_all(&all, "ratio", |v| {
        let vendor = vendor_of(v);
        let (host, guest) = (u32_of(v, "host_khz"), u32_of(v, "guest_khz"));
        let want = (
            u64_of(v, "ratio"),
            v["scaling"].as_bool().expect("scaling"),
            v["valid"].as_bool().expect("valid"),
        );
        let out = compute_ratio(vendor, host, guest);
        let got = (out.choice.ratio, out.choice.scaling, out.valid);
        let api = tsc_ratio(vendor, host, guest);
        let api_ok = match &api {
            Ok(c) => want.2 && c.ratio == want.0 && c.scaling == want.1,
            Err(_) => !want.2,
        };
        (got != want || !api_ok).then(|| format!("{v}: got {got:?}, tsc_ratio {api:?}"))
    });
    assert!(n >= 300, "only {n} ratio vectors");
}

#[test]
fn scale_vectors() {
    let all = vectors();
    check_all(&all, "scale", |v| {
        let frac = vendor_of(v).scaling().frac_bits;
        let got = scale_tsc(u64_of(v, "tsc"), u64_of(v, "ratio"), frac);
        (got != u64_of(v, "scaled")).then(|| format!("{v}: got {got}"))
    });
}

#[test]
fn time_scale_vectors() {
    let all = vectors();
    check_all(&all, "time_scale", |v| {
        let got = time_scale(u64_of(v, "scaled_hz"), u64_of(v, "base_hz"));
        let shift = v["shift"].as_i64().expect("shift");
        let want = (u32_of(v, "mul"), shift);
        (want != (got.mul, i64::from(got.shift))).then(|| format!("{v}: got {got:?}"))
    });
}

#[test]
fn scale_delta_vectors() {
    let all = vectors();
    check_all(&all, "scale_delta", |v| {
        let shift = i8::try_from(v["shift"].as_i64().expect("shift")).expect("shift fits i8");
        let got = pvclock_scale_delta(u64_of(v, "delta"), u32_of(v, "mul"), shift);
        (got != u64_of(v, "ns")).then(|| format!("{v}: got {got}"))
    });
}

/// What real KVM wrote into the pvclock page on the project's machines.
#[test]
fn pvclock_known_answers_from_real_kvm() {
    let cases = [
        (2_445_404u64, 0xd15f_52ce_u32, -1i8),
        (2_445_380, 0xd15f_d979, -1),
    ];
    for (khz, mul, shift) in cases {
        assert_eq!(
            time_scale(1_000_000_000, khz * 1000),
            PvclockScale { mul, shift },
            "{khz} kHz"
        );
    }
    // The first one is also in the vector file (scaled 1e9 Hz, base 2445404000 Hz).
    let all = vectors();
    let found = section(&all, "time_scale").iter().any(|v| {
        u64_of(v, "scaled_hz") == 1_000_000_000
            && u64_of(v, "base_hz") == 2_445_404_000
            && u32_of(v, "mul") == 0xd15f_52ce
            && v["shift"].as_i64() == Some(-1)
    });
    assert!(found, "2445404 kHz known answer missing from the vectors");
}
