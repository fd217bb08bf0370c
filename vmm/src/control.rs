//! The control thread: one loop that runs every API request and waits for whatever ends the
//! VMM (`vmm.shutdown`, SIGINT/SIGTERM, the VM stopping on its own).
//!
//! Everything reaches the loop as a [`Control`] message on one channel: API connection threads
//! send requests through [`Controller::api_handler`] (they only speak HTTP and wait for the
//! answer, so their seccomp filter need not allow what the requests do); the VM's events arrive
//! through [`Controller::events`], which the VMM library sends to directly; SIGINT/SIGTERM
//! through [`Controller::watch_exit_signals`]. `vm.send-migration` and `vm.receive-migration`
//! run in a thread of their own (that answers the waiting connection when done), so that the
//! loop keeps answering `vm.info` meanwhile. An embedder runs a VM with the same few calls the
//! `hourglass` binary makes.

use std::sync::mpsc;
use std::sync::Arc;

use log::{error, info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiError, ApiHandler, ApiRequest, ApiResponse};
pub use crate::events::{Control, Reply};
use crate::events::{EventSender, VmmEvent};
use crate::seccomp::{self, ThreadKind};
use crate::vcpu::VmEvent;
use crate::Service;

/// The control loop's channel, before the loop runs.
pub struct Controller {
    tx: mpsc::Sender<Control>,
    rx: mpsc::Receiver<Control>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

/// The API server's handler: hands each request to the control thread and waits for the answer.
struct ControlChannel {
    tx: mpsc::Sender<Control>,
}

impl ApiHandler for ControlChannel {
    fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
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

impl Controller {
    /// A new channel.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Self { tx, rx }
    }

    /// Where the VMM library sends what ends the VMM ([`crate::Vmm::boot`], [`Service::new`]).
    pub fn events(&self) -> EventSender {
        EventSender::from(self.tx.clone())
    }

    /// The handler to serve the API with ([`crate::api::start_api_server`]).
    pub fn api_handler(&self) -> Arc<dyn ApiHandler> {
        Arc::new(ControlChannel {
            tx: self.tx.clone(),
        })
    }

    /// Turn each read of `exit_evt` (written by the SIGINT/SIGTERM handler,
    /// [`crate::signal::install_exit_handlers`]) into [`VmmEvent::Signal`], in a thread of the
    /// signal kind.
    pub fn watch_exit_signals(&self, exit_evt: EventFd) -> std::io::Result<()> {
        let control = self.tx.clone();
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
            .map(|_| ())
    }

    /// Run API requests on this thread until something ends the VMM; then stop the VM. Returns
    /// the process exit code: 0 for `vmm.shutdown`, a signal, or a guest that shut down or
    /// reset; 1 for a failed vCPU or a lost channel.
    pub fn run(self, service: &Arc<Service>) -> i32 {
        let Controller { tx, rx } = self;
        // The loop must notice when every sender is gone.
        drop(tx);
        let code = loop {
            match rx.recv() {
                Ok(Control::Api(req, reply)) => dispatch(service, req, reply),
                Ok(Control::Event(ev @ (VmmEvent::ApiShutdown | VmmEvent::Signal))) => {
                    let why = match ev {
                        VmmEvent::ApiShutdown => "vmm.shutdown",
                        _ => "signal",
                    };
                    // An incoming migration is abandoned before its hand-over (the source keeps
                    // its VM); one that handed over meanwhile made this the only copy.
                    if service.begin_stop() {
                        warn!(
                            "not shutting down ({why}): a migration completed as the request \
                             came, and this VMM now runs the only copy of the guest; ask again \
                             to stop it"
                        );
                        continue;
                    }
                    info!("shutting down ({why})");
                    break 0;
                }
                Ok(Control::Event(VmmEvent::Vm(ev))) => {
                    // A guest stopped by memory it could not read is no guest shutdown.
                    if let Some(why) = service.vmm().and_then(|v| v.vm().memory_backing_problem()) {
                        error!("VM stopped ({ev:?}): {why}");
                        break 1;
                    }
                    match ev {
                        VmEvent::VcpuError(..) => {
                            error!("VM stopped: {ev}");
                            break 1;
                        }
                        // Cloud Hypervisor's choices: a reset reboots the VM, a power-off
                        // ends the VMM with status 0.
                        VmEvent::GuestReset(_) => match service.reboot() {
                            Ok(()) => {}
                            Err(e) => {
                                error!("{ev}; the reboot failed: {e}");
                                break 1;
                            }
                        },
                        VmEvent::GuestPowerOff(_) => {
                            info!("VM stopped: {ev}");
                            break 0;
                        }
                        _ => {
                            warn!("VM stopped: {ev}");
                            break 0;
                        }
                    }
                }
                Err(_) => {
                    error!("control channel closed");
                    break 1;
                }
            }
        };
        // Requests that arrive from now on are answered at once ("shutting down").
        drop(rx);
        if let Some(vmm) = service.vmm() {
            vmm.shutdown_vm();
        }
        code
    }
}

/// Run `req` on `service`; a panicking handler is answered 500 (as the API server does when it
/// runs the handler itself) and the calling thread goes on.
fn run_request(service: &Service, req: ApiRequest) -> Result<ApiResponse, ApiError> {
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
fn dispatch(service: &Arc<Service>, mut req: ApiRequest, reply: Reply) {
    let (name, kind) = match &req {
        ApiRequest::VmSendMigration(_) => ("migration-send", ThreadKind::MigrationSend),
        ApiRequest::VmReceiveMigration(_) => ("migration-recv", ThreadKind::MigrationRecv),
        _ => {
            let _ = reply.send(run_request(service, req));
            return;
        }
    };
    if let ApiRequest::VmSendMigration(cfg) = &mut req {
        // The sender may not open files: an interface named in the URL's IPv6 zone is looked
        // up here, and what it reads of the kernel's page tables opened here.
        match crate::migration::transport::pin_zone(&cfg.destination_url) {
            Ok(url) => cfg.destination_url = url,
            Err(e) => {
                let _ = reply.send(Err(
                    ApiError::bad_request("The VM could not be migrated").caused_by(e)
                ));
                return;
            }
        }
        if let Err(e) = crate::residency::Prober::shared() {
            warn!("migration: cannot open the kernel's page map ({e}); every page is read");
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hv() -> Option<Arc<dyn hypervisor::Hypervisor>> {
        if !std::path::Path::new("/dev/kvm").exists() {
            println!("skipped: /dev/kvm is absent");
            return None;
        }
        Some(hypervisor::new().expect("hypervisor"))
    }

    #[test]
    fn shutdown_request_ends_the_loop_with_zero_and_answers_it() {
        let Some(hv) = hv() else { return };
        let c = Controller::new();
        let handler = c.api_handler();
        let svc = Arc::new(Service::new(hv, c.events(), None));
        let client = std::thread::spawn(move || {
            let ping = handler.handle(ApiRequest::VmmPing);
            let shutdown = handler.handle(ApiRequest::VmmShutdown);
            (ping.is_ok(), shutdown.is_ok(), handler)
        });
        assert_eq!(c.run(&svc), 0);
        let (ping, shutdown, handler) = client.join().unwrap();
        assert!(ping && shutdown, "ping {ping}, shutdown {shutdown}");
        // After the loop: answered at once, with an error, not left waiting.
        let late = handler.handle(ApiRequest::VmInfo).unwrap_err();
        assert!(
            late.causes.iter().any(|c| c.contains("shutting down")),
            "{late:?}"
        );
    }

    #[test]
    fn a_failed_vcpu_ends_the_loop_with_one() {
        let Some(hv) = hv() else { return };
        let c = Controller::new();
        let svc = Arc::new(Service::new(hv, c.events(), None));
        c.events()
            .send(VmmEvent::Vm(VmEvent::VcpuError(0, "test".into())));
        assert_eq!(c.run(&svc), 1);
    }
}
