//! [`TscState`] for [`KvmVm`]: the DESIGN.md time model on KVM.
//!
//! **Freeze**: one `KVM_GET_CLOCK` sample `(k, T, H)`, then per vCPU `KVM_VCPU_TSC_OFFSET`
//! (`O + A_i`) and TSC_ADJUST (`A_i`), handed to [`crate::tsc::capture`].
//!
//! **Thaw**: one new sample `(k', T', H')` -> [`crate::tsc::plan_thaw`] -> per vCPU
//! `KVM_VCPU_TSC_OFFSET = O' + A_i` and a host-initiated TSC_ADJUST write of `A_i` (then any
//! TSC_DEADLINE held back by `set_state`) -> read back the offset and `MSR_IA32_TSC` -> if the host
//! honoured them, `KVM_SET_CLOCK { k + elapsed, T', REALTIME }`.
//!
//! **Resume on the same host**: when the caller says the snapshot is this VM's own last freeze
//! ([`ThawOrigin::OwnFreeze`]), the `wallclock` policy measures the pause with the host TSC
//! (`scale(H') - scale(H)`, so `O' = O`) instead of realtime, which is exact and immune to a
//! coarse or stepped CLOCK_REALTIME.
//!
//! **Hosts that ignore offsets** (accept the write, keep the guest on the host TSC): detected by
//! the read-back (and by a probe at hypervisor creation, so later thaws skip the futile writes).
//! kvmclock is then made to agree with the TSC the guest really has
//! ([`crate::tsc::plan_for_actual_tsc`]); the report says `host_tsc` and warns. A thaw that would move the
//! guest TSC backwards is refused and whatever was written is put back.
//!
//! **Kernels without `KVM_VCPU_TSC_OFFSET`** (before 5.16): host-initiated `MSR_IA32_TSC` writes of
//! `G' + A_i`, all computed for one instant, and the report says so.
//!
//! The work is done by `engine` on plain kvm-ioctls file descriptors, shared with
//! [`crate::kvm::tsc`] (for VMMs that own their fds); this file only adapts `&dyn Vcpu` to it
//! and keeps the VM's state (guest kHz, what the read-back showed) between calls. `verify`
//! holds the measurements.

pub(crate) mod engine;
mod verify;

use std::sync::atomic::Ordering;

use crate::caps::TscCapabilities;
use crate::cpu::Vcpu;
use crate::error::HypervisorError;
use crate::kvm::{KvmVcpu, KvmVm};
use crate::tsc::{Capture, ClockPolicy, ClockReport, ThawOrigin, TscSnapshot, VcpuTscReading};
use crate::vm::TscState;
use engine::TscContext;

pub use engine::IGNORED_OFFSETS_WARNING;

/// Each `&dyn Vcpu` as the [`KvmVcpu`] it must be; another backend's vCPU is refused.
fn kvm_vcpus<'a>(vcpus: &[&'a dyn Vcpu]) -> Result<Vec<&'a KvmVcpu>, HypervisorError> {
    vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_any().downcast_ref::<KvmVcpu>().ok_or_else(|| {
                HypervisorError::InvalidArgument(format!(
                    "vCPU {} (entry {i}) is not a KVM vCPU: a KVM VM only keeps time for vCPUs \
                     it created",
                    v.id()
                ))
            })
        })
        .collect()
}

impl KvmVm {
    /// What is known about offsets taking effect: the last thaw's read-back, else the probe.
    fn offsets_honoured(&self) -> Option<bool> {
        let seen = *self.offsets_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.or(self.caps.offsets_honoured)
    }

    /// The engine's view of this VM now.
    fn context(&self) -> TscContext {
        TscContext {
            vendor: self.caps.vendor,
            host_tsc_khz: self.caps.host_tsc_khz,
            guest_tsc_khz: self.guest_khz_now(),
            tsc_offset_attr: self.caps.tsc_offset_attr,
            tsc_scaling: self.caps.tsc_scaling,
            clock_realtime: self.caps.clock_realtime,
            offsets_honoured: self.offsets_honoured(),
        }
    }

    /// Keep what the engine learnt (guest kHz, offsets honoured) for the next call.
    fn keep(&self, ctx: &TscContext) {
        self.guest_khz.store(ctx.guest_tsc_khz, Ordering::SeqCst);
        if ctx.offsets_honoured.is_some() {
            *self.offsets_seen.lock().unwrap_or_else(|e| e.into_inner()) = ctx.offsets_honoured;
        }
    }
}

impl TscState for KvmVm {
    fn tsc_capabilities(&self) -> TscCapabilities {
        let mut c = self.caps.clone();
        c.offsets_honoured = self.offsets_honoured();
        c
    }

    fn set_guest_tsc_khz(&self, vcpus: &[&dyn Vcpu], khz: u32) -> Result<(), HypervisorError> {
        let vcpus = kvm_vcpus(vcpus)?;
        let mut ctx = self.context();
        engine::set_guest_tsc_khz(&mut ctx, &vcpus, khz)?;
        self.keep(&ctx);
        Ok(())
    }

    fn guest_tsc_khz(&self) -> u32 {
        self.guest_khz_now()
    }

    fn freeze_with_readings(
        &self,
        vcpus: &[&dyn Vcpu],
        readings: &[Option<VcpuTscReading>],
    ) -> Result<Capture, HypervisorError> {
        self.freeze_stopped_at(vcpus, readings, None)
    }

    fn freeze_stopped_at(
        &self,
        vcpus: &[&dyn Vcpu],
        readings: &[Option<VcpuTscReading>],
        stopped_at: Option<u64>,
    ) -> Result<Capture, HypervisorError> {
        let vcpus = kvm_vcpus(vcpus)?;
        engine::freeze(&self.fd, &self.context(), &vcpus, readings, stopped_at)
    }

    fn thaw(
        &self,
        vcpus: &[&dyn Vcpu],
        snap: &TscSnapshot,
        origin: ThawOrigin,
        policy: ClockPolicy,
    ) -> Result<ClockReport, HypervisorError> {
        let vcpus = kvm_vcpus(vcpus)?;
        let mut ctx = self.context();
        let r = engine::thaw(&self.fd, &mut ctx, &vcpus, snap, origin, policy);
        self.keep(&ctx);
        r
    }

    fn clock_tsc_stable(&self) -> Result<Option<bool>, HypervisorError> {
        Ok(Some(crate::kvm::clock::sample(&self.fd)?.tsc_stable()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{CpuIdEntry, MsrEntry, SpecialRegisters, StandardRegisters};
    use crate::cpu::{VcpuKicker, VmExit};
    use crate::state::VcpuState;

    /// Another backend's vCPU: every call fails, only `id` and `as_any` answer.
    struct Foreign;

    fn no<T>() -> Result<T, HypervisorError> {
        Err(HypervisorError::Unsupported("foreign vCPU".into()))
    }

    impl Vcpu for Foreign {
        fn id(&self) -> u32 {
            7
        }
        fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
            no()
        }
        fn kicker(&mut self) -> std::sync::Arc<dyn VcpuKicker> {
            unimplemented!("not called")
        }
        fn set_cpuid(&self, _: &[CpuIdEntry]) -> Result<(), HypervisorError> {
            no()
        }
        fn regs(&self) -> Result<StandardRegisters, HypervisorError> {
            no()
        }
        fn set_regs(&self, _: &StandardRegisters) -> Result<(), HypervisorError> {
            no()
        }
        fn sregs(&self) -> Result<SpecialRegisters, HypervisorError> {
            no()
        }
        fn set_sregs(&self, _: &SpecialRegisters) -> Result<(), HypervisorError> {
            no()
        }
        fn msrs(&self, _: &[u32]) -> Result<Vec<MsrEntry>, HypervisorError> {
            no()
        }
        fn set_msrs(&self, _: &[MsrEntry]) -> Result<(), HypervisorError> {
            no()
        }
        fn notify_guest_clock_paused(&self) -> Result<(), HypervisorError> {
            no()
        }
        fn tsc_reading(&self) -> Result<VcpuTscReading, HypervisorError> {
            no()
        }
        fn state(&self) -> Result<VcpuState, HypervisorError> {
            no()
        }
        fn set_state(&self, _: &VcpuState) -> Result<(), HypervisorError> {
            no()
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    #[test]
    fn another_backends_vcpu_is_refused_by_name() {
        let e = kvm_vcpus(&[&Foreign]).err().expect("refused");
        assert!(matches!(e, HypervisorError::InvalidArgument(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("vCPU 7") && msg.contains("not a KVM vCPU"),
            "{msg}"
        );
        assert!(kvm_vcpus(&[]).unwrap().is_empty());
    }
}
