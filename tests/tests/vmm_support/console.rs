//! `hourglass` with `--serial tty`: its stdin is the guest's keyboard, its stdout read by a
//! thread here.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use super::{prebuilt_or_built, temp_dir};

/// A running `hourglass` whose stdout is read by a thread; killed on drop.
pub struct Console {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub out: Receiver<Vec<u8>>,
    /// Stdout so far.
    pub seen: Vec<u8>,
}

impl Console {
    /// Spawn `hourglass` with `args`, `--serial tty`, an API socket, `stdin` as its stdin and
    /// its stdout read here.
    pub fn spawn(tag: &str, args: &[&str], stdin: Stdio) -> Self {
        Self::spawn_env(tag, args, stdin, None)
    }

    pub fn spawn_env(tag: &str, args: &[&str], stdin: Stdio, selftest: Option<&str>) -> Self {
        let dir = temp_dir(tag);
        let socket = dir.join("api.sock");
        let mut cmd = Command::new(prebuilt_or_built("hourglass"));
        cmd.args(args)
            .args(["--serial", "tty", "-v"])
            .arg("--api-socket")
            .arg(format!("path={}", socket.display()))
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("stderr.log")).expect("stderr log"),
            ));
        match selftest {
            Some(k) => cmd.env("HOURGLASS_SECCOMP_SELFTEST", k),
            None => cmd.env_remove("HOURGLASS_SECCOMP_SELFTEST"),
        };
        let mut child = cmd.spawn().expect("spawn hourglass");
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, out) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Console {
            child,
            socket,
            dir,
            out,
            seen: Vec::new(),
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        vmm::api::client::api_request(&self.socket, method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.stderr()))
    }

    /// Wait (20 s at most) until the API answers.
    pub fn wait_api(&mut self) {
        self.wait_api_for(Duration::from_secs(20));
    }

    /// Wait (`timeout` at most) until the API answers `vm.info` (a VM is there).
    pub fn wait_api_for(&mut self, timeout: Duration) {
        self.wait_answer("vm.info", timeout);
    }

    /// Wait (`timeout` at most) until the API answers `GET path` with 200 (`vmm.ping`: the
    /// VMM serves, with or without a VM).
    pub fn wait_answer(&mut self, path: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = vmm::api::client::api_request(&self.socket, "GET", path, None) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("hourglass exited ({st}):\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "the API did not come up:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Collect stdout until it holds `n` bytes (or `timeout` passes, or it ends).
    pub fn read_stdout(&mut self, n: usize, timeout: Duration) -> &[u8] {
        let deadline = Instant::now() + timeout;
        while self.seen.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(_) => break,
            }
        }
        &self.seen
    }

    /// Collect stdout until what came after byte `from` holds `pattern`; the offset just past
    /// the pattern's first occurrence there. On a timeout, or if stdout ends first, the panic
    /// shows the VMM's log and stdout's tail.
    pub fn wait_stdout(&mut self, from: usize, pattern: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let p = pattern.as_bytes();
        loop {
            let start = from.min(self.seen.len());
            if let Some(i) = self.seen[start..].windows(p.len()).position(|w| w == p) {
                return start + i + p.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(e) => {
                    let tail =
                        String::from_utf8_lossy(&self.seen[self.seen.len().saturating_sub(3000)..])
                            .into_owned();
                    panic!(
                        "{pattern:?} not on the console ({e:?} after {timeout:?}); its tail:\n{tail}\n\
                         hourglass said:\n{}",
                        self.stderr()
                    );
                }
            }
        }
    }

    /// Stop the VMM through the API, check it exits with status 0, and return all it wrote on
    /// stdout.
    pub fn shutdown(mut self) -> Vec<u8> {
        let (code, body) = self.api("PUT", "vmm.shutdown", None);
        assert_eq!(code, 204, "{body}");
        let st = self.wait_exit(Duration::from_secs(20));
        assert_eq!(st.code(), Some(0), "{}", self.stderr());
        // The reader thread ends at the end of stdout.
        while let Ok(chunk) = self.out.recv_timeout(Duration::from_secs(20)) {
            self.seen.extend_from_slice(&chunk);
        }
        std::mem::take(&mut self.seen)
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "hourglass did not exit:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
