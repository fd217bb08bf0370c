//! The 16550 UART (COM1) from vm-superio: guest output to stdout, a file, or nowhere; guest
//! input from a [`SerialInput`] handle.
//!
//! The UART raises its interrupt through an [`IrqLine`]; a guest may also poll the line status
//! register (vm-superio keeps "transmitter empty" set at all times).
//!
//! # Input
//!
//! vm-superio's receive FIFO holds 64 bytes. Input beyond that waits in a pending queue of this
//! device (at most [`PENDING_INPUT_MAX`] bytes), and moves into the FIFO whenever the FIFO has
//! room: when input arrives, and after each guest read of the receive buffer register (and when
//! the guest leaves loopback mode, in which the FIFO takes no input). Nothing polls. A producer
//! ([`SerialInput::send`]) blocks while the pending queue is full, so no byte is ever dropped:
//! a person pasting faster than the guest reads is slowed down, not cut off. The pending queue
//! is part of the saved state ([`SerialDeviceState::pending_input`]).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAction, PioDevice};

/// COM1's base port.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports a 16550 occupies.
pub const SERIAL_PORT_LEN: u16 = 8;
/// The most guest input a serial device holds outside its receive FIFO (the pending queue);
/// a producer blocks while it is full.
pub const PENDING_INPUT_MAX: usize = 64 * 1024;
/// vm-superio's receive FIFO, in bytes.
const FIFO_BYTES: usize = 64;
/// The receive buffer (read) and transmit holding (write) register.
const DATA_OFFSET: u8 = 0;
/// The modem control register (its loopback bit stops input reaching the FIFO).
const MCR_OFFSET: u8 = 4;

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
    /// The receive FIFO (at most 64 bytes).
    pub in_buffer: Vec<u8>,
    /// Guest input waiting for room in the FIFO, oldest first (at most [`PENDING_INPUT_MAX`]
    /// bytes). Absent from snapshots taken before console input existed, and left out when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_input: Vec<u8>,
}

impl SerialDeviceState {
    /// Whether the queues fit the device: the error names the field.
    pub fn check(&self) -> Result<(), SerialError> {
        if self.in_buffer.len() > FIFO_BYTES {
            return Err(SerialError::State(format!(
                "in_buffer holds {} bytes, more than the FIFO's {FIFO_BYTES}",
                self.in_buffer.len()
            )));
        }
        if self.pending_input.len() > PENDING_INPUT_MAX {
            return Err(SerialError::State(format!(
                "pending_input holds {} bytes, more than the {PENDING_INPUT_MAX} a serial device \
                 keeps",
                self.pending_input.len()
            )));
        }
        Ok(())
    }
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
            pending_input: Vec::new(),
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

type Uart16550 = Uart<IrqLine, NoEvents, Box<dyn Write + Send>>;

/// The UART and its input side: what the device and its input handles share.
struct Port {
    uart: Uart16550,
    /// Input waiting for room in the FIFO, oldest first.
    pending: VecDeque<u8>,
    /// The most `pending` holds ([`PENDING_INPUT_MAX`] but in unit tests).
    limit: usize,
    /// The device takes no more input: it is gone, or a newer device took its input over.
    detached: bool,
    /// Producers blocked until `pending` has room.
    waiting: usize,
}

impl Port {
    /// Move pending input into the FIFO as far as it has room (which raises the receive
    /// interrupt if the guest enabled it); wake blocked producers once the pending queue is
    /// down to half.
    fn refill(&mut self, room: &Condvar) {
        if self.pending.is_empty() {
            return;
        }
        let before = self.uart.fifo_capacity();
        let (front, back) = self.pending.as_slices();
        for part in [front, back] {
            let cap = self.uart.fifo_capacity();
            if part.is_empty() || cap == 0 {
                break;
            }
            if let Err(e) = self.uart.enqueue_raw_bytes(part) {
                // The bytes are in the FIFO all the same (vm-superio queues them before it
                // raises the interrupt); the capacity below counts them.
                log::debug!("serial input: {e:?}");
            }
            if self.uart.fifo_capacity() == cap {
                // Loopback mode: the FIFO takes no input until the guest leaves it.
                break;
            }
        }
        let moved = before - self.uart.fifo_capacity();
        self.pending.drain(..moved);
        if moved > 0 && self.waiting > 0 && self.pending.len() <= self.limit / 2 {
            room.notify_all();
        }
    }
}

/// What a [`Serial`] and its [`SerialInput`] handles share.
struct Shared {
    port: Mutex<Port>,
    /// Signalled when the pending queue has room again, or the device is detached.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Port> {
        self.port.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn detach(&self) {
        self.lock().detached = true;
        self.room.notify_all();
    }
}

/// A 16550 UART on the port-I/O bus.
pub struct Serial {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl Drop for Serial {
    /// The device is gone: producers blocked on it return ([`InputDetached`]).
    fn drop(&mut self) {
        self.shared.detach();
    }
}

/// A handle that feeds guest input into a [`Serial`] (a thread reading the VMM's stdin holds
/// one). Cloneable and `Send`; it does not keep the device alive.
#[derive(Clone)]
pub struct SerialInput {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialInput").finish_non_exhaustive()
    }
}

/// The device a [`SerialInput`] fed takes no more input (it was dropped, or detached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the serial device takes no more input ({queued} bytes of this send were queued)")]
pub struct InputDetached {
    /// How many leading bytes of the send the device took before.
    pub queued: usize,
}

impl SerialInput {
    /// Queue `bytes` for the guest, in order. Blocks while the pending queue is full (until the
    /// guest reads), so nothing is dropped. Fails only when the device takes no more input.
    pub fn send(&self, bytes: &[u8]) -> Result<(), InputDetached> {
        let mut port = self.shared.lock();
        let mut queued = 0;
        loop {
            if port.detached {
                return Err(InputDetached { queued });
            }
            let room = port.limit.saturating_sub(port.pending.len());
            if room > 0 || queued == bytes.len() {
                let n = room.min(bytes.len() - queued);
                port.pending.extend(&bytes[queued..queued + n]);
                queued += n;
                port.refill(&self.shared.room);
                if queued == bytes.len() {
                    return Ok(());
                }
                continue;
            }
            port.waiting += 1;
            port = self
                .shared
                .room
                .wait(port)
                .unwrap_or_else(|e| e.into_inner());
            port.waiting -= 1;
        }
    }

    /// Take no more input into this device (a newer device takes the input over): blocked and
    /// later sends return [`InputDetached`]. What it already holds stays for its guest.
    pub fn detach(&self) {
        self.shared.detach();
    }

    /// Whether `other` feeds the same device.
    pub fn same_device(&self, other: &SerialInput) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// Open `output`; a file is truncated unless `append`.
fn open_output(output: &SerialOutput, append: bool) -> Result<Box<dyn Write + Send>, SerialError> {
    Ok(match output {
        SerialOutput::Tty => Box::new(std::io::stdout()),
        SerialOutput::Off => Box::new(std::io::sink()),
        SerialOutput::File(path) => {
            let f: File = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(!append)
                .append(append)
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
        Ok(Self::with_writer(open_output(output, false)?, irq))
    }

    /// As [`Serial::new`], but a file output is appended to: the UART of a VM that replaces
    /// one the guest rebooted, whose console goes on in the same file.
    pub fn continuing(output: &SerialOutput, irq: IrqLine) -> Result<Self, SerialError> {
        Ok(Self::with_writer(open_output(output, true)?, irq))
    }

    /// A UART in its reset state writing to `out`.
    pub fn with_writer(out: Box<dyn Write + Send>, irq: IrqLine) -> Self {
        Self::with_uart(Uart::new(irq, out), VecDeque::new())
    }

    fn with_uart(uart: Uart16550, pending: VecDeque<u8>) -> Self {
        let shared = Arc::new(Shared {
            port: Mutex::new(Port {
                uart,
                pending,
                limit: PENDING_INPUT_MAX,
                detached: false,
                waiting: 0,
            }),
            room: Condvar::new(),
        });
        shared.lock().refill(&shared.room);
        Self { shared }
    }

    /// A UART restored from `state`, writing to `output`, interrupting through `irq`. A state
    /// whose queues do not fit the device is refused with an error naming the field.
    pub fn from_state(
        state: &SerialDeviceState,
        output: &SerialOutput,
        irq: IrqLine,
    ) -> Result<Self, SerialError> {
        state.check()?;
        let uart = Uart::from_state(&state.into(), irq, NoEvents, open_output(output, false)?)
            .map_err(|e| SerialError::State(format!("{e:?}")))?;
        Ok(Self::with_uart(
            uart,
            state.pending_input.iter().copied().collect(),
        ))
    }

    /// The register state to save, with the input not yet in the FIFO.
    pub fn state(&self) -> SerialDeviceState {
        let port = self.shared.lock();
        let mut state = SerialDeviceState::from(port.uart.state());
        state.pending_input = port.pending.iter().copied().collect();
        state
    }

    /// A handle that feeds guest input into this device.
    pub fn input(&self) -> SerialInput {
        SerialInput {
            shared: self.shared.clone(),
        }
    }

    /// Bytes of input waiting outside the FIFO.
    pub fn pending_input_len(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// A pending queue of at most `limit` bytes instead of [`PENDING_INPUT_MAX`].
    #[cfg(test)]
    fn with_input_limit(self, limit: usize) -> Self {
        self.shared.lock().limit = limit.clamp(1, PENDING_INPUT_MAX);
        self
    }
}

impl PioDevice for Serial {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if let Some((first, rest)) = data.split_first_mut() {
            *first = match u8::try_from(offset) {
                Ok(o) => {
                    let mut port = self.shared.lock();
                    let value = port.uart.read(o);
                    if o == DATA_OFFSET {
                        // The guest took a byte (unless DLAB is set, when this read the
                        // divisor and the FIFO has no more room than before).
                        port.refill(&self.shared.room);
                    }
                    value
                }
                Err(_) => 0xff,
            };
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> BusAction {
        if let (Some(&b), Ok(o)) = (data.first(), u8::try_from(offset)) {
            let mut port = self.shared.lock();
            if let Err(e) = port.uart.write(o, b) {
                log::debug!("serial write at offset {o}: {e:?}");
            }
            if o == MCR_OFFSET {
                // Leaving loopback mode lets pending input into the FIFO.
                port.refill(&self.shared.room);
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

    /// Line status register, data-ready bit.
    const LSR_DATA_READY: u8 = 0x01;

    /// Read `n` bytes as a polling guest does: wait for LSR's data-ready bit, then read RBR.
    /// Panics if they do not come within 20 s.
    fn guest_reads(s: &mut Serial, n: usize) -> Vec<u8> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & LSR_DATA_READY != 0 {
                let mut rbr = [0u8];
                s.read(0, &mut rbr);
                got.push(rbr[0]);
            } else {
                assert!(
                    std::time::Instant::now() < deadline,
                    "only {} of {n} bytes arrived",
                    got.len()
                );
                std::thread::yield_now();
            }
        }
        got
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// 10,000 bytes from another thread through a pending queue of 100: the producer blocks
    /// while the queue is full (it does not drop), and a guest reading RBR gets every byte, in
    /// order.
    #[test]
    fn input_beyond_the_fifo_waits_and_every_byte_arrives_in_order() {
        let mut s =
            Serial::with_writer(Box::new(std::io::sink()), IrqLine::none()).with_input_limit(100);
        let input = s.input();
        let data = pattern(10_000);
        let sent = data.clone();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let finished = done.clone();
        let producer = std::thread::spawn(move || {
            // Uneven pieces, each larger than the FIFO and some than the queue.
            for piece in sent.chunks(777) {
                input.send(piece).expect("the device is there");
            }
            finished.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        // Nothing read yet: the FIFO (64) and the queue (100) fill, and the producer waits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while s.pending_input_len() < 100 {
            assert!(
                std::time::Instant::now() < deadline,
                "the queue never filled"
            );
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            s.pending_input_len(),
            100,
            "no byte dropped, none beyond the limit"
        );
        assert_eq!(s.state().in_buffer.len(), 64, "the FIFO is full");
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "the producer must block while the queue is full"
        );
        let got = guest_reads(&mut s, data.len());
        producer.join().expect("producer");
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes reordered or changed");
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & LSR_DATA_READY, 0, "nothing more to read");
        assert_eq!(s.pending_input_len(), 0);
    }

    /// Input not yet in the FIFO is saved, survives JSON and a restore, and reaches the guest.
    #[test]
    fn pending_input_is_saved_and_restored() {
        let s = Serial::with_writer(Box::new(std::io::sink()), IrqLine::none());
        let data = pattern(1000);
        s.input().send(&data).unwrap();
        let st = s.state();
        assert_eq!(st.in_buffer, data[..64]);
        assert_eq!(st.pending_input, data[64..]);
        let json = serde_json::to_string(&st).unwrap();
        let back: SerialDeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);
        let mut r = Serial::from_state(&back, &SerialOutput::Off, IrqLine::none()).unwrap();
        assert_eq!(guest_reads(&mut r, data.len()), data);

        // A state without input leaves the field out, and a state written before the field
        // existed loads with no pending input.
        let idle = Serial::with_writer(Box::new(std::io::sink()), IrqLine::none()).state();
        let json = serde_json::to_string(&idle).unwrap();
        assert!(!json.contains("pending_input"), "{json}");
        let old: SerialDeviceState = serde_json::from_str(&json).unwrap();
        assert!(old.pending_input.is_empty());
        // A restored state whose FIFO has room (saved in loopback mode) fills it at once.
        let partial = SerialDeviceState {
            line_status: 0x60,
            pending_input: b"abc".to_vec(),
            ..idle
        };
        let mut r = Serial::from_state(&partial, &SerialOutput::Off, IrqLine::none()).unwrap();
        assert_eq!(guest_reads(&mut r, 3), b"abc");
    }

    #[test]
    fn a_pending_input_over_the_limit_is_refused_by_name() {
        let bad = SerialDeviceState {
            pending_input: vec![b'x'; PENDING_INPUT_MAX + 1],
            ..Default::default()
        };
        let e = Serial::from_state(&bad, &SerialOutput::Off, IrqLine::none()).unwrap_err();
        assert!(e.to_string().contains("pending_input"), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("{}", PENDING_INPUT_MAX + 1)),
            "{e}"
        );
        let full = SerialDeviceState {
            pending_input: vec![b'x'; PENDING_INPUT_MAX],
            ..Default::default()
        };
        assert!(Serial::from_state(&full, &SerialOutput::Off, IrqLine::none()).is_ok());
        let bad = SerialDeviceState {
            in_buffer: vec![0; 65],
            ..Default::default()
        };
        let e = Serial::from_state(&bad, &SerialOutput::Off, IrqLine::none()).unwrap_err();
        assert!(e.to_string().contains("in_buffer"), "{e}");
    }

    /// A producer blocked on a full queue returns when the device goes away (or is detached),
    /// saying how much of its send was taken.
    #[test]
    fn a_blocked_producer_returns_when_the_device_goes() {
        let s =
            Serial::with_writer(Box::new(std::io::sink()), IrqLine::none()).with_input_limit(10);
        let input = s.input();
        let producer = std::thread::spawn(move || input.send(&[b'y'; 200]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while s.pending_input_len() < 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "the queue never filled"
            );
            std::thread::yield_now();
        }
        let other = s.input();
        drop(s);
        assert_eq!(
            producer.join().unwrap(),
            Err(InputDetached { queued: 64 + 10 })
        );
        assert_eq!(other.send(b"z"), Err(InputDetached { queued: 0 }));

        let s = Serial::with_writer(Box::new(std::io::sink()), IrqLine::none());
        let (a, b) = (s.input(), s.input());
        assert!(a.same_device(&b));
        a.detach();
        assert_eq!(b.send(b"z"), Err(InputDetached { queued: 0 }));
        assert_eq!(s.state().in_buffer, b"", "a detached device takes nothing");
    }

    /// In loopback mode the FIFO takes no input: it waits, and arrives when the guest leaves
    /// loopback. Input raises the receive interrupt when the guest enabled it.
    #[test]
    fn input_waits_out_loopback_and_raises_the_receive_interrupt() {
        let fd = std::sync::Arc::new(EventFd::new(libc_nonblock()).unwrap());
        let mut s = Serial::with_writer(Box::new(std::io::sink()), IrqLine::new(fd.clone()));
        s.write(4, &[0x10]); // MCR: loopback
        s.input().send(b"hello").unwrap();
        assert_eq!(s.pending_input_len(), 5);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & LSR_DATA_READY, 0);
        s.write(1, &[0x01]); // IER: received-data interrupt
        assert!(fd.read().is_err(), "no data, no interrupt");
        s.write(4, &[0x00]); // out of loopback: the input moves into the FIFO
        assert!(fd.read().unwrap() >= 1, "received-data interrupt");
        assert_eq!(s.pending_input_len(), 0);
        assert_eq!(guest_reads(&mut s, 5), b"hello");
    }
}
