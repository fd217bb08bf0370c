//! The destination's side of the conversation as a state machine over decoded frames:
//! `Start -> Config -> Memory* -> State -> Complete`, every frame checked before use.
//!
//! [`Receiver`] knows the protocol; what the frames build (a VM) sits behind the
//! [`Destination`] trait, so the machine can be driven by arbitrary bytes in tests and fuzzing.

use std::io::{Read, Write};
use std::sync::mpsc;

use super::protocol::{Frame, FrameKind, FrameReader, FrameWriter, Message, RunData};
use super::ProtocolError;

/// One guest RAM range of the destination, `[gpa, gpa + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
}

impl RamRange {
    /// Whether `[gpa, gpa + len)` lies inside this range.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        match (gpa.checked_add(len), self.gpa.checked_add(self.len)) {
            (Some(end), Some(rend)) => gpa >= self.gpa && end <= rend,
            _ => false,
        }
    }
}

/// What the received frames build. Each method's error is a reason naming what was wrong;
/// the [`Receiver`] wraps it with the frame.
pub trait Destination {
    /// The `Config` frame's JSON: decode it, check the host can run it (TSC rate), allocate
    /// guest RAM, and return the RAM layout memory runs are checked against.
    fn config(&mut self, json: &[u8]) -> Result<Vec<RamRange>, String>;
    /// A memory run, already checked to lie inside one range of the layout.
    fn memory(&mut self, gpa: u64, len: u64, data: RunData<'_>) -> Result<(), String>;
    /// The `State` frame's JSON: decode and restore the vCPU, device and time state (the VM
    /// stays parked).
    fn state(&mut self, json: &[u8]) -> Result<(), String>;
    /// `Complete`: thaw time and run the VM.
    fn complete(&mut self) -> Result<(), String>;
}

/// Where the receiver is in the conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for `Start`.
    Start,
    /// Waiting for `Config`.
    Config,
    /// Receiving `Memory` frames, until `State`.
    Memory,
    /// `State` received; waiting for `Complete`.
    Complete,
    /// The VM runs here.
    Done,
    /// The conversation failed; nothing more is accepted.
    Failed,
}

impl Stage {
    fn expected(self) -> &'static str {
        match self {
            Self::Start => "Start",
            Self::Config => "Config",
            Self::Memory => "Memory or State",
            Self::Complete => "Complete",
            Self::Done => "nothing (the migration is complete)",
            Self::Failed => "nothing (the migration failed)",
        }
    }

    /// What the receiver waits for, for "the peer closed the connection while ...".
    pub fn waiting_for(self) -> String {
        format!("waiting for {}", self.expected())
    }
}

/// The destination's protocol state machine.
#[derive(Debug)]
pub struct Receiver<D> {
    dest: D,
    stage: Stage,
    layout: Vec<RamRange>,
    /// Memory frames accepted.
    pub memory_frames: u64,
    /// Pages written with content.
    pub data_pages: u64,
    /// Pages written as zero.
    pub zero_pages: u64,
}

impl<D: Destination> Receiver<D> {
    /// A receiver waiting for `Start`.
    pub fn new(dest: D) -> Self {
        Self {
            dest,
            stage: Stage::Start,
            layout: Vec::new(),
            memory_frames: 0,
            data_pages: 0,
            zero_pages: 0,
        }
    }

    /// The stage reached.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The destination.
    pub fn destination(&self) -> &D {
        &self.dest
    }

    /// The destination, mutably.
    pub fn destination_mut(&mut self) -> &mut D {
        &mut self.dest
    }

    /// The destination, consuming the receiver.
    pub fn into_destination(self) -> D {
        self.dest
    }

    fn out_of_order(&self, kind: FrameKind) -> ProtocolError {
        ProtocolError::OutOfOrder {
            kind,
            expected: self.stage.expected().to_string(),
        }
    }

    fn ram_description(&self) -> String {
        if self.layout.is_empty() {
            return "no RAM".into();
        }
        self.layout
            .iter()
            .map(|r| format!("{:#x}..{:#x}", r.gpa, r.gpa.saturating_add(r.len)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Handle one decoded frame. Returns the kind to acknowledge, if any. After an error the
    /// receiver is [`Stage::Failed`] and refuses everything.
    pub fn handle(&mut self, msg: &Message<'_>) -> Result<Option<FrameKind>, ProtocolError> {
        let r = self.step(msg);
        if r.is_err() {
            self.stage = Stage::Failed;
        }
        r
    }

    /// Decode a frame and handle it.
    pub fn handle_frame(&mut self, frame: &Frame) -> Result<Option<FrameKind>, ProtocolError> {
        match Message::decode(frame) {
            Ok(m) => self.handle(&m),
            Err(e) => {
                self.stage = Stage::Failed;
                Err(e)
            }
        }
    }

    fn step(&mut self, msg: &Message<'_>) -> Result<Option<FrameKind>, ProtocolError> {
        let dest_err = |kind| move |reason| ProtocolError::Destination { kind, reason };
        match (self.stage, msg) {
            (Stage::Failed | Stage::Done, m) => Err(self.out_of_order(kind_of(m))),
            (_, Message::Abandon(reason)) => Err(ProtocolError::Abandoned(reason.clone())),
            (Stage::Start, Message::Start(_)) => {
                self.stage = Stage::Config;
                Ok(Some(FrameKind::Start))
            }
            (Stage::Config, Message::Config(json)) => {
                let layout = self
                    .dest
                    .config(json)
                    .map_err(dest_err(FrameKind::Config))?;
                if layout.is_empty() {
                    return Err(ProtocolError::Destination {
                        kind: FrameKind::Config,
                        reason: "the configuration gives the VM no RAM".into(),
                    });
                }
                self.layout = layout;
                self.stage = Stage::Memory;
                Ok(Some(FrameKind::Config))
            }
            (Stage::Memory, Message::Memory(runs)) => {
                // Check every run before writing any.
                for run in runs {
                    if !self.layout.iter().any(|r| r.contains(run.gpa, run.len)) {
                        return Err(ProtocolError::OutsideRam {
                            gpa: run.gpa,
                            len: run.len,
                            ram: self.ram_description(),
                        });
                    }
                }
                for run in runs {
                    self.dest
                        .memory(run.gpa, run.len, run.data)
                        .map_err(dest_err(FrameKind::Memory))?;
                    let pages = run.len / super::PAGE_SIZE;
                    match run.data {
                        RunData::Bytes(_) => self.data_pages += pages,
                        RunData::Zero => self.zero_pages += pages,
                    }
                }
                self.memory_frames += 1;
                Ok(None)
            }
            (Stage::Memory, Message::State(json)) => {
                self.dest.state(json).map_err(dest_err(FrameKind::State))?;
                self.stage = Stage::Complete;
                Ok(Some(FrameKind::State))
            }
            (Stage::Complete, Message::Complete) => {
                self.dest
                    .complete()
                    .map_err(dest_err(FrameKind::Complete))?;
                self.stage = Stage::Done;
                Ok(Some(FrameKind::Complete))
            }
            (_, m) => Err(self.out_of_order(kind_of(m))),
        }
    }
}

fn kind_of(m: &Message<'_>) -> FrameKind {
    match m {
        Message::Start(_) => FrameKind::Start,
        Message::Config(_) => FrameKind::Config,
        Message::Memory(_) => FrameKind::Memory,
        Message::State(_) => FrameKind::State,
        Message::Complete => FrameKind::Complete,
        Message::Abandon(_) => FrameKind::Abandon,
        Message::Ack(_) => FrameKind::Ack,
        Message::Error(_) => FrameKind::Error,
    }
}

/// Run the destination's side over a stream until the VM runs here ([`Stage::Done`]) or the
/// conversation fails, reading and handling one frame at a time. Every accepted frame that
/// needs one is acknowledged on `writer`; a failure is reported to the source in an `Error`
/// frame (best effort) and returned. For in-memory streams (tests, the fuzzer); a socket is
/// received with [`receive_reading_ahead`].
pub fn receive<R: Read, W: Write, D: Destination>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    rx: &mut Receiver<D>,
) -> Result<(), ProtocolError> {
    let r = receive_inner(reader, writer, rx, |_, _, _| Ok(false));
    report_failure(r, writer, rx)
}

/// [`receive`], with the memory stage's frames read ahead on a second thread while this one
/// writes guest RAM ([`memory_stage`]): what the destination of a real migration runs.
pub fn receive_reading_ahead<R: Read + Send, W: Write, D: Destination>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    rx: &mut Receiver<D>,
) -> Result<(), ProtocolError> {
    let r = receive_inner(reader, writer, rx, |r, w, rx| {
        memory_stage(r, w, rx).map(|()| true)
    });
    report_failure(r, writer, rx)
}

/// A failed conversation: the receiver refuses everything from here, and the source is told
/// why (unless it abandoned, or is gone: its absence is not a second error).
fn report_failure<W: Write, D: Destination>(
    r: Result<(), ProtocolError>,
    writer: &mut FrameWriter<W>,
    rx: &mut Receiver<D>,
) -> Result<(), ProtocolError> {
    if let Err(e) = &r {
        rx.stage = Stage::Failed;
        if !matches!(e, ProtocolError::Abandoned(_)) {
            let _ = writer.reason(FrameKind::Error, &e.to_string());
            let _ = writer.flush();
        }
    }
    r
}

/// The conversation: `memory` may run the memory stage its own way (it returns whether it did,
/// having left that stage); otherwise every frame is read and handled here.
fn receive_inner<R: Read, W: Write, D: Destination>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    rx: &mut Receiver<D>,
    mut memory: impl FnMut(
        &mut FrameReader<R>,
        &mut FrameWriter<W>,
        &mut Receiver<D>,
    ) -> Result<bool, ProtocolError>,
) -> Result<(), ProtocolError> {
    while rx.stage() != Stage::Done {
        if rx.stage() == Stage::Memory && memory(reader, writer, rx)? {
            continue;
        }
        let frame = reader.next_frame()?;
        let frame = handle_next(frame, writer, rx)?;
        reader.recycle(frame);
    }
    Ok(())
}

/// Handle the frame read (`None`: the stream ended) and send its acknowledgement, if it has
/// one. Returns the frame, for its buffer to be reused.
fn handle_next<W: Write, D: Destination>(
    frame: Option<Frame>,
    writer: &mut FrameWriter<W>,
    rx: &mut Receiver<D>,
) -> Result<Frame, ProtocolError> {
    let frame = frame.ok_or_else(|| ProtocolError::Closed {
        stage: rx.stage().waiting_for(),
    })?;
    if let Some(kind) = rx.handle_frame(&frame)? {
        writer.ack(kind)?;
        writer.flush()?;
    }
    Ok(frame)
}

/// Memory frames read ahead of the one being written into guest RAM.
const READ_AHEAD: usize = 2;

/// The memory stage, with the stream read on a second thread: while this one writes a frame's
/// pages into guest RAM, the next frames are read, so the source goes on sending. (Read and
/// written by one thread, the socket filled up during every write into guest RAM and the source
/// waited: the two sides took turns.)
///
/// The reading thread stops after handing over the first frame that is not `Memory` (`State`
/// ends the stage, anything else fails it), at the end of the stream, on a read error, or when
/// this side has failed (nobody takes its next frame). The source never waits for an answer in
/// this stage, so that next frame comes, and a failure here returns once it has.
fn memory_stage<R: Read + Send, W: Write, D: Destination>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    rx: &mut Receiver<D>,
) -> Result<(), ProtocolError> {
    let (read_tx, read_rx) = mpsc::sync_channel(READ_AHEAD);
    let (spent_tx, spent_rx) = mpsc::channel::<Frame>();
    std::thread::scope(|s| {
        s.spawn(move || loop {
            while let Ok(f) = spent_rx.try_recv() {
                reader.recycle(f);
            }
            let next = reader.next_frame();
            let more = matches!(&next, Ok(Some(f)) if f.kind == FrameKind::Memory);
            if read_tx.send(next).is_err() || !more {
                break;
            }
        });
        let r = (|| loop {
            // The reading thread sends before it ends: a closed channel means it panicked.
            let next = read_rx.recv().map_err(|_| ProtocolError::Io {
                what: "read a frame",
                source: std::io::Error::other("the reading thread ended"),
            })??;
            let frame = handle_next(next, writer, rx)?;
            let _ = spent_tx.send(frame);
            if rx.stage() != Stage::Memory {
                return Ok(());
            }
        })();
        // Frees the reading thread if it waits to hand over a frame.
        drop(read_rx);
        r
    })
}

/// The source's wait for the destination's answer to `kind`: its `Ack`, or its `Error`
/// ([`ProtocolError::Remote`]); anything else is a protocol error.
pub fn expect_ack<R: Read>(
    reader: &mut FrameReader<R>,
    kind: FrameKind,
) -> Result<(), ProtocolError> {
    let frame = reader.next_frame()?.ok_or_else(|| ProtocolError::Closed {
        stage: format!("waiting for the destination's answer to {kind}"),
    })?;
    match Message::decode(&frame)? {
        Message::Ack(k) if k == kind => Ok(()),
        Message::Error(reason) => Err(ProtocolError::Remote(reason)),
        Message::Ack(k) => Err(ProtocolError::OutOfOrder {
            kind: FrameKind::Ack,
            expected: format!("Ack of {kind}, got Ack of {k}"),
        }),
        _ => Err(ProtocolError::OutOfOrder {
            kind: frame.kind,
            expected: format!("Ack of {kind} or Error"),
        }),
    }
}
