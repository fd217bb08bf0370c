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
    /// Serial output: tty (default), file=PATH or off. With --restore or vm.restore: replaces
    /// the snapshot's serial output
    #[arg(long, value_name = "tty|file=PATH|off", value_parser = parse_serial)]
    serial: Option<devices::SerialOutput>,
    /// Restore a VM from a snapshot instead of booting one (it comes up paused unless
    /// resume=true; memory_restore_mode=copy|ondemand|map_private, clock_policy=wallclock|frozen)
    #[arg(
        long,
        value_name = "source_url=file:///DIR[,resume=true][,clock_policy=wallclock|frozen]",
        value_parser = parse_restore,
        conflicts_with_all = ["cpus", "memory", "kernel", "dirty_mib"]
    )]
    restore: Option<vmm::api::RestoreConfig>,
    /// API socket: path=PATH (or a bare PATH)
    #[arg(long = "api-socket", value_name = "path=PATH", value_parser = parse_api_socket)]
    api_socket: Option<PathBuf>,
    /// What the guest sees of paused time by default: wallclock or frozen
    #[arg(long = "clock-policy", value_name = "wallclock|frozen", default_value = "wallclock", value_parser = parse_clock_policy)]
    clock_policy: hypervisor::tsc::ClockPolicy,
    /// MiB of RAM the test guest dirties in a loop
    #[arg(long = "dirty-mib", value_name = "N", default_value_t = 0)]
    dirty_mib: u32,
    /// Test guest idle mode: each vCPU halts N µs between samples (0: busy loop)
    #[arg(long = "guest-idle-us", value_name = "N", default_value_t = 0)]
    guest_idle_us: u32,
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

fn parse_restore(s: &str) -> std::result::Result<vmm::api::RestoreConfig, String> {
    vmm::api::RestoreConfig::from_options(s).map_err(|e| e.to_string())
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
        serial: cli.serial.clone().unwrap_or(defaults.serial.clone()),
        clock_policy: cli.clock_policy,
        dirty_mib: cli.dirty_mib,
        guest_idle_us: cli.guest_idle_us,
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
    let service = Arc::new(vmm::Service::new(
        hv.clone(),
        tx.clone(),
        cli.serial.clone(),
    ));
    let server = match &cli.api_socket {
        Some(p) => Some(
            start_api_server(p, service.clone())
                .with_context(|| format!("cannot serve the API on {}", p.display()))?,
        ),
        None => None,
    };
    // Like Cloud Hypervisor: with only --api-socket (no VM options), wait for vm.restore.
    let vm_options =
        cli.cpus.is_some() || cli.memory.is_some() || cli.kernel.is_some() || cli.dirty_mib != 0;
    if let Some(r) = &cli.restore {
        service
            .create(|| Vmm::restore(hv, r, cli.serial.clone(), tx))
            .with_context(|| format!("cannot restore the VM from {}", r.source_url))?;
    } else if vm_options || server.is_none() {
        service
            .create(|| Vmm::boot(hv, config, tx))
            .context("cannot boot the VM")?;
    } else {
        info!("no VM: waiting for vm.restore on the API socket");
    }
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
    if let Some(vmm) = service.vmm() {
        vmm.shutdown_vm();
    }
    if let Some(s) = server {
        s.shutdown();
    }
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}
