//! The migration protocol alone: frame round trips, the decoder's checks, the receiver's state
//! machine, and both transports on loopback. No VM, no /dev/kvm.

use std::io::Cursor;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use vmm::migration::protocol::{
    MemoryFrameBuilder, MAX_MEMORY_PAYLOAD, MAX_ZERO_RUN, MEMORY_FRAME_TARGET, RUN_HEADER_LEN,
    RUN_ZERO,
};
use vmm::migration::{
    expect_ack, receive, receive_reading_ahead, Destination, Endpoint, Frame, FrameKind,
    FrameReader, FrameWriter, Listener, Message, ProtocolError, RamRange, Receiver, RunData, Stage,
    Stream, HEADER_LEN, MAGIC, PAGE_SIZE, VERSION,
};

const PAGE: usize = PAGE_SIZE as usize;

/// A fake destination: two RAM ranges with a hole between them, like the real layout.
#[derive(Default, Debug)]
struct FakeDest {
    low: Vec<u8>,
    high: Vec<u8>,
    config: Option<String>,
    state: Option<String>,
    completed: bool,
    refuse_config: bool,
}

const LOW: RamRange = RamRange {
    gpa: 0,
    len: 16 * PAGE_SIZE,
};
const HIGH: RamRange = RamRange {
    gpa: 0x10_0000,
    len: 8 * PAGE_SIZE,
};

impl FakeDest {
    fn ram(&mut self, gpa: u64) -> (&mut Vec<u8>, usize) {
        if gpa >= HIGH.gpa {
            (&mut self.high, (gpa - HIGH.gpa) as usize)
        } else {
            (&mut self.low, gpa as usize)
        }
    }
}

impl Destination for FakeDest {
    fn config(&mut self, json: &[u8]) -> Result<Vec<RamRange>, String> {
        if self.refuse_config {
            return Err("tsc_khz: 1000 kHz cannot be run on this host".into());
        }
        let s = std::str::from_utf8(json).map_err(|e| e.to_string())?;
        self.config = Some(s.to_string());
        self.low = vec![0xee; LOW.len as usize];
        self.high = vec![0xee; HIGH.len as usize];
        Ok(vec![LOW, HIGH])
    }
    fn memory(&mut self, gpa: u64, len: u64, data: RunData<'_>) -> Result<(), String> {
        let (ram, off) = self.ram(gpa);
        let dst = &mut ram[off..off + len as usize];
        match data {
            RunData::Bytes(b) => dst.copy_from_slice(b),
            RunData::Zero => dst.fill(0),
        }
        Ok(())
    }
    fn state(&mut self, json: &[u8]) -> Result<(), String> {
        self.state = Some(String::from_utf8_lossy(json).into_owned());
        Ok(())
    }
    fn complete(&mut self) -> Result<(), String> {
        self.completed = true;
        Ok(())
    }
}

fn writer() -> FrameWriter<Vec<u8>> {
    FrameWriter::new(Vec::new())
}

fn read_one(bytes: &[u8]) -> Result<Option<Frame>, ProtocolError> {
    FrameReader::new(Cursor::new(bytes)).next_frame()
}

fn header(version: u16, kind: u16, len: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

fn run(gpa: u64, len: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&gpa.to_le_bytes());
    r.extend_from_slice(&len.to_le_bytes());
    r.extend_from_slice(&flags.to_le_bytes());
    r.extend_from_slice(data);
    r
}

/// A whole valid conversation from the source: Start, Config, memory (some pages with a
/// pattern, some zero), State, Complete.
fn good_stream() -> Vec<u8> {
    let mut w = writer();
    w.start().unwrap();
    w.send(FrameKind::Config, br#"{"tsc_khz":2000000,"config":{}}"#)
        .unwrap();
    let mut b = MemoryFrameBuilder::new();
    let mut data = vec![0u8; 4 * PAGE];
    data[..PAGE].fill(0x11);
    data[3 * PAGE..].fill(0x33);
    b.add(&mut w, PAGE_SIZE, &data).unwrap();
    b.add(&mut w, HIGH.gpa + 2 * PAGE_SIZE, &[0x44; PAGE])
        .unwrap();
    b.flush(&mut w).unwrap();
    w.send(FrameKind::State, br#"{"version":1}"#).unwrap();
    w.send(FrameKind::Complete, &[]).unwrap();
    w.get_ref().clone()
}

fn feed(bytes: &[u8], dest: FakeDest) -> (Result<(), ProtocolError>, Receiver<FakeDest>, Vec<u8>) {
    let mut r = FrameReader::new(Cursor::new(bytes));
    let mut w = writer();
    let mut rx = Receiver::new(dest);
    let res = receive(&mut r, &mut w, &mut rx);
    (res, rx, w.get_ref().clone())
}

/// The frames written back to the source.
fn replies(bytes: &[u8]) -> Vec<Frame> {
    let mut r = FrameReader::new(Cursor::new(bytes));
    let mut out = Vec::new();
    while let Some(f) = r.next_frame().expect("the receiver writes valid frames") {
        out.push(f);
    }
    out
}

#[test]
fn every_frame_kind_round_trips() {
    let mut w = writer();
    w.start().unwrap();
    w.send(FrameKind::Config, b"{\"a\":1}").unwrap();
    w.send(
        FrameKind::Memory,
        &[
            run(0x2000, 4096, 0, &[7u8; PAGE]),
            run(0x5000, 8192, RUN_ZERO, &[]),
        ]
        .concat(),
    )
    .unwrap();
    w.send(FrameKind::State, b"{\"s\":2}").unwrap();
    w.send(FrameKind::Complete, &[]).unwrap();
    w.reason(FrameKind::Abandon, "operator cancelled").unwrap();
    w.ack(FrameKind::Config).unwrap();
    w.reason(FrameKind::Error, "no memory here").unwrap();
    let bytes = w.get_ref().clone();
    assert_eq!(w.frames(), 8);
    assert_eq!(w.bytes(), bytes.len() as u64);

    let mut r = FrameReader::new(Cursor::new(&bytes));
    let mut frames = Vec::new();
    while let Some(f) = r.next_frame().unwrap() {
        frames.push(f);
    }
    assert_eq!(r.bytes(), bytes.len() as u64);
    let kinds: Vec<_> = frames.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, FrameKind::ALL.to_vec());
    let msgs: Vec<_> = frames.iter().map(|f| Message::decode(f).unwrap()).collect();
    assert!(matches!(msgs[0], Message::Start(s) if u64::from(s.page_size) == PAGE_SIZE));
    assert_eq!(msgs[1], Message::Config(b"{\"a\":1}"));
    match &msgs[2] {
        Message::Memory(runs) => {
            assert_eq!(runs.len(), 2);
            assert_eq!(runs[0].gpa, 0x2000);
            assert_eq!(runs[0].len, 4096);
            assert_eq!(runs[0].data, RunData::Bytes(&[7u8; PAGE]));
            assert_eq!(runs[1].gpa, 0x5000);
            assert_eq!(runs[1].len, 8192);
            assert_eq!(runs[1].data, RunData::Zero);
        }
        m => panic!("expected Memory, got {m:?}"),
    }
    assert_eq!(msgs[3], Message::State(b"{\"s\":2}"));
    assert_eq!(msgs[4], Message::Complete);
    assert_eq!(msgs[5], Message::Abandon("operator cancelled".into()));
    assert_eq!(msgs[6], Message::Ack(FrameKind::Config));
    assert_eq!(msgs[7], Message::Error("no memory here".into()));
}

#[test]
fn header_layout_is_the_documented_one() {
    let mut w = writer();
    w.send(FrameKind::State, b"xyz").unwrap();
    let b = w.get_ref();
    assert_eq!(&b[0..4], b"HGMF");
    assert_eq!(u16::from_le_bytes([b[4], b[5]]), 1);
    assert_eq!(u16::from_le_bytes([b[6], b[7]]), 4);
    assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 3);
    assert_eq!(&b[HEADER_LEN..], b"xyz");
}

#[test]
fn memory_builder_splits_frames_and_marks_zero_pages() {
    // 3 target-sized chunks of pattern data with zero pages between.
    let pages = 3 * MEMORY_FRAME_TARGET / PAGE + 5;
    let mut data = vec![0u8; pages * PAGE];
    for (i, p) in data.chunks_mut(PAGE).enumerate() {
        if i % 7 != 3 {
            p.fill((i % 251) as u8 + 1);
        }
    }
    let mut w = writer();
    let mut b = MemoryFrameBuilder::new();
    b.add(&mut w, 0x40_0000, &data).unwrap();
    b.flush(&mut w).unwrap();
    assert!(w.frames() >= 3, "{} frames", w.frames());
    let zero = (0..pages).filter(|i| i % 7 == 3).count() as u64;
    assert_eq!(b.zero_pages, zero);
    assert_eq!(b.data_pages, pages as u64 - zero);

    let rebuilt = rebuild(w.get_ref(), 0x40_0000, data.len());
    assert!(rebuilt == data, "memory rebuilt from the frames differs");
}

/// Pages taken from guest memory (checked where they are, sent from there) give exactly the
/// frames `add` gives from a buffer, for every mix of zero and data pages, through the in-memory
/// writer (which copies them out) and through a real socket (`writev` from guest memory).
#[test]
fn pages_from_guest_memory_match_pages_added_from_a_buffer() {
    let patterns: [&[bool]; 7] = [
        &[true; 8],
        &[false; 8],
        &[true, false, true, false, true, false, true, false],
        &[false, true, false, true, false, true, false, true],
        &[false, false, true, true, true, false, false, false],
        &[true, true, true, false, true, true, true, true],
        &[false, true, true, true, true, true, true, false],
    ];
    let base = 0x10_0000u64;
    for (k, zero) in patterns.iter().enumerate() {
        let mut data = vec![0u8; zero.len() * PAGE];
        for (i, p) in data.chunks_mut(PAGE).enumerate() {
            if !zero[i] {
                p.fill((i + 1) as u8);
                p[PAGE - 1] = 0xee;
            }
        }
        let memory = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(base), 3 * data.len())]).unwrap(),
        );
        let (mut wa, mut wb) = (writer(), writer());
        let mut a = MemoryFrameBuilder::new();
        let mut b = MemoryFrameBuilder::with_memory(memory.clone());
        let (tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut ws = FrameWriter::new(Stream::Unix(tx));
        let mut c = MemoryFrameBuilder::with_memory(memory.clone());
        for chunk in 0..3u64 {
            let gpa = base + chunk * (data.len() as u64);
            memory.write_slice(&data, GuestAddress(gpa)).unwrap();
            a.add(&mut wa, gpa, &data).unwrap();
            b.add_guest(&mut wb, gpa, zero.len()).unwrap();
            c.add_guest(&mut ws, gpa, zero.len()).unwrap();
        }
        a.flush(&mut wa).unwrap();
        b.flush(&mut wb).unwrap();
        c.flush(&mut ws).unwrap();
        drop(ws);
        let mut from_socket = Vec::new();
        std::io::Read::read_to_end(&mut &rx, &mut from_socket).unwrap();
        assert_eq!(wa.get_ref(), wb.get_ref(), "pattern {k}");
        assert_eq!(wa.get_ref(), &from_socket, "pattern {k} through a socket");
        assert_eq!((a.data_pages, a.zero_pages), (b.data_pages, b.zero_pages));
    }
    // Far more than a socket holds, read as it comes: the writes stop part way through a page
    // (or a run header) and carry on from there.
    let pages = 3 * MEMORY_FRAME_TARGET / PAGE + 11;
    let mut data = vec![0u8; pages * PAGE];
    for (i, p) in data.chunks_mut(PAGE).enumerate() {
        if i % 5 != 2 {
            p.fill((i % 253) as u8 + 1);
            p[i % PAGE] = 0x5a;
        }
    }
    let memory =
        Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(base), data.len())]).unwrap());
    memory.write_slice(&data, GuestAddress(base)).unwrap();
    let mut wa = writer();
    let mut a = MemoryFrameBuilder::new();
    a.add(&mut wa, base, &data).unwrap();
    a.flush(&mut wa).unwrap();
    let (tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut &rx, &mut got).unwrap();
        got
    });
    let mut ws = FrameWriter::new(Stream::Unix(tx));
    let mut c = MemoryFrameBuilder::with_memory(memory);
    let mut at = 0;
    while at < pages {
        let n = (pages - at).min(300);
        c.add_guest(&mut ws, base + (at * PAGE) as u64, n).unwrap();
        at += n;
    }
    c.flush(&mut ws).unwrap();
    drop(ws);
    let got = reader.join().unwrap();
    // Frames are cut in other places than `add` cuts them: compare the memory they rebuild.
    assert_eq!(rebuild(&got, base, data.len()), data, "through a socket");
    assert_eq!(rebuild(wa.get_ref(), base, data.len()), data);
    assert_eq!((a.data_pages, a.zero_pages), (c.data_pages, c.zero_pages));

    // Outside guest memory, unaligned, oversized, or with no memory given: refused, nothing
    // left behind.
    let memory =
        Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(base), 4 * PAGE)]).unwrap());
    let mut w = writer();
    let mut b = MemoryFrameBuilder::with_memory(memory);
    assert!(
        b.add_guest(&mut w, base + 3 * PAGE_SIZE, 2).is_err(),
        "past the end"
    );
    assert!(b.add_guest(&mut w, 0, 1).is_err(), "outside");
    assert!(b.add_guest(&mut w, base + 1, 1).is_err(), "unaligned");
    assert!(b
        .add_guest(&mut w, base, MEMORY_FRAME_TARGET / PAGE + 1)
        .is_err());
    b.flush(&mut w).unwrap();
    assert_eq!(w.frames(), 0);
    let e = MemoryFrameBuilder::new()
        .add_guest(&mut w, base, 1)
        .unwrap_err();
    assert!(e.to_string().contains("no guest memory"), "{e}");
}

/// The memory `[base, base + len)` as the `Memory` frames in `bytes` write it (0xff where
/// they write nothing).
fn rebuild(bytes: &[u8], base: u64, len: usize) -> Vec<u8> {
    let mut r = FrameReader::new(Cursor::new(bytes));
    let mut out = vec![0xffu8; len];
    while let Some(f) = r.next_frame().unwrap() {
        assert!(f.payload.len() as u64 <= MAX_MEMORY_PAYLOAD);
        let Message::Memory(runs) = Message::decode(&f).unwrap() else {
            panic!("not a Memory frame");
        };
        for run in runs {
            let off = (run.gpa - base) as usize;
            let dst = &mut out[off..off + run.len as usize];
            match run.data {
                RunData::Bytes(b) => dst.copy_from_slice(b),
                RunData::Zero => dst.fill(0),
            }
        }
    }
    out
}

/// Pages known zero without reading them become zero runs of at most `MAX_ZERO_RUN` bytes,
/// which decode back to exactly the range given, between data runs.
#[test]
fn unread_zero_ranges_become_bounded_zero_runs() {
    let mut w = writer();
    let mut b = MemoryFrameBuilder::new();
    let page = vec![7u8; PAGE];
    b.add(&mut w, 0, &page).unwrap();
    // 5 GiB of never-populated RAM: three runs (2 + 2 + 1 GiB).
    let pages = (5u64 << 30) / PAGE_SIZE;
    b.add_zero(&mut w, PAGE_SIZE, pages).unwrap();
    b.add(&mut w, PAGE_SIZE * (pages + 1), &page).unwrap();
    b.flush(&mut w).unwrap();
    assert_eq!(b.zero_pages, pages);
    assert_eq!(b.data_pages, 2);
    assert!(b.add_zero(&mut w, 17, 1).is_err(), "unaligned");
    let bytes = w.get_ref().clone();
    let f = read_one(&bytes).unwrap().unwrap();
    let Message::Memory(runs) = Message::decode(&f).unwrap() else {
        panic!("not a Memory frame");
    };
    let shape: Vec<(u64, u64, bool)> = runs
        .iter()
        .map(|r| (r.gpa, r.len, matches!(r.data, RunData::Zero)))
        .collect();
    assert_eq!(
        shape,
        vec![
            (0, PAGE_SIZE, false),
            (PAGE_SIZE, MAX_ZERO_RUN, true),
            (PAGE_SIZE + MAX_ZERO_RUN, MAX_ZERO_RUN, true),
            (PAGE_SIZE + 2 * MAX_ZERO_RUN, 1 << 30, true),
            ((pages + 1) * PAGE_SIZE, PAGE_SIZE, false),
        ]
    );
}

#[test]
fn truncated_header_and_payload_are_errors_naming_the_frame() {
    let full = good_stream();
    let e = read_one(&full[..7]).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Truncated {
                expected: 16,
                got: 7,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("frame header"), "{e}");

    let mut w = writer();
    w.send(FrameKind::State, &[b'{'; 100]).unwrap();
    let b = w.get_ref();
    let e = read_one(&b[..HEADER_LEN + 40]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "truncated State frame payload: 40 of 100 bytes before the stream ended"
    );
    // A clean end between frames is not an error for the reader...
    assert!(read_one(&[]).unwrap().is_none());
    // ...but is for a receiver that has not finished.
    let cut = full.len() - HEADER_LEN; // drop the Complete frame
    let (res, rx, _) = feed(&full[..cut], FakeDest::default());
    let e = res.unwrap_err();
    assert_eq!(
        e.to_string(),
        "the peer closed the connection while waiting for Complete"
    );
    assert!(!rx.destination().completed);
}

#[test]
fn oversized_lengths_are_refused_before_allocating() {
    for (kind, len) in [
        (FrameKind::Memory, u64::MAX),
        (FrameKind::Memory, MAX_MEMORY_PAYLOAD + 1),
        (FrameKind::Complete, 1),
        (FrameKind::Ack, 3),
        (FrameKind::Start, 9),
        (FrameKind::Config, (1 << 20) + 1),
    ] {
        let e = read_one(&header(VERSION, kind as u16, len)).unwrap_err();
        match &e {
            ProtocolError::Oversized {
                kind: k, length, ..
            } => {
                assert_eq!((*k, *length), (kind, len));
            }
            other => panic!("{kind}: expected Oversized, got {other}"),
        }
        assert!(
            e.to_string().starts_with(&format!("{kind} frame: length:")),
            "{e}"
        );
    }
    // The writer refuses too.
    let mut w = writer();
    assert!(matches!(
        w.send(FrameKind::Ack, &[0; 3]),
        Err(ProtocolError::Oversized { .. })
    ));
    assert!(w.get_ref().is_empty());
}

#[test]
fn bad_magic_unknown_kind_and_wrong_version() {
    let mut h = header(VERSION, 1, 8);
    h[0] = b'X';
    let e = read_one(&h).unwrap_err();
    assert!(matches!(e, ProtocolError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("bad magic"), "{e}");

    let e = read_one(&header(VERSION, 99, 0)).unwrap_err();
    assert_eq!(e.to_string(), "frame header: kind: unknown frame kind 99");

    let mut bytes = header(2, FrameKind::Start as u16, 8);
    bytes.extend_from_slice(&[0, 16, 0, 0, 0, 0, 0, 0]);
    let (res, rx, back) = feed(&bytes, FakeDest::default());
    let e = res.unwrap_err();
    assert_eq!(
        e.to_string(),
        "Start frame: version: the peer speaks migration protocol version 2, this build speaks \
         only version 1"
    );
    assert_eq!(rx.stage(), Stage::Failed);
    // The source is told why, in an Error frame.
    let back = replies(&back);
    assert_eq!(back.len(), 1);
    assert_eq!(
        Message::decode(&back[0]).unwrap(),
        Message::Error(e.to_string())
    );
}

#[test]
fn bad_payloads_name_the_field() {
    let cases: Vec<(FrameKind, Vec<u8>, &str)> = vec![
        (
            FrameKind::Start,
            vec![0, 2, 0, 0, 0, 0, 0, 0],
            "Start frame: page_size:",
        ),
        (
            FrameKind::Start,
            vec![0, 16, 0, 0, 1, 0, 0, 0],
            "Start frame: reserved:",
        ),
        (
            FrameKind::Start,
            vec![0, 16, 0, 0],
            "Start frame: length: 4 bytes",
        ),
        (
            FrameKind::Memory,
            run(0x1001, 4096, 0, &[0; PAGE]),
            "Memory frame: gpa: run 0:",
        ),
        (
            FrameKind::Memory,
            run(0x1000, 100, 0, &[0; 100]),
            "Memory frame: len: run 0:",
        ),
        (
            FrameKind::Memory,
            run(0x1000, 0, RUN_ZERO, &[]),
            "Memory frame: len: run 0:",
        ),
        (
            FrameKind::Memory,
            run(0x1000, 4096, 6, &[]),
            "Memory frame: flags: run 0:",
        ),
        (
            FrameKind::Memory,
            run(0x1000, 8192, 0, &[0; PAGE]),
            "Memory frame: data: run 0:",
        ),
        (
            FrameKind::Memory,
            run(u64::MAX - 4095, 8192, RUN_ZERO, &[]),
            "Memory frame: len: run 0:",
        ),
        (
            FrameKind::Memory,
            [run(0, 4096, RUN_ZERO, &[]), vec![1, 2, 3]].concat(),
            "Memory frame: run header: run 1:",
        ),
        (
            FrameKind::Ack,
            vec![42, 0],
            "Ack frame: kind: unknown frame kind 42",
        ),
        (
            FrameKind::Error,
            vec![0xff, 0xfe],
            "Error frame: reason: not UTF-8",
        ),
        (FrameKind::Config, vec![], "Config frame: config: empty"),
    ];
    for (kind, payload, want) in cases {
        let f = Frame { kind, payload };
        let e = Message::decode(&f).unwrap_err();
        assert!(
            e.to_string().starts_with(want),
            "{kind}: `{e}` does not start with `{want}`"
        );
        assert!(matches!(e, ProtocolError::BadPayload { .. }));
    }
    assert_eq!(RUN_HEADER_LEN, 16);
}

#[test]
fn a_whole_conversation_fills_memory_and_acknowledges() {
    let (res, rx, back) = feed(&good_stream(), FakeDest::default());
    res.unwrap();
    assert_eq!(rx.stage(), Stage::Done);
    assert_eq!(rx.data_pages, 3);
    assert_eq!(rx.zero_pages, 2);
    let d = rx.destination();
    assert!(d.completed);
    assert_eq!(d.state.as_deref(), Some(r#"{"version":1}"#));
    assert!(d.config.as_deref().unwrap().contains("tsc_khz"));
    // Page 0 was never sent: still the destination's fill.
    assert!(d.low[..PAGE].iter().all(|b| *b == 0xee));
    assert!(d.low[PAGE..2 * PAGE].iter().all(|b| *b == 0x11));
    assert!(d.low[2 * PAGE..4 * PAGE].iter().all(|b| *b == 0));
    assert!(d.low[4 * PAGE..5 * PAGE].iter().all(|b| *b == 0x33));
    assert!(d.high[2 * PAGE..3 * PAGE].iter().all(|b| *b == 0x44));
    assert!(d.high[3 * PAGE..].iter().all(|b| *b == 0xee));
    let acks: Vec<_> = replies(&back)
        .iter()
        .map(|f| Message::decode(f).unwrap())
        .map(|m| match m {
            Message::Ack(k) => k,
            other => panic!("expected only acks, got {other:?}"),
        })
        .collect();
    assert_eq!(
        acks,
        vec![
            FrameKind::Start,
            FrameKind::Config,
            FrameKind::State,
            FrameKind::Complete
        ]
    );
}

fn memory_stream(runs: &[Vec<u8>]) -> Vec<u8> {
    let mut w = writer();
    w.start().unwrap();
    w.send(FrameKind::Config, b"{}").unwrap();
    w.send(FrameKind::Memory, &runs.concat()).unwrap();
    w.get_ref().clone()
}

#[test]
fn memory_outside_ram_is_refused_before_any_write() {
    let cases = [
        // Beyond the end of the high range.
        (HIGH.gpa + HIGH.len, PAGE_SIZE),
        // In the hole between the ranges.
        (LOW.len, PAGE_SIZE),
        // Straddling the end of the low range.
        (LOW.len - PAGE_SIZE, 2 * PAGE_SIZE),
        // Far away.
        (1 << 40, PAGE_SIZE),
    ];
    for (gpa, len) in cases {
        // A valid run first: it must not be written either.
        let bytes = memory_stream(&[
            run(0, 4096, 0, &[0x55; PAGE]),
            run(gpa, len as u32, RUN_ZERO, &[]),
        ]);
        let (res, rx, back) = feed(&bytes, FakeDest::default());
        let e = res.unwrap_err();
        assert!(
            matches!(e, ProtocolError::OutsideRam { gpa: g, len: l, .. } if g == gpa && l == len),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "Memory frame: run {gpa:#x}+{len:#x} is outside guest RAM (0x0..0x10000, \
                 0x100000..0x108000)"
            )
        );
        assert!(rx.destination().low[..PAGE].iter().all(|b| *b == 0xee));
        let back = replies(&back);
        assert_eq!(
            Message::decode(back.last().unwrap()).unwrap(),
            Message::Error(e.to_string())
        );
    }
}

#[test]
fn frames_out_of_order_are_refused() {
    let mut config_first = writer();
    config_first.send(FrameKind::Config, b"{}").unwrap();
    let mut memory_before_config = writer();
    memory_before_config.start().unwrap();
    memory_before_config
        .send(FrameKind::Memory, &run(0, 4096, RUN_ZERO, &[]))
        .unwrap();
    let mut complete_before_state = writer();
    complete_before_state.start().unwrap();
    complete_before_state
        .send(FrameKind::Config, b"{}")
        .unwrap();
    complete_before_state
        .send(FrameKind::Complete, &[])
        .unwrap();
    let mut two_starts = writer();
    two_starts.start().unwrap();
    two_starts.start().unwrap();
    let mut memory_after_state = writer();
    memory_after_state.start().unwrap();
    memory_after_state.send(FrameKind::Config, b"{}").unwrap();
    memory_after_state.send(FrameKind::State, b"{}").unwrap();
    memory_after_state
        .send(FrameKind::Memory, &run(0, 4096, RUN_ZERO, &[]))
        .unwrap();
    let mut ack_from_source = writer();
    ack_from_source.ack(FrameKind::Start).unwrap();
    let cases = [
        (config_first, "Config frame out of order: expected Start"),
        (
            memory_before_config,
            "Memory frame out of order: expected Config",
        ),
        (
            complete_before_state,
            "Complete frame out of order: expected Memory or State",
        ),
        (two_starts, "Start frame out of order: expected Config"),
        (
            memory_after_state,
            "Memory frame out of order: expected Complete",
        ),
        (ack_from_source, "Ack frame out of order: expected Start"),
    ];
    for (w, want) in cases {
        let (res, rx, _) = feed(w.get_ref(), FakeDest::default());
        assert_eq!(res.unwrap_err().to_string(), want);
        assert_eq!(rx.stage(), Stage::Failed);
        assert!(!rx.destination().completed);
    }
}

#[test]
fn abandon_and_destination_refusal() {
    let mut w = writer();
    w.start().unwrap();
    w.send(FrameKind::Config, b"{}").unwrap();
    w.reason(FrameKind::Abandon, "source VM shut down").unwrap();
    let (res, rx, back) = feed(w.get_ref(), FakeDest::default());
    assert_eq!(
        res.unwrap_err().to_string(),
        "the source abandoned the migration: source VM shut down"
    );
    assert_eq!(rx.stage(), Stage::Failed);
    // No Error frame answers an Abandon: just the two acks.
    assert_eq!(replies(&back).len(), 2);

    let dest = FakeDest {
        refuse_config: true,
        ..FakeDest::default()
    };
    let (res, _, back) = feed(&good_stream(), dest);
    let e = res.unwrap_err();
    assert_eq!(
        e.to_string(),
        "Config frame: tsc_khz: 1000 kHz cannot be run on this host"
    );
    // The source sees the refusal as the answer to Config.
    let mut r = FrameReader::new(Cursor::new(&back));
    expect_ack(&mut r, FrameKind::Start).unwrap();
    let e2 = expect_ack(&mut r, FrameKind::Config).unwrap_err();
    assert_eq!(e2.to_string(), format!("the destination failed: {e}"));
}

/// A deterministic xorshift generator for the mutation test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn mutated_streams_never_panic_and_never_complete_wrongly() {
    let good = good_stream();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut failures = 0;
    for _ in 0..3000 {
        let mut b = good.clone();
        match rng.next() % 3 {
            0 => {
                let n = (rng.next() % 4 + 1) as usize;
                for _ in 0..n {
                    let i = (rng.next() as usize) % b.len();
                    b[i] ^= 1 << (rng.next() % 8);
                }
            }
            1 => {
                let cut = (rng.next() as usize) % b.len();
                b.truncate(cut);
            }
            _ => {
                let i = (rng.next() as usize) % b.len();
                let v = rng.next().to_le_bytes();
                let end = (i + 8).min(b.len());
                b[i..end].copy_from_slice(&v[..end - i]);
            }
        }
        let (res, rx, _) = feed(&b, FakeDest::default());
        match res {
            Ok(()) => assert!(rx.destination().completed),
            Err(_) => {
                failures += 1;
                assert_ne!(rx.stage(), Stage::Done);
            }
        }
    }
    // Most mutations must be caught (payload bytes of memory/config may change harmlessly).
    assert!(failures > 1000, "only {failures} of 3000 mutations refused");
}

/// Run a receiver on `listener` in a thread; the source side drives it here.
fn conversation_over(ep: Endpoint, listener: Listener) {
    let server = std::thread::spawn(move || {
        let s = listener.accept().unwrap();
        let mut r = FrameReader::new(s.try_clone().unwrap());
        let mut w = FrameWriter::new(s);
        let mut rx = Receiver::new(FakeDest::default());
        let res = receive_reading_ahead(&mut r, &mut w, &mut rx);
        (res.map_err(|e| e.to_string()), rx.into_destination())
    });
    let s = Stream::connect(&ep).unwrap();
    let mut r = FrameReader::new(s.try_clone().unwrap());
    let mut w = FrameWriter::new(s);
    w.start().unwrap();
    expect_ack(&mut r, FrameKind::Start).unwrap();
    w.send(FrameKind::Config, b"{}").unwrap();
    expect_ack(&mut r, FrameKind::Config).unwrap();
    let mut b = MemoryFrameBuilder::new();
    b.add(&mut w, HIGH.gpa, &vec![0x77; HIGH.len as usize])
        .unwrap();
    b.flush(&mut w).unwrap();
    w.send(FrameKind::State, b"{}").unwrap();
    expect_ack(&mut r, FrameKind::State).unwrap();
    w.send(FrameKind::Complete, &[]).unwrap();
    expect_ack(&mut r, FrameKind::Complete).unwrap();
    let (res, dest) = server.join().unwrap();
    res.unwrap();
    assert!(dest.completed);
    assert!(dest.high.iter().all(|b| *b == 0x77));
}

#[test]
fn unix_transport_carries_a_conversation() {
    let dir = std::env::temp_dir().join(format!("hg-mig-proto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rx.sock");
    let ep = Endpoint::Unix(path.clone());
    assert_eq!(ep.to_string(), format!("unix:{}", path.display()));
    {
        // A second listener on a live path is refused (its probe connection is queued on the
        // first listener, which is why this one is not used for the conversation).
        let _l = Listener::bind(&ep).unwrap();
        let e = Listener::bind(&ep).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    }
    // A plain file at the path is refused, not deleted.
    std::fs::write(&path, b"not a socket").unwrap();
    let e = Listener::bind(&ep).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    std::fs::remove_file(&path).unwrap();
    let l = Listener::bind(&ep).unwrap();
    conversation_over(ep, l);
    // The listener removed its socket file.
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tcp_transport_carries_a_conversation() {
    let l = Listener::bind(&Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port: 0,
    })
    .unwrap();
    let port = l.tcp_port().unwrap();
    assert_ne!(port, 0);
    conversation_over(
        Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        l,
    );
}

#[test]
fn connect_to_nobody_is_an_error() {
    let dir = std::env::temp_dir().join(format!("hg-mig-none-{}", std::process::id()));
    let e = Stream::connect(&Endpoint::Unix(dir.join("absent.sock"))).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn config_frames_are_decoded_with_errors_naming_the_field() {
    use vmm::migration::decode_config_frame;
    let good = serde_json::json!({
        "version": 1,
        "tsc_khz": 2_000_000,
        "config": {
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "memory": {"size": 64 << 20},
            "kernel": null,
            "serial": "off",
            "clock_policy": "wallclock",
            "dirty_mib": 4
        }
    });
    let (c, khz) = decode_config_frame(good.to_string().as_bytes()).unwrap();
    assert_eq!(khz, 2_000_000);
    assert_eq!(c.cpus.boot_vcpus, 2);
    assert_eq!(c.memory.size, 64 << 20);
    assert_eq!(c.dirty_mib, 4);

    let with = |k: &str, v: serde_json::Value| {
        let mut j = good.clone();
        j[k] = v;
        decode_config_frame(j.to_string().as_bytes()).unwrap_err()
    };
    let e = with("version", 2.into());
    assert!(e.starts_with("version: 2 is not"), "{e}");
    let e = with("tsc_khz", 0.into());
    assert!(e.starts_with("tsc_khz: 0"), "{e}");
    let e = with("extra", 1.into());
    assert!(e.contains("unknown field `extra`"), "{e}");
    let mut j = good.clone();
    j["config"]["cpus"] = serde_json::json!("many");
    let e = decode_config_frame(j.to_string().as_bytes()).unwrap_err();
    assert!(e.starts_with("config: config.json: cpus:"), "{e}");
    let e = decode_config_frame(b"not json").unwrap_err();
    assert!(!e.is_empty());
}

/// The memory stage reads ahead on a second thread. A frame refused in the middle of a stream
/// that goes on must end the receiver with that frame's error (not a hang waiting for the
/// reading thread, not a later frame's error), leave the frames after it unwritten, and tell the
/// source why, also a source that waits for that answer without sending `State`.
#[test]
fn a_refused_frame_mid_stream_ends_the_read_ahead_receiver() {
    let (src, dst) = std::os::unix::net::UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let mut r = FrameReader::new(dst.try_clone().unwrap());
        let mut w = FrameWriter::new(dst);
        let mut rx = Receiver::new(FakeDest::default());
        let res = receive_reading_ahead(&mut r, &mut w, &mut rx);
        (res, rx.into_destination())
    });
    let mut r = FrameReader::new(src.try_clone().unwrap());
    let mut w = FrameWriter::new(src);
    w.start().unwrap();
    expect_ack(&mut r, FrameKind::Start).unwrap();
    w.send(FrameKind::Config, b"{}").unwrap();
    expect_ack(&mut r, FrameKind::Config).unwrap();
    // Frame i writes page i of the low range with byte i + 1; frame 3 is outside RAM; the
    // stream goes on with 200 frames of 8 KiB (more than the socket holds, so the source is
    // still writing when the receiver gives up).
    let mut sent = 0;
    let mut write_failed = false;
    for i in 0..203u64 {
        let payload = match i {
            0..=2 => run(i * PAGE_SIZE, PAGE as u32, 0, &[i as u8 + 1; PAGE]),
            3 => run(LOW.len, PAGE as u32, RUN_ZERO, &[]),
            // Page 15 would be written, pages 0..=2 zeroed, if a frame after the refused one
            // were handled.
            _ => {
                let mut p = run(15 * PAGE_SIZE, PAGE as u32, 0, &[0xab; PAGE]);
                for k in 0..255 {
                    p.extend(run((k % 16) * PAGE_SIZE, PAGE as u32, RUN_ZERO, &[]));
                }
                p
            }
        };
        if w.send(FrameKind::Memory, &payload).is_err() {
            write_failed = true;
            break;
        }
        sent += 1;
    }
    // No State: a source that waits for the answer here must get it (a receiver that read on
    // after the refusal would wait for frames that never come).
    r.get_ref()
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let answer = r
        .next_frame()
        .expect("an answer within 20 s")
        .expect("an Error frame");
    let (res, dest) = server.join().unwrap();
    let e = res.unwrap_err();
    assert!(
        matches!(e, ProtocolError::OutsideRam { gpa, .. } if gpa == LOW.len),
        "{e}"
    );
    for i in 0..3 {
        let page = &dest.low[i * PAGE..(i + 1) * PAGE];
        assert!(page.iter().all(|b| *b == i as u8 + 1), "page {i}");
    }
    assert!(
        dest.low[15 * PAGE..].iter().all(|b| *b == 0xee),
        "a frame after the refused one was written"
    );
    assert!(dest.state.is_none());
    // The source hears why.
    assert_eq!(
        Message::decode(&answer).unwrap(),
        Message::Error(e.to_string())
    );
    // Printed so a run shows how far the source got before the receiver's end reached it.
    println!("source wrote {sent} memory frames; a later write failed: {write_failed}");
}
