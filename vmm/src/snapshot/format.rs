//! The files of a snapshot directory and their decoders.
//!
//! Every decoder goes through [`Fields`], which walks the JSON value by hand so that an error
//! names the file and the dotted path of the field (`state.json: vcpus[1].msrs: ...`). Unknown
//! fields are refused, like the `deny_unknown_fields` of the stored types.

use std::collections::BTreeMap;

use devices::probe::{ProbeState, TimeProbe};
use devices::serial::SerialDeviceState;
use hypervisor::arch::{MsrEntry, SpecialRegisters, StandardRegisters, VcpuEvents, Xcr};
use hypervisor::state::{RawVcpuState, VcpuState, VcpuStateError};
use hypervisor::tsc::{RawTscSnapshot, StateError, TscSnapshot, TscSource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::SnapshotError;
use super::{CHECKSUMS_FILE, CONFIG_FILE, MEMORY_FILE, STATE_FILE};
use crate::config::VmConfig;

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
}

/// `state.json` as written.
#[derive(Serialize)]
pub(crate) struct StateFile<'a> {
    pub version: u32,
    pub tsc: &'a TscSnapshot,
    pub vcpus: &'a [VcpuState],
    pub devices: &'a DeviceStates,
    pub memory: &'a MemoryLayout,
}

/// One file's entry in `checksums.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// A JSON object being decoded, with the file and path it came from.
pub(crate) struct Fields<'a> {
    file: &'static str,
    path: String,
    map: &'a Map<String, Value>,
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

impl<'a> Fields<'a> {
    pub(crate) fn new(
        file: &'static str,
        path: String,
        v: &'a Value,
    ) -> Result<Self, SnapshotError> {
        match v {
            Value::Object(map) => Ok(Self { file, path, map }),
            other => Err(invalid(
                file,
                if path.is_empty() {
                    "(top level)".into()
                } else {
                    path
                },
                format!("expected an object, found {}", kind(other)),
            )),
        }
    }

    fn at(&self, key: &str) -> String {
        join(&self.path, key)
    }

    fn err(&self, key: &str, reason: impl ToString) -> SnapshotError {
        invalid(self.file, self.at(key), reason)
    }

    fn value(&self, key: &str) -> Result<&'a Value, SnapshotError> {
        self.map
            .get(key)
            .ok_or_else(|| self.err(key, "missing field"))
    }

    fn req<T: DeserializeOwned>(&self, key: &str) -> Result<T, SnapshotError> {
        T::deserialize(self.value(key)?).map_err(|e| self.err(key, e))
    }

    fn opt<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SnapshotError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => T::deserialize(v).map(Some).map_err(|e| self.err(key, e)),
        }
    }

    fn obj(&self, key: &str) -> Result<Fields<'a>, SnapshotError> {
        Fields::new(self.file, self.at(key), self.value(key)?)
    }

    fn arr(&self, key: &str) -> Result<&'a [Value], SnapshotError> {
        match self.value(key)? {
            Value::Array(a) => Ok(a),
            other => Err(self.err(key, format!("expected an array, found {}", kind(other)))),
        }
    }

    /// Decode an array element by element (errors name `key[i]`).
    fn vec<T: DeserializeOwned>(&self, key: &str) -> Result<Vec<T>, SnapshotError> {
        self.arr(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                T::deserialize(v)
                    .map_err(|e| invalid(self.file, format!("{}[{i}]", self.at(key)), e))
            })
            .collect()
    }

    fn u32(&self, key: &str) -> Result<u32, SnapshotError> {
        self.req(key)
    }

    /// The format version, checked before anything else is decoded.
    fn version(&self, supported: u32) -> Result<(), SnapshotError> {
        let v = self.value("version")?;
        match v.as_u64() {
            Some(n) if n == u64::from(supported) => Ok(()),
            Some(n) => Err(SnapshotError::Version {
                file: self.file,
                found: n,
                supported,
            }),
            None => Err(self.err("version", format!("expected an integer, found {}", kind(v)))),
        }
    }

    /// Refuse fields other than `known`.
    fn only(&self, known: &[&str]) -> Result<(), SnapshotError> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(self.err(
                k,
                format!("unknown field (expected one of: {})", known.join(", ")),
            )),
            None => Ok(()),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `config.json`: the VM configuration.
pub(crate) fn decode_config(bytes: &[u8]) -> Result<VmConfig, SnapshotError> {
    let v = parse(CONFIG_FILE, bytes)?;
    let f = Fields::new(CONFIG_FILE, String::new(), &v)?;
    match VmConfig::deserialize(&v) {
        Ok(c) => Ok(c),
        Err(e) => {
            // Name the field: substitute each given field into a valid configuration until one
            // makes it fail.
            let good = serde_json::to_value(VmConfig::default()).unwrap_or(Value::Null);
            if let Value::Object(base) = good {
                for (k, val) in f.map {
                    let mut m = base.clone();
                    m.insert(k.clone(), val.clone());
                    if let Err(e) = VmConfig::deserialize(&Value::Object(m)) {
                        return Err(f.err(k, e));
                    }
                }
            }
            Err(invalid(CONFIG_FILE, "(top level)", e))
        }
    }
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

fn decode_vcpu(f: &Fields<'_>) -> Result<VcpuState, SnapshotError> {
    f.only(&[
        "version", "id", "regs", "sregs", "msrs", "lapic", "xsave", "xcrs", "events", "mp_state",
        "nested",
    ])?;
    let raw = RawVcpuState {
        version: f.u32("version")?,
        id: f.u32("id")?,
        regs: f.req::<StandardRegisters>("regs")?,
        sregs: f.req::<SpecialRegisters>("sregs")?,
        msrs: f.vec::<MsrEntry>("msrs")?,
        lapic: f.opt("lapic")?,
        xsave: f.opt("xsave")?,
        xcrs: f.opt::<Vec<Xcr>>("xcrs")?,
        events: f.opt::<VcpuEvents>("events")?,
        mp_state: f.opt("mp_state")?,
        nested: f.opt("nested")?,
    };
    VcpuState::try_from(raw).map_err(|e| vcpu_error(&f.path, e))
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

fn decode_tsc(f: &Fields<'_>) -> Result<TscSnapshot, SnapshotError> {
    f.only(&[
        "version",
        "tsc_khz",
        "vm_tsc",
        "tsc_adjust",
        "kvmclock_ns",
        "realtime_ns",
        "tsc_stable",
        "source",
    ])?;
    let raw = RawTscSnapshot {
        version: f.u32("version")?,
        tsc_khz: f.u32("tsc_khz")?,
        vm_tsc: f.req("vm_tsc")?,
        tsc_adjust: f.vec("tsc_adjust")?,
        kvmclock_ns: f.req("kvmclock_ns")?,
        realtime_ns: f.req("realtime_ns")?,
        tsc_stable: f.req("tsc_stable")?,
        source: f.req::<TscSource>("source")?,
    };
    TscSnapshot::try_from(raw).map_err(|e| tsc_error(&f.path, e))
}

fn decode_devices(f: &Fields<'_>) -> Result<DeviceStates, SnapshotError> {
    f.only(&["serial", "probe"])?;
    let serial: SerialDeviceState = f.req("serial")?;
    let probe: ProbeState = f.req("probe")?;
    // The probe's own checks (version, vCPU count, queue lengths).
    TimeProbe::restore(probe.clone()).map_err(|e| f.err("probe", e))?;
    Ok(DeviceStates { serial, probe })
}

fn decode_memory(f: &Fields<'_>) -> Result<MemoryLayout, SnapshotError> {
    f.only(&["size", "file", "regions"])?;
    let size: u64 = f.req("size")?;
    let file: String = f.req("file")?;
    if file != MEMORY_FILE {
        return Err(f.err(
            "file",
            format!("{file:?}: this build reads only {MEMORY_FILE:?}"),
        ));
    }
    let regions: Vec<MemoryRegionEntry> = f.vec("regions")?;
    let expected = MemoryLayout::for_size(size).map_err(|e| f.err("size", e))?;
    if regions != expected.regions {
        return Err(f.err(
            "regions",
            format!(
                "do not match the guest memory layout for {size} bytes (expected {:?})",
                expected.regions
            ),
        ));
    }
    Ok(expected)
}

/// `state.json`, decoded and checked against the configuration.
pub(crate) fn decode_state(
    bytes: &[u8],
    config: &VmConfig,
) -> Result<(VmState, MemoryLayout), SnapshotError> {
    let v = parse(STATE_FILE, bytes)?;
    let f = Fields::new(STATE_FILE, String::new(), &v)?;
    f.version(STATE_VERSION)?;
    f.only(&["version", "tsc", "vcpus", "devices", "memory"])?;
    let tsc = decode_tsc(&f.obj("tsc")?)?;
    let mut vcpus = Vec::new();
    for (i, v) in f.arr("vcpus")?.iter().enumerate() {
        let vf = Fields::new(STATE_FILE, format!("vcpus[{i}]"), v)?;
        let s = decode_vcpu(&vf)?;
        if s.id as usize != i {
            return Err(invalid(
                STATE_FILE,
                format!("vcpus[{i}].id"),
                format!("{} found where vCPU {i} belongs", s.id),
            ));
        }
        vcpus.push(s);
    }
    let devices = decode_devices(&f.obj("devices")?)?;
    let memory = decode_memory(&f.obj("memory")?)?;

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
        },
        memory,
    ))
}

/// `checksums.json`.
pub(crate) fn decode_checksums(bytes: &[u8]) -> Result<Checksums, SnapshotError> {
    let v = parse(CHECKSUMS_FILE, bytes)?;
    let f = Fields::new(CHECKSUMS_FILE, String::new(), &v)?;
    f.version(CHECKSUMS_VERSION)?;
    f.only(&["version", "algorithm", "files"])?;
    let algorithm: String = f.req("algorithm")?;
    if algorithm != super::hash::ALGORITHM {
        return Err(f.err(
            "algorithm",
            format!(
                "{algorithm:?}: this build checks only {:?}",
                super::hash::ALGORITHM
            ),
        ));
    }
    let files_f = f.obj("files")?;
    let mut files = BTreeMap::new();
    for name in [CONFIG_FILE, STATE_FILE, MEMORY_FILE] {
        let e = files_f.obj(name)?;
        e.only(&["size", "hg64"])?;
        let sum = FileSum {
            size: e.req("size")?,
            hg64: e.req("hg64")?,
        };
        if sum.hg64.len() != 16 || !sum.hg64.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(e.err("hg64", format!("{:?} is not 16 hex digits", sum.hg64)));
        }
        files.insert(name.to_string(), sum);
    }
    files_f.only(&[CONFIG_FILE, STATE_FILE, MEMORY_FILE])?;
    Ok(Checksums {
        version: CHECKSUMS_VERSION,
        algorithm,
        files,
    })
}
