//! A small port-I/O bus: port ranges dispatched to devices.

use std::sync::{Arc, Mutex};

/// What a device asks the VMM to do after a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusAction {
    /// Nothing.
    None,
    /// Reset the VM (the guest asked, e.g. through the i8042).
    Reset,
    /// Power the VM off (the guest entered ACPI S5).
    PowerOff,
}

/// A device on the port-I/O bus. `offset` is relative to the base of the range it was inserted
/// at.
pub trait PioDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]) -> BusAction;
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or runs past port 0xffff.
    #[error("invalid port range {base:#x}+{len:#x}")]
    InvalidRange {
        /// First port.
        base: u16,
        /// Number of ports.
        len: u16,
    },
    /// The range overlaps one already on the bus.
    #[error("port range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// First port of the new range.
        base: u16,
        /// Length of the new range.
        len: u16,
        /// First port of the range already there.
        other_base: u16,
        /// Length of the range already there.
        other_len: u16,
    },
}

type Slot = (u16, u16, Arc<Mutex<dyn PioDevice>>);

/// Port ranges and their devices.
#[derive(Default, Clone)]
pub struct PioBus {
    ranges: Vec<Slot>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r: Vec<(u16, u16)> = self.ranges.iter().map(|(b, l, _)| (*b, *l)).collect();
        f.debug_struct("PioBus").field("ranges", &r).finish()
    }
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `device` at ports `base..base+len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(BusError::InvalidRange { base, len });
        }
        for (b, l, _) in &self.ranges {
            let other_end = u32::from(*b) + u32::from(*l);
            if u32::from(base) < other_end && u32::from(*b) < end {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base: *b,
                    other_len: *l,
                });
            }
        }
        self.ranges.push((base, len, device));
        Ok(())
    }

    fn find(&self, port: u16) -> Option<&Slot> {
        self.ranges
            .iter()
            .find(|(b, l, _)| port >= *b && u32::from(port) < u32::from(*b) + u32::from(*l))
    }

    /// Dispatch a read; `false` (and `data` filled with 0xff, as a floating bus reads) when no
    /// device claims `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((base, _, dev)) => {
                lock(dev).read(port - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatch a write; `None` when no device claims `port`.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<BusAction> {
        self.find(port)
            .map(|(base, _, dev)| lock(dev).write(port - base, data))
    }
}

/// Lock a device, recovering from a poisoned lock (a panicking vCPU thread must not take every
/// other one down with it).
fn lock(dev: &Arc<Mutex<dyn PioDevice>>) -> std::sync::MutexGuard<'_, dyn PioDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec {
        last: Option<(u16, Vec<u8>)>,
    }
    impl PioDevice for Rec {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) -> BusAction {
            self.last = Some((offset, data.to_vec()));
            BusAction::None
        }
    }

    #[test]
    fn dispatch_by_range() {
        let mut bus = PioBus::new();
        let a = Arc::new(Mutex::new(Rec::default()));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert_eq!(bus.write(0x3f8, b"x"), Some(BusAction::None));
        assert_eq!(a.lock().unwrap().last, Some((0, vec![b'x'])));
        assert!(!bus.read(0x400, &mut d));
        assert_eq!(d, [0xff]);
        assert_eq!(bus.write(0x3f7, &[1]), None);
    }

    #[test]
    fn overlaps_and_bad_ranges_refused() {
        let mut bus = PioBus::new();
        bus.insert(0x60, 1, Arc::new(Mutex::new(Rec::default())))
            .unwrap();
        bus.insert(0x64, 1, Arc::new(Mutex::new(Rec::default())))
            .unwrap();
        assert!(matches!(
            bus.insert(0x5f, 2, Arc::new(Mutex::new(Rec::default()))),
            Err(BusError::Overlap {
                other_base: 0x60,
                ..
            })
        ));
        assert!(bus
            .insert(0xffff, 2, Arc::new(Mutex::new(Rec::default())))
            .is_err());
        assert!(bus
            .insert(0x10, 0, Arc::new(Mutex::new(Rec::default())))
            .is_err());
        bus.insert(0xffff, 1, Arc::new(Mutex::new(Rec::default())))
            .unwrap();
    }
}
