//! Every byte of guest RAM arrives: migration and snapshot may skip reading pages the kernel
//! says were never populated, and these tests prove that no page with data is lost that way.
//!
//! A guest of 3 GiB + 64 MiB (two RAM slots, on either side of the 32-bit gap) gets distinct
//! patterns written to the first and last pages of each slot and to pages scattered over all of
//! RAM, and dirties a region it is still sweeping for the first time while the migration runs
//! (pages absent when the first pass looks, written afterwards). It is migrated, with the real
//! sender, to an in-test destination that only records the pages, then snapshotted; both
//! copies are compared byte for byte with the source's RAM, which stays paused once sent.
//!
//! The snapshot is then restored in both memory modes. `copy` gives anonymous RAM again (the
//! skip may be used). `map_private` gives a `MAP_PRIVATE` mapping of `memory.bin`, where a page
//! that was never touched is **not** zero (it reads the file): migrating and snapshotting that
//! VM must read every page. Each restored VM is migrated, snapshotted and compared again.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm::api::SendMigrationConfig;
use vmm::config::{CpusConfig, MemoryConfig, VmConfig};
use vmm::migration::{
    decode_config_frame, receive_reading_ahead, Destination, Endpoint, FillStats, FrameReader,
    FrameWriter, Listener, RamRange, Receiver, RunData, VmDestination,
};
use vmm::Vmm;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Two slots: 3 GiB below the 32-bit gap, 64 MiB above it.
const RAM: u64 = 3072 * MIB + 64 * MIB;
/// The region the guest dirties, swept at about 32k pages/s (64 pages per 2 ms tick), so the
/// first sweep lasts about 2 s and overlaps the migration.
const DIRTY_MIB: u32 = 256;
const IDLE_US: u32 = 2_000;

fn kvm_absent(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return false;
    }
    eprintln!("SKIPPED {test}: /dev/kvm is absent");
    true
}

/// A destination that records RAM and nothing else (nothing runs there, so what it holds is
/// exactly what was sent).
#[derive(Default)]
struct Recorder {
    ranges: Vec<(RamRange, Vec<u8>)>,
    complete: bool,
}

impl Destination for Recorder {
    fn config(&mut self, json: &[u8]) -> Result<Vec<RamRange>, String> {
        let (config, _) = decode_config_frame(json)?;
        let regions = arch::layout::ram_regions(config.memory.size).map_err(|e| e.to_string())?;
        self.ranges = regions
            .iter()
            .map(|(gpa, len)| {
                (
                    RamRange {
                        gpa: gpa.0,
                        len: *len as u64,
                    },
                    // Zeroed lazily by the allocator, like the real destination's fresh RAM.
                    vec![0u8; *len],
                )
            })
            .collect();
        Ok(self.ranges.iter().map(|(r, _)| *r).collect())
    }

    fn memory(&mut self, gpa: u64, len: u64, data: RunData<'_>) -> Result<(), String> {
        let (r, ram) = self
            .ranges
            .iter_mut()
            .find(|(r, _)| gpa >= r.gpa && gpa + len <= r.gpa + r.len)
            .ok_or("run outside RAM")?;
        let at = (gpa - r.gpa) as usize;
        let dst = &mut ram[at..at + len as usize];
        match data {
            RunData::Bytes(b) => dst.copy_from_slice(b),
            RunData::Zero => dst.fill(0),
        }
        Ok(())
    }

    fn state(&mut self, _json: &[u8]) -> Result<(), String> {
        Ok(())
    }

    fn complete(&mut self) -> Result<(), String> {
        self.complete = true;
        Ok(())
    }
}

/// Receive one migration on `path` into a [`Recorder`].
fn record_on(path: &std::path::Path) -> JoinHandle<Recorder> {
    let ep = Endpoint::Unix(path.to_path_buf());
    let listener = Listener::bind(&ep).expect("listen");
    std::thread::spawn(move || {
        let stream = listener.accept().expect("accept");
        let mut reader = FrameReader::new(stream.try_clone().expect("clone"));
        let mut writer = FrameWriter::new(stream);
        let mut rx = Receiver::new(Recorder::default());
        receive_reading_ahead(&mut reader, &mut writer, &mut rx).expect("receive");
        std::mem::take(rx.destination_mut())
    })
}

/// The real destination, stopped once all memory has arrived: at `State` it ends the first
/// fill and keeps the RAM exactly as received; no state goes in and no vCPU runs.
struct Received {
    dest: VmDestination,
    mem: Option<GuestMemoryMmap>,
    fill: FillStats,
}

impl Destination for Received {
    fn config(&mut self, json: &[u8]) -> Result<Vec<RamRange>, String> {
        self.dest.config(json)
    }

    fn memory(&mut self, gpa: u64, len: u64, data: RunData<'_>) -> Result<(), String> {
        self.dest.memory(gpa, len, data)
    }

    fn state(&mut self, _json: &[u8]) -> Result<(), String> {
        self.mem = self.dest.memory_received().cloned();
        self.fill = self.dest.fill_stats().clone();
        Ok(())
    }

    fn complete(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// Migrate `vmm`'s VM (kept paused afterwards) into a real destination's fresh RAM and return
/// that RAM as received and how it was filled.
fn migrate_into_destination(
    vmm: &Vmm,
    dir: &std::path::Path,
    hv: std::sync::Arc<dyn hypervisor::Hypervisor>,
) -> (GuestMemoryMmap, FillStats) {
    let sock = dir.join("real.sock");
    let ep = Endpoint::Unix(sock.clone());
    let listener = Listener::bind(&ep).expect("listen");
    let rx = std::thread::spawn(move || {
        let (events, _keep) = mpsc::channel();
        let stream = listener.accept().expect("accept");
        let mut reader = FrameReader::new(stream.try_clone().expect("clone"));
        let mut writer = FrameWriter::new(stream);
        let dest = VmDestination::new(hv, None, events, None);
        let mut rx = Receiver::new(Received {
            dest,
            mem: None,
            fill: FillStats::default(),
        });
        receive_reading_ahead(&mut reader, &mut writer, &mut rx).expect("receive");
        let r = rx.into_destination();
        (r.mem.expect("RAM as received at State"), r.fill)
    });
    let mut cfg = SendMigrationConfig::new(&format!("unix:{}", sock.display()));
    cfg.preserve_source = true;
    let report = vmm.send_migration(&cfg).expect("send-migration");
    let (mem, fill) = rx.join().expect("receiver thread");
    eprintln!(
        "real destination: {} data pages sent, {:?}",
        report.progress.pages_sent, fill
    );
    (mem, fill)
}

/// Migrate `vmm`'s VM (kept paused afterwards) and return what arrived and the progress.
fn migrate(
    vmm: &Vmm,
    dir: &std::path::Path,
    tag: &str,
) -> (Recorder, vmm::migration::MigrationProgress) {
    let sock = dir.join(format!("{tag}.sock"));
    let rx = record_on(&sock);
    let mut cfg = SendMigrationConfig::new(&format!("unix:{}", sock.display()));
    cfg.preserve_source = true;
    let t = Instant::now();
    let report = vmm.send_migration(&cfg).expect("send-migration");
    let rec = rx.join().expect("receiver thread");
    assert!(rec.complete, "{tag}: the destination saw Complete");
    eprintln!(
        "{tag}: migrated in {:?}: {} data pages, {} zero pages, {} pages not read",
        t.elapsed(),
        report.progress.pages_sent,
        report.progress.zero_pages_sent,
        report.progress.unread_pages
    );
    (rec, report.progress)
}

/// Compare guest RAM with `other(gpa, len)` chunk by chunk, every byte.
fn compare(what: &str, mem: &GuestMemoryMmap, mut other: impl FnMut(u64, &mut [u8])) {
    const CHUNK: usize = 8 << 20;
    let (mut a, mut b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    for region in mem.iter() {
        let (start, len) = (region.start_addr().0, region.len());
        let mut off = 0;
        while off < len {
            let n = (len - off).min(CHUNK as u64) as usize;
            let gpa = start + off;
            mem.read_slice(&mut a[..n], GuestAddress(gpa))
                .expect("read source RAM");
            other(gpa, &mut b[..n]);
            if a[..n] != b[..n] {
                let i = (0..n).find(|i| a[*i] != b[*i]).unwrap_or(0);
                panic!(
                    "{what}: byte at {:#x} is {:#04x} on the source, {:#04x} in the copy",
                    gpa + i as u64,
                    a[i],
                    b[i]
                );
            }
            off += n as u64;
        }
    }
}

fn compare_recorder(what: &str, mem: &GuestMemoryMmap, rec: &Recorder) {
    compare(what, mem, |gpa, out| {
        let (r, ram) = rec
            .ranges
            .iter()
            .find(|(r, _)| gpa >= r.gpa && gpa < r.gpa + r.len)
            .expect("range");
        let at = (gpa - r.gpa) as usize;
        out.copy_from_slice(&ram[at..at + out.len()]);
    });
}

/// Compare with `memory.bin` (regions back to back, in order).
fn compare_snapshot(what: &str, mem: &GuestMemoryMmap, snap: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(snap.join("memory.bin")).expect("open memory.bin");
    let bases: Vec<(u64, u64, u64)> = {
        let mut off = 0;
        mem.iter()
            .map(|r| {
                let e = (r.start_addr().0, r.len(), off);
                off += r.len();
                e
            })
            .collect()
    };
    compare(what, mem, |gpa, out| {
        let (start, _, off) = bases
            .iter()
            .find(|(s, l, _)| gpa >= *s && gpa < s + l)
            .expect("region");
        f.read_exact_at(out, off + gpa - start)
            .expect("read memory.bin");
    });
}

/// A distinct, never-zero page for `gpa`.
fn pattern(gpa: u64) -> Vec<u8> {
    let mut x = gpa ^ 0x9e37_79b9_7f4a_7c15;
    let mut p = vec![0u8; PAGE as usize];
    for c in p.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&(x | 1).to_le_bytes());
    }
    p
}

/// Pages to write: the last page of slot 0 and the first and last of slot 1, pages just past
/// the dirtied region and at the end of RAM, and 300 pseudo-random pages over the rest of RAM
/// (outside the guest's own image and the region it dirties, which it owns).
fn pattern_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    let slots: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    assert_eq!(slots.len(), 2, "the guest has two RAM slots: {slots:x?}");
    let free_from = guest::DIRTY_BASE + u64::from(DIRTY_MIB) * MIB;
    let mut pages = vec![
        slots[0].0 + slots[0].1 - PAGE,
        slots[1].0,
        slots[1].0 + slots[1].1 - PAGE,
        free_from,
        free_from + PAGE,
    ];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while pages.len() < 305 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (RAM - free_from) / PAGE;
        let off = free_from + (x % n) * PAGE;
        // RAM offset to guest address.
        let gpa = if off < slots[0].1 {
            off
        } else {
            slots[1].0 + off - slots[0].1
        };
        pages.push(gpa);
    }
    pages
}

fn tempdir(what: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hourglass-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temporary directory");
    d
}

/// Pages of guest RAM in `[from, to)` that are not all zero.
fn nonzero_pages(mem: &GuestMemoryMmap, from: u64, to: u64) -> u64 {
    let mut p = vec![0u8; PAGE as usize];
    (from / PAGE..to / PAGE)
        .filter(|i| {
            mem.read_slice(&mut p, GuestAddress(i * PAGE))
                .expect("read");
            p.iter().any(|b| *b != 0)
        })
        .count() as u64
}

#[test]
fn every_byte_arrives_through_migration_snapshot_and_a_file_backed_restore() {
    if kvm_absent("every_byte_arrives_through_migration_snapshot_and_a_file_backed_restore") {
        return;
    }
    vmm::signal::install_vcpu_kick_handler().expect("vCPU kick signal");
    let hv = hypervisor::new().expect("open /dev/kvm");
    let (tx, _rx) = mpsc::channel::<vmm::VmmEvent>();
    let dir = tempdir("fidelity");
    let config = VmConfig {
        cpus: CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
        },
        memory: MemoryConfig { size: RAM },
        serial: devices::SerialOutput::Off,
        guest_idle_us: IDLE_US,
        dirty_mib: DIRTY_MIB,
        ..VmConfig::default()
    };
    let src = Vmm::boot(hv.clone(), config, tx.clone()).expect("boot");
    let mem = src.vm().guest_memory();
    // Patterns written while paused (the guest never touches these pages).
    src.vm().pause().expect("pause");
    let pages = pattern_pages(&mem);
    for &gpa in &pages {
        mem.write_slice(&pattern(gpa), GuestAddress(gpa))
            .expect("write a pattern");
    }
    let dirty_end = guest::DIRTY_BASE + u64::from(DIRTY_MIB) * MIB;
    let dirtied_before = nonzero_pages(&mem, guest::DIRTY_BASE, dirty_end);
    src.vm().resume(None).expect("resume");
    std::thread::sleep(Duration::from_millis(200));

    // 1. Live migration of the running guest (anonymous private RAM: the skip may be used).
    let (rec, progress) = migrate(&src, &dir, "live");
    let dirtied_after = nonzero_pages(&mem, guest::DIRTY_BASE, dirty_end);
    assert!(
        dirtied_after > dirtied_before,
        "the guest was still writing new pages: {dirtied_before} then {dirtied_after} of the \
         dirtied region's pages hold data"
    );
    assert!(
        progress.unread_pages > 0,
        "never-populated anonymous pages are known zero without reading: {progress:?}"
    );
    for &gpa in &pages {
        let mut p = vec![0u8; PAGE as usize];
        mem.read_slice(&mut p, GuestAddress(gpa)).expect("read");
        assert_eq!(p, pattern(gpa), "the pattern at {gpa:#x} is still there");
    }
    compare_recorder("live migration", &mem, &rec);
    drop(rec);

    // 1b. The guest running and dirtying again, migrated into the real destination: its fresh
    //     RAM is filled by userfaultfd copies where the host allows them, and pages sent twice
    //     (dirtied during the migration) are rewritten in place.
    src.vm()
        .resume(None)
        .expect("resume after the first migration");
    let (dest_mem, fill) = migrate_into_destination(&src, &dir, hv.clone());
    compare("migration into a real destination", &mem, |gpa, out| {
        dest_mem
            .read_slice(out, GuestAddress(gpa))
            .expect("read the destination's RAM")
    });
    match &fill.refused {
        None => {
            assert!(fill.copied > 0, "pages were filled by copies: {fill:?}");
            assert!(
                fill.rewritten > 0,
                "pages the guest dirtied during the migration were sent again and rewritten: \
                 {fill:?}"
            );
        }
        Some(why) => eprintln!("note: this host's destination wrote pages the ordinary way: {why}"),
    }
    drop(dest_mem);

    // 2. Snapshot of the (paused) source.
    let snap = dir.join("snap");
    src.vm().snapshot(&snap).expect("snapshot");
    compare_snapshot("snapshot", &mem, &snap);

    // 3. Restore it, in both memory modes. `copy` reads memory.bin into anonymous memory
    //    (holes stay unpopulated: the skip may be used). `map_private` maps memory.bin
    //    MAP_PRIVATE, where an untouched page reads the file, not zero: nothing may be skipped.
    for mode in ["copy", "map_private"] {
        let cfg = vmm::api::RestoreConfig::from_options(&format!(
            "source_url=file://{},resume=false,memory_restore_mode={mode}",
            snap.display()
        ))
        .expect("restore options");
        let restored = Vmm::restore(hv.clone(), &cfg, None, tx.clone()).expect("restore");
        let rmem = restored.vm().guest_memory();
        // The restored RAM is the snapshot's, except where KVM itself writes guest memory as
        // the vCPU state goes back in (the kvmclock page's version moves by 2): every pattern
        // page is there, and from here the copies are compared with this VM's own RAM.
        for &gpa in &pages {
            let mut p = vec![0u8; PAGE as usize];
            rmem.read_slice(&mut p, GuestAddress(gpa)).expect("read");
            assert_eq!(p, pattern(gpa), "{mode} restore: the pattern at {gpa:#x}");
        }
        for r in rmem.iter() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("host address") as usize;
            let scan = vmm::residency::scan(host, r.len() as usize);
            if mode == "map_private" {
                assert!(
                    scan.refused
                        .as_deref()
                        .is_some_and(|w| w.contains("memory.bin")),
                    "a MAP_PRIVATE region of memory.bin is refused: {:?}",
                    scan.refused
                );
                assert_eq!(scan.count(), scan.pages(), "every page may hold data");
            } else {
                assert_eq!(scan.refused, None, "copied RAM is anonymous private");
            }
        }
        let (rec, progress) = migrate(&restored, &dir, mode);
        compare_recorder(&format!("migration after a {mode} restore"), &rmem, &rec);
        if mode == "map_private" {
            assert_eq!(
                progress.unread_pages, 0,
                "no page of a file-backed mapping is skipped: {progress:?}"
            );
        } else {
            assert!(progress.unread_pages > 0, "{progress:?}");
        }
        drop(rec);
        let snap2 = dir.join(format!("snap-{mode}"));
        restored
            .vm()
            .snapshot(&snap2)
            .expect("snapshot of the restored VM");
        compare_snapshot(&format!("snapshot after a {mode} restore"), &rmem, &snap2);
        restored.shutdown_vm();
    }

    src.shutdown_vm();
    let _ = std::fs::remove_dir_all(&dir);
}
