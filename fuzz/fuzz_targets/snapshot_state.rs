//! A snapshot's `config.json` + `state.json` as a whole (what `hourglass --restore` and
//! `vm.restore` decode first): any bytes become a decoded state or an error naming the file and
//! field, never a panic; a decoded state re-encodes and decodes to the same state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::{decode_checksums, decode_json, encode_state};

fuzz_target!(|data: &[u8]| {
    // Layout: 2 bytes little-endian length of config.json, config.json, then state.json.
    if data.len() < 2 {
        return;
    }
    let n = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (config, state) = data[2..].split_at(n);
    let _ = decode_checksums(state);
    if let Ok((cfg, st, _layout)) = decode_json(config, state) {
        let again = encode_state(&cfg, &st).expect("a decoded state re-encodes");
        let (_, st2, _) = decode_json(config, &again).expect("a re-encoded state decodes");
        assert_eq!(
            encode_state(&cfg, &st2).expect("encodes"),
            again,
            "state changed through a round trip"
        );
    }
});
