//! The 16550 UART (COM1) from vm-superio, writing guest output to stdout, a file, or nowhere.
//!
//! The VM has no interrupt line wired to it: the guest polls the line status register, which
//! vm-superio keeps "transmitter empty" at all times.

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAction, PioDevice};

/// COM1's base port.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports a 16550 occupies.
pub const SERIAL_PORT_LEN: u16 = 8;

/// Where guest serial output goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialOutput {
    /// The VMM's standard output.
    Tty,
    /// A file (created or truncated).
    File(PathBuf),
    /// Discarded.
    Off,
}

/// Errors creating a serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The output file could not be opened.
    #[error("cannot open serial output file {path}: {source}")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A saved state is invalid.
    #[error("invalid serial state: {0}")]
    State(String),
}

/// The saved state of the UART registers (serde mirror of vm-superio's `SerialState`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The UART's interrupt line: an eventfd the hypervisor turns into an edge on the UART's IRQ
/// (registered with `Vm::register_irqfd`), or nothing (a guest that polls, unit tests).
#[derive(Debug, Default)]
pub struct IrqLine(Option<std::sync::Arc<EventFd>>);

impl IrqLine {
    /// A line that raises an interrupt by writing `fd`.
    pub fn new(fd: std::sync::Arc<EventFd>) -> Self {
        Self(Some(fd))
    }

    /// A line that goes nowhere.
    pub fn none() -> Self {
        Self(None)
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        match &self.0 {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

/// A 16550 UART on the port-I/O bus.
pub struct Serial {
    uart: Uart<IrqLine, NoEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

fn open_output(output: &SerialOutput) -> Result<Box<dyn Write + Send>, SerialError> {
    Ok(match output {
        SerialOutput::Tty => Box::new(std::io::stdout()),
        SerialOutput::Off => Box::new(std::io::sink()),
        SerialOutput::File(path) => {
            let f: File = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(|source| SerialError::OpenFile {
                    path: path.clone(),
                    source,
                })?;
            Box::new(LineWriter::new(f))
        }
    })
}

impl Serial {
    /// A UART in its reset state writing to `output`, interrupting through `irq`.
    pub fn new(output: &SerialOutput, irq: IrqLine) -> Result<Self, SerialError> {
        Ok(Self::with_writer(open_output(output)?, irq))
    }

    /// A UART in its reset state writing to `out`.
    pub fn with_writer(out: Box<dyn Write + Send>, irq: IrqLine) -> Self {
        Self {
            uart: Uart::new(irq, out),
        }
    }

    /// A UART restored from `state`, writing to `output`, interrupting through `irq`.
    pub fn from_state(
        state: &SerialDeviceState,
        output: &SerialOutput,
        irq: IrqLine,
    ) -> Result<Self, SerialError> {
        let uart = Uart::from_state(&state.into(), irq, NoEvents, open_output(output)?)
            .map_err(|e| SerialError::State(format!("{e:?}")))?;
        Ok(Self { uart })
    }

    /// The register state to save.
    pub fn state(&self) -> SerialDeviceState {
        self.uart.state().into()
    }
}

impl PioDevice for Serial {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if let Some((first, rest)) = data.split_first_mut() {
            *first = u8::try_from(offset).map_or(0xff, |o| self.uart.read(o));
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        if let (Some(&b), Ok(o)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(o, b) {
                log::debug!("serial write at offset {o}: {e:?}");
            }
        }
        BusAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let out = Shared::default();
        let mut s = Serial::with_writer(Box::new(out.clone()), IrqLine::none());
        for b in b"hb 1\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hb 1\n");
        // Line status: transmitter empty (bits 5 and 6).
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn file_output_and_state_round_trip() {
        let dir = std::env::temp_dir().join(format!("hg-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.log");
        let mut s = Serial::new(&SerialOutput::File(path.clone()), IrqLine::none()).unwrap();
        s.write(7, &[0x5a]); // scratch register
        for b in b"hello\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"hello\n");
        let st = s.state();
        assert_eq!(st.scratch, 0x5a);
        let json = serde_json::to_string(&st).unwrap();
        let back: SerialDeviceState = serde_json::from_str(&json).unwrap();
        let mut r = Serial::from_state(&back, &SerialOutput::Off, IrqLine::none()).unwrap();
        let mut d = [0u8];
        r.read(7, &mut d);
        assert_eq!(d, [0x5a]);
        let bad = SerialDeviceState {
            in_buffer: vec![0; 100_000],
            ..Default::default()
        };
        assert!(Serial::from_state(&bad, &SerialOutput::Off, IrqLine::none()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unopenable_file_is_an_error_naming_it() {
        let e = Serial::new(
            &SerialOutput::File("/nonexistent-dir/x/serial".into()),
            IrqLine::none(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/x/serial"));
    }

    #[test]
    fn the_interrupt_line_fires_when_the_guest_enables_it() {
        let fd = std::sync::Arc::new(EventFd::new(libc_nonblock()).unwrap());
        let mut s = Serial::with_writer(Box::new(std::io::sink()), IrqLine::new(fd.clone()));
        // Interrupts off (IER 0): a byte goes out, no interrupt.
        s.write(0, b"x");
        assert!(fd.read().is_err(), "no interrupt while IER is 0");
        // THR-empty interrupt on: the transmitter is empty, so the line fires at once...
        s.write(1, &[0x02]);
        assert!(fd.read().unwrap() >= 1);
        // Not again while the guest has not acknowledged it (read IIR)...
        s.write(0, b"y");
        assert!(fd.read().is_err(), "no second edge before the IIR read");
        let mut iir = [0u8];
        s.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "IIR: THR empty");
        // ...and again after the next byte sent.
        s.write(0, b"z");
        assert!(fd.read().unwrap() >= 1);
    }

    fn libc_nonblock() -> i32 {
        vmm_sys_util::eventfd::EFD_NONBLOCK
    }
}
