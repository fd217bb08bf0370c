//! Every kind of bad snapshot, restored with the real `hourglass` on the real /dev/kvm: a
//! non-zero exit (or a 4xx) whose message names the file and the field, nothing left running,
//! and the snapshot untouched.

mod snapshot_support;
mod vmm_support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use snapshot_support::*;
use vmm_support::*;

/// Restore `dir` on the command line: it must fail with a message holding every one of `parts`,
/// and leave the snapshot as it was.
fn refused(tag: &str, dir: &Path, parts: &[&str]) {
    let before = fingerprint(dir);
    let mut h = spawn(
        tag,
        &[
            "--restore".into(),
            format!("source_url={},resume=true", url(dir)),
        ],
    );
    let st = h.wait_exit(Duration::from_secs(30));
    let err = h.stderr();
    assert!(!st.success(), "a bad snapshot was restored:\n{err}");
    for p in parts {
        assert!(err.contains(p), "the error does not mention {p:?}:\n{err}");
    }
    assert!(!h.socket.exists(), "the failed VMM left its socket");
    assert_eq!(
        fingerprint(dir),
        before,
        "a failed restore modified the snapshot"
    );
    let _ = std::fs::remove_dir_all(dir.parent().unwrap());
}

/// A copy of the golden snapshot (made under the test lock).
fn bad_copy(tag: &str) -> std::path::PathBuf {
    copy_snapshot(&golden().dir, tag)
}

macro_rules! kvm_test {
    ($name:ident, $body:expr) => {
        #[test]
        fn $name() {
            let _x = exclusive();
            if skip(stringify!($name)) {
                return;
            }
            let f: fn() = $body;
            f();
        }
    };
}

kvm_test!(missing_file, || {
    let d = bad_copy("bad-missing");
    std::fs::remove_file(d.join("state.json")).unwrap();
    refused("bad-missing-r", &d, &["state.json", "missing"]);
});

kvm_test!(truncated_memory, || {
    let d = bad_copy("bad-trunc");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory.bin"))
        .unwrap();
    f.set_len(32 << 20).unwrap();
    refused("bad-trunc-r", &d, &["memory.bin", "truncated"]);
});

kvm_test!(corrupted_memory, || {
    let d = bad_copy("bad-corrupt-mem");
    // Flip one bit of the first non-zero byte of guest RAM.
    let p = d.join("memory.bin");
    let mut bytes = std::fs::read(&p).unwrap();
    let i = bytes
        .iter()
        .position(|&b| b != 0)
        .expect("guest RAM is not all zero");
    bytes[i] ^= 0x04;
    std::fs::write(&p, &bytes).unwrap();
    refused(
        "bad-corrupt-mem-r",
        &d,
        &["memory.bin", "checksum mismatch"],
    );
});

kvm_test!(corrupted_state, || {
    let d = bad_copy("bad-corrupt-state");
    let p = d.join("state.json");
    let mut bytes = std::fs::read(&p).unwrap();
    // A digit in the middle becomes another digit: still valid JSON, wrong content.
    let mid = bytes.len() / 2;
    let i = mid
        + bytes[mid..]
            .iter()
            .position(|b| b.is_ascii_digit())
            .unwrap();
    bytes[i] = if bytes[i] == b'9' { b'8' } else { bytes[i] + 1 };
    std::fs::write(&p, &bytes).unwrap();
    refused(
        "bad-corrupt-state-r",
        &d,
        &["state.json", "checksum mismatch"],
    );
});

kvm_test!(future_version, || {
    let d = bad_copy("bad-version");
    rewrite_consistently(&d, "state.json", |v| v["version"] = 99.into());
    refused("bad-version-r", &d, &["state.json", "version", "99"]);
});

kvm_test!(vcpu_count_mismatch, || {
    let d = bad_copy("bad-vcpus");
    rewrite_consistently(&d, "config.json", |v| {
        v["cpus"]["boot_vcpus"] = 3.into();
        v["cpus"]["max_vcpus"] = 3.into();
    });
    refused(
        "bad-vcpus-r",
        &d,
        &["state.json", "vcpus", "boot_vcpus is 3"],
    );
});

kvm_test!(memory_size_mismatch, || {
    let d = bad_copy("bad-memsize");
    rewrite_consistently(&d, "config.json", |v| {
        v["memory"]["size"] = (128u64 << 20).into()
    });
    refused(
        "bad-memsize-r",
        &d,
        &["state.json", "memory.size", "134217728"],
    );
});

kvm_test!(unknown_vendor_combination, || {
    let d = bad_copy("bad-vendor");
    // The other vendor with this vendor's ratio format.
    rewrite_consistently(&d, "state.json", |v| {
        let src = &mut v["tsc"]["source"];
        let other = if src["vendor"] == "amd" {
            "intel"
        } else {
            "amd"
        };
        src["vendor"] = Value::from(other);
    });
    refused("bad-vendor-r", &d, &["state.json", "tsc.source.frac_bits"]);
});

kvm_test!(bad_field, || {
    let d = bad_copy("bad-field");
    rewrite_consistently(&d, "state.json", |v| {
        v["vcpus"][1]["msrs"][0]["index"] = "not a number".into()
    });
    refused("bad-field-r", &d, &["state.json", "vcpus[1].msrs[0]"]);
});

kvm_test!(tsc_frequency_the_host_cannot_provide, || {
    let g = golden();
    if g.capabilities["tsc_scaling"].as_bool() != Some(false) {
        println!(
            "SKIPPED tsc_frequency_the_host_cannot_provide: this host scales the TSC ({})",
            g.capabilities
        );
        return;
    }
    let d = bad_copy("bad-khz");
    // Half the host's rate: only TSC scaling could run that.
    rewrite_consistently(&d, "state.json", |v| {
        let khz = v["tsc"]["tsc_khz"].as_u64().unwrap();
        v["tsc"]["tsc_khz"] = (khz / 2).into();
    });
    refused("bad-khz-r", &d, &["kHz", "cannot provide"]);
});

kvm_test!(bad_snapshot_through_the_api_is_a_4xx_and_no_vm, || {
    let d = bad_copy("bad-api");
    let before = fingerprint(&d);
    rewrite_consistently(&d, "config.json", |v| {
        v["cpus"]["boot_vcpus"] = 1.into();
        v["cpus"]["max_vcpus"] = 1.into();
    });
    let after_edit = fingerprint(&d);
    assert_ne!(before, after_edit);
    let mut h = start_serving("bad-api-r", &[]);
    let out = h.ch_remote(&["restore", &format!("source_url={}", url(&d))]);
    assert!(
        !out.status.success(),
        "ch-remote restore of a bad snapshot succeeded"
    );
    let body = serde_json::json!({ "source_url": url(&d), "resume": true }).to_string();
    let (code, resp) = h.api("PUT", "vm.restore", Some(&body));
    assert_eq!(code, 400, "{resp}");
    assert!(
        resp.contains("state.json") && resp.contains("vcpus"),
        "{resp}"
    );
    // Nothing half-restored: still no VM, and a good snapshot restores afterwards.
    let (code, _) = h.api("GET", "vm.info", None);
    assert!(code >= 400, "a VM exists after a failed restore");
    assert_eq!(
        fingerprint(&d),
        after_edit,
        "a failed restore modified the snapshot"
    );
    let body = serde_json::json!({ "source_url": url(&golden().dir), "resume": true }).to_string();
    let (code, resp) = h.api("PUT", "vm.restore", Some(&body));
    assert_eq!(code, 204, "{resp}\n{}", h.stderr());
    let first = vcpu_samples(&h.info());
    wait_progress(
        &mut h,
        &first,
        "the good snapshot running after a refused one",
    );
    let _ = h.api("PUT", "vmm.shutdown", None);
    assert!(h.wait_exit(Duration::from_secs(10)).success());
    let _ = std::fs::remove_dir_all(d.parent().unwrap());
});
