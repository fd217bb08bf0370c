//! The device manager: which devices a VM has, where they sit on the port-I/O bus, and their
//! saved state.
//!
//! Every device of a VM is created here, from a configuration (boot) or from saved state
//! (restore, migration), and every device's state is captured here. A device added later
//! (ACPI's PM registers) gets one field, one line in [`DeviceManager::bus`] and one in
//! [`DeviceManager::states`]: nothing else in the VM changes.
//!
//! Interrupts: the serial port raises ISA IRQ 4 through an eventfd the hypervisor turns into an
//! edge on the in-kernel irqchip ([`DeviceManager::connect`], KVM_IRQFD), so a kernel's 8250
//! driver gets its transmit and receive interrupts. The irqchip's own state is KVM's.

use std::sync::{Arc, Mutex};

use ::devices::probe::{TimeProbe, PROBE_BASE, PROBE_PORT_COUNT};
use ::devices::serial::IrqLine;
use ::devices::serial::{COM1_PORT, SERIAL_PORT_LEN};
use ::devices::{PioBus, Serial, SerialOutput, I8042};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VmError;
use crate::snapshot::DeviceStates;

/// Ports of the i8042 controller (data 0x60 .. command/status 0x64).
const I8042_PORTS: u16 = 5;

/// COM1's interrupt: ISA IRQ 4.
pub const COM1_IRQ: u32 = 4;

/// The VM's devices.
pub struct DeviceManager {
    serial: Arc<Mutex<Serial>>,
    /// Written by the serial port to raise [`COM1_IRQ`]; registered by [`Self::connect`].
    serial_irq: Arc<EventFd>,
    i8042: Arc<Mutex<I8042>>,
    probe: Arc<TimeProbe>,
}

impl DeviceManager {
    /// Fresh devices for a booting VM.
    pub fn new(serial: &SerialOutput, probe: TimeProbe) -> Result<Self, VmError> {
        let (irq, line) = irq_pair("serial")?;
        let serial = Serial::new(serial, line).map_err(|e| VmError::Device(e.to_string()))?;
        Ok(Self::with(serial, irq, probe))
    }

    /// Devices as `states` left them; the serial port writes to `serial`.
    pub fn restore(states: &DeviceStates, serial: &SerialOutput) -> Result<Self, VmError> {
        let (irq, line) = irq_pair("serial")?;
        let s = Serial::from_state(&states.serial, serial, line)
            .map_err(|e| VmError::Device(format!("serial: {e}")))?;
        let probe = TimeProbe::restore(states.probe.clone())
            .map_err(|e| VmError::Device(format!("time probe: {e}")))?;
        Ok(Self::with(s, irq, probe))
    }

    fn with(serial: Serial, serial_irq: Arc<EventFd>, probe: TimeProbe) -> Self {
        Self {
            serial: Arc::new(Mutex::new(serial)),
            serial_irq,
            i8042: Arc::new(Mutex::new(I8042::new())),
            probe: Arc::new(probe),
        }
    }

    /// Wire the devices' interrupts into `vm`'s irqchip; before any vCPU runs.
    pub fn connect(&self, vm: &dyn hypervisor::Vm) -> Result<(), VmError> {
        vm.register_irqfd(&self.serial_irq, COM1_IRQ)
            .map_err(|e| VmError::Device(format!("serial: route IRQ {COM1_IRQ}: {e}")))
    }

    /// The port-I/O bus the vCPU threads dispatch to: COM1 and the i8042 (the time probe's
    /// ports are decoded by the vCPU loop itself, which hands it guest memory).
    pub fn bus(&self) -> Result<PioBus, VmError> {
        let mut bus = PioBus::new();
        bus.insert(COM1_PORT, SERIAL_PORT_LEN, self.serial.clone())
            .map_err(|e| VmError::Device(format!("serial: {e}")))?;
        bus.insert(
            devices::i8042::I8042_DATA_PORT,
            I8042_PORTS,
            self.i8042.clone(),
        )
        .map_err(|e| VmError::Device(format!("i8042: {e}")))?;
        Ok(bus)
    }

    /// The time-probe device.
    pub fn probe(&self) -> &Arc<TimeProbe> {
        &self.probe
    }

    /// The devices as `vm.info`'s `device_tree` lists them, in Cloud Hypervisor's shape: one
    /// node per device, keyed by id, with its port range.
    pub fn device_tree(&self) -> serde_json::Value {
        let node = |id: &str, base: u16, size: u16| {
            serde_json::json!({
                "id": id,
                "resources": [{ "PioAddressRange": { "base": base, "size": size } }],
                "parent": null,
                "children": [],
                "pci_bdf": null,
            })
        };
        serde_json::json!({
            "_serial": node("_serial", COM1_PORT, SERIAL_PORT_LEN),
            "_i8042": node("_i8042", ::devices::i8042::I8042_DATA_PORT, I8042_PORTS),
            "_time_probe": node("_time_probe", PROBE_BASE, PROBE_PORT_COUNT),
        })
    }

    /// Every device's state, for a snapshot or a migration.
    pub fn states(&self) -> DeviceStates {
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state();
        DeviceStates {
            serial,
            probe: self.probe.state(),
        }
    }
}

/// An eventfd for a device's interrupt and the device's end of it.
fn irq_pair(device: &str) -> Result<(Arc<EventFd>, IrqLine), VmError> {
    let fd = EventFd::new(EFD_NONBLOCK)
        .map_err(|e| VmError::Device(format!("{device}: interrupt eventfd: {e}")))?;
    let fd = Arc::new(fd);
    Ok((fd.clone(), IrqLine::new(fd)))
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager").finish_non_exhaustive()
    }
}
