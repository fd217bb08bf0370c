//! Saved vCPU state ([`VcpuState`]): serde, versioned, decoded through validation.
//!
//! Each optional piece is saved only where the host has the capability for it, and its presence
//! is recorded (`None` = this host could not provide it). In particular nested-virtualisation
//! state is saved only where `KVM_CAP_NESTED_STATE` is non-zero: a host such as one running the
//! `kvm_pvm` backend reports 0 and fails `KVM_GET_NESTED_STATE`, and a VMM that saved it
//! unconditionally could not snapshot there at all.
//!
//! The TSC itself (`MSR_IA32_TSC`, `IA32_TSC_ADJUST`) is not part of this state: it travels in the
//! VM-wide [`crate::tsc::TscSnapshot`] and is restored by [`crate::vm::TscState::thaw`].

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::arch::{msr, MsrEntry, SpecialRegisters, StandardRegisters, VcpuEvents, Xcr};

/// Version of the [`VcpuState`] format written by this build.
pub const VCPU_STATE_VERSION: u32 = 1;

/// Size of the local APIC register page.
pub const LAPIC_SIZE: usize = 1024;

/// Size of the legacy XSAVE area in 32-bit words (4 KiB).
pub const XSAVE_WORDS: usize = 1024;

/// A saved vCPU state that cannot be used; names the field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VcpuStateError {
    /// Unknown format version.
    #[error("vcpu_state.version: unsupported version {0} (this build reads {VCPU_STATE_VERSION})")]
    Version(u32),
    /// A field has the wrong size.
    #[error("vcpu_state.{field}: expected {expected} {unit}, got {got}")]
    Size {
        /// The field.
        field: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
        /// "bytes" or "words".
        unit: &'static str,
    },
    /// An MSR appears twice.
    #[error("vcpu_state.msrs: MSR {0:#x} appears more than once")]
    DuplicateMsr(u32),
    /// The TSC MSRs belong to the TscSnapshot, not here.
    #[error(
        "vcpu_state.msrs: MSR {0:#x} is restored through the TSC snapshot, not the vCPU state"
    )]
    TscMsr(u32),
}

/// Everything needed to recreate one vCPU, except its TSC (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawVcpuState", into = "RawVcpuState")]
pub struct VcpuState {
    /// The vCPU index.
    pub id: u32,
    /// General-purpose registers.
    pub regs: StandardRegisters,
    /// Segment and control registers.
    pub sregs: SpecialRegisters,
    /// MSRs the host lists as savable (never MSR_IA32_TSC or IA32_TSC_ADJUST).
    pub msrs: Vec<MsrEntry>,
    /// Local APIC page (1024 bytes), when an in-kernel APIC exists.
    pub lapic: Option<Vec<u8>>,
    /// Legacy XSAVE area (1024 words), when the host has KVM_CAP_XSAVE.
    pub xsave: Option<Vec<u32>>,
    /// XCRs, when the host has KVM_CAP_XCRS.
    pub xcrs: Option<Vec<Xcr>>,
    /// Pending events, when the host has KVM_CAP_VCPU_EVENTS.
    pub events: Option<VcpuEvents>,
    /// Multiprocessing state (running, halted, waiting for SIPI), when an in-kernel irqchip exists.
    pub mp_state: Option<u32>,
    /// Opaque nested-virtualisation state, only when the host has KVM_CAP_NESTED_STATE.
    pub nested: Option<Vec<u8>>,
}

/// The stored form of a [`VcpuState`]: plain fields, no checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawVcpuState {
    pub version: u32,
    pub id: u32,
    pub regs: StandardRegisters,
    pub sregs: SpecialRegisters,
    pub msrs: Vec<MsrEntry>,
    pub lapic: Option<Vec<u8>>,
    pub xsave: Option<Vec<u32>>,
    pub xcrs: Option<Vec<Xcr>>,
    pub events: Option<VcpuEvents>,
    pub mp_state: Option<u32>,
    pub nested: Option<Vec<u8>>,
}

impl VcpuState {
    /// Check the invariants the decoder enforces (sizes, no duplicate or TSC MSRs).
    pub fn validate(&self) -> Result<(), VcpuStateError> {
        if let Some(l) = &self.lapic {
            if l.len() != LAPIC_SIZE {
                return Err(VcpuStateError::Size {
                    field: "lapic",
                    expected: LAPIC_SIZE,
                    got: l.len(),
                    unit: "bytes",
                });
            }
        }
        if let Some(x) = &self.xsave {
            if x.len() != XSAVE_WORDS {
                return Err(VcpuStateError::Size {
                    field: "xsave",
                    expected: XSAVE_WORDS,
                    got: x.len(),
                    unit: "words",
                });
            }
        }
        if let Some(x) = &self.xcrs {
            // KVM_MAX_XCRS
            if x.len() > 16 {
                return Err(VcpuStateError::Size {
                    field: "xcrs",
                    expected: 16,
                    got: x.len(),
                    unit: "entries at most",
                });
            }
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.msrs {
            if m.index == msr::IA32_TSC || m.index == msr::IA32_TSC_ADJUST {
                return Err(VcpuStateError::TscMsr(m.index));
            }
            if !seen.insert(m.index) {
                return Err(VcpuStateError::DuplicateMsr(m.index));
            }
        }
        Ok(())
    }

    /// Decode from JSON, validating.
    pub fn from_json(s: &str) -> Result<Self, String> {
        serde_json::from_str(s).map_err(|e| format!("vcpu_state: {e}"))
    }
}

impl TryFrom<RawVcpuState> for VcpuState {
    type Error = VcpuStateError;
    fn try_from(r: RawVcpuState) -> Result<Self, Self::Error> {
        if r.version != VCPU_STATE_VERSION {
            return Err(VcpuStateError::Version(r.version));
        }
        let s = VcpuState {
            id: r.id,
            regs: r.regs,
            sregs: r.sregs,
            msrs: r.msrs,
            lapic: r.lapic,
            xsave: r.xsave,
            xcrs: r.xcrs,
            events: r.events,
            mp_state: r.mp_state,
            nested: r.nested,
        };
        s.validate()?;
        Ok(s)
    }
}

impl From<VcpuState> for RawVcpuState {
    fn from(s: VcpuState) -> Self {
        RawVcpuState {
            version: VCPU_STATE_VERSION,
            id: s.id,
            regs: s.regs,
            sregs: s.sregs,
            msrs: s.msrs,
            lapic: s.lapic,
            xsave: s.xsave,
            xcrs: s.xcrs,
            events: s.events,
            mp_state: s.mp_state,
            nested: s.nested,
        }
    }
}

/// Version of the [`IrqchipState`] format written by this build.
pub const IRQCHIP_STATE_VERSION: u32 = 1;

/// Size of one interrupt controller's saved state (KVM's `kvm_irqchip` payload).
pub const IRQCHIP_SIZE: usize = 512;

/// The VM-wide interrupt controllers of the in-kernel irqchip, in KVM's chip order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqChip {
    /// The master 8259 PIC (ISA IRQs 0-7).
    PicMaster = 0,
    /// The slave 8259 PIC (ISA IRQs 8-15).
    PicSlave = 1,
    /// The IOAPIC (24 pins).
    Ioapic = 2,
}

impl IrqChip {
    /// Every chip, in KVM's order.
    pub const ALL: [IrqChip; 3] = [IrqChip::PicMaster, IrqChip::PicSlave, IrqChip::Ioapic];

    fn field(self) -> &'static str {
        match self {
            IrqChip::PicMaster => "pic_master",
            IrqChip::PicSlave => "pic_slave",
            IrqChip::Ioapic => "ioapic",
        }
    }
}

/// The saved state of the VM-wide interrupt controllers (the per-vCPU local APICs travel in
/// each [`VcpuState`]): which pins are masked, their vectors and trigger modes, what is
/// pending. A guest that routes an interrupt through the IOAPIC (a kernel's serial driver)
/// loses it after a restore without this. Each chip's bytes are exactly [`IRQCHIP_SIZE`] long:
/// the type cannot hold another length.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawIrqchipState", into = "RawIrqchipState")]
pub struct IrqchipState {
    chips: [Box<[u8; IRQCHIP_SIZE]>; 3],
}

impl IrqchipState {
    /// The state from each chip's bytes, in [`IrqChip::ALL`] order.
    pub fn new(chips: [[u8; IRQCHIP_SIZE]; 3]) -> Self {
        Self {
            chips: chips.map(Box::new),
        }
    }

    /// One chip's bytes.
    pub fn chip(&self, chip: IrqChip) -> &[u8; IRQCHIP_SIZE] {
        &self.chips[chip as usize]
    }
}

/// The stored form of an [`IrqchipState`]: plain fields, no checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RawIrqchipState {
    pub version: u32,
    pub pic_master: Vec<u8>,
    pub pic_slave: Vec<u8>,
    pub ioapic: Vec<u8>,
}

/// A saved irqchip state that cannot be used; names the field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IrqchipStateError {
    /// Unknown format version.
    #[error("irqchip.version: unsupported version {0} (this build reads {IRQCHIP_STATE_VERSION})")]
    Version(u32),
    /// A chip's bytes have the wrong length.
    #[error("irqchip.{field}: expected {IRQCHIP_SIZE} bytes, got {got}")]
    Size {
        /// The chip.
        field: &'static str,
        /// The length found.
        got: usize,
    },
}

impl TryFrom<RawIrqchipState> for IrqchipState {
    type Error = IrqchipStateError;
    fn try_from(r: RawIrqchipState) -> Result<Self, Self::Error> {
        if r.version != IRQCHIP_STATE_VERSION {
            return Err(IrqchipStateError::Version(r.version));
        }
        let one = |chip: IrqChip, v: Vec<u8>| -> Result<Box<[u8; IRQCHIP_SIZE]>, Self::Error> {
            let got = v.len();
            v.into_boxed_slice()
                .try_into()
                .map_err(|_| IrqchipStateError::Size {
                    field: chip.field(),
                    got,
                })
        };
        Ok(IrqchipState {
            chips: [
                one(IrqChip::PicMaster, r.pic_master)?,
                one(IrqChip::PicSlave, r.pic_slave)?,
                one(IrqChip::Ioapic, r.ioapic)?,
            ],
        })
    }
}

impl From<IrqchipState> for RawIrqchipState {
    fn from(s: IrqchipState) -> Self {
        let [m, sl, io] = s.chips;
        RawIrqchipState {
            version: IRQCHIP_STATE_VERSION,
            pic_master: m.to_vec(),
            pic_slave: sl.to_vec(),
            ioapic: io.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        VcpuState {
            id: 1,
            regs: StandardRegisters::default(),
            sregs: SpecialRegisters::default(),
            msrs: vec![MsrEntry {
                index: 0xc000_0103,
                data: 7,
            }],
            lapic: Some(vec![0; LAPIC_SIZE]),
            xsave: None,
            xcrs: Some(vec![Xcr { xcr: 0, value: 3 }]),
            events: None,
            mp_state: Some(0),
            nested: None,
        }
    }

    #[test]
    fn round_trip_keeps_absent_pieces_absent() {
        let s = sample();
        let j = serde_json::to_string(&s).unwrap();
        let back = VcpuState::from_json(&j).unwrap();
        assert_eq!(back, s);
        assert!(back.nested.is_none());
        assert!(back.xsave.is_none());
        assert!(j.contains("\"version\":1"));
    }

    #[test]
    fn rejects_bad_fields_by_name() {
        let mut raw: RawVcpuState = sample().into();
        raw.version = 9;
        let e = VcpuState::from_json(&serde_json::to_string(&raw).unwrap()).unwrap_err();
        assert!(e.contains("version"), "{e}");

        let mut raw: RawVcpuState = sample().into();
        raw.lapic = Some(vec![0; 10]);
        let e = VcpuState::from_json(&serde_json::to_string(&raw).unwrap()).unwrap_err();
        assert!(e.contains("lapic") && e.contains("1024"), "{e}");

        let mut raw: RawVcpuState = sample().into();
        raw.msrs.push(MsrEntry {
            index: 0x10,
            data: 1,
        });
        let e = VcpuState::from_json(&serde_json::to_string(&raw).unwrap()).unwrap_err();
        assert!(e.contains("0x10"), "{e}");

        let mut raw: RawVcpuState = sample().into();
        raw.msrs.push(raw.msrs[0]);
        let e = VcpuState::from_json(&serde_json::to_string(&raw).unwrap()).unwrap_err();
        assert!(e.contains("more than once"), "{e}");

        assert!(VcpuState::from_json("{").is_err());
        assert!(VcpuState::from_json("[]").is_err());
    }

    #[test]
    fn irqchip_state_round_trips_and_refuses_other_lengths() {
        let mut chips = [[0u8; IRQCHIP_SIZE]; 3];
        chips[2][0] = 0x11;
        chips[0][511] = 7;
        let s = IrqchipState::new(chips);
        let json = serde_json::to_string(&s).unwrap();
        let back: IrqchipState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.chip(IrqChip::Ioapic)[0], 0x11);
        assert_eq!(back.chip(IrqChip::PicMaster)[511], 7);

        let mut raw: RawIrqchipState = s.clone().into();
        raw.ioapic.pop();
        let e = IrqchipState::try_from(raw).unwrap_err();
        assert_eq!(e.to_string(), "irqchip.ioapic: expected 512 bytes, got 511");
        let mut raw: RawIrqchipState = s.into();
        raw.version = 9;
        assert!(matches!(
            IrqchipState::try_from(raw),
            Err(IrqchipStateError::Version(9))
        ));
    }
}
