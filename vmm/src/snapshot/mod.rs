//! Snapshots of a paused VM: the directory format, its atomic writer and its checked reader.
//!
//! A snapshot is a directory (`file:///dir` in the API) holding:
//!
//! | file | content |
//! |---|---|
//! | `config.json` | the [`VmConfig`] |
//! | `state.json` | `{version, tsc, vcpus, devices: {serial, probe}, memory: {size, file, regions}}`: the [`TscSnapshot`](hypervisor::tsc::TscSnapshot) of the pause, every vCPU's [`VcpuState`](hypervisor::state::VcpuState), device states and the layout of `memory.bin` |
//! | `memory.bin` | guest RAM, regions back to back; all-zero 4 KiB pages are holes (sparse file) |
//! | `checksums.json` | `{version, algorithm: "hg64", files: {name: {size, hg64}}}` for the three files above |
//!
//! Writing ([`write()`]) is atomic: everything goes into a sibling `.<name>.tmp-<pid>-<n>`, each
//! file and the directory are fsynced, then the directory is renamed into place. An existing
//! snapshot at the destination is renamed aside first and deleted only once the new one is in
//! place, so the destination always holds one whole snapshot (a crash between the two renames
//! leaves the old one complete under `.<name>.old-<pid>-<n>`). On any error the temporary
//! directory is removed and the destination is untouched.
//!
//! Reading ([`Snapshot::read`]) opens every file read-only, checks sizes and checksums, refuses
//! other format versions, decodes every field with an error naming the file and the field, and
//! cross-checks vCPU counts and memory sizes. [`Snapshot::load_memory`] then maps `memory.bin`
//! copy-on-write ([`MemoryMode::MapPrivate`]) or copies it ([`MemoryMode::Copy`]); neither
//! modifies the snapshot.

mod error;
mod format;
mod hash;
mod memory;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

pub use error::SnapshotError;
pub use format::{
    Checksums, DeviceStates, FileSum, MemoryLayout, MemoryRegionEntry, VmState, CHECKSUMS_VERSION,
    STATE_VERSION,
};
pub use hash::{hash_bytes, Hasher64, ALGORITHM};
pub use memory::{MemoryMode, MAX_WRITE};

use crate::config::VmConfig;
use error::io;
use format::StateFile;

/// The configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The machine state file.
pub const STATE_FILE: &str = "state.json";
/// Guest RAM.
pub const MEMORY_FILE: &str = "memory.bin";
/// Checksums of the three files above.
pub const CHECKSUMS_FILE: &str = "checksums.json";

/// The files of a snapshot, in the order they are written.
pub const FILES: [&str; 4] = [CONFIG_FILE, STATE_FILE, MEMORY_FILE, CHECKSUMS_FILE];

/// Options of [`write()`].
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteOptions {
    /// Test hook: fail just before writing this file (one of [`FILES`]), or before the final
    /// rename when `"rename"`, as a disk error would.
    pub fail_at: Option<&'static str>,
}

/// What [`write()`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteReport {
    /// Guest RAM bytes (the logical size of `memory.bin`).
    pub memory_bytes: u64,
    /// Bytes of non-zero pages actually written.
    pub data_bytes: u64,
    /// Time spent writing and fsyncing `memory.bin`.
    pub memory_time: Duration,
    /// The whole write, renames included.
    pub total_time: Duration,
}

/// Options of [`Snapshot::load_memory`].
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// How the memory is backed.
    pub mode: MemoryMode,
    /// Check `memory.bin` against its checksum first (reads its data once; in `Copy` mode the
    /// check happens during the copy at no extra cost).
    pub verify: bool,
    /// Fault every page in before returning (`MAP_POPULATE` for `MapPrivate`).
    pub prefault: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            mode: MemoryMode::default(),
            verify: true,
            prefault: false,
        }
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A sibling path `.<name>.<tag>-<pid>-<n>` of `dest`.
fn sibling(dest: &Path, tag: &str) -> Result<PathBuf, SnapshotError> {
    let name = dest
        .file_name()
        .ok_or_else(|| SnapshotError::Destination {
            path: dest.to_path_buf(),
            reason: "the snapshot destination must name a directory".into(),
        })?
        .to_string_lossy();
    let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    Ok(dest.with_file_name(format!(".{name}.{tag}-{}-{n}", std::process::id())))
}

/// Whether process `pid` exists (a signal 0 reaches it, or it exists under another user).
fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// What a writer killed mid-way (`kill -9`, power loss) left beside `dest`: its
/// `.<name>.tmp-<pid>-<n>` directories are removed; a `.<name>.old-<pid>-<n>` is the previous
/// snapshot moved aside just before the new one was renamed in, so it is put back when `dest` is
/// missing (the only complete copy) and removed otherwise. Only leftovers of processes that no
/// longer exist are touched; a failure is logged, never fatal.
fn clean_stale(dest: &Path) {
    let Some(name) = dest.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent_of(dest)) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&format!(".{name}.")) else {
            continue;
        };
        let Some((tag, ids)) = rest.split_once('-') else {
            continue;
        };
        let pid = ids.split_once('-').and_then(|(p, n)| {
            n.parse::<u64>().ok()?;
            p.parse::<i32>().ok()
        });
        let Some(pid) = pid.filter(|p| *p > 0 && !pid_alive(*p)) else {
            continue;
        };
        let path = e.path();
        let r = match tag {
            "old" if !dest.exists() => std::fs::rename(&path, dest).map(|()| {
                log::warn!(
                    "put back {} as {}: a snapshot write killed mid-way (pid {pid}) had moved it aside",
                    path.display(),
                    dest.display()
                )
            }),
            "tmp" | "old" => std::fs::remove_dir_all(&path).map(|()| {
                log::info!(
                    "removed {}, left by a snapshot write of pid {pid} that no longer runs",
                    path.display()
                )
            }),
            _ => continue,
        };
        if let Err(err) = r {
            log::warn!("cannot clean up {}: {err}", path.display());
        }
    }
}

fn parent_of(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "fsync the directory"))
}

/// Refuse to replace anything but a snapshot directory (or an empty one).
fn check_replaceable(dest: &Path) -> Result<bool, SnapshotError> {
    let meta = match std::fs::symlink_metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(dest, "inspect the destination")(e)),
    };
    if !meta.is_dir() {
        return Err(SnapshotError::Destination {
            path: dest.to_path_buf(),
            reason: "exists and is not a directory".into(),
        });
    }
    let entries = std::fs::read_dir(dest).map_err(io(dest, "list the destination"))?;
    for e in entries {
        let e = e.map_err(io(dest, "list the destination"))?;
        let name = e.file_name();
        if !FILES.iter().any(|f| name == *f) {
            return Err(SnapshotError::Destination {
                path: dest.to_path_buf(),
                reason: format!(
                    "holds {:?}, which is not part of a snapshot; refusing to replace it",
                    name
                ),
            });
        }
    }
    Ok(true)
}

/// Removes the temporary directory unless disarmed.
struct TmpGuard(Option<PathBuf>);

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn create_file(dir: &Path, name: &str) -> Result<(File, PathBuf), SnapshotError> {
    let path = dir.join(name);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io(&path, "create"))?;
    Ok((f, path))
}

fn write_small(dir: &Path, name: &'static str, bytes: &[u8]) -> Result<FileSum, SnapshotError> {
    let (mut f, path) = create_file(dir, name)?;
    f.write_all(bytes).map_err(io(&path, "write"))?;
    f.sync_all().map_err(io(&path, "fsync"))?;
    Ok(FileSum {
        size: bytes.len() as u64,
        hg64: hash::to_hex(hash_bytes(bytes)),
    })
}

fn json<T: serde::Serialize + ?Sized>(name: &'static str, v: &T) -> Result<Vec<u8>, SnapshotError> {
    serde_json::to_vec_pretty(v).map_err(|e| format::invalid(name, "(top level)", e))
}

fn inject(opts: &WriteOptions, at: &'static str) -> Result<(), SnapshotError> {
    if opts.fail_at == Some(at) {
        Err(SnapshotError::Injected(at))
    } else {
        Ok(())
    }
}

/// Write a snapshot of a paused VM into the directory `dest`, atomically (see the module docs).
///
/// `memory` must be the VM's RAM laid out as `arch::layout` lays out `config.memory.size`
/// bytes, and must not change during the call (the VM is paused).
pub fn write(
    dest: &Path,
    config: &VmConfig,
    state: &VmState,
    memory: &GuestMemoryMmap,
    opts: &WriteOptions,
) -> Result<WriteReport, SnapshotError> {
    let t0 = Instant::now();
    let layout = MemoryLayout::for_size(config.memory.size).map_err(SnapshotError::Memory)?;
    let n = config.cpus.boot_vcpus as usize;
    if state.vcpus.len() != n {
        return Err(format::invalid(
            STATE_FILE,
            "vcpus",
            format!("{} vCPU states for {n} vCPUs", state.vcpus.len()),
        ));
    }
    state
        .tsc
        .check_vcpus(n)
        .map_err(|e| format::invalid(STATE_FILE, "tsc.tsc_adjust", e))?;
    let parent = parent_of(dest);
    if !parent.is_dir() {
        return Err(SnapshotError::Destination {
            path: dest.to_path_buf(),
            reason: format!("its parent directory {} does not exist", parent.display()),
        });
    }
    clean_stale(dest);
    let exists = check_replaceable(dest)?;

    let tmp = sibling(dest, "tmp")?;
    std::fs::create_dir(&tmp).map_err(io(&tmp, "create the temporary snapshot directory"))?;
    let mut guard = TmpGuard(Some(tmp.clone()));

    inject(opts, CONFIG_FILE)?;
    let config_sum = write_small(&tmp, CONFIG_FILE, &json(CONFIG_FILE, config)?)?;

    inject(opts, STATE_FILE)?;
    let state_file = StateFile::new(STATE_VERSION, state, &layout);
    let state_sum = write_small(&tmp, STATE_FILE, &json(STATE_FILE, &state_file)?)?;

    inject(opts, MEMORY_FILE)?;
    let m0 = Instant::now();
    let (mem_file, mem_path) = create_file(&tmp, MEMORY_FILE)?;
    let mw = memory::write(&mem_file, &mem_path, memory, &layout)?;
    drop(mem_file);
    let memory_time = m0.elapsed();

    inject(opts, CHECKSUMS_FILE)?;
    let sums = Checksums {
        version: CHECKSUMS_VERSION,
        algorithm: ALGORITHM.to_string(),
        files: [
            (CONFIG_FILE.to_string(), config_sum),
            (STATE_FILE.to_string(), state_sum),
            (
                MEMORY_FILE.to_string(),
                FileSum {
                    size: mw.file_len,
                    hg64: hash::to_hex(mw.hash),
                },
            ),
        ]
        .into_iter()
        .collect(),
    };
    write_small(&tmp, CHECKSUMS_FILE, &json(CHECKSUMS_FILE, &sums)?)?;
    fsync_dir(&tmp)?;

    inject(opts, "rename")?;
    if exists {
        let old = sibling(dest, "old")?;
        std::fs::rename(dest, &old).map_err(io(dest, "move the existing snapshot aside"))?;
        if let Err(e) = std::fs::rename(&tmp, dest) {
            // Put the old snapshot back; the new one is removed by the guard.
            let _ = std::fs::rename(&old, dest);
            return Err(io(dest, "rename the new snapshot into place")(e));
        }
        guard.0 = None;
        fsync_dir(&parent)?;
        log::info!(
            "replaced the snapshot in {} (the old one was kept until the new one was complete)",
            dest.display()
        );
        // The new snapshot is in place: failing to delete the old one is worth a warning only.
        if let Err(e) = std::fs::remove_dir_all(&old) {
            log::warn!("cannot remove the replaced snapshot {}: {e}", old.display());
        }
    } else {
        std::fs::rename(&tmp, dest).map_err(io(dest, "rename the new snapshot into place"))?;
        guard.0 = None;
    }
    fsync_dir(&parent)?;
    Ok(WriteReport {
        memory_bytes: mw.file_len,
        data_bytes: mw.data_bytes,
        memory_time,
        total_time: t0.elapsed(),
    })
}

/// Decode `config.json` and `state.json` from bytes with every check [`Snapshot::read`] makes
/// on them except the checksums (a decoder entry point for fuzzing and tools; touches no file).
pub fn decode_json(
    config_json: &[u8],
    state_json: &[u8],
) -> Result<(VmConfig, VmState, MemoryLayout), SnapshotError> {
    let config = format::decode_config(config_json)?;
    let (state, memory) = format::decode_state(state_json, &config)?;
    Ok((config, state, memory))
}

/// Decode `checksums.json` from bytes (for fuzzing and tools).
pub fn decode_checksums(bytes: &[u8]) -> Result<Checksums, SnapshotError> {
    format::decode_checksums(bytes)
}

/// `state.json`'s bytes for `state` of a VM with `config` (what [`write`] stores; also the
/// payload of a migration's `State` frame).
pub fn encode_state(config: &VmConfig, state: &VmState) -> Result<Vec<u8>, SnapshotError> {
    let layout = MemoryLayout::for_size(config.memory.size).map_err(SnapshotError::Memory)?;
    let state_file = StateFile::new(STATE_VERSION, state, &layout);
    serde_json::to_vec(&state_file).map_err(|e| format::invalid(STATE_FILE, "(top level)", e))
}

/// Decode `config.json` bytes (errors name the field).
pub fn decode_config(bytes: &[u8]) -> Result<VmConfig, SnapshotError> {
    format::decode_config(bytes)
}

/// Decode `state.json` bytes and check them against `config` (errors name the field).
pub fn decode_state(bytes: &[u8], config: &VmConfig) -> Result<VmState, SnapshotError> {
    format::decode_state(bytes, config).map(|(state, _)| state)
}

/// A snapshot read from disk and checked (everything but `memory.bin`'s content, which
/// [`Snapshot::load_memory`] checks).
#[derive(Debug)]
pub struct Snapshot {
    dir: PathBuf,
    /// `config.json`.
    pub config: VmConfig,
    /// `state.json` without the memory layout.
    pub state: VmState,
    /// `state.json`'s memory layout.
    pub memory: MemoryLayout,
    /// `checksums.json`.
    pub checksums: Checksums,
    memory_file: File,
}

/// `checksums.json` is a few hundred bytes; anything past this is not one.
const MAX_CHECKSUMS_BYTES: u64 = 1 << 20;

/// Open a snapshot file read-only: a regular file only (a FIFO would block, a device such as
/// `/dev/zero` would be read without end; see [`crate::files`]).
fn open_ro(dir: &Path, name: &'static str) -> Result<File, SnapshotError> {
    let path = dir.join(name);
    crate::files::open_regular(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SnapshotError::Missing {
                file: name,
                dir: dir.to_path_buf(),
            }
        } else {
            io(path, "open")(e)
        }
    })
}

fn read_small(dir: &Path, name: &'static str, sum: &FileSum) -> Result<Vec<u8>, SnapshotError> {
    use std::io::Read;
    let f = open_ro(dir, name)?;
    let len = f.metadata().map_err(io(dir.join(name), "stat"))?.len();
    if len != sum.size {
        return Err(SnapshotError::Size {
            file: name,
            expected: sum.size,
            found: len,
            source_of_size: "recorded in checksums.json",
        });
    }
    // Never more than checksums.json records (+1 to notice a file that grew meanwhile).
    let mut bytes = Vec::new();
    f.take(sum.size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io(dir.join(name), "read"))?;
    if bytes.len() as u64 != sum.size {
        return Err(SnapshotError::Size {
            file: name,
            expected: sum.size,
            found: bytes.len() as u64,
            source_of_size: "recorded in checksums.json",
        });
    }
    let found = hash::to_hex(hash_bytes(&bytes));
    if !found.eq_ignore_ascii_case(&sum.hg64) {
        return Err(SnapshotError::Checksum {
            file: name,
            expected: sum.hg64.clone(),
            found,
        });
    }
    Ok(bytes)
}

fn parse_hex(file: &'static str, s: &str) -> Result<u64, SnapshotError> {
    u64::from_str_radix(s, 16)
        .map_err(|e| format::invalid(CHECKSUMS_FILE, format!("files.{file}.hg64"), e))
}

impl Snapshot {
    /// Read and check the snapshot in `dir`. Opens every file read-only; changes nothing.
    pub fn read(dir: &Path) -> Result<Self, SnapshotError> {
        use std::io::Read;
        if !dir.is_dir() {
            return Err(SnapshotError::Destination {
                path: dir.to_path_buf(),
                reason: "is not a snapshot directory (it does not exist or is not a directory)"
                    .into(),
            });
        }
        let mut sums_bytes = Vec::new();
        open_ro(dir, CHECKSUMS_FILE)?
            .take(MAX_CHECKSUMS_BYTES + 1)
            .read_to_end(&mut sums_bytes)
            .map_err(io(dir.join(CHECKSUMS_FILE), "read"))?;
        if sums_bytes.len() as u64 > MAX_CHECKSUMS_BYTES {
            return Err(SnapshotError::Size {
                file: CHECKSUMS_FILE,
                expected: MAX_CHECKSUMS_BYTES,
                found: sums_bytes.len() as u64,
                source_of_size: "the most a checksums file may hold",
            });
        }
        let checksums = format::decode_checksums(&sums_bytes)?;
        let sum = |name: &str| checksums.files[name].clone();

        let config_bytes = read_small(dir, CONFIG_FILE, &sum(CONFIG_FILE))?;
        let state_bytes = read_small(dir, STATE_FILE, &sum(STATE_FILE))?;
        let config = format::decode_config(&config_bytes)?;
        let (state, memory) = format::decode_state(&state_bytes, &config)?;

        let memory_file = open_ro(dir, MEMORY_FILE)?;
        let mem_sum = sum(MEMORY_FILE);
        parse_hex(MEMORY_FILE, &mem_sum.hg64)?;
        let len = memory_file
            .metadata()
            .map_err(io(dir.join(MEMORY_FILE), "stat"))?
            .len();
        if mem_sum.size != memory.file_len() {
            return Err(format::invalid(
                CHECKSUMS_FILE,
                format!("files.{MEMORY_FILE}.size"),
                format!(
                    "{} but state.json's memory layout needs {} bytes",
                    mem_sum.size,
                    memory.file_len()
                ),
            ));
        }
        if len != memory.file_len() {
            return Err(SnapshotError::Size {
                file: MEMORY_FILE,
                expected: memory.file_len(),
                found: len,
                source_of_size: "the guest memory size in state.json",
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            state,
            memory,
            checksums,
            memory_file,
        })
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn memory_hash(&self) -> u64 {
        // Checked in `read`.
        parse_hex(MEMORY_FILE, &self.checksums.files[MEMORY_FILE].hg64).unwrap_or(0)
    }

    /// Check `memory.bin` against its checksum (reads its data extents once).
    pub fn verify_memory(&self) -> Result<(), SnapshotError> {
        memory::verify(
            &self.memory_file,
            &self.dir.join(MEMORY_FILE),
            self.memory.file_len(),
            self.memory_hash(),
        )
    }

    /// The guest's RAM, backed as `opts` says. The snapshot is not modified.
    pub fn load_memory(&self, opts: &LoadOptions) -> Result<GuestMemoryMmap, SnapshotError> {
        let path = self.dir.join(MEMORY_FILE);
        match opts.mode {
            MemoryMode::MapPrivate => {
                if opts.verify {
                    self.verify_memory()?;
                }
                crate::signal::set_guest_memory_file(&path);
                memory::map_private(&self.memory_file, &path, &self.memory, opts.prefault)
            }
            MemoryMode::Copy => memory::copy(
                &self.memory_file,
                &path,
                &self.memory,
                opts.verify.then(|| self.memory_hash()),
            ),
        }
    }
}
