//! Builds the Hourglass test guest (a PVH ELF) from `src/c` with the machine's C
//! compiler, found through the `cc` crate, and leaves it in `OUT_DIR`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCES: [&str; 2] = ["src/c/entry.S", "src/c/main.c"];
const HEADERS: [&str; 1] = ["src/c/protocol.h"];
const LINKER_SCRIPT: &str = "link.ld";
const ELF_NAME: &str = "hourglass-guest.elf";

fn main() {
    for f in SOURCES.iter().chain(HEADERS.iter()) {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-changed={LINKER_SCRIPT}");
    println!("cargo:rerun-if-changed=build.rs");

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));

    // The guest is always x86_64 bare metal, whatever the host target's flags say.
    let mut build = cc::Build::new();
    build
        .files(SOURCES.iter().map(|s| manifest.join(s)))
        .include(manifest.join("src/c"))
        .pic(false)
        .opt_level(2)
        .debug(false)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .cargo_metadata(false)
        // A sanitizer build of the host code (cargo fuzz) must not instrument the guest: it
        // runs bare metal, with no sanitizer runtime to link.
        .inherit_rustflags(false)
        .flag("-fno-sanitize=all")
        .flag("-m64")
        .flag("-ffreestanding")
        .flag("-fno-builtin")
        .flag("-fno-stack-protector")
        .flag("-fno-pie")
        .flag("-fno-asynchronous-unwind-tables")
        .flag("-fcf-protection=none")
        .flag("-mno-red-zone")
        .flag("-mgeneral-regs-only")
        .flag("-mcmodel=small")
        .flag("-std=gnu11");
    let objects = build.compile_intermediates();

    let compiler = build.get_compiler();
    let elf = out_dir.join(ELF_NAME);
    let status = Command::new(compiler.path())
        .args([
            "-m64",
            "-nostdlib",
            "-nostartfiles",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
            "-Wl,-z,max-page-size=4096",
            "-Wl,--no-warn-rwx-segments",
        ])
        .arg("-T")
        .arg(manifest.join(LINKER_SCRIPT))
        .args(&objects)
        .arg("-o")
        .arg(&elf)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {:?}: {e}", compiler.path()));
    if !status.success() {
        panic!("linking the test guest failed ({status})");
    }
}
