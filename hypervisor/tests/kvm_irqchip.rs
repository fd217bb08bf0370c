//! The in-kernel irqchip's state (the two PICs and the IOAPIC) read, written into another VM and
//! read back there, on the real `/dev/kvm`.

use hypervisor::hypervisor::Hypervisor;
use hypervisor::kvm::KvmHypervisor;
use hypervisor::state::{IrqChip, IrqchipState, IRQCHIP_SIZE};

/// `kvm_ioapic_state.redirtbl[pin]`: after base_address (8), ioregsel, id, irr, pad (4 each).
fn redirtbl_offset(pin: usize) -> usize {
    24 + pin * 8
}

#[test]
fn an_ioapic_route_survives_into_another_vm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("skipped: /dev/kvm is absent on this host");
        return;
    }
    let hv = KvmHypervisor::new().expect("open /dev/kvm");
    let a = hv.create_vm().expect("VM a");
    let fresh = a
        .irqchip_state()
        .expect("read the irqchip")
        .expect("KVM has an irqchip");
    // A fresh IOAPIC has every pin masked (bit 16 of each redirection entry).
    let io = fresh.chip(IrqChip::Ioapic);
    let pin4 = |chip: &[u8; IRQCHIP_SIZE]| {
        u64::from_le_bytes(
            chip[redirtbl_offset(4)..redirtbl_offset(4) + 8]
                .try_into()
                .expect("8 bytes"),
        )
    };
    assert_ne!(pin4(io) & (1 << 16), 0, "pin 4 masked in a fresh IOAPIC");

    // What a kernel does for its serial port: pin 4 unmasked, vector 0x24, to APIC 0.
    let mut chips = [
        *fresh.chip(IrqChip::PicMaster),
        *fresh.chip(IrqChip::PicSlave),
        *fresh.chip(IrqChip::Ioapic),
    ];
    chips[2][redirtbl_offset(4)..redirtbl_offset(4) + 8].copy_from_slice(&0x24u64.to_le_bytes());
    let routed = IrqchipState::new(chips);
    a.set_irqchip_state(&routed).expect("write the irqchip");
    let back = a.irqchip_state().unwrap().unwrap();
    assert_eq!(pin4(back.chip(IrqChip::Ioapic)), 0x24);

    // Into a second VM, as a restore does, through the snapshot's JSON form.
    let json = serde_json::to_string(&back).expect("serialize");
    let decoded: IrqchipState = serde_json::from_str(&json).expect("decode");
    let b = hv.create_vm().expect("VM b");
    b.set_irqchip_state(&decoded).expect("write VM b's irqchip");
    let in_b = b.irqchip_state().unwrap().unwrap();
    assert_eq!(pin4(in_b.chip(IrqChip::Ioapic)), 0x24);
    assert_eq!(in_b, back, "every chip's state arrives whole");
}
