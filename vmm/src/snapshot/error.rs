//! [`SnapshotError`]: every failure names the file (and, for decoding, the field).

use std::path::PathBuf;

/// A snapshot that could not be written or read. Each variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot is absent.
    #[error("{file}: missing from the snapshot directory {}", dir.display())]
    Missing {
        /// The file's name inside the snapshot.
        file: &'static str,
        /// The snapshot directory.
        dir: PathBuf,
    },
    /// A file is shorter (or longer) than `checksums.json` or `state.json` records.
    #[error("{file}: truncated or resized: {found} bytes, {expected} expected ({source_of_size})")]
    Size {
        /// The file.
        file: &'static str,
        /// The size the snapshot records.
        expected: u64,
        /// The size on disk.
        found: u64,
        /// What recorded the expected size.
        source_of_size: &'static str,
    },
    /// The file's content does not match its checksum.
    #[error("{file}: checksum mismatch: checksums.json records hg64 {expected}, the file hashes to {found}")]
    Checksum {
        /// The file.
        file: &'static str,
        /// Recorded checksum (hex).
        expected: String,
        /// Computed checksum (hex).
        found: String,
    },
    /// A file is not well-formed JSON.
    #[error("{file}: not valid JSON: {reason}")]
    Syntax {
        /// The file.
        file: &'static str,
        /// The parser's message (with line and column).
        reason: String,
    },
    /// A field holds a value this build refuses.
    #[error("{file}: {field}: {reason}")]
    Invalid {
        /// The file.
        file: &'static str,
        /// Dotted path of the field, e.g. `vcpus[1].msrs`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The snapshot was written by a newer (or unknown) format version.
    #[error(
        "{file}: version: {found} is not a format this build reads (it reads version {supported})"
    )]
    Version {
        /// The file.
        file: &'static str,
        /// The version found.
        found: u64,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// The guest memory to save does not match the configuration.
    #[error("memory.bin: cannot save guest memory: {0}")]
    Memory(String),
    /// A file-system operation failed.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The destination cannot be replaced safely.
    #[error("{}: {reason}", path.display())]
    Destination {
        /// The destination directory.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// A failure injected by [`super::WriteOptions::fail_at`] (tests only).
    #[error("injected failure while writing {0}")]
    Injected(&'static str),
}

impl SnapshotError {
    /// The snapshot file the error is about, where there is one.
    pub fn file(&self) -> Option<&'static str> {
        match self {
            Self::Missing { file, .. }
            | Self::Size { file, .. }
            | Self::Checksum { file, .. }
            | Self::Syntax { file, .. }
            | Self::Invalid { file, .. }
            | Self::Version { file, .. } => Some(file),
            Self::Memory(_) => Some(super::MEMORY_FILE),
            _ => None,
        }
    }

    /// Whether the error is the caller's (a bad or mismatched snapshot, a bad destination: an
    /// HTTP 4xx) rather than the host's (an I/O failure: a 5xx).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, Self::Io { .. } | Self::Injected(_))
    }
}

/// `Io` with a path and a description.
pub(crate) fn io(
    path: impl Into<PathBuf>,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.into();
    move |source| SnapshotError::Io { path, what, source }
}
