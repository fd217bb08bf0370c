//! The migration wire format: frames, their limits, the encoder and the checked decoder.
//!
//! A frame is a 16-byte header followed by `length` payload bytes (all integers little endian):
//!
//! | bytes | field | value |
//! |---|---|---|
//! | 0..4 | magic | `HGMF` |
//! | 4..6 | version | [`VERSION`] |
//! | 6..8 | kind | [`FrameKind`] |
//! | 8..16 | length | payload bytes, at most [`FrameKind::max_payload`] |
//!
//! Payloads:
//!
//! | kind | payload |
//! |---|---|
//! | `Start` | `page_size: u32` (4096), `reserved: u32` (0) |
//! | `Config` | JSON: `{"tsc_khz": u32, "config": <config.json>}` |
//! | `Memory` | runs back to back: `gpa: u64, len: u32, flags: u32`, then `len` bytes unless `flags` has [`RUN_ZERO`] (the pages are zero) |
//! | `State` | JSON: the snapshot's `state.json` |
//! | `Complete` | empty |
//! | `Abandon`, `Error` | a UTF-8 reason |
//! | `Ack` | `kind: u16`, the frame acknowledged |
//!
//! The decoder ([`FrameReader`]) checks the magic, the kind, the length against the kind's
//! limit (before allocating anything), then the version, then reads the payload; a short read
//! is [`ProtocolError::Truncated`]. [`Message::decode`] checks each payload's own shape. Nothing
//! here panics on any input.

use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::ProtocolError;

/// The frame magic.
pub const MAGIC: [u8; 4] = *b"HGMF";
/// The protocol version this build speaks (and the only one it accepts).
pub const VERSION: u16 = 1;
/// Header bytes.
pub const HEADER_LEN: usize = 16;
/// The page size of memory runs.
pub const PAGE_SIZE: u64 = 4096;
/// Run header bytes in a `Memory` payload.
pub const RUN_HEADER_LEN: usize = 16;
/// Run flag: the run's pages are all zero and no bytes follow.
pub const RUN_ZERO: u32 = 1;
/// Largest `Memory` payload accepted.
pub const MAX_MEMORY_PAYLOAD: u64 = 16 << 20;
/// The longest zero run [`MemoryFrameBuilder::add_zero`] writes (the run length is a `u32`).
pub const MAX_ZERO_RUN: u64 = 1 << 31;
/// Payload size at which [`MemoryFrameBuilder`] starts a new frame.
pub const MEMORY_FRAME_TARGET: usize = 4 << 20;
/// Guest memory in a frame at which [`MemoryFrameBuilder::add_guest`] sends it: the pages it
/// has just looked at are still in the CPU's cache when the socket reads them.
pub const GUEST_FRAME_TARGET: usize = 512 << 10;
/// Largest `Config` payload accepted.
pub const MAX_CONFIG_PAYLOAD: u64 = 1 << 20;
/// Largest `State` payload accepted.
pub const MAX_STATE_PAYLOAD: u64 = 16 << 20;
/// Largest `Abandon`/`Error` payload accepted.
pub const MAX_REASON_PAYLOAD: u64 = 64 << 10;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// Source to destination: opens a migration.
    Start = 1,
    /// Source to destination: the VM configuration.
    Config = 2,
    /// Source to destination: guest pages.
    Memory = 3,
    /// Source to destination: vCPU, device and time state of the paused VM.
    State = 4,
    /// Source to destination: everything was sent; run the VM.
    Complete = 5,
    /// Source to destination: the migration is cancelled.
    Abandon = 6,
    /// Destination to source: a frame was accepted.
    Ack = 7,
    /// Destination to source: the migration failed here.
    Error = 8,
}

impl FrameKind {
    /// Every kind.
    pub const ALL: [FrameKind; 8] = [
        Self::Start,
        Self::Config,
        Self::Memory,
        Self::State,
        Self::Complete,
        Self::Abandon,
        Self::Ack,
        Self::Error,
    ];

    /// The kind with wire value `v`.
    pub fn from_wire(v: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u16 == v)
    }

    /// The frame's name in errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Start => "Start",
            Self::Config => "Config",
            Self::Memory => "Memory",
            Self::State => "State",
            Self::Complete => "Complete",
            Self::Abandon => "Abandon",
            Self::Ack => "Ack",
            Self::Error => "Error",
        }
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_payload(self) -> u64 {
        match self {
            Self::Start => 8,
            Self::Config => MAX_CONFIG_PAYLOAD,
            Self::Memory => MAX_MEMORY_PAYLOAD,
            Self::State => MAX_STATE_PAYLOAD,
            Self::Complete => 0,
            Self::Abandon | Self::Error => MAX_REASON_PAYLOAD,
            Self::Ack => 2,
        }
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Protocol version.
    pub version: u16,
    /// Frame kind.
    pub kind: FrameKind,
    /// Payload bytes.
    pub length: u64,
}

impl Header {
    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// Decode and check a header: magic, kind, length within the kind's limit, version.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        let raw_kind = u16::from_le_bytes([b[6], b[7]]);
        let kind = FrameKind::from_wire(raw_kind).ok_or(ProtocolError::UnknownKind(raw_kind))?;
        let length = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
        if version != VERSION {
            return Err(ProtocolError::Version {
                kind,
                found: version,
                supported: VERSION,
            });
        }
        let max = kind.max_payload();
        if length > max {
            return Err(ProtocolError::Oversized { kind, length, max });
        }
        Ok(Self {
            version,
            kind,
            length,
        })
    }
}

/// One frame as read: its kind and its payload (length already checked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The kind.
    pub kind: FrameKind,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Where a memory run's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunData<'a> {
    /// The pages' content.
    Bytes(&'a [u8]),
    /// The pages are zero.
    Zero,
}

/// One run of guest pages in a `Memory` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run<'a> {
    /// Guest-physical address (page aligned).
    pub gpa: u64,
    /// Bytes (a non-zero multiple of the page size).
    pub len: u64,
    /// The content.
    pub data: RunData<'a>,
}

/// `Start`'s payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartInfo {
    /// The page size of memory runs ([`PAGE_SIZE`]).
    pub page_size: u32,
}

/// A decoded, checked frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// `Start`.
    Start(StartInfo),
    /// `Config`: the JSON bytes (decoded by the destination).
    Config(&'a [u8]),
    /// `Memory`: its runs, in order.
    Memory(Vec<Run<'a>>),
    /// `State`: the JSON bytes.
    State(&'a [u8]),
    /// `Complete`.
    Complete,
    /// `Abandon` with the source's reason.
    Abandon(String),
    /// `Ack` of a frame kind.
    Ack(FrameKind),
    /// `Error` with the destination's reason.
    Error(String),
}

fn bad(kind: FrameKind, field: &'static str, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::BadPayload {
        kind,
        field,
        reason: reason.into(),
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

fn reason(kind: FrameKind, payload: &[u8]) -> Result<String, ProtocolError> {
    std::str::from_utf8(payload)
        .map(str::to_string)
        .map_err(|e| bad(kind, "reason", format!("not UTF-8: {e}")))
}

/// Decode the runs of a `Memory` payload: each run page aligned, a non-zero multiple of the
/// page size, known flags, its bytes present, and the runs filling the payload exactly.
pub fn decode_runs(payload: &[u8]) -> Result<Vec<Run<'_>>, ProtocolError> {
    let k = FrameKind::Memory;
    let mut runs = Vec::new();
    let mut at = 0usize;
    while at < payload.len() {
        let i = runs.len();
        let rest = payload.len() - at;
        if rest < RUN_HEADER_LEN {
            return Err(bad(
                k,
                "run header",
                format!("run {i}: {rest} bytes left, a run header needs {RUN_HEADER_LEN}"),
            ));
        }
        let gpa = u64_at(payload, at).unwrap_or(0);
        let len = u64::from(u32_at(payload, at + 8).unwrap_or(0));
        let flags = u32_at(payload, at + 12).unwrap_or(0);
        at += RUN_HEADER_LEN;
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(bad(
                k,
                "gpa",
                format!("run {i}: {gpa:#x} is not page aligned"),
            ));
        }
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(bad(
                k,
                "len",
                format!("run {i}: {len} is not a non-zero multiple of {PAGE_SIZE}"),
            ));
        }
        if gpa.checked_add(len).is_none() {
            return Err(bad(
                k,
                "len",
                format!("run {i}: {gpa:#x} + {len:#x} overflows"),
            ));
        }
        if flags & !RUN_ZERO != 0 {
            return Err(bad(
                k,
                "flags",
                format!("run {i}: unknown flags {flags:#x}"),
            ));
        }
        let data = if flags & RUN_ZERO != 0 {
            RunData::Zero
        } else {
            let n = len as usize;
            let end = at
                .checked_add(n)
                .filter(|e| *e <= payload.len())
                .ok_or_else(|| {
                    bad(
                        k,
                        "data",
                        format!(
                            "run {i}: {len} bytes announced, {} left in the frame",
                            payload.len() - at
                        ),
                    )
                })?;
            let d = RunData::Bytes(&payload[at..end]);
            at = end;
            d
        };
        runs.push(Run { gpa, len, data });
    }
    Ok(runs)
}

impl<'a> Message<'a> {
    /// Check a frame's payload and decode it.
    pub fn decode(frame: &'a Frame) -> Result<Self, ProtocolError> {
        let k = frame.kind;
        let p = frame.payload.as_slice();
        match k {
            FrameKind::Start => {
                if p.len() != 8 {
                    return Err(bad(k, "length", format!("{} bytes, expected 8", p.len())));
                }
                let page_size = u32_at(p, 0).unwrap_or(0);
                let reserved = u32_at(p, 4).unwrap_or(0);
                if u64::from(page_size) != PAGE_SIZE {
                    return Err(bad(
                        k,
                        "page_size",
                        format!("{page_size}, this build moves {PAGE_SIZE}-byte pages"),
                    ));
                }
                if reserved != 0 {
                    return Err(bad(k, "reserved", format!("{reserved:#x}, must be 0")));
                }
                Ok(Self::Start(StartInfo { page_size }))
            }
            FrameKind::Config => {
                if p.is_empty() {
                    return Err(bad(k, "config", "empty"));
                }
                Ok(Self::Config(p))
            }
            FrameKind::Memory => Ok(Self::Memory(decode_runs(p)?)),
            FrameKind::State => {
                if p.is_empty() {
                    return Err(bad(k, "state", "empty"));
                }
                Ok(Self::State(p))
            }
            FrameKind::Complete => Ok(Self::Complete),
            FrameKind::Abandon => Ok(Self::Abandon(reason(k, p)?)),
            FrameKind::Error => Ok(Self::Error(reason(k, p)?)),
            FrameKind::Ack => {
                if p.len() != 2 {
                    return Err(bad(k, "length", format!("{} bytes, expected 2", p.len())));
                }
                let v = u16::from_le_bytes([p[0], p[1]]);
                let acked = FrameKind::from_wire(v)
                    .ok_or_else(|| bad(k, "kind", format!("unknown frame kind {v}")))?;
                Ok(Self::Ack(acked))
            }
        }
    }
}

/// Reads frames from a byte stream, checking each header before reading its payload.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    frames: u64,
    bytes: u64,
    /// Payload buffers handed back by [`FrameReader::recycle`], reused for the next frames
    /// (a receiver reads thousands of 4 MiB memory frames; a fresh buffer each would be
    /// allocated and cleared each time). At most [`SPARE_BUFFERS`]: a receiver that reads
    /// ahead has that many frames in flight.
    spare: Vec<Vec<u8>>,
}

/// Payload buffers a [`FrameReader`] keeps for reuse.
pub const SPARE_BUFFERS: usize = 4;

/// Read exactly `buf.len()` bytes; `Ok(n)` with `n < buf.len()` at end of stream.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl<R: Read> FrameReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            frames: 0,
            bytes: 0,
            spare: Vec::new(),
        }
    }

    /// Hand a frame's payload buffer back for the next frame to reuse.
    pub fn recycle(&mut self, frame: Frame) {
        if self.spare.len() < SPARE_BUFFERS && frame.payload.capacity() > 0 {
            self.spare.push(frame.payload);
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The underlying stream, mutably.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Frames read so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Bytes read so far (headers included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The next frame; `Ok(None)` when the stream ends cleanly between frames.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let mut h = [0u8; HEADER_LEN];
        let got = read_full(&mut self.inner, &mut h).map_err(|source| ProtocolError::Io {
            what: "read a frame header",
            source,
        })?;
        if got == 0 {
            return Ok(None);
        }
        if got < HEADER_LEN {
            return Err(ProtocolError::Truncated {
                what: "frame header".into(),
                expected: HEADER_LEN as u64,
                got: got as u64,
            });
        }
        let header = Header::decode(&h)?;
        // The length is bounded by the kind's limit (at most 16 MiB), so this fits memory.
        // A recycled buffer is cleared only where it grows.
        let mut payload = self.spare.pop().unwrap_or_default();
        payload.resize(header.length as usize, 0);
        let got = read_full(&mut self.inner, &mut payload).map_err(|source| ProtocolError::Io {
            what: "read a frame payload",
            source,
        })?;
        if got < payload.len() {
            return Err(ProtocolError::Truncated {
                what: format!("{} frame payload", header.kind),
                expected: header.length,
                got: got as u64,
            });
        }
        self.frames += 1;
        self.bytes += HEADER_LEN as u64 + header.length;
        Ok(Some(Frame {
            kind: header.kind,
            payload,
        }))
    }
}

/// Writes frames to a byte stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    frames: u64,
    bytes: u64,
    write_time: std::time::Duration,
}

impl<W: Write> FrameWriter<W> {
    /// A writer over `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            frames: 0,
            bytes: 0,
            write_time: std::time::Duration::ZERO,
        }
    }

    /// Time spent inside writes so far (blocked on a full socket included): with
    /// [`FrameWriter::bytes`], the throughput the stream really achieves.
    pub fn write_time(&self) -> std::time::Duration {
        self.write_time
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The underlying stream, mutably.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Bytes written so far (headers included).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Write one frame. Refuses a payload over the kind's limit (nothing is written then).
    pub fn send(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), ProtocolError> {
        let length = payload.len() as u64;
        let max = kind.max_payload();
        if length > max {
            return Err(ProtocolError::Oversized { kind, length, max });
        }
        let h = Header {
            version: VERSION,
            kind,
            length,
        }
        .encode();
        let io = |source| ProtocolError::Io {
            what: "write a frame",
            source,
        };
        let t = std::time::Instant::now();
        let r = self
            .inner
            .write_all(&h)
            .and_then(|()| self.inner.write_all(payload));
        self.write_time += t.elapsed();
        r.map_err(io)?;
        self.frames += 1;
        self.bytes += HEADER_LEN as u64 + length;
        Ok(())
    }

    /// Write a `Start` frame.
    pub fn start(&mut self) -> Result<(), ProtocolError> {
        let mut p = [0u8; 8];
        p[0..4].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        self.send(FrameKind::Start, &p)
    }

    /// Write an `Ack` of `kind`.
    pub fn ack(&mut self, kind: FrameKind) -> Result<(), ProtocolError> {
        self.send(FrameKind::Ack, &(kind as u16).to_le_bytes())
    }

    /// Write an `Abandon` or `Error` frame, truncating the reason to the limit.
    pub fn reason(&mut self, kind: FrameKind, reason: &str) -> Result<(), ProtocolError> {
        let mut end = reason.len().min(MAX_REASON_PAYLOAD as usize);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.send(kind, &reason.as_bytes()[..end])
    }

    /// Flush the stream.
    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.inner.flush().map_err(|source| ProtocolError::Io {
            what: "flush",
            source,
        })
    }
}

/// One part of a frame on its way out: bytes, or guest memory where it is mapped.
#[derive(Debug)]
pub enum Part<'a> {
    /// Bytes of the frame (the header, run headers, pages given as a buffer).
    Bytes(&'a [u8]),
    /// Guest pages, read by the stream where they are mapped (never copied by the VMM first).
    Guest(VolatileSlice<'a>),
}

impl Part<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Bytes(b) => b.len(),
            Self::Guest(s) => s.len(),
        }
    }
}

/// A stream a frame can be written to from its [`Part`]s.
pub trait GatherWrite: Write {
    /// Write every part, in order. This default copies guest memory out first (for the
    /// in-memory writers of tests and the fuzzer); [`super::Stream`] hands the parts to
    /// `writev(2)`, so the socket reads guest pages where they are.
    fn write_parts(&mut self, parts: &[Part<'_>]) -> std::io::Result<()> {
        for p in parts {
            match p {
                Part::Bytes(b) => self.write_all(b)?,
                Part::Guest(s) => {
                    let mut copy = vec![0u8; s.len()];
                    s.copy_to(&mut copy[..]);
                    self.write_all(&copy)?;
                }
            }
        }
        Ok(())
    }
}

impl GatherWrite for Vec<u8> {}

impl<W: GatherWrite> FrameWriter<W> {
    /// Write one frame whose payload is `parts`, back to back. Refuses a payload over the kind's
    /// limit (nothing is written then).
    pub fn send_parts(&mut self, kind: FrameKind, parts: &[Part<'_>]) -> Result<(), ProtocolError> {
        let length = parts.iter().map(|p| p.len() as u64).sum();
        let max = kind.max_payload();
        if length > max {
            return Err(ProtocolError::Oversized { kind, length, max });
        }
        let h = Header {
            version: VERSION,
            kind,
            length,
        }
        .encode();
        let mut all = Vec::with_capacity(parts.len() + 1);
        all.push(Part::Bytes(&h));
        all.extend(parts.iter().map(|p| match p {
            Part::Bytes(b) => Part::Bytes(b),
            Part::Guest(s) => Part::Guest(*s),
        }));
        let t = std::time::Instant::now();
        let r = self.inner.write_parts(&all);
        self.write_time += t.elapsed();
        r.map_err(|source| ProtocolError::Io {
            what: "write a frame",
            source,
        })?;
        self.frames += 1;
        self.bytes += HEADER_LEN as u64 + length;
        Ok(())
    }
}

/// Builds `Memory` frames from runs, sending a frame whenever the payload reaches
/// [`MEMORY_FRAME_TARGET`]. Pages taken from guest memory ([`Self::add_guest`]) are checked for
/// zero where they are and sent from there: the frame holds only their address until it is
/// written.
#[derive(Debug, Default)]
pub struct MemoryFrameBuilder {
    /// The payload's own bytes: run headers, and pages added as a buffer.
    buf: Vec<u8>,
    /// Guest pages of the payload: `(at, gpa, len)`, the pages going in after `buf[..at]`.
    guest: Vec<(usize, u64, usize)>,
    /// Bytes in `guest`.
    guest_bytes: usize,
    /// Where [`Self::add_guest`] pages come from.
    memory: Option<Arc<GuestMemoryMmap>>,
    /// Pages added with content.
    pub data_pages: u64,
    /// Pages added as zero runs.
    pub zero_pages: u64,
}

impl MemoryFrameBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty builder that can take pages from `memory` ([`Self::add_guest`]).
    pub fn with_memory(memory: Arc<GuestMemoryMmap>) -> Self {
        Self {
            memory: Some(memory),
            ..Self::default()
        }
    }

    fn payload_len(&self) -> usize {
        self.buf.len() + self.guest_bytes
    }

    fn header(&mut self, gpa: u64, len: u32, flags: u32) {
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&flags.to_le_bytes());
    }

    /// Add a run of pages at `gpa` (page aligned, `data.len()` a multiple of the page size);
    /// all-zero pages become zero runs. Sends frames to `w` as the buffer fills.
    pub fn add<W: GatherWrite>(
        &mut self,
        w: &mut FrameWriter<W>,
        gpa: u64,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        let page = PAGE_SIZE as usize;
        if !gpa.is_multiple_of(PAGE_SIZE) || !data.len().is_multiple_of(page) {
            return Err(bad(
                FrameKind::Memory,
                "run",
                format!(
                    "{gpa:#x}+{:#x} is not a whole number of aligned pages",
                    data.len()
                ),
            ));
        }
        let mut i = 0;
        let pages = data.len() / page;
        while i < pages {
            let zero = is_zero(&data[i * page..(i + 1) * page]);
            let mut j = i + 1;
            // Group consecutive pages of the same kind, within the frame target.
            let max_pages = (MEMORY_FRAME_TARGET / page).max(1);
            while j < pages && j - i < max_pages && is_zero(&data[j * page..(j + 1) * page]) == zero
            {
                j += 1;
            }
            let run_gpa = gpa + (i * page) as u64;
            let len = ((j - i) * page) as u32;
            if zero {
                self.header(run_gpa, len, RUN_ZERO);
                self.zero_pages += (j - i) as u64;
            } else {
                if self.payload_len() + RUN_HEADER_LEN + len as usize > MEMORY_FRAME_TARGET
                    && self.payload_len() > 0
                {
                    self.flush(w)?;
                }
                self.header(run_gpa, len, 0);
                self.buf.extend_from_slice(&data[i * page..j * page]);
                self.data_pages += (j - i) as u64;
            }
            if self.payload_len() >= MEMORY_FRAME_TARGET {
                self.flush(w)?;
            }
            i = j;
        }
        Ok(())
    }

    /// Add `pages` pages of guest memory at `gpa` (page aligned, inside one RAM region): the
    /// same runs as [`Self::add`] gives for those bytes, all-zero pages becoming zero runs. Each
    /// page is looked at where it is (copied a page at a time into a buffer that stays in the
    /// CPU's cache, and checked there); a data run goes into the frame as its address, and the
    /// stream reads it from guest memory when the frame is written. At most
    /// [`MEMORY_FRAME_TARGET`] bytes at once. Sends frames to `w` as the buffer fills.
    ///
    /// The guest may write a page between the look and the send: a migration runs with dirty
    /// logging on, and such a page is sent again.
    pub fn add_guest<W: GatherWrite>(
        &mut self,
        w: &mut FrameWriter<W>,
        gpa: u64,
        pages: usize,
    ) -> Result<(), ProtocolError> {
        let page = PAGE_SIZE as usize;
        let len = pages * page;
        let refuse = |why: String| bad(FrameKind::Memory, "run", why);
        if !gpa.is_multiple_of(PAGE_SIZE) || pages == 0 || len > MEMORY_FRAME_TARGET {
            return Err(refuse(format!(
                "{gpa:#x}+{pages} pages is not a run of aligned pages that fits a frame"
            )));
        }
        let memory = self
            .memory
            .clone()
            .ok_or_else(|| refuse("this builder was given no guest memory".into()))?;
        let slice = memory
            .get_slice(GuestAddress(gpa), len)
            .map_err(|e| refuse(format!("{gpa:#x}+{len:#x}: {e}")))?;
        if self.payload_len() + RUN_HEADER_LEN + len > MEMORY_FRAME_TARGET && self.payload_len() > 0
        {
            self.flush(w)?;
        }
        let mut look = [0u8; PAGE_SIZE as usize];
        let mut zero_at = |i: usize| -> Result<bool, ProtocolError> {
            let p = slice
                .subslice(i * page, page)
                .map_err(|e| refuse(format!("{gpa:#x} page {i}: {e}")))?;
            p.copy_to(&mut look[..]);
            Ok(is_zero(&look))
        };
        let mut i = 0;
        let mut zero = zero_at(0)?;
        while i < pages {
            let mut j = i + 1;
            let mut next = false;
            while j < pages {
                next = zero_at(j)?;
                if next != zero {
                    break;
                }
                j += 1;
            }
            let run_gpa = gpa + (i * page) as u64;
            let n = (j - i) * page;
            if zero {
                self.header(run_gpa, n as u32, RUN_ZERO);
                self.zero_pages += (j - i) as u64;
            } else {
                self.header(run_gpa, n as u32, 0);
                self.guest.push((self.buf.len(), run_gpa, n));
                self.guest_bytes += n;
                self.data_pages += (j - i) as u64;
            }
            i = j;
            zero = next;
        }
        if self.payload_len() >= MEMORY_FRAME_TARGET || self.guest_bytes >= GUEST_FRAME_TARGET {
            self.flush(w)?;
        }
        Ok(())
    }

    /// Add `pages` pages at `gpa` (page aligned) known to be zero without reading them, as
    /// zero runs (each at most [`MAX_ZERO_RUN`] bytes). Sends frames to `w` as the buffer fills.
    pub fn add_zero<W: GatherWrite>(
        &mut self,
        w: &mut FrameWriter<W>,
        gpa: u64,
        pages: u64,
    ) -> Result<(), ProtocolError> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(bad(
                FrameKind::Memory,
                "run",
                format!("{gpa:#x} is not page aligned"),
            ));
        }
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(MAX_ZERO_RUN / PAGE_SIZE);
            self.header(gpa + done * PAGE_SIZE, (n * PAGE_SIZE) as u32, RUN_ZERO);
            self.zero_pages += n;
            done += n;
            if self.buf.len() >= MEMORY_FRAME_TARGET {
                self.flush(w)?;
            }
        }
        Ok(())
    }

    /// Send what is buffered as one `Memory` frame (nothing when empty).
    pub fn flush<W: GatherWrite>(&mut self, w: &mut FrameWriter<W>) -> Result<(), ProtocolError> {
        if self.payload_len() == 0 {
            return Ok(());
        }
        let r = self.send(w);
        self.buf.clear();
        self.guest.clear();
        self.guest_bytes = 0;
        r
    }

    fn send<W: GatherWrite>(&self, w: &mut FrameWriter<W>) -> Result<(), ProtocolError> {
        let Some(memory) = self.memory.as_deref().filter(|_| !self.guest.is_empty()) else {
            return w.send_parts(FrameKind::Memory, &[Part::Bytes(&self.buf)]);
        };
        let mut parts = Vec::with_capacity(2 * self.guest.len() + 1);
        let mut from = 0;
        for &(at, gpa, len) in &self.guest {
            parts.push(Part::Bytes(&self.buf[from..at]));
            // Looked up when added; the mapping lives as long as `memory`.
            let s = memory
                .get_slice(GuestAddress(gpa), len)
                .map_err(|e| bad(FrameKind::Memory, "run", format!("{gpa:#x}+{len:#x}: {e}")))?;
            parts.push(Part::Guest(s));
            from = at;
        }
        parts.push(Part::Bytes(&self.buf[from..]));
        w.send_parts(FrameKind::Memory, &parts)
    }
}

/// Whether a page is all zero (wide compares that stop at the first difference; see
/// [`crate::residency::is_zero`]).
pub fn is_zero(b: &[u8]) -> bool {
    crate::residency::is_zero(b)
}
