//! What a `KVM_EXIT_SHUTDOWN` left behind, in words an operator (or a bug hunt) can use.
//!
//! A shutdown reaches the VMM two ways, and the vCPU's registers afterwards tell which:
//!
//! * **The CPU's own SHUTDOWN intercept** (AMD SVM): the processor met a triple fault while
//!   running the guest and exited. The VMCB is undefined after that exit, so KVM re-initialises
//!   the vCPU (as INIT would) before it reports the exit: the registers hold the reset state
//!   (`CS.base` 0xffff0000, `RIP` 0xfff0, protected mode off) and where the guest was is lost.
//!   In that case the fault was raised by the CPU, or by whatever emulates it.
//! * **KVM's own triple fault** (Intel VMX's triple-fault exit, or KVM raising one itself, e.g.
//!   an exception it injects while another is pending): the registers are where the guest
//!   stopped.
//!
//! Reading them costs nothing while the guest runs: it happens once, after the exit.

use hypervisor::arch::{SpecialRegisters, StandardRegisters};

/// `CR0.PE`.
const CR0_PE: u64 = 1;
/// The reset vector's `CS.base` and `RIP` (Intel SDM vol. 3, 9.1.4; AMD APM vol. 2, 14.1.3).
const RESET_CS_BASE: u64 = 0xffff_0000;
const RESET_RIP: u64 = 0xfff0;

/// Which way the shutdown came, judged from the registers after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOrigin {
    /// The registers hold the reset state: the CPU's SHUTDOWN intercept, KVM re-initialised
    /// the vCPU.
    CpuIntercept,
    /// The registers are the guest's own: KVM stopped it where it was.
    GuestState,
}

/// The origin, from registers read after the exit.
pub fn origin(regs: &StandardRegisters, sregs: &SpecialRegisters) -> ShutdownOrigin {
    if regs.rip == RESET_RIP && sregs.cs.base == RESET_CS_BASE && sregs.cr0 & CR0_PE == 0 {
        ShutdownOrigin::CpuIntercept
    } else {
        ShutdownOrigin::GuestState
    }
}

/// The log line's text after "vCPU N: guest shutdown": the origin and the registers that say
/// where the guest was (`None`: they could not be read).
pub fn describe(regs: Option<&StandardRegisters>, sregs: Option<&SpecialRegisters>) -> String {
    let (Some(r), Some(s)) = (regs, sregs) else {
        return "registers unreadable after the exit".into();
    };
    let how = match origin(r, s) {
        ShutdownOrigin::CpuIntercept => {
            "the CPU's own SHUTDOWN intercept (a triple fault the processor, or what emulates \
             it, met while running the guest; KVM re-initialised the vCPU, so where it was is lost)"
        }
        ShutdownOrigin::GuestState => {
            "a triple fault KVM raised or saw with the guest's state intact (check the IDT and \
             the stack below)"
        }
    };
    format!(
        "{how}: rip {:#x} rsp {:#x} rflags {:#x} cs {:#x}/base {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} \
         cr4 {:#x} efer {:#x} idt {:#x}/{:#x}",
        r.rip,
        r.rsp,
        r.rflags,
        s.cs.selector,
        s.cs.base,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.idt.base,
        s.idt.limit
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reset_state() -> (StandardRegisters, SpecialRegisters) {
        let r = StandardRegisters {
            rip: RESET_RIP,
            rflags: 2,
            ..Default::default()
        };
        let mut s = SpecialRegisters::default();
        s.cs.base = RESET_CS_BASE;
        s.cs.selector = 0xf000;
        s.cr0 = 0x6000_0010;
        (r, s)
    }

    #[test]
    fn the_reset_state_is_the_cpus_intercept() {
        let (r, s) = reset_state();
        assert_eq!(origin(&r, &s), ShutdownOrigin::CpuIntercept);
        let text = describe(Some(&r), Some(&s));
        assert!(text.contains("SHUTDOWN intercept"), "{text}");
        assert!(text.contains("rip 0xfff0"), "{text}");
    }

    #[test]
    fn a_long_mode_guest_state_is_kept_and_shown() {
        let (mut r, mut s) = reset_state();
        r.rip = 0x10_2345;
        s.cs.base = 0;
        s.cs.selector = 8;
        s.cr0 = 0x8000_0011;
        s.idt.base = 0x20_0000;
        s.idt.limit = 0xfff;
        assert_eq!(origin(&r, &s), ShutdownOrigin::GuestState);
        let text = describe(Some(&r), Some(&s));
        assert!(text.contains("rip 0x102345"), "{text}");
        assert!(text.contains("idt 0x200000/0xfff"), "{text}");
    }

    #[test]
    fn real_mode_elsewhere_than_the_reset_vector_is_the_guests_own() {
        // A real-mode guest at the reset vector's offset but another CS is not the reset state.
        let (r, mut s) = reset_state();
        s.cs.base = 0xf_0000;
        assert_eq!(origin(&r, &s), ShutdownOrigin::GuestState);
        assert_eq!(
            describe(None, Some(&s)),
            "registers unreadable after the exit"
        );
    }
}
