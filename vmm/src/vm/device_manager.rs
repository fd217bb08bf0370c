//! The device manager: which devices a VM has, where they sit on the port-I/O bus, and their
//! saved state.
//!
//! Every device of a VM is created here, from a configuration (boot) or from saved state
//! (restore, migration), and every device's state is captured here. A device added later gets
//! one field, one line in [`DeviceManager::bus`] and, if it has state, one in
//! [`DeviceManager::states`]: nothing else in the VM changes (ACPI's sleep registers came so).
//!
//! Power: the guest powers off through ACPI's sleep control register (the FADT names its port,
//! [`ACPI_SLEEP_PORT`]) and resets through the FADT's reset register, which is the i8042's
//! command port with its CPU-reset command, so both reset paths end in the same device.
//!
//! Interrupts: the serial port raises ISA IRQ 4 through an eventfd the hypervisor turns into an
//! edge on the in-kernel irqchip ([`DeviceManager::connect`], KVM_IRQFD), so a kernel's 8250
//! driver gets its transmit and receive interrupts. The irqchip's own state is KVM's.
//!
//! Console input: once the `hourglass` binary enabled it
//! ([`DeviceManager::enable_stdin_console`]), the serial port of a VM whose output is the
//! terminal (`--serial tty`; booted, restored or received by migration) gets the VMM's standard
//! input: one `stdin` thread per process reads it and feeds the newest such port, and a
//! terminal is put in raw mode until [`DeviceManager::restore_terminal`] at exit.

use std::sync::{Arc, Mutex};

use ::devices::acpi::{SleepControl, SLEEP_PORTS};
use ::devices::probe::{TimeProbe, PROBE_BASE, PROBE_PORT_COUNT};
use ::devices::serial::IrqLine;
use ::devices::serial::{COM1_PORT, SERIAL_PORT_LEN};
use ::devices::{PioBus, Serial, SerialOutput, I8042};
use arch::x86_64::acpi::S5_SLEEP_TYPE;
use arch::x86_64::layout::ACPI_SLEEP_PORT;
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
    sleep: Arc<Mutex<SleepControl>>,
    probe: Arc<TimeProbe>,
}

impl DeviceManager {
    /// Fresh devices for a booting VM; `again`: it replaces one the guest rebooted, and the
    /// serial output continues (a file is appended to). A terminal output also takes the console
    /// input (see the module documentation).
    pub fn new(output: &SerialOutput, probe: TimeProbe, again: bool) -> Result<Self, VmError> {
        let (irq, line) = irq_pair("serial")?;
        let serial = if again {
            Serial::continuing(output, line)
        } else {
            Serial::new(output, line)
        }
        .map_err(|e| VmError::Device(e.to_string()))?;
        let input = (*output == SerialOutput::Tty).then(|| serial.input());
        let devices = Self::with(serial, irq, probe);
        if let Some(input) = input {
            console::attach(input);
        }
        Ok(devices)
    }

    /// Devices as `states` left them (the serial port's pending input included); the serial
    /// port writes to `serial`, and takes the console input if that is the terminal.
    pub fn restore(states: &DeviceStates, serial: &SerialOutput) -> Result<Self, VmError> {
        let (irq, line) = irq_pair("serial")?;
        let s = Serial::from_state(&states.serial, serial, line)
            .map_err(|e| VmError::Device(format!("serial: {e}")))?;
        let probe = TimeProbe::restore(states.probe.clone())
            .map_err(|e| VmError::Device(format!("time probe: {e}")))?;
        let input = (*serial == SerialOutput::Tty).then(|| s.input());
        let devices = Self::with(s, irq, probe);
        if let Some(input) = input {
            console::attach(input);
        }
        Ok(devices)
    }

    fn with(serial: Serial, serial_irq: Arc<EventFd>, probe: TimeProbe) -> Self {
        Self {
            serial: Arc::new(Mutex::new(serial)),
            serial_irq,
            i8042: Arc::new(Mutex::new(I8042::new())),
            sleep: Arc::new(Mutex::new(SleepControl::new(S5_SLEEP_TYPE))),
            probe: Arc::new(probe),
        }
    }

    /// Wire the devices' interrupts into `vm`'s irqchip; before any vCPU runs.
    pub fn connect(&self, vm: &dyn hypervisor::Vm) -> Result<(), VmError> {
        vm.register_irqfd(&self.serial_irq, COM1_IRQ)
            .map_err(|e| VmError::Device(format!("serial: route IRQ {COM1_IRQ}: {e}")))
    }

    /// The port-I/O bus the vCPU threads dispatch to: COM1, the i8042 and ACPI's sleep
    /// registers (the time probe's
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
        bus.insert(ACPI_SLEEP_PORT, SLEEP_PORTS, self.sleep.clone())
            .map_err(|e| VmError::Device(format!("ACPI sleep control: {e}")))?;
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
            "_acpi_sleep": node("_acpi_sleep", ACPI_SLEEP_PORT, SLEEP_PORTS),
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

/// The console on the VMM's standard input (process-wide: one stdin, one terminal).
impl DeviceManager {
    /// From now on, a VM whose serial output is the terminal reads the VMM's standard input
    /// (the `hourglass` binary calls this once, before any VM; a library user that does not
    /// leaves stdin alone). If stdin is a terminal in this process's foreground, it is put in
    /// raw mode when the first such VM is created: keys go to the guest as typed, unechoed,
    /// except that Ctrl-C, Ctrl-Z and Ctrl-\ still signal the VMM (as QEMU's stdio console
    /// does by default). A terminal this process does not own (run in the background) is not
    /// read.
    pub fn enable_stdin_console() {
        console::enable();
    }

    /// Put the terminal back in the mode it had before raw mode, if raw mode was set; no raw
    /// mode is set afterwards. The `hourglass` binary calls this on every way out of `main`.
    pub fn restore_terminal() {
        console::restore_terminal();
    }
}

/// The VMM's standard input as the console of the VMs whose serial output is the terminal.
///
/// One `stdin` thread per process (started with the first such VM) reads stdin and queues what
/// it reads for the newest such VM's serial port ([`SerialInput::send`]: it blocks while the
/// port's pending queue is full, so nothing is dropped). A newer VM (a reboot, a restore or a
/// received migration after a shutdown) takes the input over: the older port is detached, and
/// what it had not taken goes to the newer one. With no VM to take it, the thread waits.
/// End of input (a pipe, `/dev/null`) ends the thread quietly; a read error is logged once and
/// ends it.
mod console {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Condvar, Mutex, MutexGuard, Once};

    use ::devices::serial::{InputDetached, SerialInput};
    use log::{debug, info, warn};

    use crate::seccomp::ThreadKind;

    /// Whether VMs with a terminal console read stdin ([`enable`]).
    static ENABLED: AtomicBool = AtomicBool::new(false);
    /// The serial port input goes to (the newest VM's).
    static TARGET: Mutex<Option<SerialInput>> = Mutex::new(None);
    /// Signalled when [`TARGET`] changes.
    static CHANGED: Condvar = Condvar::new();
    /// Raw mode and the stdin thread, once.
    static START: Once = Once::new();
    /// The terminal's mode before raw mode.
    static TERMINAL: Mutex<Terminal> = Mutex::new(Terminal {
        saved: None,
        closed: false,
    });

    struct Terminal {
        /// The mode to restore (set while stdin is in raw mode).
        saved: Option<libc::termios>,
        /// The VMM is exiting: no raw mode any more.
        closed: bool,
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn enable() {
        ENABLED.store(true, Ordering::SeqCst);
    }

    /// A VM whose serial output is the terminal was created: its port takes the input from now
    /// on (the first one starts the stdin thread).
    pub(super) fn attach(input: SerialInput) {
        if !ENABLED.load(Ordering::SeqCst) {
            return;
        }
        START.call_once(start);
        set_target(input);
    }

    /// Make `input` the port stdin feeds; the previous one takes no more.
    pub(super) fn set_target(input: SerialInput) {
        let old = lock(&TARGET).replace(input);
        CHANGED.notify_all();
        if let Some(old) = old {
            old.detach();
        }
    }

    /// Raw mode (a terminal) and the stdin thread.
    fn start() {
        if !enter_raw_mode() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(read_stdin);
        if let Err(e) = spawned {
            warn!("console input: cannot start the stdin thread ({e}); the guest gets no input");
            put_back(&mut lock(&TERMINAL));
        }
    }

    /// Put stdin in raw mode if it is a terminal. False if it is the controlling terminal and
    /// its foreground is another process group (this VMM runs in the background): it is not
    /// read then, lest the read stop the VMM (SIGTTIN).
    fn enter_raw_mode() -> bool {
        let mut term = lock(&TERMINAL);
        if term.closed {
            return false;
        }
        // SAFETY: isatty(3) only asks the kernel about fd 0 (an ioctl); no memory is passed.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return true;
        }
        // SAFETY: tcgetpgrp(3) (an ioctl on fd 0) and getpgrp(2) only return numbers; no
        // memory is passed.
        let (foreground, own) = unsafe { (libc::tcgetpgrp(libc::STDIN_FILENO), libc::getpgrp()) };
        // -1 (ENOTTY): a terminal that is not this process's controlling terminal, where no job
        // control applies.
        if foreground > 0 && foreground != own {
            info!("stdin is a terminal this VMM does not own (background): no console input");
            return false;
        }
        // SAFETY: termios is plain integers, for which all zeroes is a valid value; tcgetattr(3)
        // writes one termios into `saved`, which lives across the call.
        let (rc, saved) = unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            (libc::tcgetattr(libc::STDIN_FILENO, &mut saved), saved)
        };
        if rc != 0 {
            warn!(
                "console input: cannot read the terminal's mode ({}); it stays as it is",
                std::io::Error::last_os_error()
            );
            return true;
        }
        let mut raw = saved;
        // Input as typed: no line editing, echo, CR/NL translation, flow control or stripping.
        // ISIG stays (Ctrl-C ends the VMM), and OPOST (the guest's and the log's newlines).
        raw.c_iflag &= !(libc::IGNBRK
            | libc::BRKINT
            | libc::PARMRK
            | libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON);
        raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: tcsetattr(3) (an ioctl on fd 0) reads one termios from `raw`, which lives
        // across the call.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            warn!(
                "console input: cannot put the terminal in raw mode ({}); input is by line",
                std::io::Error::last_os_error()
            );
            return true;
        }
        term.saved = Some(saved);
        debug!("console input: the terminal is in raw mode");
        true
    }

    pub(super) fn restore_terminal() {
        let mut term = lock(&TERMINAL);
        term.closed = true;
        put_back(&mut term);
    }

    /// Restore the mode saved before raw mode, if any.
    fn put_back(term: &mut Terminal) {
        let Some(saved) = term.saved.take() else {
            return;
        };
        // Sent to the background meanwhile (Ctrl-Z, bg), the VMM would be stopped by SIGTTOU
        // here; with it blocked, the call goes through.
        let blocked = vmm_sys_util::signal::block_signal(libc::SIGTTOU).is_ok();
        // SAFETY: tcsetattr(3) (an ioctl on fd 0) reads one termios from `saved`, which lives
        // across the call.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &saved) } != 0 {
            warn!(
                "cannot restore the terminal's mode ({}); `stty sane` repairs it",
                std::io::Error::last_os_error()
            );
        }
        if blocked {
            let _ = vmm_sys_util::signal::unblock_signal(libc::SIGTTOU);
        }
    }

    /// The stdin thread.
    fn read_stdin() {
        crate::seccomp::enter(ThreadKind::Stdin);
        // A terminal this process lost to the background (Ctrl-Z, bg) makes the read fail
        // (EIO) instead of stopping the whole VMM with SIGTTIN.
        let _ = vmm_sys_util::signal::block_signal(libc::SIGTTIN);
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => {
                    debug!("console input: end of stdin");
                    return;
                }
                Ok(n) => deliver(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("console input: cannot read stdin ({e}); the guest gets no more input");
                    return;
                }
            }
        }
    }

    /// Queue `bytes` for the current port, in order, waiting for one if there is none; what a
    /// detached port did not take goes to the next.
    pub(super) fn deliver(mut bytes: &[u8]) {
        loop {
            let input = {
                let mut target = lock(&TARGET);
                loop {
                    if let Some(input) = target.as_ref() {
                        break input.clone();
                    }
                    target = CHANGED.wait(target).unwrap_or_else(|e| e.into_inner());
                }
            };
            match input.send(bytes) {
                Ok(()) => return,
                Err(InputDetached { queued }) => {
                    bytes = &bytes[queued..];
                    let mut target = lock(&TARGET);
                    if target.as_ref().is_some_and(|t| t.same_device(&input)) {
                        *target = None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use arch::x86_64::layout::{RESET_PORT, RESET_VALUE};
    use devices::i8042::{CMD_RESET_CPU, I8042_COMMAND_PORT};
    use devices::serial::{IrqLine, PENDING_INPUT_MAX};
    use devices::{PioDevice, Serial};

    use super::console;

    /// Console input goes to the newest port: one that stops taking input (detached by a
    /// newer VM) hands what it did not take to the next, in order, nothing lost.
    #[test]
    fn console_input_moves_to_the_newest_port_without_loss() {
        let first = Serial::with_writer(Box::new(std::io::sink()), IrqLine::none());
        let mut second = Serial::with_writer(Box::new(std::io::sink()), IrqLine::none());
        console::set_target(first.input());
        // More than the first port holds (its FIFO and pending queue): the sender blocks.
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let sender = std::thread::spawn(move || console::deliver(&sent));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while first.pending_input_len() < PENDING_INPUT_MAX {
            assert!(
                std::time::Instant::now() < deadline,
                "the first port never filled"
            );
            std::thread::yield_now();
        }
        console::set_target(second.input());
        sender.join().expect("sender");
        let a = first.state();
        let taken = a.in_buffer.len() + a.pending_input.len();
        assert_eq!(taken, 64 + PENDING_INPUT_MAX);
        assert_eq!([a.in_buffer, a.pending_input].concat(), data[..taken]);
        let b = second.state();
        assert_eq!([b.in_buffer, b.pending_input].concat(), data[taken..]);
        // The second port's guest reads it all.
        let mut lsr = [0u8];
        second.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1);
    }

    /// The FADT's reset register (arch) must be the i8042's reset command (devices).
    #[test]
    fn the_acpi_reset_register_is_the_i8042_reset() {
        assert_eq!(
            (RESET_PORT, RESET_VALUE),
            (I8042_COMMAND_PORT, CMD_RESET_CPU)
        );
    }
}
