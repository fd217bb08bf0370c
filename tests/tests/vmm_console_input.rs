//! `--serial tty` is interactive: the real `hourglass` feeds its standard input to the guest's
//! serial port, on this host's KVM.
//!
//! The guest is a PVH kernel of a few instructions, built here byte by byte: it polls the line
//! status register (0x3fd) for data, reads the receive buffer (0x3f8), turns a-z into A-Z and
//! writes the byte back to the transmit register. So what comes out on the VMM's stdout is
//! exactly what went into its stdin, upper-cased, if and only if no byte was lost, repeated or
//! reordered on the way in. The input is far larger than the UART's 64-byte FIFO and is
//! written in one go, so it exercises the device's pending queue and its backpressure; a
//! second test snapshots a paused VM with input still queued and restores it in another
//! process, which must echo all of it; a third runs the VMM on a pseudo-terminal and checks
//! its raw mode and the mode restored on SIGTERM; a fourth checks that the stdin thread runs
//! under its own seccomp filter.

mod vmm_support;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_support::console::Console;
use vmm_support::*;

/// The echo guest's 32-bit PVH entry:
///
/// ```text
/// 0:  mov $0x3fd,%dx
/// 1:  in (%dx),%al ; test $1,%al ; je 1b          LSR: wait for data ready
///     mov $0x3f8,%dx ; in (%dx),%al               RBR
///     cmp $'a',%al ; jb 2f ; cmp $'z',%al ; ja 2f ; sub $0x20,%al
/// 2:  out %al,(%dx) ; jmp 0b                      THR
/// ```
const ECHO_UPPER_CODE: [u8; 27] = [
    0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xfb, 0x66, 0xba, 0xf8, 0x03, 0xec, 0x3c, 0x61,
    0x72, 0x06, 0x3c, 0x7a, 0x77, 0x02, 0x2c, 0x20, 0xee, 0xeb, 0xe5,
];

/// Where the guest's code is loaded and entered.
const LOAD: u64 = 0x10_0000;

fn put(v: &mut [u8], at: usize, bytes: &[u8]) {
    v[at..at + bytes.len()].copy_from_slice(bytes);
}

/// An ELF64 executable with one PT_LOAD of `code` at [`LOAD`] and a PT_NOTE holding the Xen
/// PHYS32_ENTRY note (type 18) that names [`LOAD`] as the PVH entry.
fn pvh_kernel(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let code_at = EHDR + 2 * PHDR;
    let note_at = code_at + code.len().next_multiple_of(4);
    let mut note = Vec::new();
    for word in [4u32, 4, 18] {
        note.extend_from_slice(&word.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD as u32).to_le_bytes());
    let mut v = vec![0u8; note_at + note.len()];
    put(&mut v, 0, b"\x7fELF\x02\x01\x01");
    put(&mut v, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut v, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut v, 20, &1u32.to_le_bytes()); // EV_CURRENT
    put(&mut v, 24, &LOAD.to_le_bytes()); // e_entry
    put(&mut v, 32, &(EHDR as u64).to_le_bytes()); // e_phoff
    put(&mut v, 52, &(EHDR as u16).to_le_bytes()); // e_ehsize
    put(&mut v, 54, &(PHDR as u16).to_le_bytes()); // e_phentsize
    put(&mut v, 56, &2u16.to_le_bytes()); // e_phnum
                                          // (p_type, p_flags, offset, address, size)
    let headers = [
        (1u32, 7u32, code_at, LOAD, code.len()), // PT_LOAD, RWX
        (4, 4, note_at, 0, note.len()),          // PT_NOTE
    ];
    for (i, (kind, flags, off, addr, len)) in headers.into_iter().enumerate() {
        let at = EHDR + i * PHDR;
        put(&mut v, at, &kind.to_le_bytes());
        put(&mut v, at + 4, &flags.to_le_bytes());
        put(&mut v, at + 8, &(off as u64).to_le_bytes());
        put(&mut v, at + 16, &addr.to_le_bytes());
        put(&mut v, at + 24, &addr.to_le_bytes());
        put(&mut v, at + 32, &(len as u64).to_le_bytes());
        put(&mut v, at + 40, &(len as u64).to_le_bytes());
        put(&mut v, at + 48, &4u64.to_le_bytes());
    }
    put(&mut v, code_at, code);
    put(&mut v, note_at, &note);
    v
}

/// `n` bytes of text: lines of mixed-case words, digits and punctuation (every printable ASCII
/// character), deterministic.
fn text(n: usize) -> Vec<u8> {
    let printable: Vec<u8> = (0x20u8..0x7f).collect();
    let mut v = Vec::with_capacity(n);
    let mut x: u32 = 12345;
    while v.len() < n {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let r = (x >> 16) as usize;
        v.push(if r.is_multiple_of(61) {
            b'\n'
        } else {
            printable[r % printable.len()]
        });
    }
    v
}

/// What the guest answers to `input`.
fn echoed(input: &[u8]) -> Vec<u8> {
    input.to_ascii_uppercase()
}

/// Boot the echo guest.
fn boot(tag: &str, stdin: Stdio) -> Console {
    let image_dir = temp_dir(&format!("{tag}-image"));
    let kernel = image_dir.join("kernel");
    std::fs::write(&kernel, pvh_kernel(&ECHO_UPPER_CODE)).expect("write the kernel");
    let mut c = Console::spawn(
        tag,
        &[
            "--memory",
            "size=64M",
            "--kernel",
            kernel.to_str().expect("utf-8"),
        ],
        stdin,
    );
    c.wait_api();
    // Read and loaded by now.
    let _ = std::fs::remove_dir_all(&image_dir);
    c
}

/// Assert `got` is `want`, naming the first difference.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let show = |v: &[u8]| {
        String::from_utf8_lossy(&v[at.min(v.len())..(at + 40).min(v.len())]).into_owned()
    };
    panic!(
        "{what}: {} bytes, {} expected; first difference at byte {at}: got {:?}, expected {:?}",
        got.len(),
        want.len(),
        show(got),
        show(want)
    );
}

/// 20 KiB written to the VMM's stdin at once (320 times the UART's FIFO) all come back from the
/// guest, in order, each byte once; the end of stdin leaves the VM running.
#[test]
fn every_byte_typed_reaches_the_guest_in_order() {
    let _x = exclusive();
    if skip("every_byte_typed_reaches_the_guest_in_order") {
        return;
    }
    let mut c = boot("console-echo", Stdio::piped());
    let input = text(20 * 1024);
    let want = echoed(&input);
    let started = Instant::now();
    {
        let mut stdin = c.child.stdin.take().expect("stdin");
        stdin.write_all(&input).expect("write stdin");
        // Dropped: the VMM sees the end of its input.
    }
    let got = c.read_stdout(want.len(), Duration::from_secs(120)).len();
    let took = started.elapsed();
    assert!(
        got >= want.len(),
        "only {got} of {} bytes came back in {took:?}:\n{}",
        want.len(),
        c.stderr()
    );
    println!(
        "{} bytes echoed in {took:?} ({:.0} bytes/s)",
        want.len(),
        want.len() as f64 / took.as_secs_f64()
    );
    // The end of stdin ended the input, not the VM.
    assert!(matches!(c.child.try_wait(), Ok(None)), "{}", c.stderr());
    let info: Value = serde_json::from_str(&c.api("GET", "vm.info", None).1).expect("JSON");
    assert_eq!(info["state"], "Running", "{info}");
    let log = c.stderr();
    let out = c.shutdown();
    assert_same(&out, &want, "stdout");
    assert!(!log.contains("cannot read stdin"), "{log}");
}

/// `devices.serial` of a snapshot's `state.json`: its FIFO and its pending input, joined.
fn saved_input(dir: &Path) -> Option<Vec<u8>> {
    let state: Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()?;
    let serial = &state["devices"]["serial"];
    let bytes = |field: &str| -> Vec<u8> {
        serial[field]
            .as_array()
            .map(|a| a.iter().map(|b| b.as_u64().unwrap_or(0) as u8).collect())
            .unwrap_or_default()
    };
    Some([bytes("in_buffer"), bytes("pending_input")].concat())
}

/// Input that a paused guest has not read is part of its snapshot (the 64 bytes in the FIFO
/// and the rest in the pending queue), and a VMM that restores the snapshot in another process
/// delivers all of it to the guest.
#[test]
fn input_not_yet_read_survives_snapshot_and_restore() {
    let _x = exclusive();
    if skip("input_not_yet_read_survives_snapshot_and_restore") {
        return;
    }
    let mut c = boot("console-snap", Stdio::piped());
    let (code, body) = c.api("PUT", "vm.pause", None);
    assert_eq!(code, 204, "{body}");
    let input = text(5000);
    let mut stdin = c.child.stdin.take().expect("stdin");
    stdin.write_all(&input).expect("write stdin");
    // The stdin thread queues what it reads; snapshot until all of it is in the state.
    let snap = temp_dir("console-snap-dir");
    let request = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    let deadline = Instant::now() + Duration::from_secs(20);
    let saved = loop {
        let (code, body) = c.api("PUT", "vm.snapshot", Some(&request));
        assert_eq!(code, 204, "vm.snapshot: {body}");
        let saved = saved_input(&snap).expect("state.json with devices.serial");
        if saved.len() >= input.len() || Instant::now() > deadline {
            break saved;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_same(&saved, &input, "the snapshot's serial input");
    let state: Value =
        serde_json::from_slice(&std::fs::read(snap.join("state.json")).expect("state.json"))
            .expect("JSON");
    let serial = &state["devices"]["serial"];
    assert_eq!(serial["in_buffer"].as_array().map(Vec::len), Some(64));
    assert_eq!(
        serial["pending_input"].as_array().map(Vec::len),
        Some(input.len() - 64)
    );
    // Paused all along: the guest echoed nothing.
    assert_eq!(c.read_stdout(1, Duration::from_millis(200)), b"");
    drop(stdin);
    drop(c);

    let source = format!("source_url=file://{},resume=true", snap.display());
    let mut r = Console::spawn("console-restored", &["--restore", &source], Stdio::null());
    r.wait_api();
    let want = echoed(&input);
    let got = r.read_stdout(want.len(), Duration::from_secs(60)).len();
    assert!(got >= want.len(), "only {got} bytes:\n{}", r.stderr());
    let out = r.shutdown();
    assert_same(&out, &want, "the restored guest's echo");
    let _ = std::fs::remove_dir_all(&snap);
}

/// A pseudo-terminal (the test's side and the VMM's side).
struct Pty {
    master: std::fs::File,
    slave: std::fs::File,
}

impl Pty {
    fn open() -> Self {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        // SAFETY: posix_openpt(3) only opens the pty multiplexer; the fd is checked and owned by
        // the File below.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
        assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let master = unsafe { std::fs::File::from_raw_fd(fd) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: grantpt, unlockpt and ptsname_r are ioctls on the master fd; ptsname_r writes
        // at most `name.len()` bytes into `name`, which lives across the call.
        let ok = unsafe {
            libc::grantpt(fd) == 0
                && libc::unlockpt(fd) == 0
                && libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) == 0
        };
        assert!(ok, "pty set-up: {}", std::io::Error::last_os_error());
        let name: Vec<u8> = name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let path = String::from_utf8(name).expect("pty name");
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
        Pty { master, slave }
    }

    /// The terminal's mode.
    fn mode(&self) -> libc::termios {
        use std::os::fd::AsRawFd;
        // SAFETY: termios is plain integers (all zeroes valid); tcgetattr (an ioctl) writes one
        // termios into `t`, which lives across the call.
        let (rc, t) = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            (libc::tcgetattr(self.slave.as_raw_fd(), &mut t), t)
        };
        assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        t
    }
}

/// On a terminal, the VMM puts it in raw mode (no line editing, no echo, CR passed as typed,
/// signals kept) while it runs, the guest gets each key, and SIGTERM puts the terminal back as
/// it was.
#[test]
fn a_terminal_is_raw_while_the_vmm_runs_and_restored_after() {
    let _x = exclusive();
    if skip("a_terminal_is_raw_while_the_vmm_runs_and_restored_after") {
        return;
    }
    let mut pty = Pty::open();
    let before = pty.mode();
    assert_ne!(
        before.c_lflag & libc::ICANON,
        0,
        "a fresh pty is in canonical mode"
    );
    let stdin = Stdio::from(pty.slave.try_clone().expect("dup the pty"));
    let mut c = boot("console-pty", stdin);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pty.mode().c_lflag & libc::ICANON != 0 {
        assert!(
            Instant::now() < deadline,
            "the terminal never left canonical mode:\n{}",
            c.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let raw = pty.mode();
    assert_eq!(raw.c_lflag & (libc::ECHO | libc::ICANON | libc::IEXTEN), 0);
    assert_ne!(raw.c_lflag & libc::ISIG, 0, "Ctrl-C still ends the VMM");
    assert_eq!(raw.c_iflag & (libc::ICRNL | libc::IXON), 0);
    pty.master.write_all(b"echo Hello\r").expect("type");
    let want = b"ECHO HELLO\r";
    let got = c.read_stdout(want.len(), Duration::from_secs(20)).to_vec();
    assert_same(&got, want, "the guest's answer to typed keys");

    let pid = i32::try_from(c.child.id()).expect("pid");
    // SAFETY: kill(2) on our own child; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st = c.wait_exit(Duration::from_secs(20));
    assert_eq!(st.code(), Some(0), "{st}:\n{}", c.stderr());
    let after = pty.mode();
    assert_eq!(
        (after.c_iflag, after.c_oflag, after.c_lflag, after.c_cc),
        (before.c_iflag, before.c_oflag, before.c_lflag, before.c_cc),
        "the terminal's mode after exit"
    );
}

/// The stdin thread installs its own seccomp filter: the test hook's forbidden call in it ends
/// the VMM by SIGSYS, and the report names the thread.
#[test]
fn the_stdin_thread_runs_under_its_own_seccomp_filter() {
    let _x = exclusive();
    if skip("the_stdin_thread_runs_under_its_own_seccomp_filter") {
        return;
    }
    let image_dir = temp_dir("console-seccomp-image");
    let kernel = image_dir.join("kernel");
    std::fs::write(&kernel, pvh_kernel(&ECHO_UPPER_CODE)).expect("write the kernel");
    let mut c = Console::spawn_env(
        "console-seccomp",
        &[
            "--memory",
            "size=64M",
            "--kernel",
            kernel.to_str().expect("utf-8"),
        ],
        Stdio::piped(),
        Some("stdin"),
    );
    let st = c.wait_exit(Duration::from_secs(20));
    let err = c.stderr();
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st}:\n{err}");
    let want = format!(
        "hourglass: seccomp: thread stdin made syscall {}",
        libc::SYS_sysinfo
    );
    assert!(err.contains(&want), "{err}");
    let _ = std::fs::remove_dir_all(&image_dir);
}

/// A VM received by live migration into a serving VMM with `--serial tty` reads that VMM's
/// stdin (the stdin thread is then started by the migration receiver, under its filter), and
/// the source's guest answered its own input before it left.
#[test]
fn a_migrated_guest_reads_the_destination_stdin() {
    let _x = exclusive();
    if skip("a_migrated_guest_reads_the_destination_stdin") {
        return;
    }
    let mut src = boot("console-mig-src", Stdio::piped());
    let before = text(3000);
    let mut src_in = src.child.stdin.take().expect("stdin");
    src_in.write_all(&before).expect("write the source's stdin");
    let got = src
        .read_stdout(before.len(), Duration::from_secs(60))
        .to_vec();
    assert_same(&got, &echoed(&before), "the source's echo");

    let mut dst = Console::spawn("console-mig-dst", &[], Stdio::piped());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(
        vmm::api::client::api_request(&dst.socket, "GET", "vmm.ping", None),
        Ok((200, _))
    ) {
        assert!(Instant::now() < deadline, "no API:\n{}", dst.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    let rx_sock = dst.dir.join("rx.sock");
    let url = format!("unix:{}", rx_sock.display());
    let (api, body) = (
        dst.socket.clone(),
        serde_json::json!({ "receiver_url": url }).to_string(),
    );
    let rx = std::thread::spawn(move || {
        vmm::api::client::api_request(&api, "PUT", "vm.receive-migration", Some(&body))
            .expect("vm.receive-migration request")
    });
    while !rx_sock.exists() {
        assert!(Instant::now() < deadline, "no receiver:\n{}", dst.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    let body = serde_json::json!({ "destination_url": url }).to_string();
    let (code, answer) = src.api("PUT", "vm.send-migration", Some(&body));
    assert_eq!(code, 204, "vm.send-migration: {answer}\n{}", src.stderr());
    let (code, answer) = rx.join().expect("receiver");
    assert_eq!(
        code,
        204,
        "vm.receive-migration: {answer}\n{}",
        dst.stderr()
    );

    let after = text(4000);
    let mut dst_in = dst.child.stdin.take().expect("stdin");
    dst_in
        .write_all(&after)
        .expect("write the destination's stdin");
    let got = dst
        .read_stdout(after.len(), Duration::from_secs(60))
        .to_vec();
    assert_same(&got, &echoed(&after), "the migrated guest's echo");
    drop((src_in, dst_in));
    assert_same(&dst.shutdown(), &echoed(&after), "the destination's stdout");
    assert_same(&src.shutdown(), &echoed(&before), "the source's stdout");
}
