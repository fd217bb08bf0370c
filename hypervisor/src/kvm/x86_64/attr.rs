//! `KVM_{HAS,GET,SET}_DEVICE_ATTR` on a vCPU file descriptor.
//!
//! kvm-ioctls 0.25 only offers these on aarch64 vCPUs, but x86 needs them for the per-vCPU TSC
//! controls (`KVM_VCPU_TSC_CTRL` group, `KVM_VCPU_TSC_OFFSET` attribute). The three ioctls are
//! defined here, once, with vmm-sys-util's macros; everything else in the crate goes through the
//! thin safe wrappers below, which take any file descriptor (`AsRawFd`).

use std::os::unix::io::AsRawFd;

use kvm_bindings::{kvm_device_attr, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::error::HypervisorError;

/// The three ioctl numbers (include/uapi/linux/kvm.h), private to this file.
mod nr {
    use kvm_bindings::{kvm_device_attr, KVMIO};
    use vmm_sys_util::ioctl_iow_nr;

    ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
    ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
    ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);
}
use nr::{KVM_GET_DEVICE_ATTR, KVM_HAS_DEVICE_ATTR, KVM_SET_DEVICE_ATTR};

/// Whether the object behind `fd` implements attribute `attr` of `group`.
///
/// `ENXIO` (no such attribute) and `ENOTTY`/`EINVAL` (no attribute support at all) mean "no";
/// any other failure is an error.
///
/// ```
/// use hypervisor::kvm::x86_64::attr;
/// if !std::path::Path::new("/dev/kvm").exists() {
///     println!("skipped: /dev/kvm is absent");
///     return;
/// }
/// let kvm = kvm_ioctls::Kvm::new().unwrap();
/// let vm = kvm.create_vm().unwrap();
/// let vcpu = vm.create_vcpu(0).unwrap();
/// let has = attr::has_attr(&vcpu, kvm_bindings::KVM_VCPU_TSC_CTRL, 0).unwrap();
/// println!("KVM_VCPU_TSC_OFFSET: {has}");
/// ```
pub fn has_attr<F: AsRawFd>(fd: &F, group: u32, attr: u64) -> Result<bool, HypervisorError> {
    let a = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr: 0,
    };
    // SAFETY: `a` is a valid kvm_device_attr that lives across the call; KVM_HAS_DEVICE_ATTR
    // only reads it (addr is ignored).
    let ret = unsafe { ioctl_with_ref(fd, KVM_HAS_DEVICE_ATTR(), &a) };
    if ret == 0 {
        return Ok(true);
    }
    let e = errno::Error::last();
    match e.errno() {
        libc::ENXIO | libc::ENOTTY | libc::EINVAL => Ok(false),
        n => Err(HypervisorError::ioctl("KVM_HAS_DEVICE_ATTR", n)),
    }
}

/// Read a 64-bit attribute value.
///
/// ```
/// use hypervisor::kvm::x86_64::attr;
/// if !std::path::Path::new("/dev/kvm").exists() {
///     println!("skipped: /dev/kvm is absent");
///     return;
/// }
/// let kvm = kvm_ioctls::Kvm::new().unwrap();
/// let vm = kvm.create_vm().unwrap();
/// let vcpu = vm.create_vcpu(0).unwrap();
/// if attr::has_attr(&vcpu, kvm_bindings::KVM_VCPU_TSC_CTRL, 0).unwrap() {
///     let offset = attr::get_attr_u64(&vcpu, kvm_bindings::KVM_VCPU_TSC_CTRL, 0).unwrap();
///     println!("TSC offset {offset}");
/// }
/// ```
pub fn get_attr_u64<F: AsRawFd>(fd: &F, group: u32, attr: u64) -> Result<u64, HypervisorError> {
    let mut value: u64 = 0;
    let a = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr: &mut value as *mut u64 as u64,
    };
    // SAFETY: `a.addr` points at `value`, 8 writable bytes that outlive the call; the kernel
    // writes at most a u64 there for the attributes this crate uses and only reads `a`.
    let ret = unsafe { ioctl_with_ref(fd, KVM_GET_DEVICE_ATTR(), &a) };
    if ret != 0 {
        return Err(HypervisorError::ioctl(
            "KVM_GET_DEVICE_ATTR",
            errno::Error::last().errno(),
        ));
    }
    Ok(value)
}

/// Write a 64-bit attribute value.
///
/// ```
/// use hypervisor::kvm::x86_64::attr;
/// if !std::path::Path::new("/dev/kvm").exists() {
///     println!("skipped: /dev/kvm is absent");
///     return;
/// }
/// let kvm = kvm_ioctls::Kvm::new().unwrap();
/// let vm = kvm.create_vm().unwrap();
/// let vcpu = vm.create_vcpu(0).unwrap();
/// if attr::has_attr(&vcpu, kvm_bindings::KVM_VCPU_TSC_CTRL, 0).unwrap() {
///     attr::set_attr_u64(&vcpu, kvm_bindings::KVM_VCPU_TSC_CTRL, 0, 1 << 40).unwrap();
/// }
/// ```
pub fn set_attr_u64<F: AsRawFd>(
    fd: &F,
    group: u32,
    attr: u64,
    value: u64,
) -> Result<(), HypervisorError> {
    let a = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr: &value as *const u64 as u64,
    };
    // SAFETY: `a.addr` points at `value`, 8 readable bytes that outlive the call; the kernel
    // only reads `a` and the u64 behind it.
    let ret = unsafe { ioctl_with_ref(fd, KVM_SET_DEVICE_ATTR(), &a) };
    if ret != 0 {
        return Err(HypervisorError::ioctl(
            "KVM_SET_DEVICE_ATTR",
            errno::Error::last().errno(),
        ));
    }
    Ok(())
}

/// Whether a vCPU has the `KVM_VCPU_TSC_OFFSET` attribute (Linux 5.16+).
pub fn has_tsc_offset<F: AsRawFd>(vcpu: &F) -> Result<bool, HypervisorError> {
    has_attr(vcpu, KVM_VCPU_TSC_CTRL, u64::from(KVM_VCPU_TSC_OFFSET))
}

/// A vCPU's L1 TSC offset (`O + A_i` in the time model).
pub fn tsc_offset<F: AsRawFd>(vcpu: &F) -> Result<u64, HypervisorError> {
    get_attr_u64(vcpu, KVM_VCPU_TSC_CTRL, u64::from(KVM_VCPU_TSC_OFFSET))
}

/// Set a vCPU's L1 TSC offset.
pub fn set_tsc_offset<F: AsRawFd>(vcpu: &F, offset: u64) -> Result<(), HypervisorError> {
    set_attr_u64(
        vcpu,
        KVM_VCPU_TSC_CTRL,
        u64::from(KVM_VCPU_TSC_OFFSET),
        offset,
    )
}
