//! The README's set-up commands, taken from README.md itself (not copied here) and run against
//! the real binaries: the main job boots and serves, and each `ch-remote` line works. Only the
//! binaries' directory (`target/release/` → this build's) and the socket path (a fresh one per
//! run) are substituted. `ch-remote info` is parsed by a strict model of the `VmInfo` fields
//! Cloud Hypervisor's API has, as a typed client of that API would.

mod vmm_support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use vmm_support::*;

/// Cloud Hypervisor's `VmInfo`, as far as Hourglass serves it; a typed client fails on a field
/// of the wrong shape (extra fields are allowed, as serde allows them by default).
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct ChVmInfo {
    config: ChVmConfig,
    state: String,
    memory_actual_size: Option<u64>,
    device_tree: Option<BTreeMap<String, ChDeviceNode>>,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct ChVmConfig {
    cpus: ChCpus,
    memory: ChMemory,
    payload: Option<ChPayload>,
    serial: ChConsole,
    console: ChConsole,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct ChCpus {
    boot_vcpus: u8,
    max_vcpus: u8,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct ChMemory {
    size: u64,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct ChPayload {
    firmware: Option<String>,
    kernel: Option<String>,
    cmdline: Option<String>,
    initramfs: Option<String>,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct ChConsole {
    file: Option<String>,
    mode: ChConsoleMode,
    iommu: bool,
    socket: Option<String>,
}

#[derive(Debug, Deserialize)]
enum ChConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct ChDeviceNode {
    id: String,
    resources: Vec<serde_json::Value>,
    parent: Option<String>,
    children: Vec<String>,
    pci_bdf: Option<serde_json::Value>,
}

/// The indented command lines of the README's "Set-up" section.
fn setup_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Set-up"))
        .expect("a Set-up section in README.md");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .map(str::to_string)
        .collect()
}

/// `line` with the README's binary directory and socket replaced by this run's, split into
/// words (the README's commands use no quoting).
fn words(line: &str, socket: &str) -> Vec<String> {
    let bin = bin_dir();
    line.replace("target/release/", &format!("{}/", bin.display()))
        .replace("/tmp/hourglass.sock", socket)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_readme_setup_commands_work_as_written() {
    let _x = exclusive();
    if skip("the_readme_setup_commands_work_as_written") {
        return;
    }
    let cmds = setup_commands();
    let main_job = cmds
        .iter()
        .find(|c| c.contains("hourglass --"))
        .expect("the main job in the README");
    let (build, run) = main_job
        .split_once(" && ")
        .expect("the main job builds, then runs");
    assert!(
        build.starts_with("cargo build --release --bins"),
        "the README builds with: {build}"
    );
    // The build itself is what this test's own build already did (in its own profile).
    binary("hourglass");
    let dir = temp_dir("readme");
    let socket = dir.join("api.sock").display().to_string();
    let argv = words(run, &socket);
    let mut vmm = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("stderr.log")).expect("log"),
        ))
        .spawn()
        .unwrap_or_else(|e| panic!("{run}: {e}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !matches!(
        vmm::api::client::api_request(std::path::Path::new(&socket), "GET", "vm.info", None),
        Ok((200, _))
    ) {
        assert!(
            std::time::Instant::now() < deadline && vmm.try_wait().unwrap().is_none(),
            "the main job did not serve vm.info: {}",
            std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let clients: Vec<&String> = cmds.iter().filter(|c| c.contains("ch-remote ")).collect();
    assert!(
        clients.iter().any(|c| c.ends_with(" info")) && clients.len() >= 4,
        "{clients:?}"
    );
    for line in clients {
        let argv = words(line, &socket);
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(
            out.status.success(),
            "{line}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        if line.ends_with(" info") {
            let info: ChVmInfo = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "a typed Cloud Hypervisor client cannot read `ch-remote info`: {e}\n{}",
                    String::from_utf8_lossy(&out.stdout)
                )
            });
            assert_eq!(info.state, "Running");
            assert_eq!(info.config.cpus.boot_vcpus, 2);
            assert_eq!(info.config.memory.size, 256 << 20);
        }
    }
    // The last README line ends the VMM.
    let status = {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = vmm.try_wait().unwrap() {
                break st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "shutdown-vmm did not end the VMM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(status.success(), "the main job exited with {status}");
}
