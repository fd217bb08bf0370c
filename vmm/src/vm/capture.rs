//! The paused VM's whole state (a snapshot's `state.json`, a migration's `State` frame) and a
//! snapshot of it on disk.

use std::path::Path;
use std::time::Instant;

use log::info;

use super::{hv_err, RunState, Vm, VmError};
use crate::snapshot::{VmState, WriteOptions, WriteReport};

impl Vm {
    /// capture of the pause, every vCPU's state, the devices' states and guest RAM (see
    /// [`crate::snapshot`]). A running VM is refused ([`VmError::InvalidState`]).
    pub fn snapshot(&self, dest: &Path) -> Result<WriteReport, VmError> {
        let t0 = Instant::now();
        let state = self.capture_state()?;
        let memory = self.vcpus.shared().memory.clone();
        let report = crate::snapshot::write(
            dest,
            &self.config,
            &state,
            &memory,
            &WriteOptions::default(),
        )?;
        info!(
            "snapshot written to {}: {} MiB of RAM, {} MiB of data, in {:.3} ms ({:.3} ms writing)",
            dest.display(),
            report.memory_bytes >> 20,
            report.data_bytes >> 20,
            t0.elapsed().as_secs_f64() * 1e3,
            report.total_time.as_secs_f64() * 1e3
        );
        Ok(report)
    }

    /// The paused VM's state: the time capture of the pause, every vCPU's state and the
    /// devices' states (what a snapshot's `state.json` and a migration's `State` frame hold).
    /// A running VM is refused ([`VmError::InvalidState`]).
    pub fn capture_state(&self) -> Result<VmState, VmError> {
        match self.state {
            RunState::Paused => {}
            RunState::Running => {
                return Err(VmError::InvalidState(
                    "the VM must be paused to be snapshotted (vm.pause first)".into(),
                ))
            }
            RunState::Shutdown => return Err(VmError::InvalidState("the VM is shut down".into())),
        }
        let capture = &self
            .frozen
            .as_ref()
            .ok_or_else(|| VmError::InvalidState("paused without a time capture".into()))?
            .capture;
        let vcpus = if let Some(v) = &self.restored_vcpus {
            v.clone()
        } else {
            let guards = self.vcpus.lock_all();
            guards
                .iter()
                .map(|g| {
                    g.state()
                        .map_err(hv_err(format!("read vCPU {}'s state", g.id())))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let irqchip = self
            .vm
            .irqchip_state()
            .map_err(hv_err("read the interrupt controllers' state"))?;
        Ok(VmState {
            tsc: capture.snapshot.clone(),
            vcpus,
            devices: self.devices.states(),
            irqchip,
        })
    }
}
