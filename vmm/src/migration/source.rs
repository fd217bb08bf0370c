//! The sending side: pre-copy with KVM dirty logging, then pause, last pages, state, and the
//! destination's acknowledgement; on any failure the source VM keeps (or resumes) running,
//! except when the destination's answer to `Complete` is lost: then it stays paused (see the
//! module documentation of `migration`).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::protocol::{FrameKind, FrameReader, FrameWriter, MemoryFrameBuilder, PAGE_SIZE};
use super::{expect_ack, Endpoint, MigrationError, ProtocolError, Stream};
use crate::api::{SendMigrationConfig, TimeoutStrategy};
use crate::vm::{RunState, Vm};

/// Dirty-page passes after the first full copy before the source pauses anyway.
pub const MAX_ITERATIONS: u32 = 5;
/// Longest wait for one answer of the destination (bounded by the migration's timeout).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Pages read from guest memory at once.
const CHUNK_PAGES: usize = 128;

/// What `vm.info` shows of a migration (the latest one, running or finished).
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationProgress {
    /// `connecting`, `precopy`, `stopped` (final pass under pause), `completed`, `failed`.
    pub phase: String,
    /// Where to.
    pub destination: String,
    /// Pre-copy pass (0: the full copy).
    pub iteration: u32,
    /// Bytes written to the socket (frame headers included).
    pub bytes_sent: u64,
    /// Pages sent with content.
    pub pages_sent: u64,
    /// Pages sent as zero runs.
    pub zero_pages_sent: u64,
    /// Of those, pages the first pass sent as zero without reading them: never populated
    /// anonymous private memory, which the kernel guarantees reads as zero (see
    /// [`crate::residency`]). Always 0 for file-backed or shared guest memory.
    pub unread_pages: u64,
    /// Dirty pages found by the latest dirty-log read and not yet sent.
    pub dirty_pages_left: u64,
    /// Guest RAM pages.
    pub ram_pages: u64,
    /// Measured throughput, bytes per second.
    pub bandwidth_bps: u64,
    /// Downtime target, ms.
    pub downtime_target_ms: u64,
    /// Pause to the destination's `Ack(Complete)`, ms (once stopped).
    pub downtime_ms: Option<f64>,
    /// Start to end, ms (once over).
    pub total_ms: Option<f64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Whether the source VM was resumed after the failure.
    pub source_resumed: bool,
}

/// Progress shared with `vm.info`.
pub type SharedProgress = Arc<Mutex<MigrationProgress>>;

/// What a successful migration did.
#[derive(Clone, Debug)]
pub struct SendReport {
    /// The final progress record.
    pub progress: MigrationProgress,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One RAM slot: its index (the KVM slot), guest address, size and host address.
#[derive(Clone, Copy, Debug)]
struct Slot {
    index: u32,
    gpa: u64,
    len: u64,
    /// Where this process maps it (0: unknown, then every page is read).
    host: usize,
}

fn slots(memory: &GuestMemoryMmap) -> Vec<Slot> {
    memory
        .iter()
        .enumerate()
        .map(|(i, r)| Slot {
            index: i as u32,
            gpa: r.start_addr().0,
            len: r.len(),
            host: r
                .get_host_address(MemoryRegionAddress(0))
                .map_or(0, |p| p as usize),
        })
        .collect()
}

/// The sending connection and its counters.
struct Sender<'a> {
    reader: FrameReader<Stream>,
    writer: FrameWriter<Stream>,
    builder: MemoryFrameBuilder,
    progress: &'a SharedProgress,
    /// Pages of the first pass sent as zero without reading them.
    unread_pages: u64,
    /// The VM, to notice a shutdown (SIGTERM, vm.shutdown) between chunks of a pass.
    vm: &'a Mutex<Vm>,
}

impl Sender<'_> {
    fn update(&self, f: impl FnOnce(&mut MigrationProgress)) {
        let mut p = lock(self.progress);
        p.bytes_sent = self.writer.bytes();
        p.pages_sent = self.builder.data_pages;
        p.zero_pages_sent = self.builder.zero_pages;
        p.unread_pages = self.unread_pages;
        f(&mut p);
    }

    /// Send `pages` pages from `gpa`.
    fn send_range(&mut self, gpa: u64, pages: usize) -> Result<(), MigrationError> {
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(CHUNK_PAGES);
            let at = gpa + (done as u64) * PAGE_SIZE;
            // Checked for zero where it is, and sent from there (see `add_guest`). A failed
            // write stays a protocol I/O error: then the destination's Error frame is read
            // for the reason (see `run`).
            self.builder.add_guest(&mut self.writer, at, n)?;
            done += n;
        }
        Ok(())
    }

    /// Fails once the VM has been shut down, so that a pass over a large guest is not finished
    /// for nothing. Never waits for the VM lock: whoever holds it is not shutting the VM down.
    fn check_alive(&self) -> Result<(), MigrationError> {
        match self.vm.try_lock() {
            Ok(v) if v.state() == RunState::Shutdown => Err(MigrationError::InvalidState(
                "the VM was shut down during the migration".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The first pass: every page of every slot. Pages the kernel says were never populated
    /// (anonymous private memory only, see [`crate::residency`]) go out as zero runs without
    /// being read; dirty logging is on already, so a page populated after this look is in the
    /// next dirty log.
    fn send_all(&mut self, slots: &[Slot]) -> Result<(), MigrationError> {
        for s in slots {
            let pages = (s.len / PAGE_SIZE) as usize;
            let known = if s.host == 0 {
                crate::residency::Residency::all(pages, "no host address")
            } else {
                crate::residency::scan(s.host, pages * PAGE_SIZE as usize)
            };
            if let Some(why) = &known.refused {
                info!("migration: slot {} is read page by page ({why})", s.index);
            }
            let mut at = 0;
            while at < pages {
                self.check_alive()?;
                if known.may_hold_data(at) {
                    let end = known.run_end(at, 4096);
                    self.send_range(s.gpa + at as u64 * PAGE_SIZE, end - at)?;
                    at = end;
                } else {
                    let end = known.run_end(at, usize::MAX);
                    self.builder.add_zero(
                        &mut self.writer,
                        s.gpa + at as u64 * PAGE_SIZE,
                        (end - at) as u64,
                    )?;
                    self.unread_pages += (end - at) as u64;
                    at = end;
                }
                self.update(|_| {});
            }
        }
        self.builder.flush(&mut self.writer)?;
        Ok(())
    }

    /// Send the pages set in each slot's bitmap.
    fn send_dirty(&mut self, slots: &[Slot], maps: &[Vec<u64>]) -> Result<(), MigrationError> {
        let mut since_check = 0;
        for (s, map) in slots.iter().zip(maps) {
            let pages = (s.len / PAGE_SIZE) as usize;
            let mut p = 0;
            while p < pages {
                if !bit(map, p) {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < pages && bit(map, p) && p - start < CHUNK_PAGES * 4 {
                    p += 1;
                }
                self.send_range(s.gpa + start as u64 * PAGE_SIZE, p - start)?;
                since_check += p - start;
                if since_check >= 4096 {
                    self.check_alive()?;
                    since_check = 0;
                }
            }
        }
        self.builder.flush(&mut self.writer)?;
        self.update(|_| {});
        Ok(())
    }
}

fn bit(map: &[u64], page: usize) -> bool {
    map.get(page / 64)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

fn count(maps: &[Vec<u64>]) -> u64 {
    maps.iter()
        .flat_map(|m| m.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn union(into: &mut [Vec<u64>], from: &[Vec<u64>]) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= *y;
        }
    }
}

fn dirty_logs(hv: &dyn hypervisor::Vm, slots: &[Slot]) -> Result<Vec<Vec<u64>>, MigrationError> {
    slots
        .iter()
        .map(|s| {
            hv.dirty_log(s.index, s.len).map_err(|e| {
                MigrationError::Hypervisor(format!("read slot {}'s dirty log: {e}", s.index))
            })
        })
        .collect()
}

/// The endpoint of an API URL.
pub fn endpoint(url: &crate::api::MigrationUrl) -> Endpoint {
    match url {
        crate::api::MigrationUrl::Unix(p) => Endpoint::Unix(p.clone()),
        crate::api::MigrationUrl::Tcp { host, port } => Endpoint::Tcp {
            host: host.clone(),
            port: *port,
        },
    }
}

/// Migrate the VM in `vm` to the destination `cfg` names. The VM lock is held only while the
/// VM is paused for the final pass (and briefly at the start); pre-copy runs with the guest
/// running and `vm.info` answering. On success the source VM is shut down (kept paused with
/// `preserve_source`); on any failure it is left running (resumed if this paused it), dirty
/// logging is turned off and the destination is told to abandon.
pub fn send(
    vm: &Mutex<Vm>,
    cfg: &SendMigrationConfig,
    progress: &SharedProgress,
) -> Result<SendReport, MigrationError> {
    let t0 = Instant::now();
    let url = cfg.destination().map_err(MigrationError::Url)?;
    let ep = endpoint(&url);
    let (memory, hv, was_paused) = {
        let v = lock(vm);
        match v.state() {
            RunState::Running => {}
            RunState::Paused => {}
            RunState::Shutdown => {
                return Err(MigrationError::InvalidState("the VM is shut down".into()))
            }
        }
        (
            v.guest_memory(),
            v.hypervisor_vm(),
            v.state() == RunState::Paused,
        )
    };
    let slots = slots(&memory);
    let ram_pages = slots.iter().map(|s| s.len / PAGE_SIZE).sum();
    *lock(progress) = MigrationProgress {
        phase: "connecting".into(),
        destination: ep.to_string(),
        ram_pages,
        downtime_target_ms: cfg.downtime_ms,
        ..MigrationProgress::default()
    };
    let mut paused_here = false;
    let r = run(
        vm,
        cfg,
        progress,
        &ep,
        memory,
        hv.as_ref(),
        &slots,
        was_paused,
        &mut paused_here,
        t0,
    );
    // Dirty logging off again, whatever happened (the VM may be gone on success).
    {
        let v = lock(vm);
        if v.state() != RunState::Shutdown {
            if let Err(e) = v.set_dirty_logging(false) {
                warn!("migration: cannot turn dirty logging off: {e}");
            }
        }
    }
    match r {
        Ok(()) => {
            let p = {
                let mut p = lock(progress);
                p.phase = "completed".into();
                p.total_ms = Some(ms(t0.elapsed()));
                p.clone()
            };
            info!(
                "migration to {} completed: {} iterations, {} MiB sent, downtime {:.1} ms, total {:.0} ms",
                p.destination,
                p.iteration,
                p.bytes_sent >> 20,
                p.downtime_ms.unwrap_or(0.0),
                p.total_ms.unwrap_or(0.0)
            );
            Ok(SendReport { progress: p })
        }
        Err(e) => {
            let mut resumed = false;
            let in_doubt = matches!(e, MigrationError::InDoubt(_));
            if paused_here && !in_doubt {
                let mut v = lock(vm);
                if v.state() == RunState::Paused {
                    match v.resume(None) {
                        Ok(_) => resumed = true,
                        Err(re) => {
                            warn!("migration failed and the source VM could not be resumed: {re}")
                        }
                    }
                }
            }
            let mut p = lock(progress);
            p.phase = if in_doubt { "in_doubt" } else { "failed" }.into();
            p.error = Some(e.to_string());
            p.source_resumed = resumed;
            p.total_ms = Some(ms(t0.elapsed()));
            warn!(
                "migration to {} failed: {e}; the source VM {}",
                p.destination,
                if resumed {
                    "was resumed"
                } else if in_doubt {
                    "stays paused (the destination may be running it)"
                } else if was_paused {
                    "stays paused"
                } else {
                    "kept running"
                }
            );
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    vm: &Mutex<Vm>,
    cfg: &SendMigrationConfig,
    progress: &SharedProgress,
    ep: &Endpoint,
    memory: Arc<GuestMemoryMmap>,
    hv: &dyn hypervisor::Vm,
    slots: &[Slot],
    was_paused: bool,
    paused_here: &mut bool,
    t0: Instant,
) -> Result<(), MigrationError> {
    let deadline = t0 + cfg.timeout();
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let stream = Stream::connect(ep).map_err(|source| MigrationError::Connect {
        endpoint: ep.to_string(),
        source,
    })?;
    let io = |source| {
        MigrationError::Protocol(ProtocolError::Io {
            what: "set socket timeouts",
            source,
        })
    };
    stream.set_write_timeout(Some(ACK_TIMEOUT)).map_err(io)?;
    // The read timeout last set, to say how long a silent destination was waited for.
    let waited = std::cell::Cell::new(ACK_TIMEOUT);
    let set_read = |s: &Stream| -> Result<(), MigrationError> {
        let t = remaining().min(ACK_TIMEOUT);
        if t.is_zero() {
            return Err(MigrationError::Timeout(cfg.timeout_s));
        }
        waited.set(t);
        s.set_read_timeout(Some(t)).map_err(io)
    };
    let mut tx = Sender {
        reader: FrameReader::new(stream.try_clone().map_err(io)?),
        writer: FrameWriter::new(stream),
        builder: MemoryFrameBuilder::with_memory(memory),
        progress,
        unread_pages: 0,
        vm,
    };
    let res = conversation(
        vm,
        cfg,
        &mut tx,
        hv,
        slots,
        was_paused,
        paused_here,
        &set_read,
        deadline,
        t0,
    )
    .map_err(|e| e.silent_peer("destination", waited.get()));
    if let Err(e) = &res {
        if !matches!(e, MigrationError::Protocol(ProtocolError::Remote(_))) {
            // Best effort: the destination may be gone.
            let _ = tx.writer.reason(FrameKind::Abandon, &e.to_string());
        }
        let _ = tx.writer.get_ref().shutdown();
        // A write failed because the destination closed: its Error frame may say why.
        if let MigrationError::Protocol(ProtocolError::Io { .. }) = e {
            let _ = tx
                .reader
                .get_ref()
                .set_read_timeout(Some(Duration::from_millis(200)));
            if let Ok(Some(f)) = tx.reader.next_frame() {
                if let Ok(super::Message::Error(reason)) = super::Message::decode(&f) {
                    return Err(MigrationError::Protocol(ProtocolError::Remote(reason)));
                }
            }
        }
    }
    res
}

#[allow(clippy::too_many_arguments)]
fn conversation(
    vm: &Mutex<Vm>,
    cfg: &SendMigrationConfig,
    tx: &mut Sender<'_>,
    hv: &dyn hypervisor::Vm,
    slots: &[Slot],
    was_paused: bool,
    paused_here: &mut bool,
    set_read: &dyn Fn(&Stream) -> Result<(), MigrationError>,
    deadline: Instant,
    t0: Instant,
) -> Result<(), MigrationError> {
    let (config_json, tsc_khz) = {
        let v = lock(vm);
        (
            serde_json::to_value(v.config()).map_err(|e| MigrationError::Encode(e.to_string()))?,
            v.tsc_khz(),
        )
    };
    tx.writer.start()?;
    set_read(tx.reader.get_ref())?;
    expect_ack(&mut tx.reader, FrameKind::Start)?;
    let config = serde_json::to_vec(&serde_json::json!({
        "version": super::dest::CONFIG_VERSION,
        "tsc_khz": tsc_khz,
        "config": config_json,
    }))
    .map_err(|e| MigrationError::Encode(e.to_string()))?;
    tx.writer.send(FrameKind::Config, &config)?;
    set_read(tx.reader.get_ref())?;
    expect_ack(&mut tx.reader, FrameKind::Config)?;

    // Pre-copy: log dirty pages, copy everything, then the pages dirtied meanwhile.
    lock(vm).set_dirty_logging(true)?;
    tx.update(|p| p.phase = "precopy".into());
    let pass0 = Instant::now();
    tx.send_all(slots)?;
    let ram_pages: u64 = slots.iter().map(|s| s.len / PAGE_SIZE).sum();
    let mut model = CostModel::default();
    // The rate of pages read and checked: those known zero unread cost (almost) nothing and
    // would make every later prediction too hopeful.
    model.measure(
        &tx.writer,
        ram_pages.saturating_sub(tx.unread_pages),
        pass0.elapsed(),
    );
    let target = cfg.downtime();
    let mut iteration = 0;
    let mut pending = dirty_logs(hv, slots)?;
    loop {
        let dirty = count(&pending);
        let predicted = model.predict(dirty);
        tx.update(|p| {
            p.iteration = iteration;
            p.dirty_pages_left = dirty;
            p.bandwidth_bps = model.bytes_per_s as u64;
        });
        info!(
            "migration: pass {iteration}: {} MiB sent, {dirty} dirty pages left, {:.0} MiB/s on \
             the wire, {:.0} pages/s scanned, predicted downtime {predicted:?}",
            tx.writer.bytes() >> 20,
            model.bytes_per_s / (1 << 20) as f64,
            model.pages_per_s
        );
        if was_paused || predicted <= target || iteration >= MAX_ITERATIONS {
            break;
        }
        if Instant::now() >= deadline {
            match cfg.timeout_strategy {
                TimeoutStrategy::Cancel => return Err(MigrationError::Timeout(cfg.timeout_s)),
                TimeoutStrategy::Ignore => break,
            }
        }
        iteration += 1;
        let t = Instant::now();
        tx.send_dirty(slots, &pending)?;
        model.measure(&tx.writer, dirty, t.elapsed());
        pending = dirty_logs(hv, slots)?;
    }

    // Stop the guest for the last pages and the state; the VM stays locked until the end.
    let mut v = lock(vm);
    let stop = Instant::now();
    match v.state() {
        RunState::Running => {
            v.pause()?;
            *paused_here = true;
        }
        RunState::Paused => {}
        RunState::Shutdown => {
            return Err(MigrationError::InvalidState(
                "the VM was shut down during the migration".into(),
            ))
        }
    }
    tx.update(|p| p.phase = "stopped".into());
    union(&mut pending, &dirty_logs(hv, slots)?);
    let last = count(&pending);
    tx.send_dirty(slots, &pending)?;
    let state = v.capture_state()?;
    let state_json = crate::snapshot::encode_state(v.config(), &state)?;
    tx.writer.send(FrameKind::State, &state_json)?;
    tx.writer.flush()?;
    set_read(tx.reader.get_ref())?;
    expect_ack(&mut tx.reader, FrameKind::State)?;
    // From here the destination may start the guest. Only its explicit refusal proves it did
    // not; a lost answer leaves the source paused rather than risk two running copies.
    let in_doubt = |e: MigrationError| match e {
        MigrationError::Protocol(ProtocolError::Remote(_)) => e,
        e => MigrationError::InDoubt(e.to_string()),
    };
    tx.writer
        .send(FrameKind::Complete, &[])
        .map_err(|e| in_doubt(e.into()))?;
    tx.writer.flush().map_err(|e| in_doubt(e.into()))?;
    set_read(tx.reader.get_ref()).map_err(in_doubt)?;
    expect_ack(&mut tx.reader, FrameKind::Complete).map_err(|e| in_doubt(e.into()))?;
    let downtime = stop.elapsed();
    tx.update(|p| {
        p.dirty_pages_left = 0;
        p.downtime_ms = Some(ms(downtime));
        p.total_ms = Some(ms(t0.elapsed()));
    });
    info!("migration: last pass {last} pages + state; downtime {downtime:?}");
    // The guest runs on the destination now.
    if cfg.preserve_source {
        info!("migration: source VM kept paused (preserve_source)");
    } else {
        v.shutdown();
    }
    Ok(())
}

/// What a pass costs, measured: the stream's byte rate while writing, and the rate at which
/// pages are read and checked outside the writes. The downtime of `n` dirty pages is predicted
/// as if every one had content (an upper bound: zero pages travel as 16-byte runs).
#[derive(Debug, Default)]
struct CostModel {
    bytes_per_s: f64,
    pages_per_s: f64,
    last_bytes: u64,
    last_write: Duration,
}

impl CostModel {
    fn measure(&mut self, w: &FrameWriter<Stream>, pages: u64, elapsed: Duration) {
        let bytes = w.bytes() - self.last_bytes;
        let write = w.write_time() - self.last_write;
        self.last_bytes = w.bytes();
        self.last_write = w.write_time();
        // Too little written to measure: keep the earlier rate.
        if bytes >= 1 << 20 || self.bytes_per_s == 0.0 {
            self.bytes_per_s = bytes as f64 / write.as_secs_f64().max(1e-6);
        }
        if pages >= 1024 || self.pages_per_s == 0.0 {
            let scan = elapsed.saturating_sub(write);
            self.pages_per_s = pages as f64 / scan.as_secs_f64().max(1e-6);
        }
    }

    fn predict(&self, pages: u64) -> Duration {
        let bytes = (pages * (PAGE_SIZE + super::protocol::RUN_HEADER_LEN as u64)) as f64;
        Duration::from_secs_f64(
            bytes / self.bytes_per_s.max(1.0) + pages as f64 / self.pages_per_s.max(1.0),
        )
    }
}
