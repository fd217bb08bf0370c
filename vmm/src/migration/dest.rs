//! The receiving side: a [`Destination`] that builds a VM from the frames, and
//! [`receive_vm`], which listens, runs the conversation and hands back the running VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::tsc::{ClockPolicy, ThawOrigin};
use hypervisor::Hypervisor;
use log::{info, warn};
use serde::Deserialize;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::protocol::{RunData, PAGE_SIZE};
use super::{
    receive_reading_ahead, Destination, Endpoint, FrameReader, FrameWriter, Listener, RamRange,
};
use super::{MigrationError, ProtocolError, Receiver};
use crate::config::VmConfig;
use crate::fresh_ram::FreshRam;
use crate::vcpu::VmEvent;
use crate::vm::{Incoming, Vm};

/// Version of the `Config` frame's JSON.
pub const CONFIG_VERSION: u32 = 1;
/// Longest silence of the source between two frames before the destination gives up.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(120);

/// The `Config` frame's JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFrame {
    version: u32,
    tsc_khz: u32,
    config: serde_json::Value,
}

/// Decode a `Config` frame's JSON: `{version, tsc_khz, config}`, the configuration decoded
/// as a snapshot's `config.json` is. The error names the field.
pub fn decode_config_frame(json: &[u8]) -> Result<(VmConfig, u32), String> {
    let f: ConfigFrame = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if f.version != CONFIG_VERSION {
        return Err(format!(
            "version: {} is not a configuration version this build reads (it reads {CONFIG_VERSION})",
            f.version
        ));
    }
    if f.tsc_khz == 0 {
        return Err("tsc_khz: 0 is not a TSC frequency".into());
    }
    let bytes = serde_json::to_vec(&f.config).map_err(|e| e.to_string())?;
    let config = crate::snapshot::decode_config(&bytes).map_err(|e| format!("config: {e}"))?;
    Ok((config, f.tsc_khz))
}

/// Builds the migrated VM: RAM and vCPUs at `Config`, pages at `Memory`, state at `State`
/// (parked), run at `Complete` under the policy given, else the migrated VM's own default (its
/// configuration's `clock_policy`, as a restore does).
pub struct VmDestination {
    hv: Arc<dyn Hypervisor>,
    serial: Option<devices::SerialOutput>,
    events: Sender<VmEvent>,
    policy: Option<ClockPolicy>,
    tsc_khz: u32,
    /// First writes into the fresh RAM without the kernel's page clearing, until the state
    /// arrives (`None` where the host refuses it: the writes then fault pages in).
    fresh: Option<FreshRam>,
    fill: FillStats,
    incoming: Option<Incoming>,
    vm: Option<Vm>,
    memory_time: Duration,
    /// RAM ranges and, per range, one bit per page written with content so far. Fresh guest
    /// RAM is zero, so a zero run over pages never written costs nothing (an idle guest's
    /// RAM is mostly zero runs; writing them would fault in all of it).
    written: Vec<Written>,
    /// Set when this VMM is asked to stop (vmm.shutdown, SIGTERM): every frame before the VM
    /// runs here is then refused, so the source keeps (and resumes) its VM.
    abort: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for VmDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmDestination")
            .field("tsc_khz", &self.tsc_khz)
            .field("has_vm", &self.vm.is_some())
            .finish_non_exhaustive()
    }
}

impl VmDestination {
    /// A destination on `hv`; the VM's serial goes to `serial` when given (else the source's
    /// configuration), its events to `events`.
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        serial: Option<devices::SerialOutput>,
        events: Sender<VmEvent>,
        policy: Option<ClockPolicy>,
    ) -> Self {
        Self {
            hv,
            serial,
            events,
            policy,
            tsc_khz: 0,
            fresh: None,
            fill: FillStats::default(),
            incoming: None,
            vm: None,
            memory_time: Duration::ZERO,
            written: Vec::new(),
            abort: None,
        }
    }

    /// The VM, once `Complete` has run it.
    pub fn take_vm(&mut self) -> Option<Vm> {
        self.vm.take()
    }

    /// No more memory comes (the `State` frame does this first): the first-fill registration
    /// ends, so from here anything may touch guest RAM. Returns the RAM as received, before
    /// any state is restored into the VM (`None` before `Config` or after `State`).
    pub fn memory_received(&mut self) -> Option<&GuestMemoryMmap> {
        if let Some(f) = self.fresh.take() {
            self.fill.copied = f.copied;
            self.fill.rewritten = f.rewritten;
            info!(
                "migration: {} MiB filled into fresh RAM by userfaultfd copies, {} KiB rewritten",
                f.copied >> 20,
                f.rewritten >> 10
            );
        }
        if self.incoming.is_some() {
            info!(
                "migration: writing guest memory took {:?} of the receiver's time",
                self.memory_time
            );
        }
        self.incoming.as_ref().map(Incoming::memory)
    }

    /// How the pages were written into the fresh RAM.
    pub fn fill_stats(&self) -> &FillStats {
        &self.fill
    }
}

/// How a destination wrote received pages into its fresh RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FillStats {
    /// Bytes written by `userfaultfd` copies (no page clearing, no fault).
    pub copied: u64,
    /// Bytes written the ordinary way into pages that already existed (sent again).
    pub rewritten: u64,
    /// Why the copies were not used (`None`: they were, or no `Config` yet).
    pub refused: Option<String>,
}

impl VmDestination {
    /// Refuse every frame once `abort` is set (see [`receive_vm`]).
    pub fn with_abort(mut self, abort: Arc<AtomicBool>) -> Self {
        self.abort = Some(abort);
        self
    }

    /// An error when this VMM is stopping: nothing more is taken, the VM never runs here.
    fn check_abort(&self) -> Result<(), String> {
        match &self.abort {
            Some(a) if a.load(Ordering::SeqCst) => Err(ABORTED.into()),
            _ => Ok(()),
        }
    }
}

/// What the source is told when the destination stops before the VM runs there.
pub const ABORTED: &str = "the destination VMM is shutting down (vmm.shutdown or a signal): \
                           the migration is abandoned before the hand-over, and the source \
                           keeps its VM";

impl Destination for VmDestination {
    fn config(&mut self, json: &[u8]) -> Result<Vec<RamRange>, String> {
        self.check_abort()?;
        let (mut config, tsc_khz) = decode_config_frame(json)?;
        if let Some(s) = &self.serial {
            config.serial = s.clone();
        }
        let incoming =
            Vm::prepare_incoming(self.hv.clone(), config, tsc_khz).map_err(|e| chain(&e))?;
        let ranges: Vec<RamRange> = incoming
            .ram_regions()
            .into_iter()
            .map(|(gpa, len)| RamRange { gpa, len })
            .collect();
        let mem = incoming.memory();
        self.written = Vec::with_capacity(ranges.len());
        for (range, region) in ranges.iter().zip(mem.iter()) {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| format!("guest RAM at {:#x}: {e}", range.gpa))?;
            self.written.push(Written {
                range: *range,
                host: host as usize,
                bits: vec![0u64; (range.len / PAGE_SIZE).div_ceil(64) as usize],
            });
        }
        let host: Vec<(usize, usize)> = self
            .written
            .iter()
            .map(|w| (w.host, w.range.len as usize))
            .collect();
        match crate::fresh_ram::register_anonymous(&host) {
            Ok(f) => self.fresh = Some(f),
            Err(why) => {
                info!("migration: guest RAM filled by ordinary writes: {why}");
                self.fill.refused = Some(why);
            }
        }
        self.tsc_khz = tsc_khz;
        self.incoming = Some(incoming);
        Ok(ranges)
    }

    fn memory(&mut self, gpa: u64, len: u64, data: RunData<'_>) -> Result<(), String> {
        self.check_abort()?;
        let t = Instant::now();
        let inc = self
            .incoming
            .as_ref()
            .ok_or("memory before the VM was configured")?;
        let mem: &GuestMemoryMmap = inc.memory();
        let Written { range, host, bits } = self
            .written
            .iter_mut()
            .find(|w| w.range.contains(gpa, len))
            .ok_or_else(|| format!("{gpa:#x}+{len:#x} is not guest RAM"))?;
        let first = ((gpa - range.gpa) / PAGE_SIZE) as usize;
        let pages = (len / PAGE_SIZE) as usize;
        let r = match data {
            RunData::Bytes(b) => {
                for p in first..first + pages {
                    bits[p / 64] |= 1 << (p % 64);
                }
                match self.fresh.as_mut() {
                    // SAFETY: `[gpa, gpa + len)` lies inside this RAM range (checked above),
                    // whose host mapping `incoming` owns; nothing else runs on it yet.
                    Some(f) => unsafe { f.write(*host + (gpa - range.gpa) as usize, b) }
                        .map_err(|e| format!("userfaultfd copy: {e}")),
                    None => mem
                        .write_slice(b, GuestAddress(gpa))
                        .map_err(|e| e.to_string()),
                }
            }
            RunData::Zero => {
                let mut r = Ok(());
                for p in first..first + pages {
                    if bits[p / 64] & (1 << (p % 64)) != 0 {
                        bits[p / 64] &= !(1 << (p % 64));
                        r = zero(mem, range.gpa + p as u64 * PAGE_SIZE, PAGE_SIZE);
                        if r.is_err() {
                            break;
                        }
                    }
                }
                r
            }
        };
        self.memory_time += t.elapsed();
        r.map_err(|e| format!("write guest memory at {gpa:#x}+{len:#x}: {e}"))
    }

    fn state(&mut self, json: &[u8]) -> Result<(), String> {
        // From here on the kernel (KVM) and the vCPUs touch guest RAM: the registration ends
        // before any of them can meet a missing page (see crate::fresh_ram).
        self.memory_received();
        let inc = self
            .incoming
            .take()
            .ok_or("state before the VM was configured")?;
        let state = crate::snapshot::decode_state(json, inc.config()).map_err(|e| e.to_string())?;
        if state.tsc.tsc_khz() != self.tsc_khz {
            return Err(format!(
                "tsc.tsc_khz: {} kHz but the Config frame announced {} kHz",
                state.tsc.tsc_khz(),
                self.tsc_khz
            ));
        }
        let vm = Vm::finish_incoming(
            inc,
            &state,
            ThawOrigin::Migration,
            self.policy,
            self.events.clone(),
        )
        .map_err(|e| chain(&e))?;
        self.vm = Some(vm);
        Ok(())
    }

    fn complete(&mut self) -> Result<(), String> {
        // The last moment to refuse: past this the VM runs here and the source stops.
        self.check_abort()?;
        let vm = self.vm.as_mut().ok_or("complete before the state")?;
        let report = vm.resume(None).map_err(|e| chain(&e))?;
        info!(
            "migration: VM running here; clock policy {} applied as {:?}, {} ns elapsed",
            report.policy_requested, report.policy_applied, report.elapsed_ns
        );
        Ok(())
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        s.push_str(": ");
        s.push_str(&c.to_string());
        next = c.source();
    }
    s
}

/// One RAM range of the destination: where it is mapped, and which pages hold content.
struct Written {
    range: RamRange,
    /// Host address of the range's first byte.
    host: usize,
    /// One bit per page written with content so far.
    bits: Vec<u64>,
}

fn zero(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<(), String> {
    static ZERO: [u8; 4096] = [0; 4096];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(ZERO.len() as u64);
        mem.write_slice(&ZERO[..n as usize], GuestAddress(gpa + at))
            .map_err(|e| e.to_string())?;
        at += n;
    }
    Ok(())
}

/// What [`receive_vm`] did.
#[derive(Debug)]
pub struct ReceiveReport {
    /// Memory frames received.
    pub memory_frames: u64,
    /// Pages received with content.
    pub data_pages: u64,
    /// Pages received as zero.
    pub zero_pages: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Accept to `Complete` acknowledged.
    pub total: Duration,
}

/// Listen on `ep`, receive one migration and return the VM, running. On any failure the
/// partial VM is discarded and the source has been told why. Once `abort` is set (the VMM is
/// asked to stop) the wait for the source ends, and any frame before the VM runs here is
/// refused: the source is told and keeps its VM; a VM already running here is returned.
pub fn receive_vm(
    ep: &Endpoint,
    hv: Arc<dyn Hypervisor>,
    serial: Option<devices::SerialOutput>,
    events: Sender<VmEvent>,
    policy: Option<ClockPolicy>,
    abort: Arc<AtomicBool>,
) -> Result<(Vm, ReceiveReport), MigrationError> {
    let listener = Listener::bind(ep).map_err(|source| MigrationError::Listen {
        endpoint: ep.to_string(),
        source,
    })?;
    info!("migration: waiting for the source on {ep}");
    let stream = listener
        .accept_until(&abort)
        .map_err(|source| MigrationError::Listen {
            endpoint: ep.to_string(),
            source,
        })?;
    drop(listener);
    let t0 = Instant::now();
    let io = |source| {
        MigrationError::Protocol(ProtocolError::Io {
            what: "set up the migration socket",
            source,
        })
    };
    stream.set_read_timeout(Some(FRAME_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(FRAME_TIMEOUT)).map_err(io)?;
    let mut reader = FrameReader::new(stream.try_clone().map_err(io)?);
    let mut writer = FrameWriter::new(stream);
    let mut rx = Receiver::new(VmDestination::new(hv, serial, events, policy).with_abort(abort));
    let r = receive_reading_ahead(&mut reader, &mut writer, &mut rx);
    let report = ReceiveReport {
        memory_frames: rx.memory_frames,
        data_pages: rx.data_pages,
        zero_pages: rx.zero_pages,
        bytes: reader.bytes(),
        total: t0.elapsed(),
    };
    if let Err(e) = r {
        warn!("migration: receive failed: {e}; the partial VM is discarded");
        // Dropping the destination drops the parked VM (its vCPU threads stop) and its RAM.
        drop(rx);
        return Err(MigrationError::from(e).silent_peer("source", FRAME_TIMEOUT));
    }
    let vm = rx.destination_mut().take_vm().ok_or_else(|| {
        MigrationError::InvalidState("the migration completed without a VM".into())
    })?;
    info!(
        "migration: received {} MiB ({} data pages, {} zero pages) in {:?}",
        report.bytes >> 20,
        report.data_pages,
        report.zero_pages,
        report.total
    );
    Ok((vm, report))
}
