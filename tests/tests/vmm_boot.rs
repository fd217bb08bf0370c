//! Booting through the real `hourglass`: `--kernel` with the guest that `--write-guest` wrote,
//! and the guest's memory-dirtying load (`--dirty-mib`, `--dirty-passes`).

mod vmm_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// `--dirty-passes 2`: the guest makes two passes over its 8 MiB and then stops writing them,
/// while it keeps sampling. 8 MiB is 2048 pages, 64 a sample: 32 samples a pass, so a guest
/// that went on writing would have made 10 more passes in the 320 samples waited for here.
#[test]
fn dirty_passes_stops_the_guest_writing() {
    let _x = exclusive();
    if skip("dirty_passes_stops_the_guest_writing") {
        return;
    }
    const MORE_SAMPLES: u64 = 320;
    let mut h = Hourglass::start(
        "dirty-passes",
        1,
        &["--dirty-mib", "8", "--dirty-passes", "2"],
    );
    let info = h.info();
    assert_eq!(info["config"]["dirty_mib"], 8, "{}", info["config"]);
    assert_eq!(info["config"]["dirty_passes"], 2, "{}", info["config"]);
    let vcpu0 = |info: &serde_json::Value, field: &str| {
        info["time_probe"]["vcpus"][0][field]
            .as_u64()
            .unwrap_or_else(|| panic!("time_probe.vcpus[0].{field} missing in {info}"))
    };
    let mut at_two = None;
    h.wait_until("two passes over the 8 MiB", Duration::from_secs(30), |h| {
        let info = h.info();
        let passes = vcpu0(&info, "dirty_passes");
        assert!(passes <= 2, "the guest made {passes} passes, 2 asked");
        if passes == 2 {
            at_two = Some(vcpu0(&info, "samples"));
        }
        at_two.is_some()
    });
    let start = at_two.expect("samples at the second pass");
    let mut last = (0, 0);
    h.wait_until(
        &format!("{MORE_SAMPLES} more samples of vCPU 0 after its second pass"),
        Duration::from_secs(30),
        |h| {
            let info = h.info();
            last = (vcpu0(&info, "samples"), vcpu0(&info, "dirty_passes"));
            last.0 >= start + MORE_SAMPLES
        },
    );
    assert_eq!(
        last.1, 2,
        "the guest went on dirtying its memory: {} passes at sample {} (2 passes at sample \
         {start})",
        last.1, last.0
    );
}

/// `--dirty-passes` counts passes over the `--dirty-mib` region: without a non-zero
/// `--dirty-mib` it is refused, naming both flags, before anything starts.
#[test]
fn dirty_passes_without_dirty_mib_is_refused() {
    for args in [
        &["--dirty-passes", "1", "--serial", "off"][..],
        &["--dirty-mib", "0", "--dirty-passes", "1", "--serial", "off"],
    ] {
        let out = refused(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("--dirty-passes 1") && err.contains("--dirty-mib"),
            "{args:?}: {err}"
        );
    }
}

/// Runs `hourglass` with `args`, which it must refuse: its output, or a panic (after killing
/// it) when it is still running after 20 s, having booted instead.
fn refused(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(binary("hourglass"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hourglass");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait for hourglass");
            panic!(
                "{args:?} was not refused: hourglass still ran after 20 s\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("hourglass's output")
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
        &[
            "--restore",
            "source_url=file:///nowhere",
            "--dirty-passes",
            "1",
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
