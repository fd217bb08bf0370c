//! The HTTP API server, its client and `ch-remote`, against a fake VMM handler.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use vmm::api::client::api_request;
use vmm::api::http::{start_api_server_with_limits, ServerLimits};
use vmm::api::{
    start_api_server, ApiError, ApiHandler, ApiRequest, ApiResponse, ApiServer, ApiServerError,
    ClockPolicy, MemoryRestoreMode, MigrationMode, ReceiveMigrationConfig, RestoreConfig,
    ResumeConfig, SendMigrationConfig, SnapshotConfig,
};
use vmm_sys_util::tempdir::TempDir;

fn ping_json() -> Value {
    json!({"build_version": "fake-build", "version": "9.9.9", "pid": 4242, "features": ["kvm"]})
}

fn info_json() -> Value {
    json!({"config": {"cpus": {"boot_vcpus": 2}}, "state": "Running"})
}

/// Records every request; pausing a paused VM fails like Cloud Hypervisor's does (500).
#[derive(Default)]
struct Fake {
    log: Mutex<Vec<ApiRequest>>,
    paused: Mutex<bool>,
}

impl Fake {
    fn log(&self) -> Vec<ApiRequest> {
        self.log.lock().unwrap().clone()
    }
}

impl ApiHandler for Fake {
    fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        if matches!(&req, ApiRequest::VmSnapshot(c) if c.destination_url == "file:///panic") {
            panic!("fake handler told to panic");
        }
        self.log.lock().unwrap().push(req.clone());
        let mut paused = self.paused.lock().unwrap();
        match req {
            ApiRequest::VmmPing => Ok(ApiResponse::Json(ping_json())),
            ApiRequest::VmInfo => Ok(ApiResponse::Json(info_json())),
            ApiRequest::VmPause if *paused => {
                Err(ApiError::internal("The VM could not be paused")
                    .caused_by("VM is already paused"))
            }
            ApiRequest::VmPause => {
                *paused = true;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::VmResume(_) if !*paused => {
                Err(ApiError::internal("The VM could not be resumed").caused_by("VM is not paused"))
            }
            ApiRequest::VmResume(_) => {
                *paused = false;
                Ok(ApiResponse::Empty)
            }
            _ => Ok(ApiResponse::Empty),
        }
    }
}

struct Fixture {
    _dir: TempDir,
    sock: PathBuf,
    fake: Arc<Fake>,
    server: Option<ApiServer>,
}

fn tempdir() -> TempDir {
    TempDir::new_with_prefix(std::env::temp_dir().join("hg-api-")).unwrap()
}

fn fixture_with(limits: ServerLimits) -> Fixture {
    let dir = tempdir();
    let sock = dir.as_path().join("api.sock");
    let fake = Arc::new(Fake::default());
    let server = start_api_server_with_limits(&sock, fake.clone(), limits).unwrap();
    Fixture {
        _dir: dir,
        sock,
        fake,
        server: Some(server),
    }
}

fn fixture() -> Fixture {
    fixture_with(ServerLimits::default())
}

/// Sends raw bytes and returns everything the server wrote before closing.
fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// Splits a raw response into (status line, headers, body).
fn split_response(r: &str) -> (&str, Vec<&str>, &str) {
    let (head, body) = r.split_once("\r\n\r\n").expect("no end of headers");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap();
    (status, lines.collect(), body)
}

fn causes(body: &str) -> Vec<String> {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("error body {body:?} is not [str]: {e}"))
}

#[test]
fn every_endpoint_answers_with_cloud_hypervisor_status_and_body() {
    let f = fixture();
    let req = |m, p, b: Option<&str>| api_request(&f.sock, m, p, b).unwrap();

    let (status, body) = req("GET", "vmm.ping", None);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), ping_json());
    let (status, body) = req("GET", "/api/v1/vm.info", None);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), info_json());
    assert_eq!(req("PUT", "vm.pause", None), (204, String::new()));
    let (status, body) = req("PUT", "vm.pause", None);
    assert_eq!(status, 500);
    assert_eq!(
        causes(&body),
        ["The VM could not be paused", "VM is already paused"]
    );
    assert_eq!(
        req("PUT", "vm.resume", Some(r#"{"clock_policy":"frozen"}"#)),
        (204, String::new())
    );
    assert_eq!(req("PUT", "vm.shutdown", None), (204, String::new()));
    assert_eq!(
        req(
            "PUT",
            "vm.snapshot",
            Some(r#"{"destination_url":"file:///snap"}"#)
        ),
        (204, String::new())
    );
    let restore = r#"{"source_url":"file:///snap","prefault":false,"memory_restore_mode":"Copy","net_fds":null,"vfio_fds":null,"resume":true,"zone_updates":[]}"#;
    assert_eq!(
        req("PUT", "vm.restore", Some(restore)),
        (204, String::new())
    );
    assert_eq!(
        req(
            "PUT",
            "vm.send-migration",
            Some(r#"{"destination_url":"unix:/tmp/m","local":true,"downtime_ms":100}"#)
        ),
        (204, String::new())
    );
    assert_eq!(
        req(
            "PUT",
            "vm.receive-migration",
            Some(r#"{"receiver_url":"tcp:0.0.0.0:6000","tls_dir":null}"#)
        ),
        (204, String::new())
    );
    assert_eq!(req("PUT", "vmm.shutdown", None), (204, String::new()));

    let mut send = SendMigrationConfig::new("unix:/tmp/m");
    send.local = true;
    send.downtime_ms = 100;
    let expected = vec![
        ApiRequest::VmmPing,
        ApiRequest::VmInfo,
        ApiRequest::VmPause,
        ApiRequest::VmPause,
        ApiRequest::VmResume(ResumeConfig {
            clock_policy: Some(ClockPolicy::Frozen),
        }),
        ApiRequest::VmShutdown,
        ApiRequest::VmSnapshot(SnapshotConfig {
            destination_url: "file:///snap".into(),
        }),
        ApiRequest::VmRestore(RestoreConfig {
            source_url: "file:///snap".into(),
            prefault: false,
            memory_restore_mode: MemoryRestoreMode::Copy,
            resume: true,
            clock_policy: None,
        }),
        ApiRequest::VmSendMigration(send),
        ApiRequest::VmReceiveMigration(ReceiveMigrationConfig {
            receiver_url: "tcp:0.0.0.0:6000".into(),
            memory_mode: MigrationMode::Precopy,
            clock_policy: None,
        }),
        ApiRequest::VmmShutdown,
    ];
    assert_eq!(f.fake.log(), expected);
}

#[test]
fn response_bytes_have_no_reason_phrase_and_exact_header_spelling() {
    let f = fixture();
    let r = raw(
        &f.sock,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    let (status, headers, body) = split_response(&r);
    assert_eq!(status, "HTTP/1.1 200 ");
    assert!(
        headers.contains(&format!("Content-Length: {}", body.len()).as_str()),
        "{r:?}"
    );
    assert!(headers.contains(&"Content-Type: application/json"), "{r:?}");
    assert!(headers.contains(&"Connection: close"), "{r:?}");
    assert_eq!(serde_json::from_str::<Value>(body).unwrap(), ping_json());

    let r = raw(&f.sock, b"PUT /api/v1/vm.pause HTTP/1.1\r\n\r\n");
    let (status, headers, body) = split_response(&r);
    assert_eq!(status, "HTTP/1.1 204 ");
    assert!(body.is_empty());
    assert!(
        !headers
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with("content-")),
        "204 must carry no Content-Length/Type: {r:?}"
    );

    let r = raw(&f.sock, b"PUT /api/v1/vm.pause HTTP/1.1\r\n\r\n");
    let (status, headers, body) = split_response(&r);
    assert_eq!(status, "HTTP/1.1 500 ");
    assert!(headers.contains(&format!("Content-Length: {}", body.len()).as_str()));
    assert_eq!(
        causes(body),
        ["The VM could not be paused", "VM is already paused"]
    );
}

/// Parses a response exactly as Cloud Hypervisor's client does: status after "HTTP/1.1 " up
/// to the first CR, trimmed; body length from the literal "Content-Length: ".
fn cloud_hypervisor_client_parse(res: &str) -> (u16, Option<String>) {
    let o = res.find("HTTP/1.1").expect("missing protocol");
    let line_end = o + res[o..].find('\r').unwrap();
    let status: u16 = res[o + "HTTP/1.1 ".len()..line_end].trim().parse().unwrap();
    let body_offset = res.find("\r\n\r\n").unwrap() + 4;
    let body = res.find("Content-Length: ").map(|h| {
        let v = &res[h + "Content-Length: ".len()..h + res[h..].find('\r').unwrap()];
        let len: usize = v.trim().parse().unwrap();
        res[body_offset..body_offset + len].to_string()
    });
    (status, body)
}

#[test]
fn cloud_hypervisor_client_byte_sequence_is_understood() {
    let f = fixture();
    // The writes Cloud Hypervisor's client makes for `ch-remote snapshot file:///snap`.
    let body = r#"{"destination_url":"file:///snap"}"#;
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.write_all(b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n")
        .unwrap();
    s.write_all(format!("Content-Length: {}\r\n", body.len()).as_bytes())
        .unwrap();
    s.write_all(b"\r\n").unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(cloud_hypervisor_client_parse(&out), (204, None));

    let out = raw(
        &f.sock,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    );
    let (status, body) = cloud_hypervisor_client_parse(&out);
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body.unwrap()).unwrap(),
        ping_json()
    );
}

#[test]
fn request_sent_in_pieces_is_buffered_until_complete() {
    let f = fixture();
    let body = r#"{"destination_url": "file:///pieces/of/a/snapshot"}"#;
    let request = format!(
        "PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: localhost\r\ncontent-LENGTH: {}\r\n\r\n{body}",
        body.len()
    );
    let bytes = request.into_bytes();
    // Cut inside the request line, inside a header name, before the blank line, inside the body.
    let cuts = [
        5,
        40,
        bytes.len() - body.len() - 1,
        bytes.len() - 10,
        bytes.len(),
    ];
    let stream = UnixStream::connect(&f.sock).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let pieces: Vec<Vec<u8>> = cuts
        .iter()
        .scan(0, |start, &end| {
            let piece = bytes[*start..end].to_vec();
            *start = end;
            Some(piece)
        })
        .collect();
    let t = thread::spawn(move || {
        for p in pieces {
            writer.write_all(&p).unwrap();
            writer.flush().unwrap();
            // Pauses make the server see separate reads; correctness does not depend on them.
            thread::sleep(Duration::from_millis(30));
        }
    });
    let mut reader = stream;
    let mut out = String::new();
    reader.read_to_string(&mut out).unwrap();
    t.join().unwrap();
    assert!(out.starts_with("HTTP/1.1 204 \r\n"), "{out:?}");
    assert_eq!(
        f.fake.log(),
        [ApiRequest::VmSnapshot(SnapshotConfig {
            destination_url: "file:///pieces/of/a/snapshot".into()
        })]
    );
}

#[test]
fn malformed_requests_are_400_with_json_causes() {
    let f = fixture();
    for bad in [
        &b"NOT AN HTTP REQUEST\r\n\r\n"[..],
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nBad Header\r\n\r\n",
        b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: x1\r\n\r\n",
        b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ] {
        let r = raw(&f.sock, bad);
        let (status, _, body) = split_response(&r);
        assert_eq!(
            status,
            "HTTP/1.1 400 ",
            "{:?} -> {r:?}",
            String::from_utf8_lossy(bad)
        );
        assert!(!causes(body).is_empty());
    }
    // Headers that end before the blank line, then the client half-closes.
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    assert!(r.starts_with("HTTP/1.1 400 "), "{r:?}");

    let (status, body) = api_request(
        &f.sock,
        "PUT",
        "vm.restore",
        Some(r#"{"source_url": "file:///s","#),
    )
    .unwrap();
    assert_eq!(status, 400);
    assert!(
        causes(&body)[0].starts_with("vm.restore body: body is not valid JSON"),
        "{body}"
    );
    let (status, body) = api_request(
        &f.sock,
        "PUT",
        "vm.restore",
        Some(r#"{"source_url": "file:///s", "prefault": "yes"}"#),
    )
    .unwrap();
    assert_eq!(status, 400);
    assert_eq!(
        causes(&body),
        ["vm.restore body: field `prefault`: expected a boolean, got a string \"yes\""]
    );
    let (status, body) = api_request(
        &f.sock,
        "PUT",
        "vm.receive-migration",
        Some(r#"{"receiver_url": "unix:/r", "memory_mode": "Postcopy"}"#),
    )
    .unwrap();
    assert_eq!(status, 400);
    assert!(causes(&body)[0].contains("Postcopy migration is not supported"));
    assert!(f.fake.log().is_empty(), "bad requests reached the VMM");
}

#[test]
fn oversize_unknown_and_wrong_method() {
    let f = fixture();
    let big = format!(
        r#"{{"destination_url":"file:///s","pad":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let (status, body) = api_request(&f.sock, "PUT", "vm.snapshot", Some(&big)).unwrap();
    assert_eq!(status, 413);
    assert!(causes(&body)[0].contains("exceeds the limit of 65536 bytes"));

    let (status, body) = api_request(&f.sock, "GET", "vm.counters", None).unwrap();
    assert_eq!(status, 404);
    assert_eq!(causes(&body), ["Unknown API endpoint /api/v1/vm.counters"]);

    let r = raw(&f.sock, b"POST /api/v1/vm.pause HTTP/1.1\r\n\r\n");
    let (status, headers, body) = split_response(&r);
    assert_eq!(status, "HTTP/1.1 405 ");
    assert!(headers.contains(&"Allow: PUT"), "{r:?}");
    assert_eq!(
        causes(body),
        ["Method POST is not allowed on /api/v1/vm.pause; use PUT"]
    );

    let r = raw(
        &f.sock,
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 501 "), "{r:?}");
    assert!(f.fake.log().is_empty());
}

#[test]
fn handler_panic_is_a_500_and_the_server_survives() {
    let f = fixture();
    let (status, body) = api_request(
        &f.sock,
        "PUT",
        "vm.snapshot",
        Some(r#"{"destination_url":"file:///panic"}"#),
    )
    .unwrap();
    assert_eq!(status, 500);
    assert_eq!(
        causes(&body),
        ["internal error: the vm.snapshot handler panicked"]
    );
    assert_eq!(
        api_request(&f.sock, "GET", "vmm.ping", None).unwrap().0,
        200
    );
}

#[test]
fn socket_is_owner_only_and_removed_on_drop() {
    let mut f = fixture();
    let meta = std::fs::symlink_metadata(&f.sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // No temporary directory is left beside it.
    let entries: Vec<_> = std::fs::read_dir(f.sock.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["api.sock"]);
    assert_eq!(f.server.as_ref().unwrap().path(), f.sock);
    drop(f.server.take());
    assert!(!f.sock.exists(), "socket left behind after drop");
    assert!(UnixStream::connect(&f.sock).is_err());

    let mut g = fixture();
    g.server.take().unwrap().shutdown();
    assert!(!g.sock.exists(), "socket left behind after shutdown()");
}

#[test]
fn second_server_refused_stale_replaced_other_files_kept() {
    let f = fixture();
    let second = start_api_server(&f.sock, Arc::new(Fake::default()));
    match second {
        Err(e @ ApiServerError::AlreadyServing(_)) => assert_eq!(
            e.to_string(),
            format!("another hourglass is serving {}", f.sock.display())
        ),
        Err(e) => panic!("wrong refusal: {e}"),
        Ok(_) => panic!("second server started on a live socket"),
    }
    // The first one still serves.
    assert_eq!(
        api_request(&f.sock, "GET", "vmm.ping", None).unwrap().0,
        200
    );

    // A stale socket (its listener is gone) is replaced.
    let dir = tempdir();
    let stale = dir.as_path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = start_api_server(&stale, Arc::new(Fake::default())).unwrap();
    assert_eq!(api_request(&stale, "GET", "vmm.ping", None).unwrap().0, 200);
    drop(server);

    // A regular file is not a socket and is never removed.
    let file = dir.as_path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    assert!(matches!(
        start_api_server(&file, Arc::new(Fake::default())),
        Err(ApiServerError::NotASocket(_))
    ));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn header_timeout_drops_the_connection_and_serving_continues() {
    let f = fixture_with(ServerLimits {
        read_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    });
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost:")
        .unwrap();
    // The server must give up on its own: read until it closes (bounded in case it never does).
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => assert!(out.is_empty(), "unexpected answer {out:?}"),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
            panic!("the server kept an incomplete request open")
        }
        Err(e) => panic!("{e}"),
    }
    assert_eq!(
        api_request(&f.sock, "GET", "vmm.ping", None).unwrap().0,
        200
    );
}

#[test]
fn many_concurrent_clients_are_all_answered() {
    let f = fixture();
    let sock = Arc::new(f.sock.clone());
    let clients: Vec<_> = (0..32)
        .map(|c| {
            let sock = Arc::clone(&sock);
            thread::spawn(move || {
                for i in 0..100 {
                    let (status, body) = if (c + i) % 2 == 0 {
                        api_request(&sock, "GET", "vmm.ping", None).unwrap()
                    } else {
                        let b = format!(r#"{{"destination_url":"file:///c{c}/r{i}"}}"#);
                        api_request(&sock, "PUT", "vm.snapshot", Some(&b)).unwrap()
                    };
                    if (c + i) % 2 == 0 {
                        assert_eq!(status, 200);
                        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), ping_json());
                    } else {
                        assert_eq!((status, body.as_str()), (204, ""));
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let log = f.fake.log();
    assert_eq!(log.len(), 3200);
    let snapshots = log
        .iter()
        .filter(|r| matches!(r, ApiRequest::VmSnapshot(_)))
        .count();
    assert_eq!(snapshots, 1600);
    assert!(log.contains(&ApiRequest::VmSnapshot(SnapshotConfig {
        destination_url: "file:///c31/r0".into()
    })));
}

// ---- ch-remote, the built binary, against the fake server ----

fn ch_remote(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ch-remote"))
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn ch_remote_ping_and_info_print_the_json() {
    let f = fixture();
    let (code, stdout, stderr) = ch_remote(&f.sock, &["ping"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, format!("{}\n", ping_json()));
    let (code, stdout, _) = ch_remote(&f.sock, &["info"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(stdout.trim_end()).unwrap(),
        info_json()
    );
    // Pretty-printed, one field a line, as Cloud Hypervisor's client prints it.
    assert_eq!(
        stdout,
        format!("{}\n", serde_json::to_string_pretty(&info_json()).unwrap())
    );
    let (code, stdout, stderr) = ch_remote(&f.sock, &["pause"]);
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "", ""));
}

#[test]
fn ch_remote_error_exits_nonzero_with_the_server_causes() {
    let f = fixture();
    assert_eq!(ch_remote(&f.sock, &["pause"]).0, 0);
    let (code, stdout, stderr) = ch_remote(&f.sock, &["pause"]);
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "Error: ch-remote exited with the following chain of errors:\n  \
         0: the vm.pause request failed\n  \
         1: Server responded with InternalServerError (500)\n  \
         2: The VM could not be paused\n  \
         3: VM is already paused\n"
    );

    let dir = tempdir();
    let (code, _, stderr) = ch_remote(&dir.as_path().join("nobody.sock"), &["ping"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot connect to the API socket"),
        "{stderr}"
    );
}

#[test]
fn ch_remote_sends_cloud_hypervisor_bodies() {
    let f = fixture();
    let ok = |args: &[&str]| {
        let (code, _, stderr) = ch_remote(&f.sock, args);
        assert_eq!(code, 0, "{args:?}: {stderr}");
    };
    ok(&["snapshot", "file:///snap/dir"]);
    ok(&[
        "restore",
        "source_url=file:///snap/dir,prefault=on,resume=true,clock_policy=frozen",
    ]);
    ok(&["send-migration", "unix:/tmp/mig.sock", "--local"]);
    ok(&[
        "send-migration",
        "destination_url=tcp:192.0.2.3:6000,downtime_ms=500,timeout_s=60",
    ]);
    ok(&["receive-migration", "tcp:0.0.0.0:6000"]);
    ok(&["pause"]);
    ok(&["resume", "clock_policy=wallclock"]);
    ok(&["shutdown"]);
    ok(&["shutdown-vmm"]);

    let mut local = SendMigrationConfig::new("unix:/tmp/mig.sock");
    local.local = true;
    let mut tcp = SendMigrationConfig::new("tcp:192.0.2.3:6000");
    tcp.downtime_ms = 500;
    tcp.timeout_s = 60;
    assert_eq!(
        f.fake.log(),
        [
            ApiRequest::VmSnapshot(SnapshotConfig {
                destination_url: "file:///snap/dir".into()
            }),
            ApiRequest::VmRestore(RestoreConfig {
                source_url: "file:///snap/dir".into(),
                prefault: true,
                memory_restore_mode: MemoryRestoreMode::Copy,
                resume: true,
                clock_policy: Some(ClockPolicy::Frozen),
            }),
            ApiRequest::VmSendMigration(local),
            ApiRequest::VmSendMigration(tcp),
            ApiRequest::VmReceiveMigration(ReceiveMigrationConfig {
                receiver_url: "tcp:0.0.0.0:6000".into(),
                memory_mode: MigrationMode::Precopy,
                clock_policy: None,
            }),
            ApiRequest::VmPause,
            ApiRequest::VmResume(ResumeConfig {
                clock_policy: Some(ClockPolicy::Wallclock)
            }),
            ApiRequest::VmShutdown,
            ApiRequest::VmmShutdown,
        ]
    );
}

#[test]
fn ch_remote_refuses_bad_options_before_contacting_the_server() {
    let f = fixture();
    for (args, needle) in [
        (
            &["restore", "resume=true"][..],
            "missing required field `source_url`",
        ),
        (
            &["restore", "source_url=file:///s,resume=maybe"],
            "option `resume`: `maybe`",
        ),
        (
            &["restore", "source_url=file:///s,bogus=1"],
            "unknown option `bogus`",
        ),
        (&["snapshot", "/not/a/url"], "field `destination_url`"),
        (
            &["receive-migration", "unix:/r,memory_mode=postcopy"],
            "Postcopy",
        ),
        (
            &["send-migration", "tcp:h:1", "--local"],
            "local migration needs a unix:",
        ),
    ] {
        let (code, _, stderr) = ch_remote(&f.sock, args);
        assert_eq!(code, 1, "{args:?}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    assert!(f.fake.log().is_empty());
}

#[test]
fn openapi_document_lists_exactly_what_is_served() {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/api/openapi/hourglass.yaml"
    ))
    .unwrap();
    // Paths are the two-space-indented keys under `paths:`, each followed by its method.
    let lines: Vec<&str> = yaml.lines().collect();
    let mut documented: Vec<(String, String)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            let method = lines[i + 1]
                .trim()
                .trim_end_matches(':')
                .to_ascii_uppercase();
            documented.push((method, name.to_string()));
        }
    }
    let mut served: Vec<(String, String)> = vmm::api::endpoints()
        .map(|(m, n)| (m.to_string(), n.to_string()))
        .collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
}

/// Blocks every request until released, announcing when it has started.
struct Gate {
    entered: Mutex<std::sync::mpsc::Sender<()>>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl ApiHandler for Gate {
    fn handle(&self, _req: ApiRequest) -> Result<ApiResponse, ApiError> {
        self.entered.lock().unwrap().send(()).unwrap();
        self.release.lock().unwrap().recv().unwrap();
        Ok(ApiResponse::Empty)
    }
}

#[test]
fn shutdown_answers_requests_in_progress_before_removing_the_socket() {
    let dir = tempdir();
    let sock = dir.as_path().join("drain.sock");
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let gate = Arc::new(Gate {
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
    });
    let server = start_api_server(&sock, gate).unwrap();
    let mut client = UnixStream::connect(&sock).unwrap();
    client
        .write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\n\r\n")
        .unwrap();
    entered_rx.recv().unwrap();
    let stopper = thread::spawn(move || server.shutdown());
    // Releasing late lets a shutdown that does not wait return first; the test then fails.
    let releaser = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        release_tx.send(()).unwrap();
    });
    stopper.join().unwrap();
    assert!(!sock.exists());
    client.set_nonblocking(true).unwrap();
    let mut out = [0u8; 64];
    let n = client
        .read(&mut out)
        .expect("shutdown returned before the request in progress was answered");
    assert!(out[..n].starts_with(b"HTTP/1.1 204 \r\n"));
    releaser.join().unwrap();
}

#[test]
fn idle_connections_cannot_starve_the_server() {
    let f = fixture_with(ServerLimits {
        max_connections: 2,
        read_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    });
    // Two connections that never send anything hold both slots until they time out.
    let idle: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::connect(&f.sock).unwrap())
        .collect();
    assert_eq!(
        api_request(&f.sock, "GET", "vmm.ping", None).unwrap().0,
        200
    );
    drop(idle);
}

#[test]
fn expect_100_continue_is_honoured() {
    let f = fixture();
    let body = r#"{"destination_url":"file:///expect"}"#;
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.write_all(
        format!(
            "PUT /api/v1/vm.snapshot HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    // The interim answer comes before the body is sent.
    let mut interim = Vec::new();
    let mut byte = [0u8; 1];
    while !interim.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed before 100 Continue");
        interim.push(byte[0]);
    }
    assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 204 \r\n"), "{rest:?}");
    assert_eq!(
        f.fake.log(),
        [ApiRequest::VmSnapshot(SnapshotConfig {
            destination_url: "file:///expect".into()
        })]
    );
}

#[test]
fn long_socket_path_still_gets_mode_0600() {
    let dir = tempdir();
    // A parent directory so long that the socket path fits a socket address (107 bytes) but the
    // staging path beside it (`<parent>/.hourglass-api-<pid>-<n>/s`) does not.
    let base = dir.as_path().as_os_str().len() + 1;
    assert!(base < 80, "temporary directory path too long for this test");
    let parent = dir.as_path().join("p".repeat(92 - base));
    std::fs::create_dir(&parent).unwrap();
    let sock = parent.join("api.sock");
    assert_eq!(sock.as_os_str().len(), 101);
    let staging = parent.join(format!(".hourglass-api-{}-0/s", std::process::id()));
    assert!(staging.as_os_str().len() > 107);
    let server = start_api_server(&sock, Arc::new(Fake::default())).unwrap();
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(api_request(&sock, "GET", "vmm.ping", None).unwrap().0, 200);
    drop(server);
    assert!(!sock.exists());
    assert_eq!(std::fs::read_dir(&parent).unwrap().count(), 0);
}
