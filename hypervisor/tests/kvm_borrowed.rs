//! The borrowed-descriptor path (`hypervisor::kvm::tsc`) against the real /dev/kvm: a VM built
//! with plain kvm-ioctls, frozen and thawed with the two calls.
//!
//! What a thaw applies depends on the host: where offsets are honoured a `frozen` thaw writes
//! one VM offset to every vCPU (checked by reading the attribute back); where they are ignored
//! (this project's kvm_pvm hosts) the report says `host_tsc` and shows the real elapsed time,
//! and a snapshot from the future is refused with every offset left as it was. The test asks the
//! KVM backend's probe which case this host is, and checks that case.

use hypervisor::kvm::x86_64::attr;
use hypervisor::kvm::KvmHypervisor;
use hypervisor::tsc::{AppliedPolicy, ClockPolicy, RawTscSnapshot, ThawOrigin, TscSnapshot};
use hypervisor::HypervisorError;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

struct Fds {
    vm: VmFd,
    vcpus: Vec<VcpuFd>,
}

impl Fds {
    fn refs(&self) -> Vec<&VcpuFd> {
        self.vcpus.iter().collect()
    }
    fn offsets(&self) -> Vec<u64> {
        self.vcpus
            .iter()
            .map(|v| attr::tsc_offset(v).expect("KVM_VCPU_TSC_OFFSET"))
            .collect()
    }
}

/// A VM with an irqchip and two vCPUs, or `None` (printed) without /dev/kvm.
fn fds_or_skip() -> Option<(Fds, Option<bool>)> {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("skipped: /dev/kvm is absent on this host");
        return None;
    }
    let honoured = KvmHypervisor::new()
        .expect("open /dev/kvm")
        .tsc_capabilities()
        .offsets_honoured;
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let vcpus = (0..2)
        .map(|i| vm.create_vcpu(i).expect("KVM_CREATE_VCPU"))
        .collect();
    Some((Fds { vm, vcpus }, honoured))
}

#[test]
fn freeze_records_every_vcpu_at_the_vcpus_frequency() {
    let Some((f, _)) = fds_or_skip() else { return };
    let khz = f.vcpus[0].get_tsc_khz().expect("KVM_GET_TSC_KHZ");
    let cap = hypervisor::kvm::tsc::freeze(&f.vm, &f.refs()).expect("freeze");
    assert_eq!(cap.snapshot.tsc_khz(), khz);
    assert_eq!(
        cap.snapshot.tsc_adjust(),
        &[0, 0],
        "one TSC_ADJUST per vCPU"
    );
    assert_eq!(cap.skew_cycles, 0, "fresh vCPUs share one offset");
    // The snapshot is the serialisable, validated type.
    assert_eq!(
        TscSnapshot::from_json(&cap.snapshot.to_json()).unwrap(),
        cap.snapshot
    );
}

#[test]
fn frozen_thaw_applies_what_this_host_can() {
    let Some((f, honoured)) = fds_or_skip() else {
        return;
    };
    let khz = f.vcpus[0].get_tsc_khz().expect("KVM_GET_TSC_KHZ");
    let cap = hypervisor::kvm::tsc::freeze(&f.vm, &f.refs()).expect("freeze");
    let r = hypervisor::kvm::tsc::thaw(
        &f.vm,
        &f.refs(),
        &cap.snapshot,
        ThawOrigin::OwnFreeze,
        ClockPolicy::Frozen,
    )
    .expect("a frozen thaw of the last freeze");
    println!("report: {r:?}");
    assert_eq!(
        r.tsc_khz, khz,
        "report frequency is the vCPU's KVM_GET_TSC_KHZ"
    );
    assert_eq!(r.policy_requested, ClockPolicy::Frozen);
    assert_eq!(r.origin, Some(ThawOrigin::OwnFreeze));
    match honoured {
        Some(false) => {
            // The guest kept the host TSC, which ran on: kvmclock follows it.
            assert_eq!(r.policy_applied, AppliedPolicy::HostTsc);
            assert!(!r.offsets_honoured);
            assert!(r.elapsed_ns > 0, "the host TSC ran between freeze and thaw");
            assert!(r.kvmclock_ns >= cap.snapshot.kvmclock_ns() + r.elapsed_ns);
        }
        _ => {
            assert_eq!(r.policy_applied, AppliedPolicy::Frozen);
            assert_eq!(r.elapsed_ns, 0);
            assert_eq!(r.kvmclock_ns, cap.snapshot.kvmclock_ns());
            // One VM-wide offset on every vCPU (TSC_ADJUST is 0 on both).
            let o = f.offsets();
            assert_eq!(Some(o[0]), r.vm_offset_applied);
            assert_eq!(o[0], o[1], "offsets differ: {o:?}");
        }
    }
}

#[test]
fn a_snapshot_from_the_future_moves_the_tsc_or_is_refused_unchanged() {
    let Some((f, honoured)) = fds_or_skip() else {
        return;
    };
    if !attr::has_tsc_offset(&f.vcpus[0]).unwrap() {
        println!("skipped: no KVM_VCPU_TSC_OFFSET on this kernel");
        return;
    }
    let cap = hypervisor::kvm::tsc::freeze(&f.vm, &f.refs()).expect("freeze");
    let mut raw = RawTscSnapshot::from(cap.snapshot.clone());
    raw.vm_tsc = raw.vm_tsc.wrapping_add(1 << 40); // minutes ahead of this host
    let future = TscSnapshot::try_from(raw).unwrap();
    let before = f.offsets();
    let res = hypervisor::kvm::tsc::thaw(
        &f.vm,
        &f.refs(),
        &future,
        ThawOrigin::Snapshot,
        ClockPolicy::Frozen,
    );
    match honoured {
        Some(false) => {
            let e = res.expect_err("the guest TSC would go backwards");
            assert!(
                matches!(e, HypervisorError::Tsc(_)) && e.to_string().contains("backwards"),
                "{e}"
            );
            assert_eq!(f.offsets(), before, "a refused thaw changes nothing");
        }
        _ => {
            let r = res.expect("an honouring host moves the offset");
            assert_eq!(r.policy_applied, AppliedPolicy::Frozen);
            let o = f.offsets();
            assert_eq!(o[0], o[1]);
            assert_ne!(o, before);
        }
    }
}

#[test]
fn no_vcpus_is_an_error_naming_it() {
    let Some((f, _)) = fds_or_skip() else { return };
    let e = hypervisor::kvm::tsc::freeze(&f.vm, &[]).unwrap_err();
    assert!(e.to_string().contains("no vCPUs"), "{e}");
}
