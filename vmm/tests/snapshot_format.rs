//! The snapshot directory format alone (no KVM): round trip, sparse memory, atomic replacement,
//! and one test per kind of bad input, each of which must name the file and the field.

use vmm::snapshot;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use devices::probe::TimeProbe;
use devices::serial::SerialDeviceState;
use hypervisor::arch::{MsrEntry, SpecialRegisters, StandardRegisters, Xcr};
use hypervisor::state::{IrqChip, IrqchipState, VcpuState, IRQCHIP_SIZE, LAPIC_SIZE};
use hypervisor::tsc::{capture, tsc_ratio, HostSample, HostTsc, VcpuTscReading, Vendor};
use serde_json::Value;
use snapshot::{
    hash_bytes, DeviceStates, LoadOptions, MemoryMode, Snapshot, SnapshotError, VmState,
    WriteOptions, CHECKSUMS_FILE, CONFIG_FILE, MEMORY_FILE, STATE_FILE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::config::{CpusConfig, MemoryConfig, VmConfig};

const MIB: u64 = 1 << 20;

/// A fresh scratch directory under the target directory (same disk as the build).
fn scratch(name: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("snapshot_format-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(vcpus: u32, mem: u64) -> VmConfig {
    VmConfig {
        cpus: CpusConfig {
            boot_vcpus: vcpus,
            max_vcpus: vcpus,
        },
        memory: MemoryConfig { size: mem },
        ..VmConfig::default()
    }
}

fn vm_state(vcpus: u32) -> VmState {
    let khz = 2_445_404;
    let host = HostTsc {
        vendor: Vendor::Amd,
        host_khz: khz,
        ratio: tsc_ratio(Vendor::Amd, khz, khz).unwrap().ratio,
    };
    let sample = HostSample {
        kvmclock_ns: 5_000_000,
        realtime_ns: 1_700_000_000_000_000_000,
        host_tsc: 123_456_789,
        bracket_ns: 0,
    };
    let readings: Vec<_> = (0..vcpus)
        .map(|i| VcpuTscReading {
            offset: 1000 + u64::from(i),
            tsc_adjust: u64::from(i),
        })
        .collect();
    let tsc = capture(&sample, &host, khz, &readings, true, true)
        .unwrap()
        .snapshot;
    let vcpus_state = (0..vcpus)
        .map(|i| VcpuState {
            id: i,
            regs: StandardRegisters {
                rip: 0x10_0000 + u64::from(i),
                rax: 0xdead_beef,
                ..Default::default()
            },
            sregs: SpecialRegisters::default(),
            msrs: vec![
                MsrEntry {
                    index: 0xc000_0103,
                    data: u64::from(i),
                },
                MsrEntry {
                    index: 0x6e0,
                    data: 77,
                },
            ],
            lapic: Some((0..LAPIC_SIZE).map(|b| b as u8).collect()),
            xsave: None,
            xcrs: Some(vec![Xcr { xcr: 0, value: 3 }]),
            events: None,
            mp_state: Some(0),
            nested: None,
        })
        .collect();
    VmState {
        tsc,
        vcpus: vcpus_state,
        devices: DeviceStates {
            serial: SerialDeviceState {
                scratch: 0x5a,
                ..Default::default()
            },
            probe: TimeProbe::new(vcpus, 0, khz).state(),
        },
        irqchip: Some(IrqchipState::new({
            let mut chips = [[0u8; IRQCHIP_SIZE]; 3];
            chips[2][56] = 0x24; // IOAPIC pin 4: vector 0x24, unmasked
            chips
        })),
    }
}

/// The guest address of RAM page `page` (RAM pages are numbered across the regions).
fn page_addr(size: u64, page: u64) -> u64 {
    let mut off = page * 4096;
    for (base, len) in arch::layout::ram_regions(size).unwrap() {
        if off < len as u64 {
            return base.0 + off;
        }
        off -= len as u64;
    }
    panic!("page {page} is beyond {size} bytes of RAM");
}

/// Guest RAM of `size` bytes with a recognisable byte in each page of `pages` (other pages 0).
fn memory(size: u64, pages: &[u64]) -> GuestMemoryMmap {
    let m = GuestMemoryMmap::from_ranges(&arch::layout::ram_regions(size).unwrap()).unwrap();
    for &p in pages {
        let b = [(p % 251) as u8 + 1; 16];
        m.write_slice(&b, GuestAddress(page_addr(size, p) + 100))
            .unwrap();
    }
    m
}

fn read_guest(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

const PAGES: [u64; 5] = [0, 1, 7, 300, 16383];

/// Write a 2-vCPU, 64 MiB snapshot with data in [`PAGES`].
fn good_snapshot(dir: &Path) {
    snapshot::write(
        dir,
        &config(2, 64 * MIB),
        &vm_state(2),
        &memory(64 * MIB, &PAGES),
        &WriteOptions::default(),
    )
    .unwrap();
}

/// Every file's bytes and mtime, to prove nothing changed.
fn fingerprint(dir: &Path) -> Vec<(String, u64, i64, i64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                hash_bytes(&bytes),
                m.mtime(),
                m.mtime_nsec(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Replace `name`'s content and record its new checksum, so that only the decoder can object.
fn rewrite_consistently(dir: &Path, name: &str, f: impl FnOnce(&mut Value)) {
    let p = dir.join(name);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    let bytes = serde_json::to_vec(&v).unwrap();
    std::fs::write(&p, &bytes).unwrap();
    let sp = dir.join(CHECKSUMS_FILE);
    let mut sums: Value = serde_json::from_slice(&std::fs::read(&sp).unwrap()).unwrap();
    sums["files"][name] = serde_json::json!({
        "size": bytes.len(),
        "hg64": format!("{:016x}", hash_bytes(&bytes)),
    });
    std::fs::write(&sp, serde_json::to_vec(&sums).unwrap()).unwrap();
}

fn read_err(dir: &Path) -> SnapshotError {
    match Snapshot::read(dir) {
        Ok(_) => panic!("{} was accepted", dir.display()),
        Err(e) => e,
    }
}

fn assert_names(e: &SnapshotError, parts: &[&str]) {
    let s = e.to_string();
    for p in parts {
        assert!(s.contains(p), "error {s:?} does not mention {p:?}");
    }
}

#[test]
fn round_trip_in_both_memory_modes() {
    let d = scratch("round_trip").join("snap");
    let cfg = config(2, 64 * MIB);
    let state = vm_state(2);
    let mem = memory(64 * MIB, &PAGES);
    let report = snapshot::write(&d, &cfg, &state, &mem, &WriteOptions::default()).unwrap();
    assert_eq!(report.memory_bytes, 64 * MIB);
    assert_eq!(report.data_bytes, PAGES.len() as u64 * 4096);
    let before = fingerprint(&d);

    let s = Snapshot::read(&d).unwrap();
    assert_eq!(s.config, cfg);
    assert_eq!(s.state, state);
    assert_eq!(s.memory.size, 64 * MIB);

    for mode in [MemoryMode::MapPrivate, MemoryMode::Copy] {
        let m = s
            .load_memory(&LoadOptions {
                mode,
                ..Default::default()
            })
            .unwrap();
        for &p in &PAGES {
            let page = read_guest(&m, p * 4096, 4096);
            let want = (p % 251) as u8 + 1;
            assert!(page[..100].iter().all(|&b| b == 0), "{mode:?} page {p}");
            assert!(
                page[100..116].iter().all(|&b| b == want),
                "{mode:?} page {p}"
            );
            assert!(page[116..].iter().all(|&b| b == 0), "{mode:?} page {p}");
        }
        assert!(read_guest(&m, 2 * 4096, 4096).iter().all(|&b| b == 0));
        // The guest writes to its memory: the snapshot must not see it.
        m.write_slice(&[0xee; 4096], GuestAddress(4096)).unwrap();
        m.write_slice(&[0xee; 4096], GuestAddress(5 * 4096))
            .unwrap();
        assert_eq!(read_guest(&m, 4096, 4), vec![0xee; 4]);
    }
    drop(s);
    assert_eq!(
        fingerprint(&d),
        before,
        "reading or restoring modified the snapshot"
    );
    // And it still restores to the original content.
    let again = Snapshot::read(&d)
        .unwrap()
        .load_memory(&LoadOptions::default())
        .unwrap();
    assert_eq!(read_guest(&again, 4096 + 100, 1), vec![2]);
}

#[test]
fn zero_pages_are_holes() {
    let d = scratch("sparse").join("snap");
    let pages: Vec<u64> = (0..16).map(|i| i * 1000).collect();
    snapshot::write(
        &d,
        &config(1, 64 * MIB),
        &vm_state(1),
        &memory(64 * MIB, &pages),
        &WriteOptions::default(),
    )
    .unwrap();
    let m = std::fs::metadata(d.join(MEMORY_FILE)).unwrap();
    assert_eq!(m.len(), 64 * MIB, "logical size is the RAM size");
    let allocated = m.blocks() * 512;
    assert!(
        allocated <= 1 << 20,
        "16 non-zero pages of a 64 MiB guest allocated {allocated} bytes"
    );
    // A page in a hole reads back as zero, a data page as written.
    let m = Snapshot::read(&d)
        .unwrap()
        .load_memory(&LoadOptions::default())
        .unwrap();
    assert_eq!(
        read_guest(&m, 1000 * 4096 + 100, 1),
        vec![(1000 % 251) as u8 + 1]
    );
    assert_eq!(read_guest(&m, 999 * 4096, 4096), vec![0; 4096]);
}

#[test]
fn guest_above_the_32bit_gap_round_trips() {
    // 3 GiB + 8 MiB: two regions, the second above 4 GiB; only a few pages are non-zero.
    let size = 3 * 1024 * MIB + 8 * MIB;
    let d = scratch("gap").join("snap");
    let last = size / 4096 - 1;
    snapshot::write(
        &d,
        &config(1, size),
        &vm_state(1),
        &memory(size, &[0, last]),
        &WriteOptions::default(),
    )
    .unwrap();
    let s = Snapshot::read(&d).unwrap();
    assert_eq!(s.memory.regions.len(), 2);
    for mode in [MemoryMode::MapPrivate, MemoryMode::Copy] {
        let m = s
            .load_memory(&LoadOptions {
                mode,
                ..Default::default()
            })
            .unwrap();
        let addr = page_addr(size, last);
        assert!(addr >= 1 << 32, "the last page is above the 32-bit gap");
        assert_eq!(
            read_guest(&m, addr + 100, 2),
            vec![(last % 251) as u8 + 1; 2]
        );
        assert_eq!(read_guest(&m, 100, 2), vec![1; 2]);
        assert_eq!(read_guest(&m, addr - 4096, 4096), vec![0; 4096]);
    }
}

#[test]
fn each_missing_file_is_named() {
    for name in [CONFIG_FILE, STATE_FILE, MEMORY_FILE, CHECKSUMS_FILE] {
        let d = scratch(&format!("missing-{name}")).join("snap");
        good_snapshot(&d);
        std::fs::remove_file(d.join(name)).unwrap();
        let e = read_err(&d);
        assert!(matches!(e, SnapshotError::Missing { .. }), "{e}");
        assert_names(&e, &[name, "missing"]);
    }
    let e = read_err(&scratch("missing-dir").join("nothing-here"));
    assert_names(&e, &["nothing-here", "not a snapshot directory"]);
}

#[test]
fn truncated_files_are_refused() {
    for name in [CONFIG_FILE, STATE_FILE, MEMORY_FILE] {
        let d = scratch(&format!("trunc-{name}")).join("snap");
        good_snapshot(&d);
        let p = d.join(name);
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len / 2).unwrap();
        let e = read_err(&d);
        assert!(matches!(e, SnapshotError::Size { .. }), "{e}");
        assert_names(&e, &[name, "truncated"]);
    }
    let d = scratch("trunc-sums").join("snap");
    good_snapshot(&d);
    let p = d.join(CHECKSUMS_FILE);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = read_err(&d);
    assert_names(&e, &[CHECKSUMS_FILE, "not valid JSON"]);
}

fn flip_byte(p: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, at).unwrap();
}

#[test]
fn a_corrupted_byte_is_a_checksum_error_naming_the_file() {
    for name in [CONFIG_FILE, STATE_FILE] {
        let d = scratch(&format!("corrupt-{name}")).join("snap");
        good_snapshot(&d);
        let len = std::fs::metadata(d.join(name)).unwrap().len();
        flip_byte(&d.join(name), len / 2);
        let e = read_err(&d);
        assert!(matches!(e, SnapshotError::Checksum { .. }), "{e}");
        assert_names(&e, &[name, "checksum mismatch"]);
    }
    // memory.bin: a byte in a data page, and a byte in a hole (now non-zero).
    for (what, at) in [("data", 7 * 4096 + 101), ("hole", 9 * 4096 + 5)] {
        let d = scratch(&format!("corrupt-mem-{what}")).join("snap");
        good_snapshot(&d);
        flip_byte(&d.join(MEMORY_FILE), at);
        let s = Snapshot::read(&d).unwrap();
        for mode in [MemoryMode::MapPrivate, MemoryMode::Copy] {
            let e = s
                .load_memory(&LoadOptions {
                    mode,
                    ..Default::default()
                })
                .unwrap_err();
            assert!(
                matches!(e, SnapshotError::Checksum { .. }),
                "{what} {mode:?}: {e}"
            );
            assert_names(&e, &[MEMORY_FILE, "checksum mismatch"]);
        }
        assert!(s.verify_memory().is_err());
    }
}

#[test]
fn a_future_version_is_refused() {
    let d = scratch("future").join("snap");
    good_snapshot(&d);
    rewrite_consistently(&d, STATE_FILE, |v| v["version"] = 2.into());
    let e = read_err(&d);
    assert!(matches!(e, SnapshotError::Version { found: 2, .. }), "{e}");
    assert_names(&e, &[STATE_FILE, "version", "2"]);

    let d = scratch("future-sums").join("snap");
    good_snapshot(&d);
    let p = d.join(CHECKSUMS_FILE);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["version"] = 9.into();
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    assert_names(&read_err(&d), &[CHECKSUMS_FILE, "version", "9"]);

    // The vCPU state's own version, inside state.json.
    let d = scratch("future-vcpu").join("snap");
    good_snapshot(&d);
    rewrite_consistently(&d, STATE_FILE, |v| v["vcpus"][1]["version"] = 5.into());
    assert_names(&read_err(&d), &[STATE_FILE, "vcpus[1].version", "5"]);
}

#[test]
fn a_vcpu_count_mismatch_is_refused() {
    let d = scratch("vcpus-config").join("snap");
    good_snapshot(&d);
    rewrite_consistently(&d, CONFIG_FILE, |v| {
        v["cpus"]["boot_vcpus"] = 3.into();
        v["cpus"]["max_vcpus"] = 3.into();
    });
    assert_names(
        &read_err(&d),
        &[STATE_FILE, "vcpus", "holds 2 vCPUs", "boot_vcpus is 3"],
    );

    // One vCPU state dropped, the TSC snapshot still has two.
    let d = scratch("vcpus-state").join("snap");
    good_snapshot(&d);
    rewrite_consistently(&d, STATE_FILE, |v| {
        v["vcpus"].as_array_mut().unwrap().pop();
    });
    assert_names(&read_err(&d), &[STATE_FILE, "vcpus", "holds 1 vCPUs"]);

    let d = scratch("vcpus-tsc").join("snap");
    good_snapshot(&d);
    rewrite_consistently(&d, STATE_FILE, |v| {
        v["tsc"]["tsc_adjust"]
            .as_array_mut()
            .unwrap()
            .push(0.into());
    });
    assert_names(&read_err(&d), &[STATE_FILE, "tsc.tsc_adjust", "3"]);
}

#[test]
fn the_irqchip_round_trips_is_optional_and_a_bad_one_is_named() {
    let d = scratch("irqchip").join("snap");
    good_snapshot(&d);
    let read = Snapshot::read(&d).expect("read");
    assert_eq!(read.state.irqchip, vm_state(2).irqchip);
    assert_eq!(
        read.state.irqchip.as_ref().unwrap().chip(IrqChip::Ioapic)[56],
        0x24
    );

    // A snapshot written before the field existed (or by a host with no irqchip to read).
    let d = scratch("irqchip-absent").join("snap");
    good_snapshot(&d);
    rewrite_consistently(&d, STATE_FILE, |v| {
        v.as_object_mut().unwrap().remove("irqchip");
    });
    assert_eq!(Snapshot::read(&d).expect("read").state.irqchip, None);

    let d = scratch("irqchip-short").join("snap");
    good_snapshot(&d);
    rewrite_consistently(&d, STATE_FILE, |v| {
        v["irqchip"]["ioapic"].as_array_mut().unwrap().pop();
    });
    assert_names(
        &read_err(&d),
        &[STATE_FILE, "irqchip.ioapic", "expected 512 bytes, got 511"],
    );
}

#[test]
fn a_memory_size_mismatch_is_refused() {
    let d = scratch("mem-config").join("snap");
    good_snapshot(&d);
    rewrite_consistently(&d, CONFIG_FILE, |v| {
        v["memory"]["size"] = (128 * MIB).into()
    });
    assert_names(
        &read_err(&d),
        &[
            STATE_FILE,
            "memory.size",
            &(64 * MIB).to_string(),
            &(128 * MIB).to_string(),
        ],
    );

    let d = scratch("mem-regions").join("snap");
    good_snapshot(&d);
    rewrite_consistently(&d, STATE_FILE, |v| {
        v["memory"]["regions"][0]["size"] = (32 * MIB).into()
    });
    assert_names(&read_err(&d), &[STATE_FILE, "memory.regions"]);

    // memory.bin grown behind the snapshot's back.
    let d = scratch("mem-file").join("snap");
    good_snapshot(&d);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join(MEMORY_FILE))
        .unwrap();
    f.set_len(65 * MIB).unwrap();
    assert_names(&read_err(&d), &[MEMORY_FILE, &(65 * MIB).to_string()]);
}

#[test]
fn bad_fields_are_named() {
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &[&str]); 9] = [
        (
            STATE_FILE,
            |v| v["vcpus"][1]["msrs"][0]["index"] = "x".into(),
            &["vcpus[1].msrs[0]", "invalid type"],
        ),
        (
            STATE_FILE,
            |v| v["vcpus"][1]["msrs"][1]["index"] = 0x10.into(),
            &["vcpus[1].msrs", "0x10"],
        ),
        (
            STATE_FILE,
            |v| v["vcpus"][0]["lapic"] = serde_json::json!([1, 2, 3]),
            &["vcpus[0].lapic", "1024"],
        ),
        (
            STATE_FILE,
            |v| {
                v["vcpus"][0].as_object_mut().unwrap().remove("regs");
            },
            &["vcpus[0].regs", "missing"],
        ),
        (
            STATE_FILE,
            |v| v["tsc"]["tsc_khz"] = 0.into(),
            &["tsc.tsc_khz", "non-zero"],
        ),
        (
            STATE_FILE,
            |v| v["devices"]["probe"]["vcpus"] = 0.into(),
            &["devices.probe"],
        ),
        (
            STATE_FILE,
            |v| v["memory"]["file"] = "../etc/passwd".into(),
            &["memory.file"],
        ),
        (
            STATE_FILE,
            |v| v["surprise"] = true.into(),
            &["surprise", "unknown field"],
        ),
        (CONFIG_FILE, |v| v["cpus"] = "two".into(), &["cpus"]),
    ];
    for (i, (file, edit, parts)) in cases.iter().enumerate() {
        let d = scratch(&format!("field-{i}")).join("snap");
        good_snapshot(&d);
        rewrite_consistently(&d, file, edit);
        let e = read_err(&d);
        assert!(matches!(e, SnapshotError::Invalid { .. }), "case {i}: {e}");
        assert_eq!(e.file(), Some(*file), "case {i}: {e}");
        assert_names(&e, parts);
    }
    // Not JSON at all.
    let d = scratch("field-syntax").join("snap");
    good_snapshot(&d);
    let bytes = b"{ this is not json".to_vec();
    std::fs::write(d.join(STATE_FILE), &bytes).unwrap();
    let sp = d.join(CHECKSUMS_FILE);
    let mut sums: Value = serde_json::from_slice(&std::fs::read(&sp).unwrap()).unwrap();
    sums["files"][STATE_FILE] = serde_json::json!({
        "size": bytes.len(),
        "hg64": format!("{:016x}", hash_bytes(&bytes)),
    });
    std::fs::write(&sp, serde_json::to_vec(&sums).unwrap()).unwrap();
    let e = read_err(&d);
    assert!(
        e.to_string().contains(STATE_FILE) && e.to_string().contains("not valid JSON"),
        "{e}"
    );
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn an_existing_snapshot_survives_a_failed_write() {
    let parent = scratch("atomic");
    let d = parent.join("snap");
    good_snapshot(&d);
    let before = fingerprint(&d);
    for stage in [
        CONFIG_FILE,
        STATE_FILE,
        MEMORY_FILE,
        CHECKSUMS_FILE,
        "rename",
    ] {
        let e = snapshot::write(
            &d,
            &config(1, 32 * MIB),
            &vm_state(1),
            &memory(32 * MIB, &[3]),
            &WriteOptions {
                fail_at: Some(stage),
            },
        )
        .unwrap_err();
        assert!(matches!(e, SnapshotError::Injected(s) if s == stage), "{e}");
        assert_eq!(
            fingerprint(&d),
            before,
            "failure at {stage} touched the snapshot"
        );
        assert!(leftovers(&parent).is_empty(), "{:?}", leftovers(&parent));
        Snapshot::read(&d).unwrap();
    }
    // A write that fails on its own: memory that does not match the configuration.
    let e = snapshot::write(
        &d,
        &config(2, 32 * MIB),
        &vm_state(2),
        &memory(64 * MIB, &[3]),
        &WriteOptions::default(),
    )
    .unwrap_err();
    assert_names(&e, &[MEMORY_FILE]);
    assert_eq!(fingerprint(&d), before);
    assert!(leftovers(&parent).is_empty(), "{:?}", leftovers(&parent));

    // A successful write replaces it whole, leaving nothing behind.
    snapshot::write(
        &d,
        &config(1, 32 * MIB),
        &vm_state(1),
        &memory(32 * MIB, &[3]),
        &WriteOptions::default(),
    )
    .unwrap();
    let s = Snapshot::read(&d).unwrap();
    assert_eq!(s.config.cpus.boot_vcpus, 1);
    assert_eq!(s.memory.size, 32 * MIB);
    assert!(leftovers(&parent).is_empty(), "{:?}", leftovers(&parent));
}

#[test]
fn a_destination_that_is_not_a_snapshot_is_not_replaced() {
    let parent = scratch("foreign");
    let d = parent.join("precious");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("thesis.tex"), b"years of work").unwrap();
    let e = snapshot::write(
        &d,
        &config(1, 32 * MIB),
        &vm_state(1),
        &memory(32 * MIB, &[]),
        &WriteOptions::default(),
    )
    .unwrap_err();
    assert_names(&e, &["precious", "thesis.tex", "refusing"]);
    assert_eq!(
        std::fs::read(d.join("thesis.tex")).unwrap(),
        b"years of work"
    );

    let e = snapshot::write(
        &parent.join("no/such/parent"),
        &config(1, 32 * MIB),
        &vm_state(1),
        &memory(32 * MIB, &[]),
        &WriteOptions::default(),
    )
    .unwrap_err();
    assert_names(&e, &["does not exist"]);
    // An empty directory is fine to fill.
    let empty = parent.join("empty");
    std::fs::create_dir(&empty).unwrap();
    good_snapshot(&empty);
    Snapshot::read(&empty).unwrap();
}

#[test]
fn mutated_json_is_an_error_never_a_panic() {
    let d = scratch("mutate").join("snap");
    good_snapshot(&d);
    let config = std::fs::read(d.join(CONFIG_FILE)).unwrap();
    let state = std::fs::read(d.join(STATE_FILE)).unwrap();
    let sums = std::fs::read(d.join(CHECKSUMS_FILE)).unwrap();
    assert!(snapshot::decode_json(&config, &state).is_ok());
    assert!(snapshot::decode_checksums(&sums).is_ok());
    // Deterministic pseudo-random edits: overwrite, delete or duplicate a byte, or cut the text.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let alphabet = b"{}[]\",:0123456789-.eE truefalsn\\\x00\xff";
    let mut errors = 0;
    for round in 0..3000 {
        let which = round % 3;
        let mut b = match which {
            0 => config.clone(),
            1 => state.clone(),
            _ => sums.clone(),
        };
        for _ in 0..1 + next() % 3 {
            let i = (next() % b.len() as u64) as usize;
            match next() % 4 {
                0 => b[i] = alphabet[(next() % alphabet.len() as u64) as usize],
                1 => {
                    b.remove(i);
                }
                2 => b.insert(i, b[i]),
                _ => b.truncate(i),
            }
            if b.is_empty() {
                break;
            }
        }
        let r = match which {
            0 => snapshot::decode_json(&b, &state).map(|_| ()),
            1 => snapshot::decode_json(&config, &b).map(|_| ()),
            _ => snapshot::decode_checksums(&b).map(|_| ()),
        };
        if let Err(e) = r {
            errors += 1;
            // Every error names a file.
            let s = e.to_string();
            assert!(
                [CONFIG_FILE, STATE_FILE, CHECKSUMS_FILE]
                    .iter()
                    .any(|f| s.starts_with(f)),
                "{s}"
            );
        }
    }
    assert!(
        errors > 1000,
        "only {errors} of 3000 mutations were refused"
    );
}

/// Each file replaced by something that is not a regular file: a symlink to `/dev/zero` (read
/// without end before), a FIFO with no writer (blocked for good before), a directory. Refused at
/// once, naming the file and what it is.
#[test]
fn files_that_are_not_regular_are_refused_at_once() {
    use std::os::unix::ffi::OsStrExt;
    for name in [CONFIG_FILE, STATE_FILE, MEMORY_FILE, CHECKSUMS_FILE] {
        for what in ["a character device", "a FIFO", "a directory"] {
            let d = scratch(&format!("special-{name}-{}", what.len())).join("snap");
            good_snapshot(&d);
            let p = d.join(name);
            std::fs::remove_file(&p).unwrap();
            match what {
                "a character device" => std::os::unix::fs::symlink("/dev/zero", &p).unwrap(),
                "a FIFO" => {
                    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
                    // SAFETY: mkfifo(3) reads the NUL-terminated path, alive across the call.
                    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
                }
                _ => std::fs::create_dir(&p).unwrap(),
            }
            let t0 = std::time::Instant::now();
            let e = read_err(&d);
            assert_names(&e, &[name]);
            let chain = format!("{:?}", anyhow_chain(&e));
            assert!(chain.contains(what), "{name} as {what}: {chain}");
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(5),
                "{name} as {what}: took {:?}",
                t0.elapsed()
            );
        }
    }
}

/// An error and its sources, as one string.
fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// A pid that no longer runs: a child that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// `kill -9` during a snapshot leaves `.NAME.tmp-PID-N` (and, in the instant of the swap,
/// `.NAME.old-PID-N`): the next snapshot into the same parent removes those of dead processes
/// and leaves a live writer's alone.
#[test]
fn leftovers_of_dead_writers_are_removed_by_the_next_snapshot() {
    let parent = scratch("stale");
    let dest = parent.join("snap");
    good_snapshot(&dest);
    let dead = dead_pid();
    let live = std::process::id();
    for name in [
        format!(".snap.tmp-{dead}-0"),
        format!(".snap.old-{dead}-3"),
        format!(".snap.tmp-{live}-999"),
        format!(".other.tmp-{dead}-0"),
    ] {
        std::fs::create_dir(parent.join(&name)).unwrap();
        std::fs::write(parent.join(&name).join("memory.bin"), b"x").unwrap();
    }
    good_snapshot(&dest);
    let mut left = leftovers(&parent);
    left.sort();
    assert_eq!(
        left,
        vec![
            format!(".other.tmp-{dead}-0"),
            format!(".snap.tmp-{live}-999")
        ],
        "only a live writer's and another snapshot's leftovers stay"
    );
    Snapshot::read(&dest).expect("the new snapshot reads back");
}
