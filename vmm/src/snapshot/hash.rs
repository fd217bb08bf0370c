//! `hg64`: the snapshot's fast 64-bit checksum (not cryptographic).
//!
//! Four independent lanes each take one little-endian 64-bit word per 32-byte block:
//! `lane = rotl((lane ^ word) * P1, 31)`. Every step is a bijection of the lane for a fixed word
//! and of the word for a fixed lane, and the final combination is a chain of bijections, so a
//! change confined to one 8-byte word (any single corrupted byte) always changes the checksum.
//! The lanes are independent, so the loop runs at several bytes per cycle.
//!
//! Guest memory is hashed page by page: only pages that are not all zero contribute, each one
//! preceded by its page index ([`Hasher64::page`]). The checksum is then a property of the
//! logical content, whatever holes the file system keeps, and the holes need not be read.

/// First multiplier (odd, from xxHash64).
const P1: u64 = 0x9E37_79B1_85EB_CA87;
/// Second multiplier (odd, from xxHash64).
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
/// Name recorded in `checksums.json`.
pub const ALGORITHM: &str = "hg64";
/// Guest page size used for sparse writing and hashing.
pub const PAGE: usize = 4096;

#[inline(always)]
fn round(lane: u64, word: u64) -> u64 {
    (lane ^ word).wrapping_mul(P1).rotate_left(31)
}

#[inline(always)]
fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

/// A streaming `hg64` hasher.
#[derive(Clone, Debug)]
pub struct Hasher64 {
    lanes: [u64; 4],
    tail: [u8; 32],
    tail_len: usize,
    len: u64,
}

impl Default for Hasher64 {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher64 {
    /// A hasher with the fixed seed.
    pub fn new() -> Self {
        Self {
            lanes: [P1, P2, P1 ^ P2, P1.wrapping_add(P2)],
            tail: [0; 32],
            tail_len: 0,
            len: 0,
        }
    }

    #[inline(always)]
    fn blocks(&mut self, data: &[u8]) {
        let [mut a, mut b, mut c, mut d] = self.lanes;
        for blk in data.chunks_exact(32) {
            a = round(a, word(&blk[0..]));
            b = round(b, word(&blk[8..]));
            c = round(c, word(&blk[16..]));
            d = round(d, word(&blk[24..]));
        }
        self.lanes = [a, b, c, d];
    }

    /// Feed bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len = self.len.wrapping_add(data.len() as u64);
        if self.tail_len > 0 {
            let take = (32 - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len < 32 {
                return;
            }
            let t = self.tail;
            self.blocks(&t);
            self.tail_len = 0;
        }
        let whole = data.len() / 32 * 32;
        self.blocks(&data[..whole]);
        let rest = &data[whole..];
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    /// Feed one guest page (or any block) that starts at page index `index`, prefixed by the
    /// index so that moving a page changes the checksum.
    pub fn page(&mut self, index: u64, data: &[u8]) {
        let mut hdr = [0u8; 32];
        hdr[..8].copy_from_slice(&index.to_le_bytes());
        hdr[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        self.update(&hdr);
        self.update(data);
    }

    /// The checksum.
    pub fn finish(&self) -> u64 {
        let mut h = self.len.wrapping_mul(P2);
        // The tail, zero-padded, as one more block (its length is already in `len`).
        let mut lanes = self.lanes;
        if self.tail_len > 0 {
            let mut t = [0u8; 32];
            t[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            for (i, l) in lanes.iter_mut().enumerate() {
                *l = round(*l, word(&t[i * 8..]));
            }
        }
        for l in lanes {
            h = (h ^ round(0, l)).wrapping_mul(P1).rotate_left(27);
        }
        // xxHash64's avalanche (a bijection).
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(0x1656_67B1_9E37_79F9);
        h ^= h >> 32;
        h
    }
}

/// `hg64` of a byte string.
pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut h = Hasher64::new();
    h.update(data);
    h.finish()
}

/// A page of zeros to compare with.
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Whether `data` is all zero. Compares with a zero page, which the standard library does
/// with an optimised `memcmp` (fast even in debug builds).
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(PAGE).all(|c| c == &ZERO_PAGE[..c.len()])
}

/// Format a checksum as `checksums.json` stores it (16 lowercase hex digits).
pub fn to_hex(h: u64) -> String {
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let whole = hash_bytes(&data);
        for split in [0, 1, 7, 31, 32, 33, 500, 999, 1000] {
            let mut h = Hasher64::new();
            h.update(&data[..split]);
            h.update(&data[split..]);
            assert_eq!(h.finish(), whole, "split at {split}");
        }
    }

    #[test]
    fn every_single_byte_change_is_seen() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 31) as u8).collect();
        let base = hash_bytes(&data);
        for i in 0..data.len() {
            for flip in [1u8, 0x80, 0xff] {
                let mut d = data.clone();
                d[i] ^= flip;
                assert_ne!(hash_bytes(&d), base, "byte {i} ^ {flip:#x}");
            }
        }
        // Length matters even for zero padding.
        assert_ne!(hash_bytes(&[0u8; 5]), hash_bytes(&[0u8; 6]));
        assert_ne!(hash_bytes(b""), hash_bytes(&[0u8]));
    }

    #[test]
    fn page_index_matters() {
        let p = vec![1u8; PAGE];
        let mut a = Hasher64::new();
        a.page(1, &p);
        let mut b = Hasher64::new();
        b.page(2, &p);
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE + 3];
        assert!(is_zero(&p));
        for i in [0, 63, 64, PAGE - 1, PAGE + 2] {
            p[i] = 1;
            assert!(!is_zero(&p), "{i}");
            p[i] = 0;
        }
        assert_eq!(to_hex(0xab), "00000000000000ab");
    }
}
