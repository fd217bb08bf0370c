//! The device manager: which devices a VM has, where they sit on the port-I/O bus, and their
//! saved state.
//!
//! Every device of a VM is created here, from a configuration (boot) or from saved state
//! (restore, migration), and every device's state is captured here. A device added later (an
//! interrupt route for the serial port, ACPI's PM registers) gets one field, one line in
//! [`DeviceManager::bus`] and one in [`DeviceManager::states`]: nothing else in the VM changes.

use std::sync::{Arc, Mutex};

use ::devices::probe::{TimeProbe, PROBE_BASE, PROBE_PORT_COUNT};
use ::devices::serial::{COM1_PORT, SERIAL_PORT_LEN};
use ::devices::{PioBus, Serial, SerialOutput, I8042};

use super::VmError;
use crate::snapshot::DeviceStates;

/// Ports of the i8042 controller (data 0x60 .. command/status 0x64).
const I8042_PORTS: u16 = 5;

/// The VM's devices.
pub struct DeviceManager {
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    probe: Arc<TimeProbe>,
}

impl DeviceManager {
    /// Fresh devices for a booting VM.
    pub fn new(serial: &SerialOutput, probe: TimeProbe) -> Result<Self, VmError> {
        let serial = Serial::new(serial).map_err(|e| VmError::Device(e.to_string()))?;
        Ok(Self::with(serial, probe))
    }

    /// Devices as `states` left them; the serial port writes to `serial`.
    pub fn restore(states: &DeviceStates, serial: &SerialOutput) -> Result<Self, VmError> {
        let s = Serial::from_state(&states.serial, serial)
            .map_err(|e| VmError::Device(format!("serial: {e}")))?;
        let probe = TimeProbe::restore(states.probe.clone())
            .map_err(|e| VmError::Device(format!("time probe: {e}")))?;
        Ok(Self::with(s, probe))
    }

    fn with(serial: Serial, probe: TimeProbe) -> Self {
        Self {
            serial: Arc::new(Mutex::new(serial)),
            i8042: Arc::new(Mutex::new(I8042::new())),
            probe: Arc::new(probe),
        }
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

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager").finish_non_exhaustive()
    }
}
