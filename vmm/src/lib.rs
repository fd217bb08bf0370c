//! The Hourglass VMM library: VM lifecycle, one thread per vCPU, pause/resume with guest time
//! frozen and thawed through the `hypervisor` crate's `TscState`, and the Cloud Hypervisor
//! compatible HTTP API ([`api`]).
//!
//! [`Vmm`] owns the VM and implements [`api::ApiHandler`]; the `hourglass` binary builds one from
//! its command line, serves the API socket and waits for a [`VmmEvent`] that ends the process.

#![deny(missing_docs)]

pub mod api;
pub mod config;
pub mod signal;
pub mod vcpu;
pub mod vm;

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};

use hypervisor::Hypervisor;
use log::info;

use crate::api::{ApiError, ApiHandler, ApiRequest, ApiResponse, VmmPingResponse};
use crate::config::{policy_from_api, VmConfig};
use crate::vcpu::VmEvent;
use crate::vm::{RunState, Vm, VmError};

/// What ends the VMM process (sent to the main thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmEvent {
    /// `PUT /api/v1/vmm.shutdown`.
    ApiShutdown,
    /// SIGINT or SIGTERM.
    Signal,
    /// The VM stopped on its own.
    Vm(VmEvent),
}

/// The VMM: one VM and the API's view of it.
pub struct Vmm {
    vm: Mutex<Vm>,
    events: Mutex<Sender<VmmEvent>>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm").finish_non_exhaustive()
    }
}

fn chain(status: u16, context: &str, e: &VmError) -> ApiError {
    ApiError::from_error(status, context, e)
}

impl Vmm {
    /// Boot a VM with `config` on `hv`. VM events (guest shutdown, vCPU failure) are forwarded
    /// to `events` as [`VmmEvent::Vm`].
    pub fn boot(
        hv: Arc<dyn Hypervisor>,
        config: VmConfig,
        events: Sender<VmmEvent>,
    ) -> Result<Self, VmError> {
        let (vm_tx, vm_rx) = std::sync::mpsc::channel::<VmEvent>();
        let fwd = events.clone();
        std::thread::Builder::new()
            .name("vm-events".into())
            .spawn(move || {
                while let Ok(ev) = vm_rx.recv() {
                    if fwd.send(VmmEvent::Vm(ev)).is_err() {
                        break;
                    }
                }
            })
            .map_err(VmError::Thread)?;
        let vm = Vm::boot(hv, config, vm_tx)?;
        Ok(Self {
            vm: Mutex::new(vm),
            events: Mutex::new(events),
        })
    }

    /// The VM (serialises every control operation).
    pub fn vm(&self) -> MutexGuard<'_, Vm> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body of `vm.info`: Cloud Hypervisor's `config`, `state` and `memory_actual_size`, plus
    /// Hourglass's `clock`, `time_probe` and `pause_stats`.
    pub fn info(&self) -> serde_json::Value {
        let vm = self.vm();
        let c = vm.config();
        serde_json::json!({
            "config": {
                "cpus": c.cpus,
                "memory": c.memory,
                "payload": { "kernel": c.kernel },
                "serial": c.serial,
                "clock_policy": c.clock_policy,
                "dirty_mib": c.dirty_mib,
            },
            "state": vm.state(),
            "memory_actual_size": c.memory.size,
            "clock": vm.clock_info(),
            "time_probe": vm.probe_report(),
            "pause_stats": vm.stats(),
        })
    }

    /// Stop the VM's vCPUs for good.
    pub fn shutdown_vm(&self) {
        self.vm().shutdown();
    }

    fn send(&self, ev: VmmEvent) {
        let tx = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let _ = tx.send(ev);
    }
}

impl ApiHandler for Vmm {
    fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        match req {
            ApiRequest::VmmPing => {
                Ok(VmmPingResponse::current(&["kvm", "clock_policy", "time_probe"]).to_response())
            }
            ApiRequest::VmmShutdown => {
                info!("API: vmm.shutdown");
                self.send(VmmEvent::ApiShutdown);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmInfo => Ok(ApiResponse::Json(self.info())),
            ApiRequest::VmPause => {
                let mut vm = self.vm();
                vm.pause()
                    .map(|_| ApiResponse::Empty)
                    .map_err(|e| chain(500, "The VM could not be paused", &e))
            }
            ApiRequest::VmResume(cfg) => {
                let mut vm = self.vm();
                let policy = cfg
                    .clock_policy
                    .map(policy_from_api)
                    .unwrap_or(vm.config().clock_policy);
                vm.resume(policy)
                    .map(|_| ApiResponse::Empty)
                    .map_err(|e| chain(500, "The VM could not be resumed", &e))
            }
            ApiRequest::VmShutdown => {
                let mut vm = self.vm();
                if vm.state() == RunState::Shutdown {
                    return Err(ApiError::internal("The VM could not be shut down")
                        .caused_by("the VM is already shut down"));
                }
                vm.shutdown();
                Ok(ApiResponse::Empty)
            }
            other => Err(ApiError::internal(format!(
                "{} is not implemented by this Hourglass build",
                other.endpoint()
            ))),
        }
    }
}
