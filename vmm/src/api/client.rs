//! The client side: one request per connection, over a Unix socket, by hand (no HTTP crate).
//!
//! Sends what Cloud Hypervisor's client sends (request line and `Host`/`Accept` headers, then
//! `Content-Length`, then the blank line, then the body, in separate writes) and reads the
//! response until `Content-Length` bytes of body have arrived or the server closes.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::API_ROOT;

/// Why a request got no HTTP answer.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("cannot connect to the API socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Sending the request failed before any answer came.
    #[error("cannot send the request")]
    Write(#[source] io::Error),
    /// Reading the response failed.
    #[error("cannot read the response")]
    Read(#[source] io::Error),
    /// The bytes received are not an HTTP response.
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
}

/// Sends `method` to `path` (`vm.info` or `/api/v1/vm.info`) with an optional JSON body and
/// returns the status code and the body. Any status is returned, error statuses included.
pub fn api_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let full = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{API_ROOT}{path}")
    };
    let sent = send(&mut stream, method, &full, body);
    // If the server answered early (413) and closed, the write fails but the answer is there.
    let response = read_response(&mut stream);
    match (sent, response) {
        (_, Ok(r)) => Ok(r),
        (Err(e), Err(_)) => Err(ClientError::Write(e)),
        (Ok(()), Err(e)) => Err(e),
    }
}

fn send(stream: &mut UnixStream, method: &str, path: &str, body: Option<&str>) -> io::Result<()> {
    stream.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n").as_bytes(),
    )?;
    if let Some(body) = body {
        stream.write_all(format!("Content-Length: {}\r\n", body.len()).as_bytes())?;
    }
    stream.write_all(b"\r\n")?;
    if let Some(body) = body {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response from `r` and returns its status and body.
pub fn read_response(r: &mut impl Read) -> Result<(u16, String), ClientError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut head: Option<(u16, usize, Option<usize>)> = None;
    loop {
        if let Some((status, start, Some(len))) = head {
            if buf.len() >= start + len {
                buf.truncate(start + len);
                return finish(status, &buf[start..]);
            }
        }
        let n = match r.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(ClientError::Read(e)),
        };
        if n == 0 {
            return match head {
                Some((status, start, None)) => finish(status, &buf[start..]),
                Some((_, start, Some(len))) => Err(ClientError::Malformed(format!(
                    "body ended after {} of {len} bytes",
                    buf.len() - start
                ))),
                None if buf.is_empty() => Err(ClientError::Malformed(
                    "the server closed the connection without answering".into(),
                )),
                None => Err(ClientError::Malformed(
                    "the server closed the connection in the middle of the headers".into(),
                )),
            };
        }
        buf.extend_from_slice(&chunk[..n]);
        while head.is_none() {
            let Some(end) = find(&buf, b"\r\n\r\n") else {
                break;
            };
            let (status, len) = parse_head(&buf[..end])?;
            if status == 100 {
                // An interim answer: drop it and look for the real one.
                buf.drain(..end + 4);
                continue;
            }
            head = Some((status, end + 4, len));
        }
    }
}

fn finish(status: u16, body: &[u8]) -> Result<(u16, String), ClientError> {
    String::from_utf8(body.to_vec())
        .map(|b| (status, b))
        .map_err(|_| ClientError::Malformed("the body is not UTF-8".into()))
}

fn parse_head(head: &[u8]) -> Result<(u16, Option<usize>), ClientError> {
    let text = std::str::from_utf8(head)
        .map_err(|_| ClientError::Malformed("the headers are not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .ok_or_else(|| ClientError::Malformed(format!("bad status line `{status_line}`")))?;
    let code = rest.split(' ').next().unwrap_or_default();
    let status: u16 = code
        .parse()
        .ok()
        .filter(|c| (100..1000).contains(c))
        .ok_or_else(|| ClientError::Malformed(format!("bad status code in `{status_line}`")))?;
    let mut length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = Some(value.trim().parse().map_err(|_| {
                    ClientError::Malformed(format!("bad Content-Length `{}`", value.trim()))
                })?);
            }
        }
    }
    Ok((status, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_responses() {
        let mut r: &[u8] = b"HTTP/1.1 204 \r\nConnection: close\r\n\r\n";
        assert_eq!(read_response(&mut r).unwrap(), (204, String::new()));
        let mut r: &[u8] =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}trailing";
        assert_eq!(read_response(&mut r).unwrap(), (200, "{}".into()));
        let mut r: &[u8] = b"HTTP/1.1 500 \r\nContent-Length: 10\r\n\r\n[\"x\"";
        assert!(matches!(
            read_response(&mut r),
            Err(ClientError::Malformed(m)) if m.contains("4 of 10")
        ));
        let mut r: &[u8] = b"SSH-2.0\r\n\r\n";
        assert!(matches!(
            read_response(&mut r),
            Err(ClientError::Malformed(_))
        ));
        let mut r: &[u8] = b"";
        assert!(matches!(
            read_response(&mut r),
            Err(ClientError::Malformed(_))
        ));
    }
}
