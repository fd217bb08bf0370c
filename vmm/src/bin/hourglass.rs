//! `hourglass`: boot a VM (by default the built-in test guest) and serve Cloud Hypervisor's API
//! on a Unix socket.
//!
//! The main thread becomes the control thread (`vmm::control`): it boots or restores the VM and
//! runs every API request; API connection threads only speak HTTP. Each thread kind has its own
//! seccomp filter (`--seccomp`, see `vmm::seccomp`).
//!
//! With `--serial tty` the guest's console is interactive: the VMM's stdin goes to the serial
//! port, and a terminal is in raw mode while the VMM runs; every way out of `main` (a normal or
//! an error exit, SIGINT/SIGTERM, a panic of the main thread) puts it back as it was.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use log::info;
use vmm::api::start_api_server;
use vmm::config::{
    parse_api_socket, parse_clock_policy, parse_cmdline, parse_cpus, parse_initramfs, parse_kernel,
    parse_memory, parse_serial, CpusConfig, MemoryConfig, VmConfig,
};
use vmm::control::Controller;
use vmm::seccomp::{self, SeccompMode, ThreadKind};
use vmm::vm::DeviceManager;
use vmm::{Service, Vmm};

/// Hourglass: a KVM VMM that keeps guest time (TSC, kvmclock) right across pause/resume,
/// snapshot/restore and live migration.
#[derive(Parser, Debug)]
#[command(
    name = "hourglass",
    version,
    about,
    long_about = None,
    after_help = "\
Modes (one per process):
  boot     any of --cpus, --memory, --kernel (with --initramfs, --cmdline), --clock-policy,
           --dirty-mib (with --dirty-passes), --guest-idle-us, or no --api-socket: boots a VM
           (the built-in test guest unless --kernel), with 1 vCPU and 512 MiB by default
  restore  --restore source_url=file:///DIR[,...]: restores a snapshot instead
  serve    only --api-socket (and --serial): no VM until vm.restore or vm.receive-migration
           arrives on the API socket
Flags that would have no effect in the mode chosen are refused.

Examples:
  hourglass --cpus boot=2 --memory size=256M --api-socket path=/tmp/hg.sock
  hourglass --kernel vmlinuz --initramfs initrd.img --cmdline \"console=ttyS0\"
  hourglass --restore source_url=file:///var/snap,resume=true --api-socket path=/tmp/hg.sock
  hourglass --api-socket path=/tmp/dst.sock     # then: ch-remote ... receive-migration"
)]
struct Cli {
    /// vCPUs: boot=N [default: boot=1]
    #[arg(long, value_name = "boot=N", value_parser = parse_cpus)]
    cpus: Option<CpusConfig>,
    /// Guest memory: size=SIZE, K, M and G suffixes [default: size=512M]
    #[arg(long, value_name = "size=SIZE", value_parser = parse_memory)]
    memory: Option<MemoryConfig>,
    /// A kernel to boot instead of the built-in test guest: an ELF with a PVH entry note (a
    /// Linux vmlinux with CONFIG_PVH, or a small PVH program) or a bzImage (a distribution's
    /// vmlinuz, through the Linux 64-bit boot protocol)
    #[arg(long, value_name = "PATH", value_parser = parse_kernel)]
    kernel: Option<PathBuf>,
    /// The initramfs for --kernel (a PVH module, or the bzImage's ramdisk)
    #[arg(long, value_name = "PATH", value_parser = parse_initramfs, requires = "kernel")]
    initramfs: Option<PathBuf>,
    /// The command line for --kernel (at most 2047 bytes for PVH; a bzImage's own limit)
    #[arg(long, value_name = "\"...\"", value_parser = parse_cmdline, requires = "kernel",
          allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Serial output: tty, file=PATH or off [default: tty]. With --restore or vm.restore:
    /// replaces the snapshot's serial output
    #[arg(long, value_name = "tty|file=PATH|off", value_parser = parse_serial)]
    serial: Option<devices::SerialOutput>,
    /// Restore a VM from a snapshot instead of booting one; it comes up paused unless
    /// resume=true. Options: source_url=file:///DIR, resume=true|false,
    /// memory_restore_mode=copy|ondemand (Cloud Hypervisor's: copy reads all of memory.bin before
    /// the VM runs; ondemand maps it copy-on-write, pages read as the guest touches them, and the
    /// snapshot must stay in place), clock_policy=wallclock|frozen
    #[arg(
        long,
        value_name = "source_url=file:///DIR[,resume=true][,clock_policy=wallclock|frozen]",
        value_parser = parse_restore,
        conflicts_with_all = ["cpus", "memory", "kernel", "initramfs", "cmdline", "dirty_mib",
                              "dirty_passes", "guest_idle_us", "clock_policy"]
    )]
    restore: Option<vmm::api::RestoreConfig>,
    /// API socket: path=PATH (or a bare PATH); at most 107 bytes
    #[arg(long = "api-socket", value_name = "path=PATH", value_parser = parse_api_socket)]
    api_socket: Option<PathBuf>,
    /// What the booted guest sees of paused time when a resume names no policy: wallclock or
    /// frozen [default: wallclock]
    #[arg(long = "clock-policy", value_name = "wallclock|frozen", value_parser = parse_clock_policy)]
    clock_policy: Option<hypervisor::tsc::ClockPolicy>,
    /// MiB of RAM the test guest dirties in a loop [default: 0]
    #[arg(long = "dirty-mib", value_name = "N")]
    dirty_mib: Option<u32>,
    /// Passes the test guest makes over --dirty-mib before it stops writing, 0 = forever
    /// [default: 0]
    #[arg(long = "dirty-passes", value_name = "N")]
    dirty_passes: Option<u32>,
    /// Test guest idle mode: each vCPU halts N µs between samples, 0 for a busy loop
    /// [default: 0]
    #[arg(long = "guest-idle-us", value_name = "N")]
    guest_idle_us: Option<u32>,
    /// Write the built-in test guest (a PVH ELF) to PATH and exit
    #[arg(
        long = "write-guest",
        value_name = "PATH",
        conflicts_with_all = ["cpus", "memory", "kernel", "initramfs", "cmdline", "serial",
                              "restore", "api_socket", "clock_policy", "dirty_mib",
                              "dirty_passes", "guest_idle_us"]
    )]
    write_guest: Option<PathBuf>,
    /// Per-thread seccomp filters: true (a forbidden syscall ends the process with SIGSYS and
    /// names the syscall), false (no filters) or log (allowed, logged by the kernel)
    #[arg(long, value_name = "true|false|log", default_value = "true", value_parser = parse_seccomp)]
    seccomp: SeccompMode,
    /// More log output (-v info, -vv debug, -vvv trace)
    #[arg(short, action = clap::ArgAction::Count)]
    v: u8,
}

impl Cli {
    /// Whether any option that describes a VM to boot was given.
    fn boot_options(&self) -> bool {
        self.cpus.is_some()
            || self.memory.is_some()
            || self.kernel.is_some()
            || self.clock_policy.is_some()
            || self.dirty_mib.is_some()
            || self.dirty_passes.is_some()
            || self.guest_idle_us.is_some()
    }

    /// What clap's attributes cannot say: `--dirty-passes` counts passes over the MiB that
    /// `--dirty-mib` dirties, so it needs a non-zero `--dirty-mib`.
    fn check(&self) -> Result<(), clap::Error> {
        match (self.dirty_passes, self.dirty_mib) {
            (Some(passes), None | Some(0)) => Err(Cli::command().error(
                ErrorKind::MissingRequiredArgument,
                format!(
                    "--dirty-passes {passes} needs a non-zero --dirty-mib N (the passes are over \
                     the MiB the test guest dirties)"
                ),
            )),
            _ => Ok(()),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = cli.check() {
        e.exit();
    }
    let level = match cli.v {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    let terminal = TerminalGuard;
    let result = run(cli);
    // Before the exit below, which runs no destructor.
    drop(terminal);
    match result {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("hourglass: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Puts the terminal back in its mode from before the console's raw mode when dropped (also
/// when the main thread unwinds from a panic).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        DeviceManager::restore_terminal();
    }
}

fn parse_seccomp(s: &str) -> std::result::Result<SeccompMode, String> {
    s.parse()
}

fn parse_restore(s: &str) -> std::result::Result<vmm::api::RestoreConfig, String> {
    vmm::api::RestoreConfig::from_options(s).map_err(|e| e.to_string())
}

/// Run the VMM; the process's exit status.
fn run(cli: Cli) -> Result<i32> {
    if let Some(path) = &cli.write_guest {
        std::fs::write(path, guest::GUEST_ELF)
            .with_context(|| format!("cannot write the guest to {}", path.display()))?;
        println!(
            "wrote the test guest ({} bytes) to {}",
            guest::GUEST_ELF.len(),
            path.display()
        );
        return Ok(0);
    }
    let defaults = VmConfig::default();
    let config = VmConfig {
        cpus: cli.cpus.unwrap_or(defaults.cpus),
        memory: cli.memory.unwrap_or(defaults.memory),
        kernel: cli.kernel.clone(),
        initramfs: cli.initramfs.clone(),
        cmdline: cli.cmdline.clone(),
        serial: cli.serial.clone().unwrap_or(defaults.serial.clone()),
        clock_policy: cli.clock_policy.unwrap_or(defaults.clock_policy),
        dirty_mib: cli.dirty_mib.unwrap_or(defaults.dirty_mib),
        guest_idle_us: cli.guest_idle_us.unwrap_or(defaults.guest_idle_us),
        dirty_passes: cli.dirty_passes.unwrap_or(defaults.dirty_passes),
    };

    // Before any filter: the process-wide mode, and the handler that names a violation.
    seccomp::set_mode(cli.seccomp);
    if cli.seccomp == SeccompMode::Trap {
        seccomp::install_sigsys_handler()?;
    }
    vmm::signal::install_vcpu_kick_handler().context("cannot install the vCPU kick signal")?;
    vmm::signal::install_sigbus_handler().context("cannot install the SIGBUS report")?;
    let exit_evt =
        vmm::signal::install_exit_handlers().context("cannot install SIGINT/SIGTERM handlers")?;
    // A VM whose serial output is the terminal gets the VMM's stdin as its console input.
    DeviceManager::enable_stdin_console();
    let controller = Controller::new();
    controller
        .watch_exit_signals(exit_evt)
        .context("cannot start the signal thread")?;
    let tx = controller.events();

    let hv = hypervisor::new().context("cannot open the hypervisor (is /dev/kvm there?)")?;
    // Claim the API socket before booting, so that a second hourglass on the same path is
    // refused before it creates anything.
    let service = Arc::new(Service::new(hv.clone(), tx.clone(), cli.serial.clone()));
    let server = match &cli.api_socket {
        Some(p) => Some(
            start_api_server(p, controller.api_handler())
                .with_context(|| format!("cannot serve the API on {}", p.display()))?,
        ),
        None => None,
    };
    // This thread is the control thread from here on: it boots or restores the VM and runs
    // every API request. The threads it spawns (vCPUs, migrations, forwarders) inherit its
    // filter, so the control filter includes theirs (see vmm::seccomp).
    seccomp::enter(ThreadKind::Control);
    // Like Cloud Hypervisor: with only --api-socket (no VM options), wait for vm.restore.
    let vm_options = cli.boot_options();
    if let Some(r) = &cli.restore {
        service
            .create(|| Vmm::restore(hv, r, cli.serial.clone(), tx))
            .with_context(|| format!("cannot restore the VM from {}", r.source_url))?;
    } else if vm_options || server.is_none() {
        service
            .create(|| Vmm::boot(hv, config, tx))
            .context("cannot boot the VM")?;
    } else {
        drop(tx);
        info!("no VM: waiting for vm.restore on the API socket");
    }
    if let Some(s) = &server {
        info!("API on {}", s.path().display());
    }

    // This thread runs pause and resume: ask for a short slice, as the API threads do, so that
    // a request handed over is not left waiting behind busy vCPU threads.
    if let Err(e) = vmm::vcpu::request_short_slice(vmm::vcpu::CONTROL_SLICE) {
        log::debug!("control thread keeps the default time slice: {e}");
    }
    let code = controller.run(&service);
    if let Some(s) = server {
        s.shutdown();
    }
    Ok(code)
}
