//! `--kernel`, `--initramfs` and `--cmdline` as the loader sees them: any bytes as the kernel
//! (told apart as ELF or bzImage, header fields checked), any initramfs and command line, any
//! vCPU count for the MP tables. Each is loaded into a small guest or refused with an error;
//! never a panic, never a write outside guest memory.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestMemoryMmap;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    kernel: &'a [u8],
    initramfs: Option<&'a [u8]>,
    cmdline: Option<&'a str>,
    vcpus: u8,
    /// The header's bytes written over a valid bzImage prefix (so the fuzzer reaches the
    /// field checks, not only the magic).
    as_bzimage: bool,
}

/// 16 MiB: enough for the loader's structures, small enough to map each run.
const MEM: u64 = 16 << 20;

fuzz_target!(|input: Input| {
    let mut kernel = input.kernel.to_vec();
    if input.as_bzimage && kernel.len() >= 0x270 {
        kernel[0x202..0x206].copy_from_slice(b"HdrS");
        kernel[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    }
    let regions = arch::layout::ram_regions(MEM).expect("16 MiB is a valid size");
    let mem = GuestMemoryMmap::from_ranges(&regions).expect("map guest memory");
    let _ = arch::load_payload(
        &mem,
        MEM,
        u32::from(input.vcpus),
        &arch::Payload {
            kernel: &kernel,
            initramfs: input.initramfs,
            cmdline: input.cmdline,
        },
    );
});
