//! What a `KVM_EXIT_INTERNAL_ERROR` means, in words an operator can act on.
//!
//! The exit ends the guest: KVM met something it could not handle on the guest's behalf (most
//! often an instruction it had to emulate and could not). On hosts whose KVM is the `kvm_pvm`
//! backend this is how a stock Linux kernel dies (an emulation failure of `lock cmpxchg16b`),
//! so the message says so.

/// `KVM_INTERNAL_ERROR_EMULATION`.
const EMULATION: u32 = 1;
/// `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`: `data[1..3]` hold the instruction.
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// KVM's name and meaning of an internal-error suberror.
pub fn suberror_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "KVM_INTERNAL_ERROR_EMULATION: instruction emulation failed",
        2 => "KVM_INTERNAL_ERROR_SIMUL_EX: a fault while delivering a fault",
        3 => "KVM_INTERNAL_ERROR_DELIVERY_EV: an event could not be delivered",
        4 => "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: an exit KVM does not handle",
        _ => "unknown suberror",
    }
}

/// The bytes of the instruction KVM failed to emulate, when it gave them: an emulation failure
/// whose flags (`data[0]`) have bit 0 set carries the length in the low byte of `data[1]` and
/// up to 15 bytes after it.
pub fn instruction_bytes(suberror: u32, data: &[u64]) -> Option<Vec<u8>> {
    if suberror != EMULATION || data.len() < 3 || data[0] & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let len = usize::from(raw[0]).min(15);
    Some(raw[1..=len].to_vec())
}

/// The whole message for an internal-error exit at `rip` (`None`: the registers could not be
/// read); the caller names the vCPU.
pub fn describe(suberror: u32, data: &[u64], rip: Option<u64>) -> String {
    let rip = rip.map_or_else(
        || "unknown (registers unreadable)".into(),
        |r| format!("{r:#x}"),
    );
    let mut s = format!(
        "KVM_RUN exit KVM_EXIT_INTERNAL_ERROR, suberror {suberror} ({}), rip {rip}",
        suberror_name(suberror)
    );
    match instruction_bytes(suberror, data) {
        Some(b) if !b.is_empty() => {
            let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
            s.push_str(&format!(", instruction bytes {}", hex.join(" ")));
        }
        _ => {}
    }
    if !data.is_empty() {
        let words: Vec<String> = data.iter().map(|w| format!("{w:#x}")).collect();
        s.push_str(&format!(", data [{}]", words.join(", ")));
    }
    s.push_str(
        ": the host's KVM could not emulate an instruction the guest ran; on kvm_pvm hosts a \
         stock Linux kernel cannot run, see README (Linux guests)",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_failure_with_bytes() {
        // lock cmpxchg16b (%rsi): f0 48 0f c7 0e, length 5.
        let insn: [u8; 16] = [
            5, 0xf0, 0x48, 0x0f, 0xc7, 0x0e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let data = [
            1,
            u64::from_le_bytes(insn[..8].try_into().unwrap()),
            u64::from_le_bytes(insn[8..].try_into().unwrap()),
            0x7,
        ];
        assert_eq!(
            instruction_bytes(1, &data).unwrap(),
            vec![0xf0, 0x48, 0x0f, 0xc7, 0x0e]
        );
        let m = describe(1, &data, Some(0xffff_ffff_8100_0000));
        assert!(
            m.starts_with(
                "KVM_RUN exit KVM_EXIT_INTERNAL_ERROR, suberror 1 (KVM_INTERNAL_ERROR_EMULATION"
            ),
            "{m}"
        );
        assert!(m.contains("rip 0xffffffff81000000"), "{m}");
        assert!(m.contains("instruction bytes f0 48 0f c7 0e"), "{m}");
        assert!(
            m.contains("on kvm_pvm hosts a stock Linux kernel cannot run"),
            "{m}"
        );
    }

    #[test]
    fn no_bytes_without_the_flag_or_the_words() {
        assert_eq!(instruction_bytes(1, &[0, 5, 0]), None);
        assert_eq!(instruction_bytes(1, &[1, 5]), None);
        assert_eq!(instruction_bytes(3, &[1, 5, 0]), None);
        // A length past 15 is clamped, not trusted.
        assert_eq!(instruction_bytes(1, &[1, 0xff, 0]).unwrap().len(), 15);
        let m = describe(3, &[], None);
        assert!(
            m.contains("suberror 3 (KVM_INTERNAL_ERROR_DELIVERY_EV"),
            "{m}"
        );
        assert!(m.contains("rip unknown"), "{m}");
        assert!(!m.contains("data ["), "{m}");
        assert!(describe(99, &[], Some(0)).contains("unknown suberror"));
    }
}
