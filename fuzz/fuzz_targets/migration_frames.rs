//! Migration frames: arbitrary bytes fed to the destination's decoder and state machine
//! (start -> config -> memory* -> state -> complete), as a source socket would deliver them.
//! Nothing may panic; no memory write may land outside the RAM layout; a conversation that
//! succeeds must have gone through every stage.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use vmm::migration::{
    receive, Destination, FrameReader, FrameWriter, RamRange, Receiver, RunData, Stage,
};

/// Two RAM ranges with a hole, like the real layout below and above the 32-bit gap.
const RAM: [RamRange; 2] = [
    RamRange {
        gpa: 0,
        len: 64 << 10,
    },
    RamRange {
        gpa: 1 << 20,
        len: 32 << 10,
    },
];

#[derive(Default)]
struct FuzzDest {
    ram: [Vec<u8>; 2],
    stages: Vec<&'static str>,
    config: Option<vmm::config::VmConfig>,
}

impl Destination for FuzzDest {
    fn config(&mut self, json: &[u8]) -> Result<Vec<RamRange>, String> {
        // The real decoder of the payload must not panic either; whatever it says, the
        // conversation goes on with a fixed layout so that later frames are reached.
        self.config = vmm::migration::decode_config_frame(json)
            .ok()
            .map(|(c, _)| c);
        if json.first() == Some(&b'!') {
            return Err("refused".into());
        }
        self.ram = [vec![0; RAM[0].len as usize], vec![0; RAM[1].len as usize]];
        self.stages.push("config");
        Ok(RAM.to_vec())
    }
    fn memory(&mut self, gpa: u64, len: u64, data: RunData<'_>) -> Result<(), String> {
        let i = RAM
            .iter()
            .position(|r| r.contains(gpa, len))
            .expect("the receiver checked the run against the layout");
        let off = (gpa - RAM[i].gpa) as usize;
        let dst = &mut self.ram[i][off..off + len as usize];
        match data {
            RunData::Bytes(b) => dst.copy_from_slice(b),
            RunData::Zero => dst.fill(0),
        }
        Ok(())
    }
    fn state(&mut self, json: &[u8]) -> Result<(), String> {
        if let Some(c) = &self.config {
            let _ = vmm::snapshot::decode_state(json, c);
        }
        self.stages.push("state");
        Ok(())
    }
    fn complete(&mut self) -> Result<(), String> {
        self.stages.push("complete");
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut reader = FrameReader::new(Cursor::new(data));
    let mut writer = FrameWriter::new(Vec::new());
    let mut rx = Receiver::new(FuzzDest::default());
    let res = receive(&mut reader, &mut writer, &mut rx);
    match res {
        Ok(()) => {
            assert_eq!(rx.stage(), Stage::Done);
            assert_eq!(
                rx.destination().stages,
                ["config", "state", "complete"],
                "a completed migration went through every stage once"
            );
        }
        Err(e) => {
            assert_eq!(rx.stage(), Stage::Failed);
            // Every error renders (names the frame or field).
            assert!(!e.to_string().is_empty());
        }
    }
    // What the receiver wrote back is itself a valid frame stream.
    let back = writer.get_ref().clone();
    let mut r = FrameReader::new(Cursor::new(back));
    while let Some(f) = r.next_frame().expect("replies decode") {
        vmm::migration::Message::decode(&f).expect("replies decode");
    }
});
