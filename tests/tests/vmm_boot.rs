//! Booting through the real `hourglass`: `--kernel` with the guest that `--write-guest` wrote,
//! and the guest's memory-dirtying load (`--dirty-mib`).

mod vmm_support;

use std::process::Command;
use std::time::Duration;

use vmm_support::*;

#[test]
fn kernel_option_boots_the_written_guest() {
    let _x = exclusive();
    if skip("kernel_option_boots_the_written_guest") {
        return;
    }
    let dir = temp_dir("kernel");
    let elf = dir.join("guest.elf");
    let out = Command::new(binary("hourglass"))
        .arg("--write-guest")
        .arg(&elf)
        .output()
        .expect("run hourglass --write-guest");
    assert!(out.status.success());
    let mut h = Hourglass::start(
        "kernel",
        2,
        &["--kernel", elf.to_str().expect("utf-8 path")],
    );
    let info = h.info();
    assert_eq!(info["config"]["payload"]["kernel"], elf.to_str().unwrap());
    h.wait_until("both vCPUs reporting", Duration::from_secs(20), |h| {
        totals(&h.info(), "vcpus_reporting") == 2
    });
    h.wait_until("a heartbeat", Duration::from_secs(20), |h| {
        h.serial_text().contains("heartbeat")
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dirty_mib_makes_the_guest_dirty_memory() {
    let _x = exclusive();
    if skip("dirty_mib_makes_the_guest_dirty_memory") {
        return;
    }
    let mut h = Hourglass::start("dirty", 1, &["--dirty-mib", "8"]);
    assert_eq!(h.info()["config"]["dirty_mib"], 8);
    h.wait_until(
        "a completed pass over the dirtied MiB",
        Duration::from_secs(30),
        |h| {
            h.info()["time_probe"]["vcpus"][0]["dirty_passes"]
                .as_u64()
                .unwrap_or(0)
                > 0
        },
    );
}

#[test]
fn dirty_mib_beyond_memory_is_refused() {
    if skip("dirty_mib_beyond_memory_is_refused") {
        return;
    }
    let out = Command::new(binary("hourglass"))
        .args([
            "--memory",
            "size=16M",
            "--dirty-mib",
            "64",
            "--serial",
            "off",
        ])
        .output()
        .expect("run hourglass");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dirty-mib 64"), "{err}");
}

/// The three modes (boot, restore, serve): a flag that would have no effect in the mode chosen
/// is refused naming both flags, before anything starts.
#[test]
fn flags_without_effect_in_the_mode_are_refused() {
    for args in [
        &[
            "--restore",
            "source_url=file:///nowhere",
            "--clock-policy",
            "frozen",
        ][..],
        &[
            "--restore",
            "source_url=file:///nowhere",
            "--guest-idle-us",
            "100",
        ],
        &["--write-guest", "/nonexistent/g.elf", "--cpus", "boot=2"],
        &[
            "--write-guest",
            "/nonexistent/g.elf",
            "--api-socket",
            "path=/tmp/x.sock",
        ],
    ] {
        let out = Command::new(binary("hourglass"))
            .args(args)
            .output()
            .expect("run hourglass");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("cannot be used with") && err.contains(args[2]),
            "{args:?}: {err}"
        );
    }
}

/// `--api-socket` with `--clock-policy` (or `--guest-idle-us`) is the boot mode, not a server
/// that silently drops the flag: the VM runs with the policy asked for.
#[test]
fn a_vm_flag_beside_the_api_socket_boots_with_it() {
    let _x = exclusive();
    if skip("a_vm_flag_beside_the_api_socket_boots_with_it") {
        return;
    }
    let mut cmd = Command::new(binary("hourglass"));
    cmd.args(["--clock-policy", "frozen"]);
    let mut h = Hourglass::spawn_cmd(cmd, "mode-boot");
    h.wait_serving(Duration::from_secs(20));
    h.wait_until("the VM", Duration::from_secs(20), |h| {
        h.try_info().is_some()
    });
    let info = h.info();
    assert_eq!(
        info["clock"]["policy_default"], "frozen",
        "{}",
        info["clock"]
    );
    assert_eq!(
        info["config"]["cpus"]["boot_vcpus"], 1,
        "{}",
        info["config"]
    );
}
