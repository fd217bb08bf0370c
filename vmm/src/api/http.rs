//! The HTTP/1.1 server: a Unix socket, one accepting thread, a pool of connection threads (at
//! most [`ServerLimits::max_connections`] connections at once), one request per connection.
//! At the limit, the connection that has waited longest without sending its request is cut,
//! so clients that connect and send nothing (any number of them) never hold off one that
//! sends a request; connections being answered are never cut.
//!
//! The connection threads are kept: [`KEPT_WORKERS`] of them wait for the next connection for
//! as long as the server runs, more are started only while that many are busy, and those exit
//! after [`WORKER_IDLE`] without work. Starting a thread per request cost tens of microseconds
//! and, on a host whose cores are busy (vCPU threads), a new thread also waits for the
//! scheduler longer than a sleeping one that is woken.
//!
//! Requests are parsed with `httparse`; responses are written by hand because Cloud
//! Hypervisor's client insists on a status line without a reason phrase (`HTTP/1.1 204 `) and
//! on the header spelling `Content-Length`. Every response carries `Connection: close`; one with
//! a body carries `Content-Type: application/json` and `Content-Length`; a 204 carries neither
//! (RFC 9110 forbids `Content-Length` there, and Cloud Hypervisor's client would print an empty
//! line for it).
//!
//! The socket file itself (created 0600 with no window for others, stale ones replaced) is
//! [`super::socket`]'s.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::socket::{bind_private, clear_stale, remove_if_ours};
pub use super::socket::{ApiServerError, MAX_SOCKET_PATH};
use super::{allowed_method, route, ApiError, ApiHandler, ApiResponse};

/// Limits applied to every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest request body accepted; larger is answered 413 without reading it.
    pub max_body: usize,
    /// Largest request head (request line and headers); larger is answered 431.
    pub max_head: usize,
    /// Time allowed to receive the whole request; after it the connection is dropped.
    pub read_timeout: Duration,
    /// Time allowed to write the response.
    pub write_timeout: Duration,
    /// Connections handled at once. Beyond it the oldest connection still waiting for its
    /// request is cut; when every slot is answering a request, new ones wait in the backlog.
    pub max_connections: usize,
    /// How long [`ApiServer::shutdown`] waits for requests in progress to be answered.
    pub drain_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_body: 64 * 1024,
            max_head: 16 * 1024,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_connections: 64,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// How long the accept thread waits for a shed connection's slot before shedding another.
const SHED_WAIT: Duration = Duration::from_millis(50);
/// How long it waits when every slot is answering a request before looking again.
const FULL_WAIT: Duration = Duration::from_millis(200);

/// Connection threads that wait for work for as long as the server runs.
pub const KEPT_WORKERS: usize = 2;
/// How long a connection thread beyond [`KEPT_WORKERS`] waits for work before it exits.
pub const WORKER_IDLE: Duration = Duration::from_secs(10);

struct Shared {
    handler: Arc<dyn ApiHandler>,
    limits: ServerLimits,
    stop: AtomicBool,
    active: Mutex<usize>,
    changed: Condvar,
    /// Accepted connections waiting for a connection thread, and the threads' census.
    queue: Mutex<WorkQueue>,
    /// Signalled when a connection is queued, and at stop.
    work: Condvar,
    /// Connections still receiving their request (queued or being read), oldest first, with a
    /// handle to cut them: at [`ServerLimits::max_connections`] the oldest is shed, so that
    /// clients that connect and send nothing never hold off one that sends a request.
    receiving: Mutex<VecDeque<(u64, UnixStream)>>,
}

#[derive(Default)]
struct WorkQueue {
    /// Accepted connections and their ids (in accept order).
    streams: VecDeque<(u64, UnixStream)>,
    /// Connection threads alive.
    workers: usize,
    /// Connection threads waiting for work.
    idle: usize,
}

impl Shared {
    fn receiving(&self) -> MutexGuard<'_, VecDeque<(u64, UnixStream)>> {
        self.receiving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection `id` has its request (or is gone): it can no longer be shed.
    fn received(&self, id: u64) {
        self.receiving().retain(|(i, _)| *i != id);
    }

    /// Cut the connection that has waited longest for its request; false if none is waiting
    /// (every connection is being answered).
    fn shed_oldest(&self) -> bool {
        let Some((id, s)) = self.receiving().pop_front() else {
            return false;
        };
        info!("API: at the connection limit; dropping connection {id}, which sent no request yet");
        let _ = s.shutdown(std::net::Shutdown::Both);
        true
    }

    fn active(&self) -> MutexGuard<'_, usize> {
        // A poisoned counter is still a counter.
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self) -> MutexGuard<'_, WorkQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running API server. Dropping it (or [`ApiServer::shutdown`]) stops accepting, waits up to
/// [`ServerLimits::drain_timeout`] for requests in progress, and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    identity: Option<(u64, u64)>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts serving `handler` on a Unix socket at `path` with the default [`ServerLimits`].
/// A path longer than [`MAX_SOCKET_PATH`] is refused: it could be bound (through a shorter
/// name and a link) but no client could connect to it.
pub fn start_api_server(
    path: &Path,
    handler: Arc<dyn ApiHandler>,
) -> Result<ApiServer, ApiServerError> {
    start_api_server_with_limits(path, handler, ServerLimits::default())
}

/// Like [`start_api_server`], with explicit limits.
pub fn start_api_server_with_limits(
    path: &Path,
    handler: Arc<dyn ApiHandler>,
    limits: ServerLimits,
) -> Result<ApiServer, ApiServerError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ApiServerError::PathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    clear_stale(path)?;
    let listener = bind_private(path)?;
    let identity = fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let shared = Arc::new(Shared {
        handler,
        limits: ServerLimits {
            max_connections: limits.max_connections.max(1),
            ..limits
        },
        stop: AtomicBool::new(false),
        active: Mutex::new(0),
        changed: Condvar::new(),
        queue: Mutex::new(WorkQueue::default()),
        work: Condvar::new(),
        receiving: Mutex::new(VecDeque::new()),
    });
    // The kept connection threads start now, not on the first request.
    for _ in 0..KEPT_WORKERS {
        if let Err(e) = start_worker(&shared) {
            warn!("cannot start an API connection thread: {e}");
        }
    }
    let accept_shared = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name("hg-api".into())
        .spawn(move || accept_loop(listener, accept_shared))
        .map_err(|e| {
            remove_if_ours(path, identity);
            ApiServerError::Thread(e)
        })?;
    info!("API server listening on {}", path.display());
    Ok(ApiServer {
        path: path.to_path_buf(),
        identity,
        shared,
        thread: Some(thread),
    })
}

impl ApiServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the server (see the type's documentation).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        {
            // Under the queue lock, so that no connection thread misses the wake-up.
            let _q = self.shared.queue();
            self.shared.work.notify_all();
        }
        // Wake the accepting thread with a connection of our own.
        match UnixStream::connect(&self.path) {
            Ok(_) => {
                if thread.join().is_err() {
                    warn!("API accept thread panicked");
                }
            }
            Err(e) => warn!(
                "cannot wake the API accept thread through {} ({e}); leaving it",
                self.path.display()
            ),
        }
        let active = self.shared.active();
        let (active, timeout) = self
            .shared
            .changed
            .wait_timeout_while(active, self.shared.limits.drain_timeout, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() {
            warn!("API server stopped with {} request(s) unanswered", *active);
        }
        drop(active);
        remove_if_ours(&self.path, self.identity);
        info!("API server on {} stopped", self.path.display());
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The API threads carry pause and resume: ask for a short slice so that a request is not
/// left waiting behind busy vCPU threads (see [`crate::vcpu::request_short_slice`]).
fn short_slice() {
    if let Err(e) = crate::vcpu::request_short_slice(crate::vcpu::CONTROL_SLICE) {
        debug!("API thread keeps the default time slice: {e}");
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    crate::seccomp::enter(crate::seccomp::ThreadKind::Api);
    short_slice();
    let mut seq = 0u64;
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!("API accept failed: {e}");
                // Out of descriptors or similar: back off instead of spinning.
                thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        // At the limit: shed the connection that has waited longest without sending its
        // request, and take this one as soon as a slot frees; if every slot is answering a
        // request, wait for one to finish.
        {
            let mut active = shared.active();
            while *active >= shared.limits.max_connections && !shared.stop.load(Ordering::SeqCst) {
                drop(active);
                let shed = shared.shed_oldest();
                active = shared.active();
                let wait = if shed { SHED_WAIT } else { FULL_WAIT };
                active = shared
                    .changed
                    .wait_timeout(active, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
            *active += 1;
        }
        seq += 1;
        match stream.try_clone() {
            Ok(handle) => shared.receiving().push_back((seq, handle)),
            Err(e) => debug!("API connection {seq} cannot be shed: {e}"),
        }
        let need_worker = {
            let mut q = shared.queue();
            q.streams.push_back((seq, stream));
            shared.work.notify_one();
            q.idle < q.streams.len()
        };
        if need_worker {
            if let Err(e) = start_worker(&shared) {
                warn!("cannot start an API connection thread: {e}");
                // Without a thread for it, answer nothing: drop the newest connection.
                let mut q = shared.queue();
                if q.workers == 0 {
                    if let Some((id, _)) = q.streams.pop_back() {
                        drop(q);
                        shared.received(id);
                        *shared.active() -= 1;
                        shared.changed.notify_all();
                    }
                }
            }
        }
    }
    // Let the connection threads go.
    let _q = shared.queue();
    shared.work.notify_all();
}

/// Starts one connection thread (counted in the census before it runs).
fn start_worker(shared: &Arc<Shared>) -> io::Result<()> {
    shared.queue().workers += 1;
    let worker_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("hg-api-conn".into())
        .spawn(move || worker_loop(&worker_shared));
    if spawned.is_err() {
        shared.queue().workers -= 1;
    }
    spawned.map(|_| ())
}

/// A connection thread: serves queued connections one after the other until the server stops
/// or, beyond the kept threads, it has been idle for [`WORKER_IDLE`].
fn worker_loop(shared: &Shared) {
    crate::seccomp::enter(crate::seccomp::ThreadKind::Api);
    short_slice();
    loop {
        let stream = {
            let mut q = shared.queue();
            loop {
                if let Some(s) = q.streams.pop_front() {
                    break s;
                }
                if shared.stop.load(Ordering::SeqCst) {
                    q.workers -= 1;
                    return;
                }
                q.idle += 1;
                let (guard, waited) = shared
                    .work
                    .wait_timeout(q, WORKER_IDLE)
                    .unwrap_or_else(|p| p.into_inner());
                q = guard;
                q.idle -= 1;
                if waited.timed_out() && q.streams.is_empty() && q.workers > KEPT_WORKERS {
                    q.workers -= 1;
                    return;
                }
            }
        };
        // The handler's own panics are caught inside; this guards the census against the rest.
        let (id, stream) = stream;
        if panic::catch_unwind(AssertUnwindSafe(|| serve_connection(id, stream, shared))).is_err() {
            warn!("API connection thread: serving a connection panicked");
        }
        shared.received(id);
        *shared.active() -= 1;
        shared.changed.notify_all();
    }
}

/// Formats a response: no reason phrase, `Connection: close`, and for a body
/// `Content-Type: application/json` and `Content-Length`.
pub fn format_response(status: u16, body: Option<&str>, allow: Option<&str>) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} \r\nServer: Hourglass API\r\nConnection: close\r\n");
    if let Some(allow) = allow {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    if let Some(body) = body {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        out.push_str("\r\n");
    }
    out.into_bytes()
}

fn error_response(e: &ApiError, allow: Option<&str>) -> Vec<u8> {
    format_response(e.status, Some(&e.body()), allow)
}

/// What reading a request produced.
enum Incoming {
    /// A full request.
    Request {
        method: String,
        path: String,
        body: Vec<u8>,
    },
    /// Answer with this error.
    Reject(ApiError),
    /// Drop the connection silently (timeout, or the client left before sending anything).
    Hangup,
}

/// Reads into `buf` with the remaining time; `Ok(0)` on end of stream, `Err` on timeout.
fn read_some(stream: &mut UnixStream, buf: &mut Vec<u8>, deadline: Instant) -> io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(left))?;
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn read_request(stream: &mut UnixStream, limits: &ServerLimits) -> Incoming {
    let deadline = Instant::now() + limits.read_timeout;
    let mut buf = Vec::with_capacity(1024);
    let (head_len, method, path, content_length, expect_continue) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let (method, path) = (
                    req.method.unwrap_or_default().to_string(),
                    req.path.unwrap_or_default().to_string(),
                );
                if req
                    .headers
                    .iter()
                    .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
                {
                    return Incoming::Reject(ApiError::new(
                        501,
                        "Transfer-Encoding is not supported; send Content-Length",
                    ));
                }
                let mut length: Option<usize> = None;
                for h in req
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                {
                    let text = String::from_utf8_lossy(h.value);
                    let text = text.trim();
                    let parsed = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                        text.parse::<usize>().ok()
                    } else {
                        None
                    };
                    match (parsed, length) {
                        (None, _) => {
                            return Incoming::Reject(ApiError::bad_request(format!(
                                "invalid Content-Length `{}`",
                                text.escape_debug().take(40).collect::<String>()
                            )))
                        }
                        (Some(a), Some(b)) if a != b => {
                            return Incoming::Reject(ApiError::bad_request(
                                "conflicting Content-Length headers",
                            ))
                        }
                        (Some(a), _) => length = Some(a),
                    }
                }
                let expect = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("expect")
                        && h.value.eq_ignore_ascii_case(b"100-continue")
                });
                break (n, method, path, length.unwrap_or(0), expect);
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Incoming::Reject(ApiError::new(431, "too many request headers"))
            }
            Err(e) => {
                return Incoming::Reject(ApiError::bad_request(format!("malformed request: {e}")))
            }
        }
        if buf.len() > limits.max_head {
            return Incoming::Reject(ApiError::new(
                431,
                format!("request line and headers exceed {} bytes", limits.max_head),
            ));
        }
        match read_some(stream, &mut buf, deadline) {
            Ok(0) if buf.is_empty() => return Incoming::Hangup,
            Ok(0) => {
                return Incoming::Reject(ApiError::bad_request(
                    "malformed request: connection closed before the end of the headers",
                ))
            }
            Ok(_) => {}
            Err(e) => {
                debug!("API request head not received: {e}");
                return Incoming::Hangup;
            }
        }
    };
    if content_length > limits.max_body {
        return Incoming::Reject(ApiError::new(
            413,
            format!(
                "request body of {content_length} bytes exceeds the limit of {} bytes",
                limits.max_body
            ),
        ));
    }
    let mut body = buf.split_off(head_len);
    if expect_continue && body.len() < content_length {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    while body.len() < content_length {
        match read_some(stream, &mut body, deadline) {
            Ok(0) => {
                return Incoming::Reject(ApiError::bad_request(format!(
                    "request body ended after {} of {content_length} bytes",
                    body.len()
                )))
            }
            Ok(_) => {}
            Err(e) => {
                debug!("API request body not received: {e}");
                return Incoming::Hangup;
            }
        }
    }
    body.truncate(content_length);
    Incoming::Request { method, path, body }
}

fn serve_connection(id: u64, mut stream: UnixStream, shared: &Shared) {
    let limits = &shared.limits;
    let incoming = read_request(&mut stream, limits);
    // From here on the connection is being answered, not waiting: never shed.
    shared.received(id);
    let response = match incoming {
        Incoming::Hangup => return,
        Incoming::Reject(e) => error_response(&e, None),
        Incoming::Request { method, path, body } => match route(&method, &path, &body) {
            Err(e) => {
                let allow = if e.status == 405 {
                    allowed_method(&path)
                } else {
                    None
                };
                error_response(&e, allow)
            }
            Ok(req) => {
                let name = req.endpoint();
                debug!("API request {name}");
                let answer = panic::catch_unwind(AssertUnwindSafe(|| shared.handler.handle(req)))
                    .unwrap_or_else(|_| {
                        Err(ApiError::internal(format!(
                            "internal error: the {name} handler panicked"
                        )))
                    });
                match answer {
                    Ok(ApiResponse::Empty) => format_response(204, None, None),
                    Ok(ApiResponse::Json(v)) => format_response(200, Some(&v.to_string()), None),
                    Err(e) => {
                        info!("API request {name} failed: {e}");
                        error_response(&e, None)
                    }
                }
            }
        },
    };
    let _ = stream.set_write_timeout(Some(limits.write_timeout));
    if let Err(e) = stream.write_all(&response).and_then(|()| stream.flush()) {
        debug!("API response not delivered: {e}");
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::api::ApiRequest;

    struct Nobody;
    impl ApiHandler for Nobody {
        fn handle(&self, _: ApiRequest) -> Result<ApiResponse, ApiError> {
            Ok(ApiResponse::Empty)
        }
    }

    #[test]
    fn a_path_no_client_could_reach_is_refused_naming_the_limit() {
        let dir = std::env::temp_dir().join(format!("hg-long-{}", std::process::id()));
        let long = dir.join("s".repeat(MAX_SOCKET_PATH - dir.as_os_str().len()));
        assert_eq!(long.as_os_str().len(), MAX_SOCKET_PATH + 1);
        let e = start_api_server(&long, Arc::new(Nobody))
            .err()
            .expect("refused");
        let msg = e.to_string();
        assert!(
            msg.contains("at most 107 bytes")
                && msg.contains(&format!("{} bytes", MAX_SOCKET_PATH + 1)),
            "{msg}"
        );
        assert!(!long.exists() && !dir.exists(), "nothing created");
        // One byte shorter is served, and a client reaches it.
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("s".repeat(MAX_SOCKET_PATH - 1 - dir.as_os_str().len()));
        let server = start_api_server(&ok, Arc::new(Nobody)).expect("107 bytes is a valid path");
        let (code, _) =
            crate::api::client::api_request(&ok, "GET", "vmm.ping", None).expect("ping");
        assert_eq!(code, 204);
        server.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn response_shapes() {
        assert_eq!(
            format_response(204, None, None),
            b"HTTP/1.1 204 \r\nServer: Hourglass API\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            String::from_utf8(format_response(200, Some("{\"a\":1}"), None)).unwrap(),
            "HTTP/1.1 200 \r\nServer: Hourglass API\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
        let r = String::from_utf8(error_response(&ApiError::new(405, "no"), Some("PUT"))).unwrap();
        assert!(r.starts_with("HTTP/1.1 405 \r\n"));
        assert!(r.contains("\r\nAllow: PUT\r\n"));
        assert!(r.ends_with("Content-Length: 6\r\n\r\n[\"no\"]"));
    }
}
