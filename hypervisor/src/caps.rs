//! [`TscCapabilities`]: what a host can do for guest time, as a backend probed it.

use serde::{Deserialize, Serialize};

use crate::tsc;

/// What the host can do for guest time, as probed (never assumed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TscCapabilities {
    /// Backend ("kvm", "mshv").
    pub backend: String,
    /// Host CPU vendor (decides the scaling arithmetic).
    pub vendor: tsc::Vendor,
    /// Host TSC frequency in kHz (KVM_GET_TSC_KHZ on a fresh vCPU).
    pub host_tsc_khz: u32,
    /// The per-vCPU KVM_VCPU_TSC_OFFSET attribute exists (KVM_HAS_DEVICE_ATTR).
    pub tsc_offset_attr: bool,
    /// Whether written offsets take effect, probed by read-back of the offset and of the guest
    /// TSC on a scratch vCPU; `None` if it could not be probed.
    pub offsets_honoured: Option<bool>,
    /// Hardware TSC scaling (KVM_CAP_TSC_CONTROL).
    pub tsc_scaling: bool,
    /// VM-wide default TSC frequency (KVM_CAP_VM_TSC_CONTROL).
    pub vm_tsc_control: bool,
    /// KVM_SET_CLOCK/KVM_GET_CLOCK understand KVM_CLOCK_REALTIME (KVM_CAP_ADJUST_CLOCK bits).
    pub clock_realtime: bool,
    /// KVM_GET_CLOCK can return the host TSC (KVM_CLOCK_HOST_TSC).
    pub clock_host_tsc: bool,
    /// Nested-virtualisation state can be saved (KVM_CAP_NESTED_STATE > 0).
    pub nested_state: bool,
}
