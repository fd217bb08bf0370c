//! Migration sockets: the destination listens on a `unix:` path or a `tcp:` address, the
//! source connects.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// Where a migration stream goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix stream socket.
    Unix(PathBuf),
    /// A TCP address.
    Tcp {
        /// Host name or address (no brackets).
        host: String,
        /// Port.
        port: u16,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// The socket addresses of `host`:`port`. An IP literal is taken as it is, an IPv6 one with its
/// zone (`fe80::1%eth0`, or the interface's index, `fe80::1%2`); other names go through the
/// system's resolver. Not the resolver for a zone: glibc looks an interface name up with the
/// SIOCGIFINDEX ioctl, which the migration threads' seccomp filter refuses, so a link-local
/// URL used to kill the VMM with SIGSYS. The name is read from sysfs instead ([`zone_index`]).
pub fn resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    if let Some((ip, zone)) = host.split_once('%') {
        let ip: Ipv6Addr = ip.parse().map_err(|_| {
            invalid(format!(
                "`{host}`: a zone (`%...`) goes only with an IPv6 address, and `{ip}` is not one"
            ))
        })?;
        return Ok(vec![SocketAddr::V6(SocketAddrV6::new(
            ip,
            port,
            0,
            zone_index(zone)?,
        ))]);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    Ok((host, port).to_socket_addrs()?.collect())
}

/// The index of the network interface an IPv6 zone names: a number as it is, a name from
/// `/sys/class/net/NAME/ifindex` (a file read, where the threads that connect may not open
/// files: see [`pin_zone`]).
pub fn zone_index(zone: &str) -> std::io::Result<u32> {
    if let Ok(n) = zone.parse::<u32>() {
        return Ok(n);
    }
    // An interface name: at most 15 bytes, no '/', not '.' or '..' (the kernel's rules).
    if zone.is_empty() || zone.len() > 15 || zone.contains('/') || zone == "." || zone == ".." {
        return Err(invalid(format!(
            "`%{zone}` is neither an interface's index nor a possible interface name"
        )));
    }
    let path = format!("/sys/class/net/{zone}/ifindex");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("no network interface `{zone}` here ({path}: {e})"),
        )
    })?;
    text.trim()
        .parse()
        .map_err(|_| invalid(format!("{path} holds `{}`, not an index", text.trim())))
}

/// `url` with an IPv6 zone given by name (`tcp:[fe80::1%eth0]:6000`) replaced by the
/// interface's index (`%2`), for a thread that may not open files to look it up; any other URL
/// as it is. The error names the interface that is not there.
/// A URL that does not parse is left for the migration itself to refuse.
pub fn pin_zone(url: &str) -> Result<String, String> {
    let Ok(crate::api::MigrationUrl::Tcp { host, port }) = crate::api::MigrationUrl::parse(url)
    else {
        return Ok(url.to_string());
    };
    match host.split_once('%') {
        Some((ip, zone)) if zone.parse::<u32>().is_err() => {
            let index = zone_index(zone).map_err(|e| format!("`{url}`: {e}"))?;
            let host = format!("{ip}%{index}");
            Ok(Endpoint::Tcp { host, port }.to_string())
        }
        _ => Ok(url.to_string()),
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// A connected migration stream.
#[derive(Debug)]
pub enum Stream {
    /// Over a Unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// Connect to a listening destination.
    pub fn connect(ep: &Endpoint) -> std::io::Result<Self> {
        match ep {
            Endpoint::Unix(p) => UnixStream::connect(p).map(Self::Unix),
            Endpoint::Tcp { host, port } => {
                let s = TcpStream::connect(&resolve(host, *port)?[..])?;
                s.set_nodelay(true)?;
                Ok(Self::Tcp(s))
            }
        }
    }

    /// A second handle on the same socket (one for reading, one for writing).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        match self {
            Self::Unix(s) => s.try_clone().map(Self::Unix),
            Self::Tcp(s) => s.try_clone().map(Self::Tcp),
        }
    }

    /// Read timeout (None: block).
    pub fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        match self {
            Self::Unix(s) => s.set_read_timeout(d),
            Self::Tcp(s) => s.set_read_timeout(d),
        }
    }

    /// Write timeout (None: block).
    pub fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        match self {
            Self::Unix(s) => s.set_write_timeout(d),
            Self::Tcp(s) => s.set_write_timeout(d),
        }
    }

    /// Shut both directions down (wakes a reader blocked on the other handle).
    pub fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Unix(s) => s.flush(),
            Self::Tcp(s) => s.flush(),
        }
    }
}

/// `writev(2)` takes at most this many parts at once (the kernel's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

impl super::protocol::GatherWrite for Stream {
    /// One `writev(2)` per 1024 parts (more where the socket takes part of them): guest pages
    /// go from where they are mapped into the socket, the only copy on the source.
    fn write_parts(&mut self, parts: &[super::protocol::Part<'_>]) -> std::io::Result<()> {
        use super::protocol::Part;
        use std::os::fd::AsRawFd;
        let fd = match self {
            Self::Unix(s) => s.as_raw_fd(),
            Self::Tcp(s) => s.as_raw_fd(),
        };
        let mut iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| match p {
                Part::Bytes(b) => libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                },
                Part::Guest(g) => libc::iovec {
                    iov_base: g.ptr_guard().as_ptr() as *mut libc::c_void,
                    iov_len: g.len(),
                },
            })
            .filter(|v| v.iov_len > 0)
            .collect();
        let mut at = 0;
        while at < iov.len() {
            let n = (iov.len() - at).min(MAX_IOVECS);
            // SAFETY: each iovec points to `iov_len` readable bytes that `parts` borrows for
            // the whole call: a byte slice, or guest memory that a `VolatileSlice` keeps
            // mapped; writev only reads them, and `n` iovecs follow `at`.
            let r = unsafe { libc::writev(fd, iov[at..].as_ptr(), n as libc::c_int) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            at = step_past(&mut iov, at, r as usize);
        }
        Ok(())
    }
}

/// After a write of `done` bytes from `iov[at..]`: the first iovec not wholly written, the one
/// it stopped in starting where it stopped. (A blocking socket writes all unless a signal or
/// its timeout stops it part way.)
fn step_past(iov: &mut [libc::iovec], mut at: usize, mut done: usize) -> usize {
    while done > 0 && at < iov.len() {
        let v = &mut iov[at];
        if done >= v.iov_len {
            done -= v.iov_len;
            at += 1;
        } else {
            v.iov_base = v.iov_base.wrapping_add(done);
            v.iov_len -= done;
            done = 0;
        }
    }
    at
}

/// A listening destination socket. A Unix socket file it created is removed on drop.
#[derive(Debug)]
pub enum Listener {
    /// On a Unix path.
    Unix(UnixListener, PathBuf),
    /// On a TCP address.
    Tcp(TcpListener),
}

impl Listener {
    /// Listen on `ep`. A stale Unix socket file (nobody listening) is replaced; any other
    /// existing file is refused.
    pub fn bind(ep: &Endpoint) -> std::io::Result<Self> {
        match ep {
            Endpoint::Unix(p) => {
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_socket() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", p.display()),
                        ));
                    }
                    if UnixStream::connect(p).is_ok() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{} is in use by a listening process", p.display()),
                        ));
                    }
                    std::fs::remove_file(p)?;
                }
                UnixListener::bind(p).map(|l| Self::Unix(l, p.clone()))
            }
            Endpoint::Tcp { host, port } => {
                TcpListener::bind(&resolve(host, *port)?[..]).map(Self::Tcp)
            }
        }
    }

    /// The TCP port actually bound (useful with port 0), or None for a Unix socket.
    pub fn tcp_port(&self) -> Option<u16> {
        match self {
            Self::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Self::Unix(..) => None,
        }
    }

    /// Wait for the source until it connects or `stop` is set (checked every 100 ms; then an
    /// `Interrupted` error).
    pub fn accept_until(&self, stop: &std::sync::atomic::AtomicBool) -> std::io::Result<Stream> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Self::Unix(l, _) => l.as_raw_fd(),
            Self::Tcp(l) => l.as_raw_fd(),
        };
        loop {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "the VMM is shutting down; no longer waiting for the source",
                ));
            }
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one pollfd that lives across the call; the listener's fd is
            // open for as long as `self` is.
            let n = unsafe { libc::poll(&mut p, 1, 100) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            } else if n > 0 {
                return self.accept();
            }
        }
    }

    /// Wait for the source.
    pub fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Self::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Self::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_written_gather_goes_on_where_it_stopped() {
        let (a, b, c) = ([1u8; 10], [2u8; 5], [3u8; 7]);
        let mut iov: Vec<libc::iovec> = [&a[..], &b[..], &c[..]]
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            })
            .collect();
        // 4 bytes: inside the first.
        assert_eq!(step_past(&mut iov, 0, 4), 0);
        assert_eq!(
            (iov[0].iov_base as usize, iov[0].iov_len),
            (a.as_ptr() as usize + 4, 6)
        );
        // The rest of the first and 2 of the second.
        assert_eq!(step_past(&mut iov, 0, 8), 1);
        assert_eq!(
            (iov[1].iov_base as usize, iov[1].iov_len),
            (b.as_ptr() as usize + 2, 3)
        );
        // Exactly to the end of the second.
        assert_eq!(step_past(&mut iov, 1, 3), 2);
        assert_eq!(
            (iov[2].iov_base as usize, iov[2].iov_len),
            (c.as_ptr() as usize, 7)
        );
        // All of it.
        assert_eq!(step_past(&mut iov, 2, 7), 3);
    }

    /// The loopback interface's index as the kernel reports it (not assumed to be 1).
    fn lo_index() -> u32 {
        std::fs::read_to_string("/sys/class/net/lo/ifindex")
            .expect("lo's index")
            .trim()
            .parse()
            .expect("a number")
    }

    #[test]
    fn ip_literals_resolve_as_written() {
        assert_eq!(
            resolve("192.0.2.7", 6000).unwrap(),
            vec!["192.0.2.7:6000".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve("2001:db8::1", 7).unwrap(),
            vec!["[2001:db8::1]:7".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn an_ipv6_zone_by_index_or_by_name() {
        let by_index = resolve("fe80::1%7", 6000).unwrap();
        assert_eq!(
            by_index,
            vec!["[fe80::1%7]:6000".parse::<SocketAddr>().unwrap()]
        );
        let lo = lo_index();
        let SocketAddr::V6(a) = resolve("fe80::5054:ff:fe12:340b%lo", 6000).unwrap()[0] else {
            panic!("not IPv6");
        };
        assert_eq!((a.scope_id(), a.port()), (lo, 6000));
        assert_eq!(
            *a.ip(),
            "fe80::5054:ff:fe12:340b".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn bad_zones_are_named() {
        let e = resolve("fe80::1%no-such-if0", 1).unwrap_err().to_string();
        assert!(e.contains("no network interface `no-such-if0`"), "{e}");
        let e = resolve("192.0.2.1%lo", 1).unwrap_err().to_string();
        assert!(e.contains("goes only with an IPv6 address"), "{e}");
        for zone in ["", "a/b", "..", "sixteen-bytes-xx"] {
            let e = zone_index(zone).unwrap_err().to_string();
            assert!(e.contains("neither an interface's index"), "{zone}: {e}");
        }
    }

    #[test]
    fn pin_zone_replaces_a_name_by_the_index_only() {
        let lo = lo_index();
        assert_eq!(
            pin_zone("tcp:[fe80::1%lo]:6000").unwrap(),
            format!("tcp:[fe80::1%{lo}]:6000")
        );
        for same in [
            "tcp:[fe80::1%3]:6000",
            "tcp:[::1]:6000",
            "tcp:192.0.2.1:6000",
            "unix:/tmp/x%lo",
            "tcp:[fe80::1%lo",
        ] {
            assert_eq!(pin_zone(same).unwrap(), same);
        }
        let e = pin_zone("tcp:[fe80::1%nope0]:6000").unwrap_err();
        assert!(
            e.contains("tcp:[fe80::1%nope0]:6000") && e.contains("nope0"),
            "{e}"
        );
    }
}
