//! The i8042 keyboard controller, reduced to what a guest uses to reset the machine: the CPU
//! reset command 0xFE written to the command port.

use serde::{Deserialize, Serialize};

use crate::bus::{BusAction, PioDevice};

/// The data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The command that pulses the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 state (the last command, for snapshots).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The last byte written to the command port.
    pub last_command: u8,
    /// Whether a reset was requested.
    pub reset_requested: bool,
}

/// The i8042. Insert it on the bus at [`I8042_DATA_PORT`] with length 5 (0x60..=0x64).
#[derive(Debug, Default)]
pub struct I8042 {
    state: I8042State,
}

impl I8042 {
    /// A fresh controller.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuild from a saved state.
    pub fn from_state(state: I8042State) -> Self {
        Self { state }
    }

    /// The state to save.
    pub fn state(&self) -> I8042State {
        self.state
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty; data port reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        if offset == I8042_COMMAND_PORT - I8042_DATA_PORT {
            if let Some(&cmd) = data.first() {
                self.state.last_command = cmd;
                if cmd == CMD_RESET_CPU {
                    self.state.reset_requested = true;
                    return BusAction::Reset;
                }
            }
        }
        BusAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::PioBus;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reset_command_requests_reset() {
        let mut bus = PioBus::new();
        let dev = Arc::new(Mutex::new(I8042::new()));
        bus.insert(I8042_DATA_PORT, 5, dev.clone()).unwrap();
        assert_eq!(bus.write(0x64, &[0xd1]), Some(BusAction::None));
        assert_eq!(
            bus.write(0x60, &[0xfe]),
            Some(BusAction::None),
            "data port: no reset"
        );
        assert!(!dev.lock().unwrap().state().reset_requested);
        assert_eq!(bus.write(0x64, &[0xfe]), Some(BusAction::Reset));
        assert!(dev.lock().unwrap().state().reset_requested);
        let mut s = [0xaa];
        assert!(bus.read(0x64, &mut s));
        assert_eq!(s, [0]);
    }

    #[test]
    fn state_round_trips() {
        let mut d = I8042::new();
        d.write(4, &[0xfe]);
        let json = serde_json::to_string(&d.state()).unwrap();
        let back: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(I8042::from_state(back).state(), d.state());
        assert!(serde_json::from_str::<I8042State>("{\"last_command\":300}").is_err());
    }
}
