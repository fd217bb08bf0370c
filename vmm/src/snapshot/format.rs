//! The files of a snapshot directory and their decoders.
//!
//! Each file is read into its plain serde form (the private `Raw…` structs here, the
//! hypervisor's [`RawTscSnapshot`] and [`RawVcpuState`]) through [`crate::decode`], then checked
//! into the validated types, so that an error names the file and the dotted path of the field
//! (`state.json: vcpus[1].msrs: ...`). Unknown fields are refused (`deny_unknown_fields`), except
//! in `config.json`, whose [`VmConfig`] ignores them.

use std::collections::BTreeMap;

use devices::probe::{ProbeState, TimeProbe};
use devices::serial::SerialDeviceState;
use hypervisor::state::{
    IrqchipState, IrqchipStateError, RawIrqchipState, RawVcpuState, VcpuState, VcpuStateError,
};
use hypervisor::tsc::{RawTscSnapshot, StateError, TscSnapshot};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::SnapshotError;
use super::{CHECKSUMS_FILE, CONFIG_FILE, MEMORY_FILE, STATE_FILE};
use crate::config::VmConfig;
use crate::decode::{self, DecodeError};

/// Version of `state.json` written by this build.
pub const STATE_VERSION: u32 = 1;
/// Version of `checksums.json` written by this build.
pub const CHECKSUMS_VERSION: u32 = 1;

/// Saved device state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceStates {
    /// COM1's registers.
    pub serial: SerialDeviceState,
    /// The time-probe device.
    pub probe: ProbeState,
}

/// Where one guest RAM region lives in `memory.bin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRegionEntry {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Byte offset in `memory.bin` (page aligned).
    pub file_offset: u64,
}

/// `state.json`'s `memory`: the layout of `memory.bin`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryLayout {
    /// Guest RAM bytes (equal to `config.json`'s `memory.size`).
    pub size: u64,
    /// The memory file's name (always `memory.bin`).
    pub file: String,
    /// The RAM regions, in guest-address order, packed back to back in the file.
    pub regions: Vec<MemoryRegionEntry>,
}

impl MemoryLayout {
    /// The layout of a guest with `size` bytes of RAM (the regions of `arch::layout`).
    pub fn for_size(size: u64) -> Result<Self, String> {
        let ranges = arch::layout::ram_regions(size).map_err(|e| e.to_string())?;
        let mut off = 0u64;
        let regions = ranges
            .iter()
            .map(|(a, len)| {
                let e = MemoryRegionEntry {
                    guest_addr: a.0,
                    size: *len as u64,
                    file_offset: off,
                };
                off += *len as u64;
                e
            })
            .collect();
        Ok(Self {
            size,
            file: MEMORY_FILE.to_string(),
            regions,
        })
    }

    /// Bytes of `memory.bin` (its logical size; holes included).
    pub fn file_len(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.file_offset + r.size)
            .max()
            .unwrap_or(0)
    }
}

/// Everything of a paused VM except its configuration and its RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmState {
    /// Guest time at the freeze (the pause's capture).
    pub tsc: TscSnapshot,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DeviceStates,
    /// The in-kernel PICs and IOAPIC (`None`: the host kept none, or a snapshot written before
    /// this field existed; the VM then starts with a reset irqchip).
    pub irqchip: Option<IrqchipState>,
}

/// `state.json` as written.
#[derive(Serialize)]
pub(crate) struct StateFile<'a> {
    pub version: u32,
    pub tsc: &'a TscSnapshot,
    pub vcpus: &'a [VcpuState],
    pub devices: &'a DeviceStates,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub irqchip: Option<&'a IrqchipState>,
    pub memory: &'a MemoryLayout,
}

impl<'a> StateFile<'a> {
    /// `state.json` for `state` with its memory at `memory`.
    pub fn new(version: u32, state: &'a VmState, memory: &'a MemoryLayout) -> Self {
        StateFile {
            version,
            tsc: &state.tsc,
            vcpus: &state.vcpus,
            devices: &state.devices,
            irqchip: state.irqchip.as_ref(),
            memory,
        }
    }
}

/// One file's entry in `checksums.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSum {
    /// Logical size in bytes.
    pub size: u64,
    /// `hg64` checksum, 16 hex digits.
    pub hg64: String,
}

/// `checksums.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Checksums {
    /// [`CHECKSUMS_VERSION`].
    pub version: u32,
    /// `hg64`.
    pub algorithm: String,
    /// Per file.
    pub files: BTreeMap<String, FileSum>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub(crate) fn invalid(
    file: &'static str,
    field: impl Into<String>,
    reason: impl ToString,
) -> SnapshotError {
    SnapshotError::Invalid {
        file,
        field: field.into(),
        reason: reason.to_string(),
    }
}

/// Parse a whole file as JSON.
pub(crate) fn parse(file: &'static str, bytes: &[u8]) -> Result<Value, SnapshotError> {
    serde_json::from_slice(bytes).map_err(|e| SnapshotError::Syntax {
        file,
        reason: e.to_string(),
    })
}

/// Decodes `file`'s plain form; an error names the file and the field.
fn read<'de, T: Deserialize<'de>>(file: &'static str, v: &'de Value) -> Result<T, SnapshotError> {
    decode::from_value(v).map_err(|e: DecodeError| {
        let field = if e.path.is_empty() {
            "(top level)".to_string()
        } else {
            e.path
        };
        invalid(file, field, e.problem)
    })
}

/// The format version, checked before anything else is decoded.
fn check_version(file: &'static str, v: &Value, supported: u32) -> Result<(), SnapshotError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u64,
    }
    let found = read::<Versioned>(file, v)?.version;
    if found != u64::from(supported) {
        return Err(SnapshotError::Version {
            file,
            found,
            supported,
        });
    }
    Ok(())
}

/// `config.json`: the VM configuration.
pub(crate) fn decode_config(bytes: &[u8]) -> Result<VmConfig, SnapshotError> {
    read(CONFIG_FILE, &parse(CONFIG_FILE, bytes)?)
}

/// `state.json` as read, before any check.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStateFile {
    #[allow(dead_code)] // Checked by `check_version` first.
    version: u32,
    tsc: RawTscSnapshot,
    vcpus: Vec<RawVcpuState>,
    devices: RawDeviceStates,
    #[serde(default)]
    irqchip: Option<RawIrqchipState>,
    memory: RawMemoryLayout,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeviceStates {
    serial: SerialDeviceState,
    probe: ProbeState,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemoryLayout {
    size: u64,
    file: String,
    regions: Vec<MemoryRegionEntry>,
}

fn vcpu_error(path: &str, e: VcpuStateError) -> SnapshotError {
    let field = match &e {
        VcpuStateError::Version(_) => "version",
        VcpuStateError::Size { field, .. } => field,
        VcpuStateError::DuplicateMsr(_) | VcpuStateError::TscMsr(_) => "msrs",
    };
    let text = e.to_string();
    let reason = text.split_once(": ").map_or(text.as_str(), |(_, r)| r);
    invalid(STATE_FILE, join(path, field), reason)
}

fn irqchip_error(e: IrqchipStateError) -> SnapshotError {
    let field = match &e {
        IrqchipStateError::Version(_) => "irqchip.version".to_string(),
        IrqchipStateError::Size { field, .. } => format!("irqchip.{field}"),
    };
    let text = e.to_string();
    let reason = text.split_once(": ").map_or(text.as_str(), |(_, r)| r);
    invalid(STATE_FILE, field, reason)
}

fn tsc_error(path: &str, e: StateError) -> SnapshotError {
    let (field, reason) = match &e {
        StateError::Json(m) => ("", m.clone()),
        StateError::Version { .. } => ("version", e.to_string()),
        StateError::Field { field, reason } => (*field, reason.clone()),
        StateError::VcpuCount { .. } => ("tsc_adjust", e.to_string()),
    };
    let reason = match reason.split_once(": ") {
        Some((head, r)) if head.starts_with("tsc_snapshot") => r.to_string(),
        _ => reason,
    };
    invalid(
        STATE_FILE,
        if field.is_empty() {
            path.to_string()
        } else {
            join(path, field)
        },
        reason,
    )
}

impl TryFrom<RawDeviceStates> for DeviceStates {
    type Error = SnapshotError;
    fn try_from(raw: RawDeviceStates) -> Result<Self, SnapshotError> {
        // The probe's own checks (version, vCPU count, queue lengths).
        TimeProbe::restore(raw.probe.clone())
            .map_err(|e| invalid(STATE_FILE, "devices.probe", e))?;
        Ok(DeviceStates {
            serial: raw.serial,
            probe: raw.probe,
        })
    }
}

impl TryFrom<RawMemoryLayout> for MemoryLayout {
    type Error = SnapshotError;
    fn try_from(raw: RawMemoryLayout) -> Result<Self, SnapshotError> {
        let err = |field: &str, reason: String| invalid(STATE_FILE, join("memory", field), reason);
        if raw.file != MEMORY_FILE {
            return Err(err(
                "file",
                format!("{:?}: this build reads only {MEMORY_FILE:?}", raw.file),
            ));
        }
        let size = raw.size;
        let expected = MemoryLayout::for_size(size).map_err(|e| err("size", e))?;
        if raw.regions != expected.regions {
            return Err(err(
                "regions",
                format!(
                    "do not match the guest memory layout for {size} bytes (expected {:?})",
                    expected.regions
                ),
            ));
        }
        Ok(expected)
    }
}

/// `state.json`, decoded and checked against the configuration.
pub(crate) fn decode_state(
    bytes: &[u8],
    config: &VmConfig,
) -> Result<(VmState, MemoryLayout), SnapshotError> {
    let v = parse(STATE_FILE, bytes)?;
    check_version(STATE_FILE, &v, STATE_VERSION)?;
    let raw: RawStateFile = read(STATE_FILE, &v)?;
    let tsc = TscSnapshot::try_from(raw.tsc).map_err(|e| tsc_error("tsc", e))?;
    let mut vcpus = Vec::with_capacity(raw.vcpus.len());
    for (i, r) in raw.vcpus.into_iter().enumerate() {
        let s = VcpuState::try_from(r).map_err(|e| vcpu_error(&format!("vcpus[{i}]"), e))?;
        if s.id as usize != i {
            return Err(invalid(
                STATE_FILE,
                format!("vcpus[{i}].id"),
                format!("{} found where vCPU {i} belongs", s.id),
            ));
        }
        vcpus.push(s);
    }
    let devices = DeviceStates::try_from(raw.devices)?;
    let irqchip = raw
        .irqchip
        .map(IrqchipState::try_from)
        .transpose()
        .map_err(irqchip_error)?;
    let memory = MemoryLayout::try_from(raw.memory)?;

    // Cross-checks with config.json.
    let n = config.cpus.boot_vcpus as usize;
    if vcpus.len() != n {
        return Err(invalid(
            STATE_FILE,
            "vcpus",
            format!(
                "holds {} vCPUs but {CONFIG_FILE}'s cpus.boot_vcpus is {n}",
                vcpus.len()
            ),
        ));
    }
    tsc.check_vcpus(n).map_err(|e| tsc_error("tsc", e))?;
    if devices.probe.vcpus as usize != n {
        return Err(invalid(
            STATE_FILE,
            "devices.probe.vcpus",
            format!(
                "{} but {CONFIG_FILE}'s cpus.boot_vcpus is {n}",
                devices.probe.vcpus
            ),
        ));
    }
    if memory.size != config.memory.size {
        return Err(invalid(
            STATE_FILE,
            "memory.size",
            format!(
                "{} bytes but {CONFIG_FILE}'s memory.size is {} bytes",
                memory.size, config.memory.size
            ),
        ));
    }
    Ok((
        VmState {
            tsc,
            vcpus,
            devices,
            irqchip,
        },
        memory,
    ))
}

/// `checksums.json` as read, before any check.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChecksums {
    #[allow(dead_code)] // Checked by `check_version` first.
    version: u32,
    algorithm: String,
    files: BTreeMap<String, FileSum>,
}

impl TryFrom<RawChecksums> for Checksums {
    type Error = SnapshotError;
    fn try_from(raw: RawChecksums) -> Result<Self, SnapshotError> {
        let err = |field: String, reason: String| invalid(CHECKSUMS_FILE, field, reason);
        let algorithm = raw.algorithm;
        if algorithm != super::hash::ALGORITHM {
            return Err(err(
                "algorithm".into(),
                format!(
                    "{algorithm:?}: this build checks only {:?}",
                    super::hash::ALGORITHM
                ),
            ));
        }
        let names = [CONFIG_FILE, STATE_FILE, MEMORY_FILE];
        for name in names {
            match raw.files.get(name) {
                None => return Err(err(format!("files.{name}"), "missing field".into())),
                Some(sum)
                    if sum.hg64.len() != 16 || !sum.hg64.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    return Err(err(
                        format!("files.{name}.hg64"),
                        format!("{:?} is not 16 hex digits", sum.hg64),
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(other) = raw.files.keys().find(|k| !names.contains(&k.as_str())) {
            return Err(err(
                format!("files.{other}"),
                format!("unknown field (expected one of: {})", names.join(", ")),
            ));
        }
        Ok(Checksums {
            version: CHECKSUMS_VERSION,
            algorithm,
            files: raw.files,
        })
    }
}

/// `checksums.json`.
pub(crate) fn decode_checksums(bytes: &[u8]) -> Result<Checksums, SnapshotError> {
    let v = parse(CHECKSUMS_FILE, bytes)?;
    check_version(CHECKSUMS_FILE, &v, CHECKSUMS_VERSION)?;
    read::<RawChecksums>(CHECKSUMS_FILE, &v)?.try_into()
}
