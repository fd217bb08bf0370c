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
use std::io::{Seek, SeekFrom};
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
/// non-zero run to `sink` (file offset, bytes) and return the content's `hg64`.
fn scan(
    file: &File,
    path: &Path,
    len: u64,
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
                    h.page(pos / page + i as u64, p);
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
    let found = scan(file, path, len, |_, _| Ok(()))?;
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
/// the way when given. Only the file's data extents are read, straight into guest memory (one
/// copy, by the kernel); the holes stay untouched zero pages.
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
    let len = layout.file_len();
    let page = PAGE as u64;
    let mut reader = file
        .try_clone()
        .map_err(io(path, "duplicate the memory file's descriptor"))?;
    let mut h = Hasher64::new();
    {
        for (off, n) in data_extents(file, path, len)? {
            // Extents are block aligned; widen to whole pages, then split at region ends.
            let mut pos = off / page * page;
            let end = ((off + n).div_ceil(page) * page).min(len);
            while pos < end {
                let (ri, r) = layout
                    .regions
                    .iter()
                    .enumerate()
                    .find(|(_, r)| pos >= r.file_offset && pos < r.file_offset + r.size)
                    .ok_or_else(|| {
                        SnapshotError::Memory(format!(
                            "file offset {pos:#x} is outside every region"
                        ))
                    })?;
                let piece_end = end.min(r.file_offset + r.size);
                let count = usize::try_from(piece_end - pos).unwrap_or(usize::MAX);
                let in_region = pos - r.file_offset;
                reader
                    .seek(SeekFrom::Start(pos))
                    .map_err(io(path, "seek in the memory file"))?;
                memory
                    .read_exact_volatile_from(
                        GuestAddress(r.guest_addr + in_region),
                        &mut reader,
                        count,
                    )
                    .map_err(|e| SnapshotError::Io {
                        path: path.to_path_buf(),
                        what: "read guest memory",
                        source: std::io::Error::other(e.to_string()),
                    })?;
                if expected.is_some() {
                    // Borrowed only now that the kernel has written this piece.
                    let regions = host_regions(&memory, layout)?;
                    let bytes = regions[ri].1;
                    let start = in_region as usize;
                    for (i, p) in bytes[start..start + count].chunks(PAGE).enumerate() {
                        if !is_zero(p) {
                            h.page(pos / page + i as u64, p);
                        }
                    }
                }
                pos = piece_end;
            }
        }
    }
    if let Some(e) = expected {
        check(e, h.finish())?;
    }
    Ok(memory)
}
