//! Emulated devices for Hourglass: the 16550 serial port, the i8042 (reset only), ACPI's sleep
//! control register (power off), the time-probe
//! device the test guest reports to, and a small port-I/O bus. Each device has a serde state type
//! for snapshots.

#![deny(missing_docs)]

pub mod acpi;
pub mod bus;
pub mod i8042;
pub mod probe;
pub mod serial;

pub use bus::{BusAction, BusError, PioBus, PioDevice};
pub use i8042::{I8042State, I8042};
pub use serial::{Serial, SerialDeviceState, SerialError, SerialOutput};
