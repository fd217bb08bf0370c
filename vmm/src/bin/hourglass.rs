//! `hourglass`: boot a VM (by default the built-in test guest) and serve Cloud Hypervisor's API
//! on a Unix socket.
//!
//! Threads and their seccomp filters (`--seccomp`, see `vmm::seccomp`): the main thread is the
//! control thread. API connection threads only speak HTTP: each parsed request is sent over a
//! channel to the control thread, which runs it and sends the answer back, so the API filter
//! need not allow what the requests do. `vm.send-migration` and `vm.receive-migration` run in a
//! `migration-send` / `migration-recv` thread that the control thread spawns (and that answers
//! the waiting connection when done), so that the control thread keeps answering `vm.info`
//! meanwhile. The signal thread and the event forwarders turn SIGINT/SIGTERM and VM events into
//! messages on the same channel.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use log::{error, info, warn};
use vmm::api::{start_api_server, ApiError, ApiHandler, ApiRequest, ApiResponse};
use vmm::config::{
    parse_api_socket, parse_clock_policy, parse_cpus, parse_memory, parse_serial, CpusConfig,
    MemoryConfig, VmConfig,
};
use vmm::seccomp::{self, SeccompMode, ThreadKind};
use vmm::{Service, Vmm, VmmEvent};

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
    /// Per-thread seccomp filters: true (a forbidden syscall ends the process with SIGSYS and
    /// names the syscall), false (no filters) or log (allowed, logged by the kernel)
    #[arg(long, value_name = "true|false|log", default_value = "true", value_parser = parse_seccomp)]
    seccomp: SeccompMode,
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

fn parse_seccomp(s: &str) -> std::result::Result<SeccompMode, String> {
    s.parse()
}

/// The answer to one API request, sent back to the waiting connection thread.
type Reply = mpsc::Sender<std::result::Result<ApiResponse, ApiError>>;

/// What the control thread waits for.
enum Control {
    /// An event that ends the process.
    Event(VmmEvent),
    /// An API request to run, and where to send its answer.
    Api(ApiRequest, Reply),
}

/// The API server's handler in `hourglass`: hands each request to the control thread and waits
/// for the answer (the connection thread does nothing but HTTP).
struct ControlChannel {
    tx: mpsc::Sender<Control>,
}

impl ApiHandler for ControlChannel {
    fn handle(&self, req: ApiRequest) -> std::result::Result<ApiResponse, ApiError> {
        let endpoint = req.endpoint();
        let gone = || {
            ApiError::internal(format!("{endpoint}: the request was not run"))
                .caused_by("the VMM is shutting down")
        };
        let (reply, answer) = mpsc::channel();
        self.tx.send(Control::Api(req, reply)).map_err(|_| gone())?;
        answer.recv().unwrap_or_else(|_| Err(gone()))
    }
}

/// Run `req` on `service`; a panicking handler is answered 500 (as the API server does when it
/// runs the handler itself) and the calling thread goes on.
fn run_request(service: &Service, req: ApiRequest) -> std::result::Result<ApiResponse, ApiError> {
    let name = req.endpoint();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| service.handle(req))).unwrap_or_else(
        |_| {
            Err(ApiError::internal(format!(
                "internal error: the {name} handler panicked"
            )))
        },
    )
}

/// Run `req` for the API: on this (control) thread, or for a migration in a thread of its own
/// that answers when the migration is over.
fn dispatch(service: &Arc<Service>, req: ApiRequest, reply: Reply) {
    let (name, kind) = match &req {
        ApiRequest::VmSendMigration(_) => ("migration-send", ThreadKind::MigrationSend),
        ApiRequest::VmReceiveMigration(_) => ("migration-recv", ThreadKind::MigrationRecv),
        _ => {
            let _ = reply.send(run_request(service, req));
            return;
        }
    };
    let endpoint = req.endpoint();
    let svc = service.clone();
    let r = reply.clone();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            seccomp::enter(kind);
            let _ = r.send(run_request(&svc, req));
        });
    if let Err(e) = spawned {
        let _ = reply.send(Err(ApiError::internal(format!(
            "{endpoint}: cannot start the {name} thread"
        ))
        .caused_by(e.to_string())));
    }
}

/// Pass `VmmEvent`s (from the VMM library) on to the control channel, in a thread of the
/// signal kind.
fn forward_events(
    events: mpsc::Receiver<VmmEvent>,
    control: mpsc::Sender<Control>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vmm-events".into())
        .spawn(move || {
            seccomp::enter(ThreadKind::Signal);
            while let Ok(ev) = events.recv() {
                if control.send(Control::Event(ev)).is_err() {
                    break;
                }
            }
        })
        .map(|_| ())
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

    // Before any filter: the process-wide mode, and the handler that names a violation.
    seccomp::set_mode(cli.seccomp);
    if cli.seccomp == SeccompMode::Trap {
        seccomp::install_sigsys_handler()?;
    }
    vmm::signal::install_vcpu_kick_handler().context("cannot install the vCPU kick signal")?;
    let exit_evt =
        vmm::signal::install_exit_handlers().context("cannot install SIGINT/SIGTERM handlers")?;
    let (control_tx, control_rx) = mpsc::channel::<Control>();
    let (tx, rx) = mpsc::channel::<VmmEvent>();
    {
        let control = control_tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                seccomp::enter(ThreadKind::Signal);
                loop {
                    match exit_evt.read() {
                        Ok(_) => {
                            let _ = control.send(Control::Event(VmmEvent::Signal));
                            break;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            error!("signal eventfd: {e}");
                            break;
                        }
                    }
                }
            })
            .context("cannot start the signal thread")?;
    }
    forward_events(rx, control_tx.clone()).context("cannot start the event thread")?;

    let hv = hypervisor::new().context("cannot open the hypervisor (is /dev/kvm there?)")?;
    // Claim the API socket before booting, so that a second hourglass on the same path is
    // refused before it creates anything.
    let service = Arc::new(Service::new(hv.clone(), tx.clone(), cli.serial.clone()));
    let server = match &cli.api_socket {
        Some(p) => Some(
            start_api_server(
                p,
                Arc::new(ControlChannel {
                    tx: control_tx.clone(),
                }),
            )
            .with_context(|| format!("cannot serve the API on {}", p.display()))?,
        ),
        None => None,
    };
    drop(control_tx);
    // This thread is the control thread from here on: it boots or restores the VM and runs
    // every API request. The threads it spawns (vCPUs, migrations, forwarders) inherit its
    // filter, so the control filter includes theirs (see vmm::seccomp).
    seccomp::enter(ThreadKind::Control);
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
    let code = loop {
        match control_rx.recv() {
            Ok(Control::Api(req, reply)) => dispatch(&service, req, reply),
            Ok(Control::Event(VmmEvent::ApiShutdown)) => {
                info!("shutting down (vmm.shutdown)");
                break 0;
            }
            Ok(Control::Event(VmmEvent::Signal)) => {
                info!("shutting down (signal)");
                break 0;
            }
            Ok(Control::Event(VmmEvent::Vm(ev))) => {
                warn!("VM stopped: {ev:?}");
                break match ev {
                    vmm::vcpu::VmEvent::VcpuError(..) => 1,
                    _ => 0,
                };
            }
            Err(_) => {
                error!("control channel closed");
                break 1;
            }
        }
    };
    // Requests that arrive from now on are answered at once ("shutting down").
    drop(control_rx);
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
