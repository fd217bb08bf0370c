//! `memory.bin`: guest RAM written sparse, brought back mapped privately or copied.
//!
//! Writing walks each RAM region 4 KiB page by page; all-zero pages are skipped (the file is
//! sized with `ftruncate` first, so they stay holes) and runs of non-zero pages go out as single
//! `pwrite`s of up to [`MAX_WRITE`] bytes straight from guest memory, hashed in the same pass.
//! Pages the kernel says were never populated are holes without being read: only in
//! anonymous private RAM, where the kernel guarantees they read as zero (see
//! [`crate::residency`]); file-backed RAM (a restored VM's) and shared RAM are read in full.
//!
//! Reading never writes the file: it is opened read-only, and mapped `MAP_PRIVATE` (the guest's
//! writes go to private copy-on-write pages) or read into anonymous memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};
use vmm_sys_util::seek_hole::SeekHole;

use super::error::{io, SnapshotError};
use super::format::MemoryLayout;
use super::hash::{is_zero, Hasher64, PAGE};
use super::MEMORY_FILE;
use crate::residency::Residency;

/// The largest single write (and read) of guest memory.
pub const MAX_WRITE: usize = 8 << 20;

/// How restored guest memory is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MemoryMode {
    /// Map `memory.bin` copy-on-write (`MAP_PRIVATE`): the restore costs the same for any RAM
    /// size, pages are read when the guest first touches them, and the guest's writes never
    /// reach the file. The file must stay in place (unmodified) while the VM runs; deleting it
    /// is harmless but frees no space until the VM exits. This is Cloud Hypervisor's
    /// `OnDemand` semantics (lazy paging, snapshot kept) by a different mechanism, and is
    /// shown by that name.
    #[default]
    #[serde(rename = "OnDemand")]
    MapPrivate,
    /// Read all of `memory.bin` into anonymous memory (Cloud Hypervisor's `Copy`): cost
    /// proportional to the data, and the snapshot may be deleted once the restore returns.
    Copy,
}

/// What writing `memory.bin` produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryWrite {
    /// `hg64` of the content (non-zero pages with their indices).
    pub hash: u64,
    /// Bytes of non-zero pages written.
    pub data_bytes: u64,
    /// Logical file size (the guest RAM size).
    pub file_len: u64,
}

/// Guest RAM regions as (guest address, host bytes) for reading.
fn host_regions<'m>(
    memory: &'m GuestMemoryMmap,
    layout: &MemoryLayout,
) -> Result<Vec<(u64, &'m [u8])>, SnapshotError> {
    let mut out = Vec::new();
    for (i, region) in memory.iter().enumerate() {
        let want = layout.regions.get(i).ok_or_else(|| {
            SnapshotError::Memory(format!(
                "guest memory has more regions than the {} of a {}-byte guest",
                layout.regions.len(),
                layout.size
            ))
        })?;
        if region.start_addr().raw_value() != want.guest_addr || region.len() != want.size {
            return Err(SnapshotError::Memory(format!(
                "region {i} is {:#x}+{:#x}, the layout for {} bytes has {:#x}+{:#x}",
                region.start_addr().raw_value(),
                region.len(),
                layout.size,
                want.guest_addr,
                want.size
            )));
        }
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        let len = usize::try_from(region.len())
            .map_err(|_| SnapshotError::Memory("region larger than the address space".into()))?;
        // SAFETY: `host` is the start of this region's mmap of `len` bytes, which `memory`
        // (borrowed for 'm) keeps mapped. The VM is paused, so neither vCPUs nor devices write
        // to guest RAM while the snapshot reads it.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        out.push((want.file_offset, bytes));
    }
    if out.len() != layout.regions.len() {
        return Err(SnapshotError::Memory(format!(
            "guest memory has {} regions, a {}-byte guest has {}",
            out.len(),
            layout.size,
            layout.regions.len()
        )));
    }
    Ok(out)
}

/// Which pages of each region may hold data (the others are zero and are not read).
fn residency(regions: &[(u64, &[u8])]) -> Vec<Residency> {
    regions
        .iter()
        .map(|(_, bytes)| {
            let r = crate::residency::scan(bytes.as_ptr() as usize, bytes.len() / PAGE * PAGE);
            if let Some(why) = &r.refused {
                log::debug!("snapshot: every page of a region is read ({why})");
            }
            r
        })
        .collect()
}

/// `hg64` of guest RAM as `memory.bin` will hold it (non-zero pages with their file page index).
fn hash_regions(regions: &[(u64, &[u8])], known: &[Residency]) -> u64 {
    let mut h = Hasher64::new();
    for ((file_offset, bytes), known) in regions.iter().zip(known) {
        let base_page = file_offset / PAGE as u64;
        for (i, p) in bytes.chunks_exact(PAGE).enumerate() {
            if known.may_hold_data(i) && !is_zero(p) {
                h.page(base_page + i as u64, p);
            }
        }
    }
    h.finish()
}

/// Write guest RAM into `file` (new and empty) at `path`, sparse, and fsync it.
///
/// The checksum is computed by a second thread reading the same (paused) memory while this one
/// writes, so the hashing costs no time as long as the disk is the slower of the two.
pub(crate) fn write(
    file: &File,
    path: &Path,
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
) -> Result<MemoryWrite, SnapshotError> {
    let regions = host_regions(memory, layout)?;
    // The VM is paused: what the kernel says now holds until the write is over.
    let known = residency(&regions);
    let file_len = layout.file_len();
    file.set_len(file_len)
        .map_err(io(path, "set the memory file's size"))?;
    let max_run = MAX_WRITE / PAGE;
    let (hash, written) = std::thread::scope(|s| {
        let hasher = std::thread::Builder::new()
            .name("snapshot-hash".into())
            .spawn_scoped(s, || hash_regions(&regions, &known));
        let written = (|| {
            let mut data_bytes = 0u64;
            for ((file_offset, bytes), known) in regions.iter().zip(&known) {
                let pages = bytes.len() / PAGE;
                let mut i = 0;
                while i < pages {
                    if !known.may_hold_data(i) {
                        // Never populated: a hole, unread.
                        i = known.run_end(i, usize::MAX);
                        continue;
                    }
                    if is_zero(&bytes[i * PAGE..(i + 1) * PAGE]) {
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while i < pages
                        && i - start < max_run
                        && known.may_hold_data(i)
                        && !is_zero(&bytes[i * PAGE..(i + 1) * PAGE])
                    {
                        i += 1;
                    }
                    let run = &bytes[start * PAGE..i * PAGE];
                    file.write_all_at(run, file_offset + (start * PAGE) as u64)
                        .map_err(io(path, "write guest memory"))?;
                    data_bytes += run.len() as u64;
                }
            }
            Ok::<u64, SnapshotError>(data_bytes)
        })();
        // Without a second thread, hash here.
        let hash = match hasher {
            Ok(h) => h.join().unwrap_or_else(|_| hash_regions(&regions, &known)),
            Err(_) => hash_regions(&regions, &known),
        };
        (hash, written)
    });
    let data_bytes = written?;
    file.sync_all().map_err(io(path, "fsync the memory file"))?;
    Ok(MemoryWrite {
        hash,
        data_bytes,
        file_len,
    })
}

/// The data extents of `file` (holes skipped), as (offset, length).
fn data_extents(file: &File, path: &Path, len: u64) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let mut f = file
        .try_clone()
        .map_err(io(path, "duplicate the memory file's descriptor"))?;
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = f.seek_data(pos).map_err(io(path, "seek to data"))? else {
            break;
        };
        if data >= len {
            break;
        }
        let hole = f
            .seek_hole(data)
            .map_err(io(path, "seek to a hole"))?
            .unwrap_or(len)
            .min(len);
        if hole <= data {
            break;
        }
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// Read every data extent of `memory.bin` in [`MAX_WRITE`] chunks, page aligned; hand each
/// non-zero run to `sink` (file offset, bytes) and return the content's `hg64` (when `hash`;
/// otherwise that of nothing).
fn scan(
    file: &File,
    path: &Path,
    len: u64,
    hash: bool,
    mut sink: impl FnMut(u64, &[u8]) -> Result<(), SnapshotError>,
) -> Result<u64, SnapshotError> {
    let mut h = Hasher64::new();
    let mut buf = vec![0u8; MAX_WRITE];
    let page = PAGE as u64;
    for (off, n) in data_extents(file, path, len)? {
        // Extents are block aligned; widen to whole pages.
        let mut pos = off / page * page;
        let end = (off + n).div_ceil(page) * page;
        let end = end.min(len);
        while pos < end {
            let want = usize::try_from((end - pos).min(MAX_WRITE as u64)).unwrap_or(MAX_WRITE);
            let chunk = &mut buf[..want];
            file.read_exact_at(chunk, pos)
                .map_err(io(path, "read guest memory"))?;
            let pages = want.div_ceil(PAGE);
            let mut i = 0;
            while i < pages {
                let p = &chunk[i * PAGE..((i + 1) * PAGE).min(want)];
                if is_zero(p) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < pages {
                    let p = &chunk[i * PAGE..((i + 1) * PAGE).min(want)];
                    if is_zero(p) {
                        break;
                    }
                    if hash {
                        h.page(pos / page + i as u64, p);
                    }
                    i += 1;
                }
                sink(
                    pos + (start * PAGE) as u64,
                    &chunk[start * PAGE..(i * PAGE).min(want)],
                )?;
            }
            pos += want as u64;
        }
    }
    Ok(h.finish())
}

/// Check `memory.bin` against its recorded checksum without keeping it (reads the data only).
pub(crate) fn verify(
    file: &File,
    path: &Path,
    len: u64,
    expected: u64,
) -> Result<(), SnapshotError> {
    let found = scan(file, path, len, true, |_, _| Ok(()))?;
    check(expected, found)
}

fn check(expected: u64, found: u64) -> Result<(), SnapshotError> {
    if expected == found {
        Ok(())
    } else {
        Err(SnapshotError::Checksum {
            file: MEMORY_FILE,
            expected: super::hash::to_hex(expected),
            found: super::hash::to_hex(found),
        })
    }
}

/// Guest memory mapped `MAP_PRIVATE` from `memory.bin`.
pub(crate) fn map_private(
    file: &File,
    path: &Path,
    layout: &MemoryLayout,
    prefault: bool,
) -> Result<GuestMemoryMmap, SnapshotError> {
    let mut regions = Vec::with_capacity(layout.regions.len());
    let flags =
        libc::MAP_PRIVATE | libc::MAP_NORESERVE | if prefault { libc::MAP_POPULATE } else { 0 };
    for r in &layout.regions {
        let f = file
            .try_clone()
            .map_err(io(path, "duplicate the memory file's descriptor"))?;
        let size = usize::try_from(r.size)
            .map_err(|_| SnapshotError::Memory("region larger than the address space".into()))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(f, r.file_offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
        )
        .map_err(|e| SnapshotError::Io {
            path: path.to_path_buf(),
            what: "map guest memory (MAP_PRIVATE)",
            source: std::io::Error::other(e.to_string()),
        })?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                SnapshotError::Memory(format!("region at {:#x} overflows", r.guest_addr))
            })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Memory(e.to_string()))
}

/// Guest memory read from `memory.bin` into anonymous memory, checked against `expected` on
/// the way when given. Only the file's data extents are read, and of them only the non-zero
/// pages are written: the holes and zero pages stay unpopulated (so a later snapshot or
/// migration of this VM skips them without reading). The pages are filled with `userfaultfd`
/// copies where the host allows it (no page clearing, no fault per page; see
/// [`crate::fresh_ram`]), otherwise written the ordinary way.
pub(crate) fn copy(
    file: &File,
    path: &Path,
    layout: &MemoryLayout,
    expected: Option<u64>,
) -> Result<GuestMemoryMmap, SnapshotError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .regions
        .iter()
        .map(|r| (GuestAddress(r.guest_addr), r.size as usize))
        .collect();
    let memory =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| SnapshotError::Memory(e.to_string()))?;
    let mut hosts = Vec::with_capacity(layout.regions.len());
    for region in memory.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        hosts.push((host as usize, region.len() as usize));
    }
    let mut fresh = match crate::fresh_ram::register_anonymous(&hosts) {
        Ok(f) => Some(f),
        Err(why) => {
            log::info!("restore: guest RAM filled by ordinary writes: {why}");
            None
        }
    };
    let found = scan(
        file,
        path,
        layout.file_len(),
        expected.is_some(),
        |mut off, mut bytes| {
            // A run may cross from one region into the next (they lie back to back in the file).
            while !bytes.is_empty() {
                let (i, r) = layout
                    .regions
                    .iter()
                    .enumerate()
                    .find(|(_, r)| off >= r.file_offset && off < r.file_offset + r.size)
                    .ok_or_else(|| {
                        SnapshotError::Memory(format!(
                            "file offset {off:#x} is outside every region"
                        ))
                    })?;
                let in_region = off - r.file_offset;
                let n = bytes.len().min((r.size - in_region) as usize);
                let (piece, rest) = bytes.split_at(n);
                let written = match fresh.as_mut() {
                    // SAFETY: `[in_region, in_region + n)` lies inside region `i`, whose mapping
                    // `memory` owns; nothing else uses this new memory until `copy` returns.
                    Some(f) => unsafe { f.write(hosts[i].0 + in_region as usize, piece) },
                    None => memory
                        .write_slice(piece, GuestAddress(r.guest_addr + in_region))
                        .map_err(|e| std::io::Error::other(e.to_string())),
                };
                written.map_err(io(path, "write guest memory"))?;
                off += n as u64;
                bytes = rest;
            }
            Ok(())
        },
    )?;
    // The registration ends before anything else (KVM, the vCPUs) can touch the RAM.
    drop(fresh);
    if let Some(e) = expected {
        check(e, found)?;
    }
    Ok(memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A distinct, never-zero page for file offset `off`.
    fn pattern(off: u64) -> Vec<u8> {
        (0..PAGE as u64)
            .map(|i| ((off / PAGE as u64) as u8) ^ (i as u8).wrapping_mul(13) | 1)
            .collect()
    }

    #[test]
    fn copy_restores_every_byte_and_populates_only_non_zero_pages() {
        // Two regions (3 GiB below the 32-bit gap, 64 MiB above), back to back in the file.
        let layout = MemoryLayout::for_size(3072 * MIB + 64 * MIB).unwrap();
        assert_eq!(layout.regions.len(), 2);
        let len = layout.file_len();
        let r1 = layout.regions[1].file_offset;
        let page = PAGE as u64;
        // First and last page of each region, a run crossing from one region into the next,
        // scattered pages, and a page of zeros written inside a data extent.
        let mut data: Vec<u64> = vec![0, r1 - 2 * page, r1 - page, r1, r1 + page, len - page];
        data.extend((1..40u64).map(|k| (k * 7_919 * page + k * k * page) % (r1 - 4 * page)));
        data.sort_unstable();
        data.dedup();
        let zero_written = data[1] + page;
        assert!(!data.contains(&zero_written));
        let path = std::env::temp_dir().join(format!("hourglass-copy-{}.bin", std::process::id()));
        let file = File::create(&path).unwrap();
        file.set_len(len).unwrap();
        for &off in &data {
            file.write_all_at(&pattern(off), off).unwrap();
        }
        file.write_all_at(&[0u8; PAGE], zero_written).unwrap();
        drop(file);
        let file = File::open(&path).unwrap();
        let expected = scan(&file, &path, len, true, |_, _| Ok(())).unwrap();
        let memory = copy(&file, &path, &layout, Some(expected)).unwrap();
        // A wrong checksum is refused.
        assert!(matches!(
            copy(&file, &path, &layout, Some(expected ^ 1)),
            Err(SnapshotError::Checksum { .. })
        ));

        // Before anything reads the RAM (a read of a hole maps the shared zero page, which the
        // kernel then reports present): only the pattern pages hold data of their own.
        let mut populated = 0;
        for (region, entry) in memory.iter().zip(&layout.regions) {
            let host = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            let r = crate::residency::scan(host, entry.size as usize);
            assert_eq!(r.refused, None);
            populated += r.count();
        }
        assert_eq!(
            populated,
            data.len(),
            "holes and zero pages stay unpopulated"
        );
        for entry in &layout.regions {
            let mut got = vec![0u8; 8 << 20];
            let mut want = vec![0u8; 8 << 20];
            let mut at = 0;
            while at < entry.size {
                let n = (entry.size - at).min(got.len() as u64) as usize;
                memory
                    .read_slice(&mut got[..n], GuestAddress(entry.guest_addr + at))
                    .unwrap();
                file.read_exact_at(&mut want[..n], entry.file_offset + at)
                    .unwrap();
                if got[..n] != want[..n] {
                    let i = (0..n).find(|&i| got[i] != want[i]).unwrap();
                    panic!(
                        "file offset {:#x} differs",
                        entry.file_offset + at + i as u64
                    );
                }
                at += n as u64;
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}
