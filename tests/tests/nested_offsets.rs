//! Proof that the KVM this test runs on honours `KVM_VCPU_TSC_OFFSET`.
//!
//! On the developer machine's KVM (kvm_pvm backend) offsets are accepted and ignored, so this test
//! prints why it is skipped there. Inside the nested kvm_amd host booted by
//! `scripts/nested-kvm.sh` (which sets `HOURGLASS_NESTED=1`) a skip is a failure: there the offset
//! must be read back and seen by a real guest RDTSC.
//!
//! The test is self-contained on purpose (raw ioctls, a hand-assembled real-mode guest): it checks
//! the test host itself, independently of the project's hypervisor crate.

use kvm_bindings::{kvm_device_attr, kvm_userspace_memory_region, KVMIO};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::ioctl_iow_nr;

ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);

/// `KVM_VCPU_TSC_CTRL`: the vCPU attribute group of the TSC controls.
const KVM_VCPU_TSC_CTRL: u32 = 0;
/// `KVM_VCPU_TSC_OFFSET`: the vCPU's L1 TSC offset, in that group.
const KVM_VCPU_TSC_OFFSET: u64 = 0;

/// The offset this test writes: far larger than any plausible host TSC difference.
const OFFSET: u64 = 1 << 40;
/// Guest physical address where the guest code is placed (and where it starts, CS=0).
const CODE_GPA: u64 = 0x1000;
/// Size of the guest's only memory slot.
const MEM_SIZE: usize = 0x10000;
/// The port the guest writes its TSC to: EAX (low half) first, then EDX (high half).
const REPORT_PORT: u16 = 0x10;
/// The message a host that ignores offsets gets, naming the script that provides one that does not.
const SKIP: &str = "skipped: this host's KVM ignores TSC offsets; run scripts/nested-kvm.sh";

/// Real-mode guest: RDTSC, report EDX:EAX on `REPORT_PORT` as two 32-bit OUTs, HLT.
const GUEST_CODE: &[u8] = &[
    0x0f, 0x31, // rdtsc
    0x66, 0x89, 0xd3, // mov ebx, edx
    0xba, 0x10, 0x00, // mov dx, 0x10 (REPORT_PORT)
    0x66, 0xef, // out dx, eax
    0x66, 0x89, 0xd8, // mov eax, ebx
    0x66, 0xef, // out dx, eax
    0xf4, // hlt
];

/// Whether a skip must be a failure: set by scripts/nested-kvm.sh inside the nested host.
fn nested_required() -> bool {
    std::env::var("HOURGLASS_NESTED").is_ok_and(|v| v == "1")
}

/// Reports that this host cannot show the property: a skip here, a failure in the nested host.
fn skip_or_fail(why: &str) {
    if nested_required() {
        panic!("HOURGLASS_NESTED=1 but {why}: the nested host must honour TSC offsets");
    }
    println!("{SKIP} ({why})");
}

/// The host's TSC, read now.
fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn tsc_offset_attr(addr: u64) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: KVM_VCPU_TSC_OFFSET,
        addr,
    }
}

fn has_tsc_offset_attr(vcpu: &VcpuFd) -> std::io::Result<()> {
    let attr = tsc_offset_attr(0);
    // SAFETY: `vcpu` is a vCPU fd; the kernel only reads `attr`, which outlives the call.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_HAS_DEVICE_ATTR(), &attr) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_tsc_offset(vcpu: &VcpuFd, offset: u64) -> std::io::Result<()> {
    let value = offset;
    let attr = tsc_offset_attr(&value as *const u64 as u64);
    // SAFETY: `vcpu` is a vCPU fd; the kernel reads `attr` and the u64 at `attr.addr`, both of
    // which live until the call returns.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_SET_DEVICE_ATTR(), &attr) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn get_tsc_offset(vcpu: &VcpuFd) -> std::io::Result<u64> {
    let mut value: u64 = 0;
    let mut attr = tsc_offset_attr(&mut value as *mut u64 as u64);
    // SAFETY: `vcpu` is a vCPU fd; the kernel reads `attr` and writes one u64 at `attr.addr`,
    // which points at `value`, alive and exclusively borrowed for the duration of the call.
    let ret = unsafe { ioctl_with_mut_ref(vcpu, KVM_GET_DEVICE_ATTR(), &mut attr) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// Anonymous guest memory, unmapped on drop.
struct GuestMem {
    ptr: *mut u8,
    len: usize,
}

impl GuestMem {
    fn new(len: usize) -> Self {
        // SAFETY: anonymous private mapping with no address hint; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap of {len} bytes of guest memory failed"
        );
        GuestMem {
            ptr: ptr.cast(),
            len,
        }
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len, "guest code does not fit");
        // SAFETY: the range was checked to lie inside the mapping, which we own exclusively.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping created in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[test]
fn nested_kvm_honours_tsc_offset() {
    if !std::path::Path::new("/dev/kvm").exists() {
        skip_or_fail("no /dev/kvm on this host");
        return;
    }
    // Declared before the VM so that it is unmapped only after the VM is gone, also on unwind.
    let mut mem = GuestMem::new(MEM_SIZE);
    mem.write(CODE_GPA as usize, GUEST_CODE);
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
    };
    // SAFETY: the region is `mem`, a valid mapping of MEM_SIZE bytes that outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");

    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
    regs.rip = CODE_GPA;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");

    if let Err(e) = has_tsc_offset_attr(&vcpu) {
        skip_or_fail(&format!(
            "KVM_HAS_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET) failed: {e}"
        ));
        return;
    }
    set_tsc_offset(&vcpu, OFFSET).expect("KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)");
    let read_back = get_tsc_offset(&vcpu).expect("KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)");
    println!("wrote TSC offset {OFFSET:#x}, read back {read_back:#x}");

    let mut halves: Vec<u32> = Vec::new();
    let before = host_tsc();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => {
                assert_eq!(port, REPORT_PORT, "guest wrote to an unexpected port");
                let bytes: [u8; 4] = data.try_into().expect("guest OUT is 4 bytes wide");
                halves.push(u32::from_le_bytes(bytes));
            }
            VcpuExit::Hlt => break,
            other => panic!("unexpected vCPU exit: {other:?}"),
        }
    }
    let after = host_tsc();
    assert_eq!(
        halves.len(),
        2,
        "guest reported {} halves, expected 2",
        halves.len()
    );
    let guest = u64::from(halves[0]) | (u64::from(halves[1]) << 32);
    let seen = guest.wrapping_sub(before);
    println!(
        "host TSC before {before:#x}, guest TSC {guest:#x}, host TSC after {after:#x}; \
         guest - host(before) = {seen:#x} (offset {OFFSET:#x})"
    );
    drop(vcpu);
    drop(vm);
    drop(mem);

    let ignored = read_back != OFFSET || seen < OFFSET / 2;
    if ignored {
        skip_or_fail(&format!(
            "offset read back as {read_back:#x} and the guest TSC is host + {seen:#x}"
        ));
        return;
    }
    // The guest's RDTSC happened between the two host reads, so with the offset honoured it
    // must lie in [before + OFFSET, after + OFFSET].
    assert!(
        guest >= before + OFFSET && guest <= after + OFFSET,
        "guest TSC {guest:#x} is outside the bracket [{:#x}, {:#x}] of host TSC + offset",
        before + OFFSET,
        after + OFFSET
    );
    println!("nested: KVM honours TSC offsets here");
}
