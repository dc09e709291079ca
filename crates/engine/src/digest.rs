//! Digests for integrity checks and identities. They detect corruption and tell files apart;
//! they are no defence against a forger (a snapshot's values are validated on load regardless).
//!
//! - [`Xxh`]: XXH3-64 (the `xxhash-rust` crate, a standard, specified hash running at memory
//!   speed), fed length-prefixed fields and little-endian words. Snapshot format version 5's
//!   checksum and the [`crate::identity`] digests.
//! - [`Fnv`] (64-bit FNV-1a fed a word at a time) and [`Lanes`] (8 FNV-style lanes over 64-byte
//!   blocks): what snapshot versions 2 to 4 were written with, kept only to read those files.

use xxhash_rust::xxh3::Xxh3;

/// XXH3-64 over a sequence of fields: [`Xxh::bytes`] writes a length prefix (so that field
/// boundaries count), [`Xxh::word`] a little-endian `u64`, [`Xxh::raw`] bytes as they are (a
/// long field fed in pieces after its length).
pub(crate) struct Xxh(Xxh3);

impl Xxh {
    pub(crate) fn new() -> Self {
        Self(Xxh3::new())
    }
    pub(crate) fn word(&mut self, w: u64) {
        self.0.update(&w.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.word(b.len() as u64);
        self.0.update(b);
    }
    pub(crate) fn raw(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    pub(crate) fn finish(&self) -> u64 {
        self.0.digest()
    }
}

const FNV_OFFSET: u64 = 0xcbf29ce484222325;
const FNV_PRIME: u64 = 0x100000001b3;

/// (Versions 2 to 4.) 64-bit FNV-1a, fed 8 bytes at a time (every step is a bijection of the running hash, so a
/// changed word always changes the result). Not cryptographic: it detects corruption only.
pub(crate) struct Fnv(pub(crate) u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Self(FNV_OFFSET)
    }
    pub(crate) fn word(&mut self, w: u64) {
        self.0 ^= w;
        self.0 = self.0.wrapping_mul(FNV_PRIME);
    }
    /// Length-prefixed, so that field boundaries count.
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.word(b.len() as u64);
        let mut words = b.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes([
                w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7],
            ]));
        }
        let mut last = [0u8; 8];
        last[..words.remainder().len()].copy_from_slice(words.remainder());
        self.word(u64::from_le_bytes(last));
    }
}

/// (Versions 3 and 4.) The digest of one tensor's bytes, fed in pieces: 8 FNV-style lanes over 64-byte
/// blocks (lane `i` takes the block's word `i`), a zero-padded last block, then the byte count
/// and the lanes folded by [`Fnv`]. The lanes are independent, so the CPU runs them in parallel.
pub(crate) struct Lanes {
    lanes: [u64; 8],
    pending: [u8; 64],
    pending_len: usize,
    len: u64,
}

impl Lanes {
    pub(crate) fn new() -> Self {
        Self {
            lanes: std::array::from_fn(|i| FNV_OFFSET ^ i as u64),
            pending: [0; 64],
            pending_len: 0,
            len: 0,
        }
    }

    fn block(lanes: &mut [u64; 8], block: &[u8]) {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = &block[i * 8..i * 8 + 8];
            *lane ^= u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            *lane = lane.wrapping_mul(FNV_PRIME);
        }
    }

    pub(crate) fn update(&mut self, mut b: &[u8]) {
        self.len += b.len() as u64;
        if self.pending_len > 0 {
            let take = (64 - self.pending_len).min(b.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&b[..take]);
            self.pending_len += take;
            b = &b[take..];
            if self.pending_len < 64 {
                return;
            }
            let block = self.pending;
            Self::block(&mut self.lanes, &block);
            self.pending_len = 0;
        }
        let mut blocks = b.chunks_exact(64);
        for block in &mut blocks {
            Self::block(&mut self.lanes, block);
        }
        let rest = blocks.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    pub(crate) fn finish(mut self) -> u64 {
        if self.pending_len > 0 {
            self.pending[self.pending_len..].fill(0);
            let block = self.pending;
            Self::block(&mut self.lanes, &block);
        }
        let mut h = Fnv::new();
        h.word(self.len);
        for lane in self.lanes {
            h.word(lane);
        }
        h.0
    }
}

#[cfg(test)]
mod tests {
    use super::Xxh;

    /// XXH3-64 is a specified hash: these values are the reference C implementation's (through
    /// PyPI's `xxhash`), so a dependency that changed them fails here, not in users' files.
    #[test]
    fn xxh3_is_the_standard_one() {
        assert_eq!(Xxh::new().finish(), 0x2d06800538d394c2);
        let mut h = Xxh::new();
        h.raw(b"a");
        assert_eq!(h.finish(), 0xe6c632b61e964e1f);
        // 2560 bytes fed in uneven pieces (the streaming state crosses its 256-byte stripes).
        let data: Vec<u8> = (0..2560).map(|i| (i % 256) as u8).collect();
        let mut h = Xxh::new();
        for piece in data.chunks(97) {
            h.raw(piece);
        }
        assert_eq!(h.finish(), 0xce94c58d4049e3e5);
    }

    #[test]
    fn fields_are_framed() {
        let of = |parts: &[&[u8]]| {
            let mut h = Xxh::new();
            for p in parts {
                h.bytes(p);
            }
            h.finish()
        };
        assert_ne!(of(&[b"ab", b"c"]), of(&[b"a", b"bc"]));
        assert_ne!(of(&[b"", b"x"]), of(&[b"x"]));
        let mut pieces = Xxh::new();
        pieces.word(3);
        pieces.raw(b"a");
        pieces.raw(b"bc");
        assert_eq!(pieces.finish(), of(&[b"abc"]));
    }
}
