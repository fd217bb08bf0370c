//! Live migration between two `hourglass` processes: a versioned framed protocol over a
//! `unix:` or `tcp:` stream, pre-copy of guest memory with KVM dirty logging, then the paused
//! VM's state, thawed on the destination under the `wallclock` policy.
//!
//! The conversation (the source connects, the destination listens):
//!
//! ```text
//! source                         destination
//! Start            ──────────▶   version and page size checked
//!                  ◀──────────   Ack(Start)            (or Error: why)
//! Config           ──────────▶   VM configuration decoded, guest RAM allocated, TSC rate checked
//!                  ◀──────────   Ack(Config)           (or Error; the source has not paused)
//! Memory*          ──────────▶   every run checked against the RAM layout, then copied
//!   (guest running: all RAM, then dirty pages, iterated)
//!   pause (time frozen)
//! Memory*, State   ──────────▶   vCPU, device and time state decoded and restored (VM parked)
//!                  ◀──────────   Ack(State)
//! Complete         ──────────▶   time thawed (wallclock), vCPUs released
//!                  ◀──────────   Ack(Complete)
//!   source VM shut down
//! ```
//!
//! Any failure before `Complete` is sent leaves the source VM running (resumed if it was paused
//! for the last pass); the destination discards what it built. Either side may end the
//! conversation early: the source with `Abandon`, the destination with `Error`, each carrying
//! the reason.
//!
//! After `Complete` is sent the destination may run the guest at any moment. If its answer
//! never arrives (connection broken, timeout), the source cannot tell "not run" from "answer
//! lost", so it does not guess: it stays paused, reports the migration `in_doubt`
//! ([`MigrationError::InDoubt`]) and leaves the choice (`vm.resume` or `vm.shutdown`) to the
//! operator, who can look at the destination. Never two running copies of one guest; like QEMU's
//! post-migrate state. An explicit `Error` from the destination after `Complete` proves it did
//! not run the guest, and the source resumes.
//!
//! [`protocol`] is the wire format; [`receiver`] the destination's state machine, a pure
//! function of the frames it is fed (fuzzed by `fuzz/fuzz_targets/migration_frames.rs`);
//! [`transport`] the sockets; [`source`] the sender's pre-copy (dirty-log passes until the
//! predicted downtime fits `downtime_ms`, at most [`source::MAX_ITERATIONS`]); [`dest`] the
//! VM built from the frames.

pub mod dest;
mod error;
pub mod protocol;
pub mod receiver;
pub mod source;
pub mod transport;

pub use dest::{decode_config_frame, receive_vm, FillStats, ReceiveReport, VmDestination};
pub use error::MigrationError;
pub use source::{send, MigrationProgress, SendReport, SharedProgress};

pub use protocol::{
    Frame, FrameKind, FrameReader, FrameWriter, Header, MemoryFrameBuilder, Message, Run, RunData,
    StartInfo, HEADER_LEN, MAGIC, PAGE_SIZE, VERSION,
};
pub use receiver::{
    expect_ack, receive, receive_reading_ahead, Destination, RamRange, Receiver, Stage,
};
pub use transport::{Endpoint, Listener, Stream};

/// Why a migration conversation failed. Each variant names the frame (and field) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The stream ended inside a frame.
    #[error("truncated {what}: {got} of {expected} bytes before the stream ended")]
    Truncated {
        /// The header, or which frame's payload.
        what: String,
        /// Bytes announced.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// The stream ended between frames before the migration was over.
    #[error("the peer closed the connection while {stage}")]
    Closed {
        /// What this side was waiting for.
        stage: String,
    },
    /// Not a migration frame.
    #[error("frame header: bad magic {found:02x?} (expected \"HGMF\"): not an Hourglass migration stream")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// A frame kind this build does not know.
    #[error("frame header: kind: unknown frame kind {0}")]
    UnknownKind(u16),
    /// The peer speaks another protocol version.
    #[error("{kind} frame: version: the peer speaks migration protocol version {found}, this build speaks only version {supported}")]
    Version {
        /// The frame.
        kind: FrameKind,
        /// The peer's version.
        found: u16,
        /// Ours.
        supported: u16,
    },
    /// A frame longer than its kind allows.
    #[error(
        "{kind} frame: length: {length} bytes is over the {max}-byte limit of this frame kind"
    )]
    Oversized {
        /// The frame.
        kind: FrameKind,
        /// The announced length.
        length: u64,
        /// The limit.
        max: u64,
    },
    /// A payload that does not decode.
    #[error("{kind} frame: {field}: {reason}")]
    BadPayload {
        /// The frame.
        kind: FrameKind,
        /// The field at fault.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A frame that is not allowed at this point of the conversation.
    #[error("{kind} frame out of order: expected {expected}")]
    OutOfOrder {
        /// The frame received.
        kind: FrameKind,
        /// What was expected instead.
        expected: String,
    },
    /// A memory run outside the destination's RAM.
    #[error("Memory frame: run {gpa:#x}+{len:#x} is outside guest RAM ({ram})")]
    OutsideRam {
        /// Run start.
        gpa: u64,
        /// Run bytes.
        len: u64,
        /// The RAM layout.
        ram: String,
    },
    /// The destination could not use a frame's content.
    #[error("{kind} frame: {reason}")]
    Destination {
        /// The frame.
        kind: FrameKind,
        /// Why.
        reason: String,
    },
    /// The destination refused or failed (its `Error` frame).
    #[error("the destination failed: {0}")]
    Remote(String),
    /// The source cancelled the migration (its `Abandon` frame).
    #[error("the source abandoned the migration: {0}")]
    Abandoned(String),
}

impl ProtocolError {
    /// Whether the peer or its bytes are at fault (rather than this side's I/O).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, Self::Io { .. } | Self::Closed { .. })
    }
}
