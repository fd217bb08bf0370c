//! Lifecycle faults of the real `hourglass` on the real /dev/kvm: SIGTERM while a snapshot is
//! being written, during a live migration (source side) and while paused; a full disk while
//! snapshotting. After SIGTERM the process exits cleanly (status 0, no signal), its API socket
//! file is gone, an earlier snapshot is intact and nothing half-written is left under the
//! destination's name. After a full disk the error names ENOSPC and the file, the guest runs on
//! after resume, and the earlier snapshot in the same directory is intact and restorable.

mod snapshot_support;
mod vmm_support;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snapshot_support::*;
use vmm::snapshot::Snapshot;
use vmm_support::*;

/// `PUT vm.snapshot` to `dest` in a thread: the status and body, or the client's error (the
/// process may go away before answering).
fn snapshot_async(api: &Path, dest: &Path) -> JoinHandle<Result<(u16, String), String>> {
    let api = api.to_path_buf();
    let body = serde_json::json!({ "destination_url": url(dest) }).to_string();
    std::thread::spawn(move || {
        vmm::api::client::api_request(&api, "PUT", "vm.snapshot", Some(&body))
            .map_err(|e| e.to_string())
    })
}

/// A temporary directory removed with everything in it on drop (also when a test fails: the
/// snapshots here are up to 1 GiB).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        Self(temp_dir(tag))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every file's name, size, inode and mtime (cheap: does not read the data).
fn meta_print(dir: &Path) -> Vec<(String, u64, u64, i64, i64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("entry");
            let m = e.metadata().expect("stat");
            (
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                m.ino(),
                m.mtime(),
                m.mtime_nsec(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The snapshot in `dir` reads and checks whole, memory checksum included.
fn assert_snapshot_whole(dir: &Path) {
    let s = Snapshot::read(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    s.verify_memory()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
}

/// Names in `parent` other than `keep`: leftovers of an interrupted write.
fn leftovers(parent: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(parent)
        .expect("list the parent")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

/// `dest` holds nothing, or one whole snapshot.
fn assert_absent_or_whole(dest: &Path) -> &'static str {
    if dest.exists() {
        assert_snapshot_whole(dest);
        "a whole snapshot"
    } else {
        "nothing"
    }
}

/// Wait for the process to exit after a SIGTERM and check that it exited cleanly and removed
/// its API socket.
fn assert_clean_exit(h: &mut Hourglass, within: Duration) -> Duration {
    let t = Instant::now();
    let st = h.wait_exit(within);
    let took = t.elapsed();
    assert_eq!(
        st.signal(),
        None,
        "hourglass died by signal {:?} (core dumped: {}):\n{}",
        st.signal(),
        st.core_dumped(),
        h.stderr()
    );
    assert_eq!(
        st.code(),
        Some(0),
        "hourglass exit status {st}:\n{}",
        h.stderr()
    );
    assert!(
        !h.socket.exists(),
        "the API socket {} is left behind:\n{}",
        h.socket.display(),
        h.stderr()
    );
    took
}

/// Start `hourglass` with 2 vCPUs, `mem` of RAM and `dirty` MiB being dirtied, and wait until
/// the guest has dirtied its whole region once.
fn start_dirty(tag: &str, mem: &str, dirty: u32) -> Hourglass {
    let mut h = spawn(
        tag,
        &[
            "--cpus".into(),
            "boot=2".into(),
            "--memory".into(),
            format!("size={mem}"),
            "--dirty-mib".into(),
            dirty.to_string(),
        ],
    );
    h.wait_until("vm.info", Duration::from_secs(20), |h| {
        h.try_info().is_some()
    });
    wait_healthy(&mut h, 2);
    h.wait_until(
        "one pass over the dirtied region",
        Duration::from_secs(20),
        |h| {
            h.info()["time_probe"]["vcpus"]
                .as_array()
                .is_some_and(|v| v.iter().any(|c| c["dirty_passes"].as_u64() > Some(0)))
        },
    );
    h
}

#[test]
fn sigterm_while_a_snapshot_is_written_exits_cleanly() {
    let _x = exclusive();
    if skip("sigterm_while_a_snapshot_is_written_exits_cleanly") {
        return;
    }
    // 1 GiB with 512 MiB of non-zero pages: writing takes long enough (about 2 s).
    let mut h = start_dirty("fault-snap-term", "1G", 512);
    let scratch = Scratch::new("fault-snap-term-out");
    let parent = scratch.0.clone();
    let earlier = parent.join("earlier");
    let dest = parent.join("dest");
    ch_remote_ok(&h, &["pause"]);
    ch_remote_ok(&h, &["snapshot", &url(&earlier)]);
    let before = meta_print(&earlier);

    let answer = snapshot_async(&h.socket, &dest);
    // Signal once the write has begun: its temporary directory is there.
    let tmp_prefix = ".dest.tmp-";
    h.wait_until(
        "the snapshot's temporary directory",
        Duration::from_secs(20),
        |_| {
            leftovers(&parent, &["earlier"])
                .iter()
                .any(|n| n.starts_with(tmp_prefix))
        },
    );
    // Otherwise the signal would not interrupt anything (the guest would be too small).
    assert!(
        !dest.exists(),
        "the snapshot was complete before the signal could be sent"
    );
    h.signal(libc::SIGTERM);
    let took = assert_clean_exit(&mut h, Duration::from_secs(30));
    let answer = answer.join().expect("snapshot thread");
    let at_dest = assert_absent_or_whole(&dest);
    if let Ok((204, _)) = answer {
        assert!(dest.exists(), "vm.snapshot answered 204 but wrote nothing");
    }
    println!(
        "snap-term: exit {took:?} after SIGTERM; snapshot answer {answer:?}; dest holds {at_dest}"
    );
    assert_eq!(meta_print(&earlier), before, "the earlier snapshot changed");
    assert_snapshot_whole(&earlier);
    let left = leftovers(&parent, &["earlier", "dest"]);
    assert!(left.is_empty(), "left behind in the parent: {left:?}");
}

/// An API request answered in a thread: its status and body, or why no answer came.
type Pending = std::thread::JoinHandle<Result<(u16, String), String>>;

/// Start receiving on `dst` (a Unix socket in its directory) and, once it listens, sending from
/// `src` with a 1 ms downtime target; returns both pending answers.
fn start_migration(src: &Hourglass, dst: &mut Hourglass) -> (Pending, Pending) {
    let sock = dst.dir.join("rx.sock");
    let url = format!("unix:{}", sock.display());
    let put = |api: std::path::PathBuf, endpoint: &'static str, body: String| -> Pending {
        std::thread::spawn(move || {
            vmm::api::client::api_request(&api, "PUT", endpoint, Some(&body))
                .map_err(|e| e.to_string())
        })
    };
    let rx = put(
        dst.socket.clone(),
        "vm.receive-migration",
        serde_json::json!({ "receiver_url": url }).to_string(),
    );
    dst.wait_until(
        "the receiver listening",
        Duration::from_secs(20),
        move |_| sock.exists(),
    );
    let send = put(
        src.socket.clone(),
        "vm.send-migration",
        serde_json::json!({ "destination_url": url, "downtime_ms": 1 }).to_string(),
    );
    (rx, send)
}

#[test]
fn sigterm_during_a_live_migration_exits_the_source_cleanly() {
    let _x = exclusive();
    if skip("sigterm_during_a_live_migration_exits_the_source_cleanly") {
        return;
    }
    // 1 GiB with 64 MiB being dirtied: the copy takes long enough to be interrupted.
    let mut src = start_dirty("fault-mig-src", "1G", 64);
    ch_remote_ok(&src, &["pause"]);
    let scratch = Scratch::new("fault-mig-out");
    let earlier = scratch.0.join("earlier");
    ch_remote_ok(&src, &["snapshot", &url(&earlier)]);
    let before = meta_print(&earlier);
    ch_remote_ok(&src, &["resume"]);

    let mut dst = start_serving("fault-mig-dst", &[]);
    let (rx, send) = start_migration(&src, &mut dst);
    src.wait_until("the migration under way", Duration::from_secs(20), |h| {
        let m = &h.info()["migration"];
        m["phase"] == "precopy" && m["bytes_sent"].as_u64().unwrap_or(0) > 1 << 20
    });
    src.signal(libc::SIGTERM);
    let took = assert_clean_exit(&mut src, Duration::from_secs(30));
    let sent = send.join().expect("send thread");
    let received = rx.join().expect("receive thread");
    println!(
        "mig-term: source exited {took:?} after SIGTERM; send answered {sent:?}; \
         receive answered {received:?}"
    );
    // The destination is still a working VMM: either the whole VM arrived and runs, or it
    // refused the cut-short stream and has no VM.
    match received {
        Ok((204, _)) => {
            let info = dst.info();
            assert_eq!(info["state"], "Running", "{info}");
            let s = vcpu_samples(&info);
            wait_progress(&mut dst, &s, "the migrated guest sampling");
            assert_no_violations(&dst.info());
        }
        Ok((code, body)) => {
            assert!((400..600).contains(&code), "receive answered {code} {body}");
            let (code, body) = dst.api("GET", "vmm.ping", None);
            assert_eq!(code, 200, "the destination after a failed receive: {body}");
        }
        Err(e) => panic!("the destination gave no answer to receive-migration: {e}"),
    }
    assert_eq!(meta_print(&earlier), before, "the earlier snapshot changed");
    assert_snapshot_whole(&earlier);
}

#[test]
fn sigterm_while_paused_exits_cleanly() {
    let _x = exclusive();
    if skip("sigterm_while_paused_exits_cleanly") {
        return;
    }
    let mut h = Hourglass::start("fault-paused", 2, &[]);
    wait_healthy(&mut h, 2);
    ch_remote_ok(&h, &["pause"]);
    let scratch = Scratch::new("fault-paused-out");
    let earlier = scratch.0.join("earlier");
    ch_remote_ok(&h, &["snapshot", &url(&earlier)]);
    let before = meta_print(&earlier);
    assert_eq!(h.info()["state"], "Paused");
    h.signal(libc::SIGTERM);
    let took = assert_clean_exit(&mut h, Duration::from_secs(10));
    println!("paused-term: exited {took:?} after SIGTERM");
    assert_eq!(meta_print(&earlier), before, "the earlier snapshot changed");
    assert_snapshot_whole(&earlier);
}

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    /// Mount, or the reason it could not be mounted.
    fn mount(tag: &str, size: &str) -> Result<Self, String> {
        let dir = temp_dir(tag);
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_while_snapshotting_fails_clearly_and_keeps_the_earlier_snapshot() {
    let _x = exclusive();
    if skip("a_full_disk_while_snapshotting_fails_clearly_and_keeps_the_earlier_snapshot") {
        return;
    }
    let fs = match SmallFs::mount("fault-enospc", "64M") {
        Ok(fs) => fs,
        Err(reason) => {
            println!("SKIPPED a_full_disk_while_snapshotting_fails_clearly_and_keeps_the_earlier_snapshot: {reason}");
            return;
        }
    };
    // About 44 MiB of non-zero RAM: one snapshot fits in 64 MiB, a second one does not.
    let mut h = start_dirty("fault-enospc-vm", "128M", 40);
    let earlier = fs.0.join("earlier");
    let dest = fs.0.join("dest");
    ch_remote_ok(&h, &["pause"]);
    ch_remote_ok(&h, &["snapshot", &url(&earlier)]);
    let before = fingerprint(&earlier);
    ch_remote_ok(&h, &["resume"]);
    let s = vcpu_samples(&h.info());
    wait_progress(&mut h, &s, "the guest sampling after the first snapshot");

    ch_remote_ok(&h, &["pause"]);
    let (code, body) = snapshot_async(&h.socket, &dest)
        .join()
        .expect("snapshot thread")
        .unwrap_or_else(|e| panic!("vm.snapshot got no answer: {e}\n{}", h.stderr()));
    println!("enospc: vm.snapshot answered {code} {body}");
    assert!(
        (400..600).contains(&code),
        "a snapshot onto a full disk answered {code}: {body}"
    );
    let msgs: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("the error body is not JSON ({e}): {body}"));
    let text = msgs.to_string();
    assert!(
        text.contains("No space left on device") || text.contains("ENOSPC"),
        "the error does not name ENOSPC: {body}"
    );
    assert!(
        vmm::snapshot::FILES.iter().any(|f| text.contains(f)),
        "the error names no snapshot file: {body}"
    );
    assert!(
        !dest.exists(),
        "something is left under the destination name"
    );
    let left = leftovers(&fs.0, &["earlier"]);
    assert!(left.is_empty(), "left behind on the full disk: {left:?}");
    assert_eq!(
        fingerprint(&earlier),
        before,
        "the earlier snapshot changed"
    );

    // The guest runs on after resume.
    ch_remote_ok(&h, &["resume"]);
    let info = h.info();
    assert_eq!(info["state"], "Running", "{info}");
    wait_progress(
        &mut h,
        &vcpu_samples(&info),
        "the guest sampling after resume",
    );
    assert_no_violations(&h.info());
    drop(h);

    // The earlier snapshot restores and its guest runs.
    let mut r = restore_cli("fault-enospc-restore", &earlier, "resume=true");
    let info = r.info();
    assert_eq!(info["state"], "Running", "{info}");
    wait_progress(&mut r, &vcpu_samples(&info), "the restored guest sampling");
    assert_no_violations(&r.info());
    drop(r);
    assert_eq!(
        fingerprint(&earlier),
        before,
        "restoring changed the snapshot"
    );
}

/// SIGTERM to the destination in the middle of a live migration: exactly one copy of the guest
/// runs afterwards, and both sides say which. Here the signal comes well before the hand-over,
/// so the destination abandons the migration and exits, and the source keeps running its VM.
/// (Before: the destination went on receiving, started the guest, then exited; the source had
/// completed and shut its VM down; the guest ran nowhere.)
#[test]
fn sigterm_to_the_destination_mid_migration_leaves_one_running_copy() {
    let _x = exclusive();
    if skip("sigterm_to_the_destination_mid_migration_leaves_one_running_copy") {
        return;
    }
    // 1 GiB with 64 MiB being dirtied: the copy takes long enough to be interrupted.
    let mut src = start_dirty("fault-dterm-src", "1G", 64);
    let mut dst = start_serving("fault-dterm-dst", &[]);
    let (rx, send) = start_migration(&src, &mut dst);
    src.wait_until("the migration under way", Duration::from_secs(20), |h| {
        let m = &h.info()["migration"];
        m["phase"] == "precopy" && m["bytes_sent"].as_u64().unwrap_or(0) > 1 << 20
    });
    dst.signal(libc::SIGTERM);
    let took = assert_clean_exit(&mut dst, Duration::from_secs(30));
    let sent = send.join().expect("send thread");
    let received = rx.join().expect("receive thread");
    println!(
        "dst-term: destination exited {took:?} after SIGTERM; send answered {sent:?}; \
         receive answered {received:?}"
    );
    match &sent {
        Ok((code, body)) => {
            assert!((400..600).contains(code), "send answered {code} {body}");
            assert!(
                body.contains("shutting down"),
                "the source is not told why: {body}"
            );
        }
        Err(e) => panic!("the source gave no answer to send-migration: {e}"),
    }
    // The one running copy is the source's.
    let info = src.info();
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(
        info["migration"]["phase"], "failed",
        "{}",
        info["migration"]
    );
    let s = vcpu_samples(&info);
    wait_progress(
        &mut src,
        &s,
        "the source guest sampling after the failed migration",
    );
    assert_no_violations(&src.info());
}

/// A destination that accepts the connection and then says nothing: the source gives up after
/// its wait and says that the destination was silent and for how long (before: "Resource
/// temporarily unavailable (os error 11)"); its VM runs on.
#[test]
fn a_silent_destination_is_named_as_silent_with_the_wait() {
    let _x = exclusive();
    if skip("a_silent_destination_is_named_as_silent_with_the_wait") {
        return;
    }
    let src = start_dirty("fault-silent-src", "64M", 1);
    let sock = src.dir.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let holder = std::thread::spawn(move || {
        // Accept and hold the connection open without a byte, until the source gives up.
        let (mut s, _) = listener.accept().expect("accept");
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
    });
    let body = serde_json::json!({
        "destination_url": format!("unix:{}", sock.display()),
        "timeout_s": 2,
    })
    .to_string();
    let (code, answer) = src.api("PUT", "vm.send-migration", Some(&body));
    holder.join().expect("holder");
    assert!((400..600).contains(&code), "{code} {answer}");
    assert!(
        answer.contains("the destination sent nothing for")
            && answer.contains("while this side waited"),
        "the silence is not named: {answer}"
    );
    assert!(!answer.contains("os error 11"), "{answer}");
    let info = src.info();
    assert_eq!(info["state"], "Running", "{info}");
}
