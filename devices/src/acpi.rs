//! The ACPI sleep control and sleep status registers of a hardware-reduced platform (ACPI 6,
//! section 4.8.3.7): the two bytes a kernel writes to power the VM off. The FADT names their
//! ports; the DSDT's `\_S5_` names the sleep type this device is told to take as "off".

use crate::bus::{BusAction, PioDevice};

/// Sleep control register: the sleep-enable bit.
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// Sleep control register: the sleep type's position (bits 2..4).
pub const SLEEP_TYPE_SHIFT: u8 = 2;
/// Sleep control register: the sleep type's mask (after the shift).
const SLEEP_TYPE_MASK: u8 = 0x7;
/// Sleep status register: the wake status bit (write 1 to clear).
pub const WAKE_STATUS: u8 = 1 << 7;
/// Ports the device takes: sleep control, then sleep status.
pub const SLEEP_PORTS: u16 = 2;

/// The two registers. They hold no state a snapshot needs: a write either powers the VM off or
/// is ignored, and the status register always reads "not woken".
#[derive(Debug)]
pub struct SleepControl {
    s5_sleep_type: u8,
}

impl SleepControl {
    /// A device that powers off when the guest enters the sleep type `s5_sleep_type` (the
    /// first element of the DSDT's `\_S5_` package).
    pub fn new(s5_sleep_type: u8) -> Self {
        Self { s5_sleep_type }
    }
}

impl PioDevice for SleepControl {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        let Some(&v) = data.first() else {
            return BusAction::None;
        };
        if offset != 0 || v & SLEEP_ENABLE == 0 {
            // The status register (the kernel clears WAKE_STATUS first), or no sleep asked.
            return BusAction::None;
        }
        let sleep_type = (v >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        if sleep_type == self.s5_sleep_type {
            BusAction::PowerOff
        } else {
            log::warn!("the guest asked for sleep type {sleep_type}, which this VM does not offer; ignored");
            BusAction::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::PioBus;
    use std::sync::{Arc, Mutex};

    #[test]
    fn s5_with_sleep_enable_powers_off_and_nothing_else_does() {
        let mut bus = PioBus::new();
        bus.insert(
            0x600,
            SLEEP_PORTS,
            Arc::new(Mutex::new(SleepControl::new(5))),
        )
        .unwrap();
        // Linux's sequence: clear WAKE_STATUS in the status register, then write the control.
        assert_eq!(bus.write(0x601, &[WAKE_STATUS]), Some(BusAction::None));
        assert_eq!(
            bus.write(0x601, &[(5 << 2) | SLEEP_ENABLE]),
            Some(BusAction::None)
        );
        assert_eq!(
            bus.write(0x600, &[5 << 2]),
            Some(BusAction::None),
            "no SLP_EN"
        );
        assert_eq!(
            bus.write(0x600, &[(3 << 2) | SLEEP_ENABLE]),
            Some(BusAction::None),
            "S3"
        );
        assert_eq!(
            bus.write(0x600, &[(5 << 2) | SLEEP_ENABLE]),
            Some(BusAction::PowerOff)
        );
        let mut s = [0xaa];
        assert!(bus.read(0x601, &mut s));
        assert_eq!(s, [0], "never woken");
    }
}
