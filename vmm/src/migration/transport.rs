//! Migration sockets: the destination listens on a `unix:` path or a `tcp:` address, the
//! source connects.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
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
                let s = TcpStream::connect((host.as_str(), *port))?;
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
                let addrs: Vec<_> = (host.as_str(), *port).to_socket_addrs()?.collect();
                TcpListener::bind(&addrs[..]).map(Self::Tcp)
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
