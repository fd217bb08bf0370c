//! x86_64 specifics of the KVM backend.
//!
//! * [`vendor`]: the Intel VMX / AMD SVM table (quirks as data).
//! * [`tsc`]: [`crate::vm::TscState`] for [`crate::kvm::KvmVm`].
//! * [`attr`]: `KVM_{HAS,GET,SET}_DEVICE_ATTR` on a vCPU.
//! * [`convert`]: our register types to and from kvm-bindings.

pub mod attr;
pub mod convert;
pub mod tsc;
pub mod vendor;
