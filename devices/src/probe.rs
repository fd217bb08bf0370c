//! The time-probe device: how the in-repo test guest (crate `guest`) reports
//! what it saw of the TSC and kvmclock.
//!
//! Port I/O at [`PROBE_BASE`]..+[`PROBE_PORT_COUNT`], all registers 32 bits:
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0x0 | read | ID, [`PROBE_MAGIC`] (no device: all-ones, the guest then runs alone) |
//! | 0x4 | read | number of vCPUs |
//! | 0x8 | read | MiB of RAM the guest dirties from `guest::DIRTY_BASE` (0 = none) |
//! | 0xc | read | guest TSC kHz (0 = unknown; the guest prefers CPUID 0x40000010) |
//! | 0x10 | write | doorbell: guest-physical address of the vCPU's record |
//! | 0x14 | read | idle mode: µs each vCPU halts between samples (0 = busy loop); [`TimeProbe::set_idle_us`] |
//! | 0x18 | read | passes the guest makes over its dirtied MiB, then stops writing (0 = forever); [`TimeProbe::set_dirty_passes`] |
//!
//! A record is [`RECORD_WORDS`] little-endian `u64`s (layout: the `REC_*`
//! constants of the `guest` crate). On a doorbell the device copies the
//! record out of guest memory, checks its magic and vCPU index, and writes a
//! command back into words [`REC_CMD`].. of the same record: HALT once
//! [`TimeProbe::request_stop`] was called, else the oldest command queued for
//! that vCPU ([`TimeProbe::request_tsc_adjust`],
//! [`TimeProbe::request_simulated_skew`]), one per doorbell. Bad addresses or records are counted and otherwise ignored;
//! nothing the guest writes can make the device panic. The guest rings at
//! most every `guest::REPORT_INTERVAL_US` per vCPU.

use std::sync::{Mutex, MutexGuard};

use guest::{
    CMD_HALT, CMD_SET_TSC_ADJUST, CMD_SIMULATE_SKEW, FLAG_HALTING, MAX_VCPUS, PROBE_REG_DIRTY_MIB,
    PROBE_REG_DIRTY_PASSES, PROBE_REG_DOORBELL, PROBE_REG_ID, PROBE_REG_IDLE_US, PROBE_REG_TSC_KHZ,
    PROBE_REG_VCPUS, RECORD_BYTES, RECORD_MAGIC, RECORD_WORDS, REC_ADJUST_WRITES, REC_CMD,
    REC_CROSS_VCPU, REC_CROSS_VCPU_WORST, REC_DIRTY_PASSES, REC_FLAGS, REC_KVMCLOCK_MISMATCH,
    REC_KVMCLOCK_MISMATCH_WORST_NS, REC_LAST_KVMCLOCK_NS, REC_LAST_TSC, REC_LAST_TSC_ADJUST,
    REC_MAGIC, REC_MAX_JUMP_NS, REC_SAMPLES, REC_SEQ, REC_SIM_SKEW, REC_TSC_BACKWARDS,
    REC_TSC_BACKWARDS_WORST, REC_TSC_BIAS, REC_TSC_KHZ, REC_VCPU,
};
pub use guest::{PROBE_BASE, PROBE_MAGIC, PROBE_PORT_COUNT};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Version of [`ProbeState`].
pub const PROBE_STATE_VERSION: u32 = 1;

/// Errors of the probe's host-side API.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProbeError {
    /// A vCPU index at or above the probe's vCPU count.
    #[error("vCPU {vcpu} out of range (the probe has {vcpus} vCPUs)")]
    NoSuchVcpu {
        /// The index asked for.
        vcpu: u32,
        /// The probe's vCPU count.
        vcpus: u32,
    },
    /// A saved state that cannot be restored.
    #[error("invalid time-probe state: {0}")]
    BadState(String),
}

/// A command for one vCPU, delivered through its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeCommand {
    /// WRMSR IA32_TSC_ADJUST := value.
    SetTscAdjust(u64),
    /// Self-test: subtract this many cycles from every later TSC read.
    SimulateSkew(u64),
}

impl ProbeCommand {
    fn encode(self) -> (u64, u64) {
        match self {
            ProbeCommand::SetTscAdjust(v) => (CMD_SET_TSC_ADJUST, v),
            ProbeCommand::SimulateSkew(v) => (CMD_SIMULATE_SKEW, v),
        }
    }
}

/// The latest record one vCPU reported, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuReport {
    /// vCPU index.
    pub vcpu: u32,
    /// Accepted doorbells from this vCPU.
    pub reports: u64,
    /// The guest's report sequence number.
    pub seq: u64,
    /// Samples taken.
    pub samples: u64,
    /// TSC of the latest sample.
    pub last_tsc: u64,
    /// kvmclock (ns) of the latest sample; 0 without kvmclock.
    pub last_kvmclock_ns: u64,
    /// IA32_TSC_ADJUST of the latest sample.
    pub last_tsc_adjust: u64,
    /// TSC-backwards steps on this vCPU.
    pub tsc_backwards: u64,
    /// Largest backwards step (cycles).
    pub tsc_backwards_worst: u64,
    /// Cross-vCPU order violations.
    pub cross_vcpu: u64,
    /// Largest cross-vCPU violation (cycles).
    pub cross_vcpu_worst: u64,
    /// kvmclock/TSC disagreements above the bound.
    pub kvmclock_mismatch: u64,
    /// Largest kvmclock/TSC disagreement (ns).
    pub kvmclock_mismatch_worst_ns: u64,
    /// Largest forward TSC step between two samples (ns).
    pub max_jump_ns: u64,
    /// `guest::FLAG_*` bits.
    pub flags: u64,
    /// The TSC kHz the guest uses.
    pub tsc_khz: u64,
    /// Completed passes over the dirtied region.
    pub dirty_passes: u64,
    /// TSC_ADJUST writes the guest made on request.
    pub adjust_writes: u64,
    /// Sum of the guest's TSC_ADJUST deltas that moved its TSC.
    pub tsc_bias: u64,
    /// Self-test skew the guest subtracts from its TSC reads (0 normally).
    pub simulated_skew: u64,
    /// The vCPU reported that it halts.
    pub halted: bool,
}

impl VcpuReport {
    fn from_words(w: &[u64; RECORD_WORDS], reports: u64) -> Self {
        let flags = w[REC_FLAGS];
        VcpuReport {
            vcpu: w[REC_VCPU] as u32,
            reports,
            seq: w[REC_SEQ],
            samples: w[REC_SAMPLES],
            last_tsc: w[REC_LAST_TSC],
            last_kvmclock_ns: w[REC_LAST_KVMCLOCK_NS],
            last_tsc_adjust: w[REC_LAST_TSC_ADJUST],
            tsc_backwards: w[REC_TSC_BACKWARDS],
            tsc_backwards_worst: w[REC_TSC_BACKWARDS_WORST],
            cross_vcpu: w[REC_CROSS_VCPU],
            cross_vcpu_worst: w[REC_CROSS_VCPU_WORST],
            kvmclock_mismatch: w[REC_KVMCLOCK_MISMATCH],
            kvmclock_mismatch_worst_ns: w[REC_KVMCLOCK_MISMATCH_WORST_NS],
            max_jump_ns: w[REC_MAX_JUMP_NS],
            flags,
            tsc_khz: w[REC_TSC_KHZ],
            dirty_passes: w[REC_DIRTY_PASSES],
            adjust_writes: w[REC_ADJUST_WRITES],
            tsc_bias: w[REC_TSC_BIAS],
            simulated_skew: w[REC_SIM_SKEW],
            halted: flags & FLAG_HALTING != 0,
        }
    }
}

/// Sums and worst values over all vCPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeTotals {
    /// Samples over all vCPUs.
    pub samples: u64,
    /// Fewest samples of any vCPU (0 until every vCPU reported).
    pub min_samples: u64,
    /// vCPUs that reported at least once.
    pub vcpus_reporting: u32,
    /// TSC-backwards steps.
    pub tsc_backwards: u64,
    /// Largest backwards step (cycles).
    pub tsc_backwards_worst: u64,
    /// Cross-vCPU order violations.
    pub cross_vcpu: u64,
    /// Largest cross-vCPU violation (cycles).
    pub cross_vcpu_worst: u64,
    /// kvmclock/TSC disagreements.
    pub kvmclock_mismatch: u64,
    /// Largest kvmclock/TSC disagreement (ns).
    pub kvmclock_mismatch_worst_ns: u64,
    /// Largest forward TSC step (ns).
    pub max_jump_ns: u64,
    /// Every vCPU reported that it halts.
    pub all_halted: bool,
}

impl ProbeTotals {
    /// Total violations of all three kinds.
    pub fn violations(&self) -> u64 {
        self.tsc_backwards + self.cross_vcpu + self.kvmclock_mismatch
    }
}

/// What the probe knows, for tests and `vm.info`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Per vCPU, indexed by vCPU; `reports == 0` where a vCPU never reported.
    pub vcpus: Vec<VcpuReport>,
    /// Sums and worst values.
    pub totals: ProbeTotals,
    /// Doorbells rung, good or bad.
    pub doorbells: u64,
    /// Doorbells ignored (bad address, magic or vCPU index).
    pub bad_doorbells: u64,
    /// Why the latest bad doorbell was ignored.
    pub last_error: Option<String>,
}

/// The probe's complete state, for snapshots and migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeState {
    /// [`PROBE_STATE_VERSION`].
    pub version: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// MiB the guest dirties.
    pub dirty_mib: u32,
    /// Guest TSC kHz offered in the register.
    pub tsc_khz: u32,
    /// Idle mode offered in the register: µs halted between samples (0 = busy loop). Absent
    /// from states saved before idle mode existed (then 0).
    #[serde(default)]
    pub idle_us: u32,
    /// Passes over the dirtied MiB offered in the register (0 = forever). Absent from states
    /// saved before the register existed (then 0).
    #[serde(default)]
    pub dirty_passes: u32,
    /// Latest record per vCPU.
    pub records: Vec<VcpuReport>,
    /// Commands not yet delivered, per vCPU, oldest first.
    pub pending: Vec<Vec<ProbeCommand>>,
    /// HALT requested.
    pub stop: bool,
    /// Last command sequence number handed out.
    pub cmd_seq: u64,
    /// Doorbells rung.
    pub doorbells: u64,
    /// Doorbells ignored.
    pub bad_doorbells: u64,
    /// Why the latest bad doorbell was ignored.
    pub last_error: Option<String>,
}

/// The time-probe device. `Send + Sync`; every method takes `&self`.
#[derive(Debug)]
pub struct TimeProbe {
    state: Mutex<ProbeState>,
}

impl TimeProbe {
    /// A probe for `vcpus` vCPUs (clamped to `1..=guest::MAX_VCPUS`), asking
    /// the guest to dirty `dirty_mib` MiB and offering `tsc_khz` (0 = unknown).
    /// The VM needs at least `guest::min_ram_bytes(dirty_mib)` of RAM from
    /// guest-physical 0.
    pub fn new(vcpus: u32, dirty_mib: u32, tsc_khz: u32) -> Self {
        let vcpus = vcpus.clamp(1, MAX_VCPUS);
        let n = vcpus as usize;
        TimeProbe {
            state: Mutex::new(ProbeState {
                version: PROBE_STATE_VERSION,
                vcpus,
                dirty_mib,
                tsc_khz,
                idle_us: 0,
                dirty_passes: 0,
                records: (0..vcpus)
                    .map(|vcpu| VcpuReport {
                        vcpu,
                        ..Default::default()
                    })
                    .collect(),
                pending: vec![Vec::new(); n],
                stop: false,
                cmd_seq: 0,
                doorbells: 0,
                bad_doorbells: 0,
                last_error: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProbeState> {
        // A panic while holding the lock cannot leave the plain-data state
        // half-updated in a way that matters; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn offset(port: u16) -> Option<u16> {
        port.checked_sub(PROBE_BASE)
            .filter(|off| *off < PROBE_PORT_COUNT)
    }

    /// Handles a port read; returns false when `port` is not the probe's.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        let Some(off) = Self::offset(port) else {
            return false;
        };
        let st = self.lock();
        let value: u32 = match off & !3 {
            PROBE_REG_ID => PROBE_MAGIC,
            PROBE_REG_VCPUS => st.vcpus,
            PROBE_REG_DIRTY_MIB => st.dirty_mib,
            PROBE_REG_TSC_KHZ => st.tsc_khz,
            PROBE_REG_DOORBELL => 0,
            PROBE_REG_IDLE_US => st.idle_us,
            PROBE_REG_DIRTY_PASSES => st.dirty_passes,
            _ => u32::MAX,
        };
        let bytes = value.to_le_bytes();
        let start = usize::from(off & 3);
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(start + i).copied().unwrap_or(0xff);
        }
        true
    }

    /// Handles a port write; returns false when `port` is not the probe's.
    /// A doorbell reads the record from `mem` and may write a command back.
    pub fn pio_write<M: GuestMemory>(&self, port: u16, data: &[u8], mem: &M) -> bool {
        let Some(off) = Self::offset(port) else {
            return false;
        };
        if off != PROBE_REG_DOORBELL {
            return true; // read-only registers: writes are ignored
        }
        let mut st = self.lock();
        st.doorbells += 1;
        if let Err(e) = Self::doorbell(&mut st, data, mem) {
            st.bad_doorbells += 1;
            log::debug!("time probe: ignored doorbell: {e}");
            st.last_error = Some(e);
        }
        true
    }

    fn doorbell<M: GuestMemory>(st: &mut ProbeState, data: &[u8], mem: &M) -> Result<(), String> {
        let raw: [u8; 4] = data
            .try_into()
            .map_err(|_| format!("doorbell write of {} bytes, expected 4", data.len()))?;
        let gpa = u64::from(u32::from_le_bytes(raw));
        let mut buf = [0u8; RECORD_BYTES];
        mem.read_slice(&mut buf, GuestAddress(gpa))
            .map_err(|e| format!("record at {gpa:#x} unreadable: {e}"))?;
        let mut words = [0u64; RECORD_WORDS];
        for (w, c) in words.iter_mut().zip(buf.chunks_exact(8)) {
            *w = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        }
        if words[REC_MAGIC] != RECORD_MAGIC {
            return Err(format!(
                "record at {gpa:#x}: bad magic {:#x}",
                words[REC_MAGIC]
            ));
        }
        let vcpu = words[REC_VCPU];
        let slot = usize::try_from(vcpu)
            .ok()
            .filter(|v| *v < st.records.len())
            .ok_or_else(|| format!("record at {gpa:#x}: vCPU {vcpu} out of range"))?;
        let reports = st.records[slot].reports + 1;
        st.records[slot] = VcpuReport::from_words(&words, reports);

        let (cmd, arg) = if st.stop {
            (CMD_HALT, 0)
        } else if let Some(c) = st.pending[slot].first() {
            c.encode()
        } else {
            return Ok(());
        };
        let seq = st.cmd_seq + 1;
        let mut reply = [0u8; 24];
        reply[0..8].copy_from_slice(&cmd.to_le_bytes());
        reply[8..16].copy_from_slice(&arg.to_le_bytes());
        reply[16..24].copy_from_slice(&seq.to_le_bytes());
        let at = GuestAddress(gpa + (REC_CMD * 8) as u64);
        mem.write_slice(&reply, at)
            .map_err(|e| format!("record at {gpa:#x}: command not writable: {e}"))?;
        st.cmd_seq = seq;
        if cmd != CMD_HALT {
            st.pending[slot].remove(0);
        }
        Ok(())
    }

    /// Everything reported so far, with totals.
    pub fn report(&self) -> ProbeReport {
        let st = self.lock();
        let reporting: Vec<&VcpuReport> = st.records.iter().filter(|r| r.reports > 0).collect();
        let max = |f: fn(&VcpuReport) -> u64| st.records.iter().map(f).max().unwrap_or(0);
        let sum = |f: fn(&VcpuReport) -> u64| st.records.iter().map(f).sum::<u64>();
        let totals = ProbeTotals {
            samples: sum(|r| r.samples),
            min_samples: if reporting.len() == st.records.len() {
                st.records.iter().map(|r| r.samples).min().unwrap_or(0)
            } else {
                0
            },
            vcpus_reporting: reporting.len() as u32,
            tsc_backwards: sum(|r| r.tsc_backwards),
            tsc_backwards_worst: max(|r| r.tsc_backwards_worst),
            cross_vcpu: sum(|r| r.cross_vcpu),
            cross_vcpu_worst: max(|r| r.cross_vcpu_worst),
            kvmclock_mismatch: sum(|r| r.kvmclock_mismatch),
            kvmclock_mismatch_worst_ns: max(|r| r.kvmclock_mismatch_worst_ns),
            max_jump_ns: max(|r| r.max_jump_ns),
            all_halted: st.records.iter().all(|r| r.halted),
        };
        ProbeReport {
            vcpus: st.records.clone(),
            totals,
            doorbells: st.doorbells,
            bad_doorbells: st.bad_doorbells,
            last_error: st.last_error.clone(),
        }
    }

    /// Queues `command` for vCPU `vcpu`; it is delivered at one of the
    /// vCPU's next reports (one command per report, every
    /// `guest::REPORT_INTERVAL_US` of running).
    pub fn request(&self, vcpu: u32, command: ProbeCommand) -> Result<(), ProbeError> {
        let mut st = self.lock();
        let vcpus = st.vcpus;
        st.pending
            .get_mut(vcpu as usize)
            .ok_or(ProbeError::NoSuchVcpu { vcpu, vcpus })?
            .push(command);
        Ok(())
    }

    /// Asks vCPU `vcpu` to WRMSR IA32_TSC_ADJUST := `value`.
    pub fn request_tsc_adjust(&self, vcpu: u32, value: u64) -> Result<(), ProbeError> {
        self.request(vcpu, ProbeCommand::SetTscAdjust(value))
    }

    /// Self-test: asks vCPU `vcpu` to subtract `cycles` from every later TSC
    /// read, so that its checks must report a backwards step and cross-vCPU
    /// violations.
    pub fn request_simulated_skew(&self, vcpu: u32, cycles: u64) -> Result<(), ProbeError> {
        self.request(vcpu, ProbeCommand::SimulateSkew(cycles))
    }

    /// Asks every vCPU to stop sampling and halt (`cli; hlt`) at its next
    /// report. Without an in-kernel LAPIC each vCPU then exits to the VMM
    /// with `KVM_EXIT_HLT`; with one, it sleeps in `KVM_RUN` until the VMM
    /// kicks it (signal + `immediate_exit`). [`ProbeTotals::all_halted`]
    /// tells when every vCPU has acknowledged.
    pub fn request_stop(&self) {
        self.lock().stop = true;
    }

    /// Idle mode: from now on the guest halts `us` microseconds between samples on every vCPU
    /// (0: busy sampling loop, the default). The guest reads the register at boot and at each
    /// report, so a change reaches a running guest within `guest::REPORT_INTERVAL_US` of its
    /// time (plus one idle period); it clamps values above `guest::IDLE_MAX_US`.
    pub fn set_idle_us(&self, us: u32) {
        self.lock().idle_us = us;
    }

    /// The idle mode offered to the guest ([`Self::set_idle_us`]).
    pub fn idle_us(&self) -> u32 {
        self.lock().idle_us
    }

    /// How many passes the guest makes over the MiB it dirties before it stops writing them
    /// (0: it dirties them forever, the default). The guest reads the register once, at boot,
    /// so set it before the guest runs.
    pub fn set_dirty_passes(&self, passes: u32) {
        self.lock().dirty_passes = passes;
    }

    /// The passes offered to the guest ([`Self::set_dirty_passes`]).
    pub fn dirty_passes(&self) -> u32 {
        self.lock().dirty_passes
    }

    /// The complete state, for a snapshot.
    pub fn state(&self) -> ProbeState {
        self.lock().clone()
    }

    /// A probe from a saved state; the state is checked first.
    pub fn restore(state: ProbeState) -> Result<Self, ProbeError> {
        if state.version != PROBE_STATE_VERSION {
            return Err(ProbeError::BadState(format!(
                "version {} (expected {PROBE_STATE_VERSION})",
                state.version
            )));
        }
        if state.vcpus == 0 || state.vcpus > MAX_VCPUS {
            return Err(ProbeError::BadState(format!(
                "vcpus {} not in 1..={MAX_VCPUS}",
                state.vcpus
            )));
        }
        let n = state.vcpus as usize;
        if state.records.len() != n || state.pending.len() != n {
            return Err(ProbeError::BadState(format!(
                "{} records and {} pending queues for {n} vCPUs",
                state.records.len(),
                state.pending.len()
            )));
        }
        Ok(TimeProbe {
            state: Mutex::new(state),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest::CMD_NONE;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory")
    }

    fn read32(p: &TimeProbe, reg: u16) -> u32 {
        let mut b = [0u8; 4];
        assert!(p.pio_read(PROBE_BASE + reg, &mut b));
        u32::from_le_bytes(b)
    }

    fn record(vcpu: u64, samples: u64) -> [u64; RECORD_WORDS] {
        let mut w = [0u64; RECORD_WORDS];
        w[REC_MAGIC] = RECORD_MAGIC;
        w[REC_VCPU] = vcpu;
        w[REC_SEQ] = 7;
        w[REC_SAMPLES] = samples;
        w[REC_LAST_TSC] = 123_456_789;
        w[REC_LAST_KVMCLOCK_NS] = 55_000;
        w[REC_LAST_TSC_ADJUST] = 9;
        w[REC_CROSS_VCPU] = 2;
        w[REC_CROSS_VCPU_WORST] = 40;
        w[REC_MAX_JUMP_NS] = 1_000_000;
        w
    }

    fn put(m: &GuestMemoryMmap, gpa: u64, w: &[u64]) {
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        m.write_slice(&bytes, GuestAddress(gpa)).expect("write");
    }

    fn ring(p: &TimeProbe, m: &GuestMemoryMmap, gpa: u32) {
        assert!(p.pio_write(PROBE_BASE + PROBE_REG_DOORBELL, &gpa.to_le_bytes(), m));
    }

    fn word(m: &GuestMemoryMmap, gpa: u64, idx: usize) -> u64 {
        m.read_obj::<u64>(GuestAddress(gpa + idx as u64 * 8))
            .expect("read")
    }

    #[test]
    fn registers() {
        let p = TimeProbe::new(3, 16, 2_445_404);
        assert_eq!(read32(&p, PROBE_REG_ID), 0x3150_4748);
        assert_eq!(read32(&p, PROBE_REG_VCPUS), 3);
        assert_eq!(read32(&p, PROBE_REG_DIRTY_MIB), 16);
        assert_eq!(read32(&p, PROBE_REG_TSC_KHZ), 2_445_404);
        assert_eq!(read32(&p, PROBE_REG_IDLE_US), 0, "busy loop by default");
        p.set_idle_us(1000);
        assert_eq!(read32(&p, PROBE_REG_IDLE_US), 1000);
        assert_eq!(p.idle_us(), 1000);
        // The guest cannot change it.
        assert!(p.pio_write(PROBE_BASE + PROBE_REG_IDLE_US, &7u32.to_le_bytes(), &mem()));
        assert_eq!(read32(&p, PROBE_REG_IDLE_US), 1000);
        assert_eq!(
            read32(&p, PROBE_REG_DIRTY_PASSES),
            0,
            "dirty forever by default"
        );
        p.set_dirty_passes(3);
        assert_eq!(read32(&p, PROBE_REG_DIRTY_PASSES), 3);
        assert_eq!(p.dirty_passes(), 3);
        assert!(p.pio_write(
            PROBE_BASE + PROBE_REG_DIRTY_PASSES,
            &9u32.to_le_bytes(),
            &mem()
        ));
        assert_eq!(read32(&p, PROBE_REG_DIRTY_PASSES), 3);
        // The last register is inside the decoded range.
        let mut w = [0u8; 4];
        assert!(p.pio_read(PROBE_BASE + PROBE_PORT_COUNT - 4, &mut w));
        assert_eq!(u32::from_le_bytes(w), 3);
        // A one-byte read of the ID's second byte.
        let mut b = [0u8; 1];
        assert!(p.pio_read(PROBE_BASE + 1, &mut b));
        assert_eq!(b[0], 0x47);
        // Not our ports.
        assert!(!p.pio_read(PROBE_BASE - 1, &mut b));
        assert!(!p.pio_read(PROBE_BASE + PROBE_PORT_COUNT, &mut b));
        assert!(!p.pio_write(0x3f8, &[0], &mem()));
        // Writes to read-only registers change nothing.
        assert!(p.pio_write(PROBE_BASE + PROBE_REG_VCPUS, &9u32.to_le_bytes(), &mem()));
        assert_eq!(read32(&p, PROBE_REG_VCPUS), 3);
        assert_eq!(p.report().doorbells, 0);
    }

    #[test]
    fn doorbell_copies_the_record() {
        let m = mem();
        let p = TimeProbe::new(2, 0, 0);
        put(&m, 0x1000, &record(1, 500));
        ring(&p, &m, 0x1000);
        let r = p.report();
        assert_eq!(r.doorbells, 1);
        assert_eq!(r.bad_doorbells, 0);
        let v = &r.vcpus[1];
        assert_eq!((v.vcpu, v.reports, v.seq, v.samples), (1, 1, 7, 500));
        assert_eq!(
            (v.last_tsc, v.last_kvmclock_ns, v.last_tsc_adjust),
            (123_456_789, 55_000, 9)
        );
        assert_eq!(
            (v.cross_vcpu, v.cross_vcpu_worst, v.max_jump_ns),
            (2, 40, 1_000_000)
        );
        assert_eq!(r.vcpus[0].reports, 0);
        assert_eq!(r.totals.vcpus_reporting, 1);
        assert_eq!(r.totals.min_samples, 0, "vCPU 0 has not reported");
        assert_eq!(r.totals.violations(), 2);
        put(&m, 0x2000, &record(0, 300));
        ring(&p, &m, 0x2000);
        let t = p.report().totals;
        assert_eq!((t.samples, t.min_samples, t.vcpus_reporting), (800, 300, 2));
        assert!(!t.all_halted);
        // No command pending: the command words stay as the guest left them.
        assert_eq!(word(&m, 0x1000, REC_CMD), 0);
    }

    #[test]
    fn bad_doorbells_are_ignored_and_counted() {
        let m = mem();
        let p = TimeProbe::new(2, 0, 0);
        // Outside guest memory, and straddling its end (a short record).
        ring(&p, &m, 0x20_0000);
        ring(&p, &m, 0x10000 - 16);
        // Wrong width.
        assert!(p.pio_write(PROBE_BASE + PROBE_REG_DOORBELL, &[0, 0x10], &m));
        // Bad magic, then a vCPU index out of range.
        let mut w = record(0, 1);
        w[REC_MAGIC] = 1;
        put(&m, 0x1000, &w);
        ring(&p, &m, 0x1000);
        put(&m, 0x1000, &record(2, 1));
        ring(&p, &m, 0x1000);
        put(&m, 0x1000, &record(u64::MAX, 1));
        ring(&p, &m, 0x1000);
        let r = p.report();
        assert_eq!((r.doorbells, r.bad_doorbells), (6, 6));
        assert!(r
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("out of range"));
        assert!(r.vcpus.iter().all(|v| v.reports == 0));
    }

    #[test]
    fn commands_are_written_back() {
        let m = mem();
        let p = TimeProbe::new(2, 0, 0);
        assert_eq!(
            p.request_tsc_adjust(2, 5),
            Err(ProbeError::NoSuchVcpu { vcpu: 2, vcpus: 2 })
        );
        p.request_tsc_adjust(1, 1 << 36).expect("vCPU 1 exists");
        // vCPU 0's doorbell does not take vCPU 1's request.
        put(&m, 0x1000, &record(0, 1));
        ring(&p, &m, 0x1000);
        assert_eq!(word(&m, 0x1000, REC_CMD), CMD_NONE);
        put(&m, 0x2000, &record(1, 1));
        ring(&p, &m, 0x2000);
        assert_eq!(word(&m, 0x2000, REC_CMD), CMD_SET_TSC_ADJUST);
        assert_eq!(word(&m, 0x2000, REC_CMD + 1), 1 << 36);
        assert_eq!(word(&m, 0x2000, REC_CMD + 2), 1);
        // Delivered once.
        put(&m, 0x2000, &record(1, 2));
        ring(&p, &m, 0x2000);
        assert_eq!(word(&m, 0x2000, REC_CMD), CMD_NONE);
        // Queued commands go out in order, one per doorbell.
        p.request_simulated_skew(1, 1000).expect("vCPU 1");
        p.request_tsc_adjust(1, 3).expect("vCPU 1");
        put(&m, 0x2000, &record(1, 3));
        ring(&p, &m, 0x2000);
        assert_eq!(word(&m, 0x2000, REC_CMD), CMD_SIMULATE_SKEW);
        assert_eq!(word(&m, 0x2000, REC_CMD + 1), 1000);
        put(&m, 0x2000, &record(1, 4));
        ring(&p, &m, 0x2000);
        assert_eq!(word(&m, 0x2000, REC_CMD), CMD_SET_TSC_ADJUST);
        assert_eq!(word(&m, 0x2000, REC_CMD + 1), 3);
        assert_eq!(word(&m, 0x2000, REC_CMD + 2), 3);
        // Stop: HALT to everyone; a halting record marks the vCPU halted.
        p.request_stop();
        ring(&p, &m, 0x1000);
        assert_eq!(word(&m, 0x1000, REC_CMD), CMD_HALT);
        assert_eq!(word(&m, 0x1000, REC_CMD + 2), 4);
        let mut w = record(0, 3);
        w[REC_FLAGS] = FLAG_HALTING;
        put(&m, 0x1000, &w);
        ring(&p, &m, 0x1000);
        let r = p.report();
        assert!(r.vcpus[0].halted && !r.vcpus[1].halted);
        assert!(!r.totals.all_halted);
    }

    #[test]
    fn state_round_trips_and_bad_states_are_refused() {
        let m = mem();
        let p = TimeProbe::new(2, 4, 1000);
        put(&m, 0x1000, &record(0, 10));
        ring(&p, &m, 0x1000);
        p.request_tsc_adjust(1, 77).expect("vCPU 1");
        p.set_idle_us(250);
        p.set_dirty_passes(2);
        let st = p.state();
        let json = serde_json::to_string(&st).expect("serialize");
        let back: ProbeState = serde_json::from_str(&json).expect("deserialize");
        let q = TimeProbe::restore(back).expect("restore");
        assert_eq!(q.report(), p.report());
        assert_eq!(read32(&q, PROBE_REG_DIRTY_MIB), 4);
        assert_eq!(read32(&q, PROBE_REG_IDLE_US), 250, "idle mode survived");
        assert_eq!(
            read32(&q, PROBE_REG_DIRTY_PASSES),
            2,
            "dirty passes survived"
        );
        // A state saved before idle mode existed has no idle_us: busy loop; one saved before
        // the passes register existed has no dirty_passes: dirty forever.
        let mut old: serde_json::Value = serde_json::from_str(&json).expect("json");
        let o = old.as_object_mut().expect("object");
        o.remove("idle_us");
        o.remove("dirty_passes");
        let old: ProbeState = serde_json::from_value(old).expect("old state");
        assert_eq!((old.idle_us, old.dirty_passes), (0, 0));
        put(&m, 0x2000, &record(1, 1));
        ring(&q, &m, 0x2000);
        assert_eq!(
            word(&m, 0x2000, REC_CMD + 1),
            77,
            "pending request survived"
        );

        let mut bad = p.state();
        bad.records.pop();
        assert!(matches!(
            TimeProbe::restore(bad),
            Err(ProbeError::BadState(_))
        ));
        let mut bad = p.state();
        bad.version = 99;
        assert!(matches!(
            TimeProbe::restore(bad),
            Err(ProbeError::BadState(_))
        ));
        let mut bad = p.state();
        bad.vcpus = 0;
        assert!(matches!(
            TimeProbe::restore(bad),
            Err(ProbeError::BadState(_))
        ));
    }
}
