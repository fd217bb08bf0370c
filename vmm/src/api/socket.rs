//! The API socket file: created with mode 0600 without a window in which others could connect
//! (bound inside a fresh 0700 directory next to the target, chmod-ed, then hard-linked to the
//! target name, which fails if the name was taken meanwhile; where that temporary path would be
//! too long for a socket address, or the file system cannot hard-link a socket, bound in place
//! and chmod-ed at once), a stale one from a dead server replaced, a live one left alone, and
//! on shutdown removed only if it is still ours.

use std::fs;
use std::io::{self, ErrorKind};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use log::{debug, info, warn};

use std::path::PathBuf;

use thiserror::Error;

/// The longest path a client can connect to: `sun_path` holds 108 bytes with the final NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum ApiServerError {
    /// The path cannot be a socket address, so no client could connect to it.
    #[error(
        "the API socket path {} is {len} bytes long; a Unix socket path can be at most {} bytes \
         (sun_path), so no client could connect: choose a shorter path",
        path.display(),
        MAX_SOCKET_PATH
    )]
    PathTooLong {
        /// The path given.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// A live server answers on the path.
    #[error("another hourglass is serving {0}")]
    AlreadyServing(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The existing file could not be examined.
    #[error("cannot check the existing API socket {path}")]
    Probe {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A stale socket could not be removed.
    #[error("cannot remove the stale API socket {path}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Creating, binding or publishing the socket failed.
    #[error("cannot create the API socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The accepting thread could not be started.
    #[error("cannot start the API server thread")]
    Thread(#[source] io::Error),
}

pub(super) fn remove_if_ours(path: &Path, identity: Option<(u64, u64)>) {
    match fs::symlink_metadata(path) {
        Ok(m) if Some((m.dev(), m.ino())) == identity => {
            if let Err(e) = fs::remove_file(path) {
                warn!("cannot remove API socket {}: {e}", path.display());
            }
        }
        Ok(_) => warn!("{} is no longer our API socket; leaving it", path.display()),
        Err(_) => {}
    }
}

/// Refuses if a live server answers at `path`; removes a stale socket.
pub(super) fn clear_stale(path: &Path) -> Result<(), ApiServerError> {
    let probe = |source| ApiServerError::Probe {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(probe(e)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ApiServerError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => {}
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiServerError::AlreadyServing(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            info!("removing stale API socket {}", path.display());
            match fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(ApiServerError::RemoveStale {
                    path: path.to_path_buf(),
                    source: e,
                }),
                _ => Ok(()),
            }
        }
        Err(e) => Err(probe(e)),
    }
}

pub(super) fn owner_only(path: &Path) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
}

/// Binds a socket at `path` that is 0600 from the moment the name exists.
pub(super) fn bind_private(path: &Path) -> Result<UnixListener, ApiServerError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let err = |source| ApiServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = parent.join(format!(
        ".hourglass-api-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(err)?;
    let tmp = dir.join("s");
    // Ok(listener): published. Err((e, true)): fall back to binding in place. Err((e, false)): fail.
    let staged = match UnixListener::bind(&tmp) {
        // The temporary path is too long for a socket address.
        Err(e) if e.kind() == ErrorKind::InvalidInput => Err((e, true)),
        Err(e) => Err((e, false)),
        Ok(listener) => match owner_only(&tmp).and_then(|()| fs::hard_link(&tmp, path)) {
            Ok(()) => Ok(listener),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err((e, false)),
            // A file system that cannot hard-link sockets.
            Err(e) => Err((e, true)),
        },
    };
    let _ = fs::remove_file(&tmp);
    let _ = fs::remove_dir(&dir);
    match staged {
        Ok(listener) => Ok(listener),
        Err((e, _)) if e.kind() == ErrorKind::AlreadyExists => {
            // Someone took the name between our check and the link.
            clear_stale(path)?;
            Err(err(e))
        }
        Err((e, true)) => {
            debug!("binding {} in place: {e}", path.display());
            let listener = UnixListener::bind(path).map_err(err)?;
            if let Err(e) = owner_only(path) {
                let _ = fs::remove_file(path);
                return Err(err(e));
            }
            Ok(listener)
        }
        Err((e, false)) => Err(err(e)),
    }
}
