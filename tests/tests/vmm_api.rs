//! The API socket of the real `hourglass`: status codes of refusals, socket permissions, one
//! VMM per socket, and no socket left behind.

mod vmm_support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use vmm_support::*;

#[test]
fn refusals_have_cloud_hypervisor_status_codes() {
    let _x = exclusive();
    if skip("refusals_have_cloud_hypervisor_status_codes") {
        return;
    }
    let h = Hourglass::start("codes", 1, &[]);
    // Resuming a running VM: a failed VM action, 500, with a JSON array of causes.
    let (c, body) = h.api("PUT", "vm.resume", None);
    assert_eq!(c, 500, "{body}");
    let causes: Vec<String> = serde_json::from_str(&body).expect("error body is a JSON array");
    assert!(
        causes.iter().any(|s| s.contains("not paused")),
        "{causes:?}"
    );
    // Pausing a paused VM: 500 too.
    assert_eq!(h.api("PUT", "vm.pause", None).0, 204);
    let (c, body) = h.api("PUT", "vm.pause", None);
    assert_eq!(c, 500, "{body}");
    assert!(body.contains("already paused"), "{body}");
    // Unknown path: 404.
    assert_eq!(h.api("GET", "vm.nonsense", None).0, 404);
    // Malformed resume body: 400; the VM stays paused.
    let (c, body) = h.api("PUT", "vm.resume", Some("{\"clock_policy\": 12"));
    assert_eq!(c, 400, "{body}");
    let (c, body) = h.api(
        "PUT",
        "vm.resume",
        Some("{\"clock_policy\": \"sometimes\"}"),
    );
    assert_eq!(c, 400, "{body}");
    assert_eq!(h.info()["state"], "Paused");
    // A resume with an explicit policy works; ping answers.
    assert_eq!(
        h.api("PUT", "vm.resume", Some("{\"clock_policy\":\"wallclock\"}"))
            .0,
        204
    );
    let (c, body) = h.api("GET", "vmm.ping", None);
    assert_eq!(c, 200);
    assert!(body.contains("\"version\""), "{body}");
    let ping: serde_json::Value = serde_json::from_str(&body).expect("vmm.ping JSON");
    for f in ["kvm", "snapshot", "migration", "seccomp"] {
        assert!(
            ping["features"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == f)),
            "vmm.ping does not list {f}: {body}"
        );
    }
    // vm.shutdown, then actions on it fail and info says Shutdown.
    assert_eq!(h.api("PUT", "vm.shutdown", None).0, 204);
    assert_eq!(h.info()["state"], "Shutdown");
    assert_eq!(h.api("PUT", "vm.pause", None).0, 500);
}

#[test]
fn socket_is_private_exclusive_and_removed() {
    let _x = exclusive();
    if skip("socket_is_private_exclusive_and_removed") {
        return;
    }
    let mut h = Hourglass::start("sock", 1, &[]);
    let mode = std::fs::metadata(&h.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    // A second hourglass on the same socket is refused, and the first keeps serving.
    let out = Command::new(binary("hourglass"))
        .arg("--api-socket")
        .arg(&h.socket)
        .args(["--serial", "off", "--memory", "size=64M"])
        .output()
        .expect("run the second hourglass");
    assert!(
        !out.status.success(),
        "second hourglass on the same socket started"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*h.socket.to_string_lossy()), "{err}");
    assert_eq!(h.api("GET", "vmm.ping", None).0, 200);

    // vmm.shutdown: exits 0 and removes the socket.
    assert_eq!(h.api("PUT", "vmm.shutdown", None).0, 204);
    assert!(h.wait_exit(Duration::from_secs(10)).success());
    assert!(!h.socket.exists(), "socket left after vmm.shutdown");
}

#[test]
fn sigterm_leaves_no_socket() {
    let _x = exclusive();
    if skip("sigterm_leaves_no_socket") {
        return;
    }
    let mut h = Hourglass::start("term", 2, &[]);
    let pid = h.child.id() as i32;
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(h.wait_exit(Duration::from_secs(10)).success());
    assert!(!h.socket.exists(), "socket left after SIGTERM");
}

#[test]
fn bad_command_lines_name_the_option() {
    let dir = temp_dir("cli");
    for (args, needle) in [
        (vec!["--cpus", "boot=0"], "--cpus"),
        (vec!["--memory", "size=lots"], "--memory"),
        (vec!["--serial", "pty"], "--serial"),
        (vec!["--clock-policy", "sometimes"], "--clock-policy"),
    ] {
        let out = Command::new(binary("hourglass"))
            .args(&args)
            .output()
            .expect("run hourglass");
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // --write-guest writes the PVH ELF the VMM boots by default.
    let path = dir.join("guest.elf");
    let out = Command::new(binary("hourglass"))
        .arg("--write-guest")
        .arg(&path)
        .output()
        .expect("run hourglass");
    assert!(out.status.success());
    let elf = std::fs::read(&path).expect("guest written");
    assert_eq!(&elf[..4], b"\x7fELF");
    let _ = std::fs::remove_dir_all(&dir);
}
