//! `hourglass`: boot a VM (by default the built-in test guest) and serve Cloud Hypervisor's API
//! on a Unix socket.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use log::{error, info, warn};
use vmm::api::start_api_server;
use vmm::config::{
    parse_api_socket, parse_clock_policy, parse_cpus, parse_memory, parse_serial, CpusConfig,
    MemoryConfig, VmConfig,
};
use vmm::{Vmm, VmmEvent};

/// Hourglass: a KVM VMM that keeps guest time (TSC, kvmclock) right across pause and resume.
#[derive(Parser, Debug)]
#[command(name = "hourglass", version, about)]
struct Cli {
    /// vCPUs: boot=N
    #[arg(long, value_name = "boot=N", value_parser = parse_cpus)]
    cpus: Option<CpusConfig>,
    /// Guest memory: size=SIZE (K, M, G suffixes)
    #[arg(long, value_name = "size=512M", value_parser = parse_memory)]
    memory: Option<MemoryConfig>,
    /// A PVH ELF image to boot instead of the built-in test guest
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Serial output: tty, file=PATH or off
    #[arg(long, value_name = "tty|file=PATH|off", default_value = "tty", value_parser = parse_serial)]
    serial: devices::SerialOutput,
    /// API socket: path=PATH (or a bare PATH)
    #[arg(long = "api-socket", value_name = "path=PATH", value_parser = parse_api_socket)]
    api_socket: Option<PathBuf>,
    /// What the guest sees of paused time by default: wallclock or frozen
    #[arg(long = "clock-policy", value_name = "wallclock|frozen", default_value = "wallclock", value_parser = parse_clock_policy)]
    clock_policy: hypervisor::tsc::ClockPolicy,
    /// MiB of RAM the test guest dirties in a loop
    #[arg(long = "dirty-mib", value_name = "N", default_value_t = 0)]
    dirty_mib: u32,
    /// Write the built-in test guest (a PVH ELF) to PATH and exit
    #[arg(long = "write-guest", value_name = "PATH")]
    write_guest: Option<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace)
    #[arg(short, action = clap::ArgAction::Count)]
    v: u8,
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.v {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    if let Err(e) = run(cli) {
        eprintln!("hourglass: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(path) = &cli.write_guest {
        std::fs::write(path, guest::GUEST_ELF)
            .with_context(|| format!("cannot write the guest to {}", path.display()))?;
        println!(
            "wrote the test guest ({} bytes) to {}",
            guest::GUEST_ELF.len(),
            path.display()
        );
        return Ok(());
    }
    let defaults = VmConfig::default();
    let config = VmConfig {
        cpus: cli.cpus.unwrap_or(defaults.cpus),
        memory: cli.memory.unwrap_or(defaults.memory),
        kernel: cli.kernel.clone(),
        serial: cli.serial.clone(),
        clock_policy: cli.clock_policy,
        dirty_mib: cli.dirty_mib,
    };

    vmm::signal::install_vcpu_kick_handler().context("cannot install the vCPU kick signal")?;
    let exit_evt =
        vmm::signal::install_exit_handlers().context("cannot install SIGINT/SIGTERM handlers")?;
    let (tx, rx) = mpsc::channel::<VmmEvent>();
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                match exit_evt.read() {
                    Ok(_) => {
                        let _ = tx.send(VmmEvent::Signal);
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        error!("signal eventfd: {e}");
                        break;
                    }
                }
            })
            .context("cannot start the signal thread")?;
    }

    let hv = hypervisor::new().context("cannot open the hypervisor (is /dev/kvm there?)")?;
    // Claim the API socket before booting, so that a second hourglass on the same path is
    // refused before it creates anything.
    let vmm_slot: Arc<LateHandler> = Arc::new(LateHandler::default());
    let server = match &cli.api_socket {
        Some(p) => Some(
            start_api_server(p, vmm_slot.clone())
                .with_context(|| format!("cannot serve the API on {}", p.display()))?,
        ),
        None => None,
    };
    let vmm = Arc::new(Vmm::boot(hv, config, tx).context("cannot boot the VM")?);
    vmm_slot.set(vmm.clone());
    if let Some(s) = &server {
        info!("API on {}", s.path().display());
    }

    let code = match rx.recv() {
        Ok(VmmEvent::ApiShutdown) => {
            info!("shutting down (vmm.shutdown)");
            0
        }
        Ok(VmmEvent::Signal) => {
            info!("shutting down (signal)");
            0
        }
        Ok(VmmEvent::Vm(ev)) => {
            warn!("VM stopped: {ev:?}");
            match ev {
                vmm::vcpu::VmEvent::VcpuError(..) => 1,
                _ => 0,
            }
        }
        Err(_) => {
            error!("event channel closed");
            1
        }
    };
    vmm.shutdown_vm();
    if let Some(s) = server {
        s.shutdown();
    }
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// An API handler that answers "booting" until the VMM exists.
#[derive(Default)]
struct LateHandler {
    vmm: std::sync::OnceLock<Arc<Vmm>>,
}

impl LateHandler {
    fn set(&self, vmm: Arc<Vmm>) {
        let _ = self.vmm.set(vmm);
    }
}

impl vmm::api::ApiHandler for LateHandler {
    fn handle(
        &self,
        req: vmm::api::ApiRequest,
    ) -> Result<vmm::api::ApiResponse, vmm::api::ApiError> {
        match self.vmm.get() {
            Some(v) => v.handle(req),
            None => Err(vmm::api::ApiError::internal("the VM is still booting")),
        }
    }
}
