//! Snapshot benchmark (no KVM needed): write throughput against a plain sequential write, and
//! restore time against guest size. Run with `scripts/bench-snapshot.sh`.
//!
//! 1. Write throughput: a guest whose every page is non-zero (`HOURGLASS_BENCH_WRITE_MIB`,
//!    default 1024) is snapshotted, and the same number of bytes is written by a `dd`-like loop
//!    (8 MiB `write`s, then `fsync`) to the same directory. Both include the fsync; the ratio is
//!    snapshot throughput / plain throughput (1.0 = disk speed).
//! 2. Restore: guests of 256 MiB, 1 GiB and 4 GiB (`HOURGLASS_BENCH_RESTORE_MIB`), a quarter of
//!    their RAM non-zero (every 4th MiB), are snapshotted; then timed: reading and checking the
//!    metadata, mapping `memory.bin` `MAP_PRIVATE` without and with the memory checksum check,
//!    and the `Copy` mode (read into anonymous memory, checked on the way).
//!
//! 3. Idle guest: guests of 256 MiB, 1 GiB and 4 GiB (`HOURGLASS_BENCH_IDLE_MIB`) of which only
//!    19 scattered pages were ever written (like the idle test guest) are snapshotted: time,
//!    `memory.bin`'s size on disk, and a plain write + fsync of the same 19 pages for the ratio.
//!
//! The directory is `HOURGLASS_BENCH_DIR` if set, else the target directory's scratch space.

use vmm::snapshot;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devices::probe::TimeProbe;
use devices::serial::SerialDeviceState;
use hypervisor::arch::{SpecialRegisters, StandardRegisters};
use hypervisor::state::VcpuState;
use hypervisor::tsc::{capture, tsc_ratio, HostSample, HostTsc, VcpuTscReading, Vendor};
use snapshot::{DeviceStates, LoadOptions, MemoryMode, Snapshot, VmState, WriteOptions};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::config::{CpusConfig, MemoryConfig, VmConfig};

const MIB: u64 = 1 << 20;

fn env_list(name: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<u64>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

fn bench_dir() -> PathBuf {
    let base = std::env::var_os("HOURGLASS_BENCH_DIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_TMPDIR").map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("bench-snapshot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create the benchmark directory");
    d
}

fn config(mem: u64) -> VmConfig {
    VmConfig {
        cpus: CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
        },
        memory: MemoryConfig { size: mem },
        ..VmConfig::default()
    }
}

fn vm_state() -> VmState {
    let khz = 2_445_404;
    let host = HostTsc {
        vendor: Vendor::Amd,
        host_khz: khz,
        ratio: tsc_ratio(Vendor::Amd, khz, khz).expect("ratio").ratio,
    };
    let sample = HostSample {
        kvmclock_ns: 1,
        realtime_ns: 2,
        host_tsc: 3,
        bracket_ns: 0,
    };
    let readings = [VcpuTscReading {
        offset: 0,
        tsc_adjust: 0,
    }];
    let tsc = capture(&sample, &host, khz, &readings, true, true)
        .expect("capture")
        .snapshot;
    VmState {
        tsc,
        vcpus: vec![VcpuState {
            id: 0,
            regs: StandardRegisters::default(),
            sregs: SpecialRegisters::default(),
            msrs: vec![],
            lapic: None,
            xsave: None,
            xcrs: None,
            events: None,
            mp_state: None,
            nested: None,
        }],
        devices: DeviceStates {
            serial: SerialDeviceState::default(),
            probe: TimeProbe::new(1, 0, khz).state(),
        },
        irqchip: None,
    }
}

/// Pseudo-random, never-zero bytes (xorshift64).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = (x | 0x0101_0101_0101_0101).to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// Guest RAM of `size` bytes; every `stride`-th MiB (1 = all) filled with non-zero data.
fn memory(size: u64, stride: u64) -> GuestMemoryMmap {
    let ranges = arch::layout::ram_regions(size).expect("layout");
    let m = GuestMemoryMmap::from_ranges(&ranges).expect("allocate guest memory");
    let mut buf = vec![0u8; MIB as usize];
    let mut n = 0u64;
    for (base, len) in ranges {
        let mut off = 0u64;
        while off < len as u64 {
            if n.is_multiple_of(stride) {
                fill(&mut buf, n + 1);
                m.write_slice(&buf, GuestAddress(base.0 + off))
                    .expect("fill");
            }
            off += MIB;
            n += 1;
        }
    }
    m
}

/// `dd if=buffer of=file bs=8M count=size/8M conv=fsync`.
fn plain_write(path: &Path, size: u64) -> Duration {
    let mut buf = vec![0u8; 8 << 20];
    fill(&mut buf, 99);
    let t = Instant::now();
    let mut f = std::fs::File::create(path).expect("create");
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.sync_all().expect("fsync");
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Pages an idle test guest has written (boot data, stacks, records), scattered over RAM.
const IDLE_PAGES: u64 = 19;

/// Guest RAM of `size` bytes with [`IDLE_PAGES`] non-zero pages spread over it; the rest never
/// touched (as in a freshly booted idle guest).
fn idle_memory(size: u64) -> GuestMemoryMmap {
    let ranges = arch::layout::ram_regions(size).expect("layout");
    let m = GuestMemoryMmap::from_ranges(&ranges).expect("allocate guest memory");
    let mut page = vec![0u8; 4096];
    for i in 0..IDLE_PAGES {
        fill(&mut page, i + 1);
        let off = (size / IDLE_PAGES) * i / 4096 * 4096;
        let (base, len) = ranges
            .iter()
            .scan(0u64, |acc, (b, l)| {
                let r = (*acc, *b, *l as u64);
                *acc += *l as u64;
                Some(r)
            })
            .find(|(acc, _, l)| off >= *acc && off < acc + l)
            .map(|(acc, b, _)| (b.0, off - acc))
            .expect("offset in RAM");
        m.write_slice(&page, GuestAddress(base + len))
            .expect("fill");
    }
    m
}

fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn idle(dir: &Path, reps: usize) {
    println!();
    println!(
        "## Idle guest snapshot ({IDLE_PAGES} pages ever written; median of {reps}; plain = write + fsync of those pages)"
    );
    println!();
    println!(
        "| guest | snapshot ms | memory.bin on disk | snapshot dir on disk | plain ms | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    for mib in env_list("HOURGLASS_BENCH_IDLE_MIB", &[256, 1024, 4096]) {
        let size = mib * MIB;
        let mem = idle_memory(size);
        let (mut t_snap, mut t_plain) = (Vec::new(), Vec::new());
        let (mut file_disk, mut dir_disk) = (0, 0);
        for r in 0..reps {
            let s = dir.join(format!("idle-{mib}-{r}"));
            let t = Instant::now();
            snapshot::write(
                &s,
                &config(size),
                &vm_state(),
                &mem,
                &WriteOptions::default(),
            )
            .expect("snapshot write");
            t_snap.push(t.elapsed());
            file_disk = disk_bytes(&s.join("memory.bin"));
            dir_disk = std::fs::read_dir(&s)
                .map(|d| d.flatten().map(|e| disk_bytes(&e.path())).sum())
                .unwrap_or(0);
            let _ = std::fs::remove_dir_all(&s);
            let p = dir.join("plain-idle");
            t_plain.push(plain_write(&p, IDLE_PAGES * 4096));
            let _ = std::fs::remove_file(&p);
        }
        let (a, b) = (median(t_snap), median(t_plain));
        println!(
            "| {mib} MiB | {:.1} | {} KiB | {} KiB | {:.2} | {:.1} |",
            ms(a),
            file_disk >> 10,
            dir_disk >> 10,
            ms(b),
            a.as_secs_f64() / b.as_secs_f64().max(1e-9)
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let dir = bench_dir();
    let reps = env_list("HOURGLASS_BENCH_REPS", &[3])[0].max(1) as usize;

    println!("snapshot benchmark in {}", dir.display());
    idle(&dir, reps);
    println!();
    println!("## Write throughput (all pages non-zero, fsync included, median of {reps})");
    println!();
    println!(
        "| guest | plain write (dd-like), median | snapshot write, median | ratio of medians | ratio of best runs | all runs plain / snapshot (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    for mib in env_list("HOURGLASS_BENCH_WRITE_MIB", &[1024]) {
        let size = mib * MIB;
        let mem = memory(size, 1);
        let cfg = config(size);
        let state = vm_state();
        let (mut plain, mut snap) = (Vec::new(), Vec::new());
        for r in 0..reps {
            let p = dir.join("plain.bin");
            let s = dir.join("snap");
            // Alternate the order so that neither always runs on a freshly flushed disk.
            let run_plain = || {
                let d = plain_write(&p, size);
                std::fs::remove_file(&p).expect("remove");
                d
            };
            let run_snap = || {
                let t = Instant::now();
                snapshot::write(&s, &cfg, &state, &mem, &WriteOptions::default())
                    .expect("snapshot write");
                let d = t.elapsed();
                std::fs::remove_dir_all(&s).expect("remove");
                d
            };
            // Start each pair from a quiet disk: earlier deletes (discards) and writeback done.
            let _ = std::process::Command::new("sync").status();
            if r % 2 == 0 {
                plain.push(run_plain());
                snap.push(run_snap());
            } else {
                snap.push(run_snap());
                plain.push(run_plain());
            }
        }
        let all = format!(
            "{} / {}",
            plain
                .iter()
                .map(|d| format!("{:.0}", ms(*d)))
                .collect::<Vec<_>>()
                .join(" "),
            snap.iter()
                .map(|d| format!("{:.0}", ms(*d)))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let (pb, sb) = (*plain.iter().min().unwrap(), *snap.iter().min().unwrap());
        let (p, s) = (median(plain), median(snap));
        println!(
            "| {mib} MiB | {:.0} MiB/s ({:.0} ms) | {:.0} MiB/s ({:.0} ms) | {:.2} | {:.2} | {all} |",
            mbps(size, p),
            ms(p),
            mbps(size, s),
            ms(s),
            p.as_secs_f64() / s.as_secs_f64(),
            pb.as_secs_f64() / sb.as_secs_f64()
        );
    }

    println!();
    println!(
        "## Restore (a quarter of RAM non-zero; median of {reps}; page cache warm from the write)"
    );
    println!();
    println!(
        "| guest | memory.bin data | read+check metadata | map MAP_PRIVATE | map + verify checksum | Copy (verified) | first touch of every page (MAP_PRIVATE) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for mib in env_list("HOURGLASS_BENCH_RESTORE_MIB", &[256, 1024, 4096]) {
        let size = mib * MIB;
        let s = dir.join(format!("restore-{mib}"));
        let report = {
            let mem = memory(size, 4);
            snapshot::write(
                &s,
                &config(size),
                &vm_state(),
                &mem,
                &WriteOptions::default(),
            )
            .expect("snapshot write")
        };
        let (mut meta, mut map, mut mapv, mut copy, mut touch) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            let snap = Snapshot::read(&s).expect("read");
            meta.push(t.elapsed());

            let t = Instant::now();
            let m = snap
                .load_memory(&LoadOptions {
                    mode: MemoryMode::MapPrivate,
                    verify: false,
                    prefault: false,
                })
                .expect("map");
            map.push(t.elapsed());
            // What the guest pays later, spread over its first accesses: one read per page.
            let t = Instant::now();
            let mut sum = 0u64;
            let mut addr = 0u64;
            for (base, len) in arch::layout::ram_regions(size).expect("layout") {
                addr = base.0;
                let end = base.0 + len as u64;
                while addr < end {
                    let b: u8 = m.read_obj(GuestAddress(addr)).expect("read");
                    sum += u64::from(b);
                    addr += 4096;
                }
            }
            std::hint::black_box((sum, addr));
            touch.push(t.elapsed());
            drop(m);

            let t = Instant::now();
            let m = snap
                .load_memory(&LoadOptions {
                    mode: MemoryMode::MapPrivate,
                    verify: true,
                    prefault: false,
                })
                .expect("map + verify");
            mapv.push(t.elapsed());
            drop(m);

            let t = Instant::now();
            let m = snap
                .load_memory(&LoadOptions {
                    mode: MemoryMode::Copy,
                    verify: true,
                    prefault: false,
                })
                .expect("copy");
            copy.push(t.elapsed());
            drop(m);
        }
        println!(
            "| {mib} MiB | {} MiB | {:.2} ms | {:.3} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
            report.data_bytes / MIB,
            ms(median(meta)),
            ms(median(map)),
            ms(median(mapv)),
            ms(median(copy)),
            ms(median(touch)),
        );
        let _ = std::fs::remove_dir_all(&s);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
