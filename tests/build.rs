//! Builds the clock probe (tests/tests/linux_support/clock_probe.c), the `/init` of the nested
//! Linux clock tests, with the host's C compiler: a static, freestanding x86-64 executable that
//! the tests put in the guest's initramfs (`include_bytes!` of `$OUT_DIR/clock_probe`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "tests/linux_support/clock_probe.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("clock_probe");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args([
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-stack-protector",
            "-fno-pie",
            "-no-pie",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
        ])
        .arg(&out)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}` for {src}: {e}"));
    assert!(status.success(), "`{cc}` failed to build {src}: {status}");
}
