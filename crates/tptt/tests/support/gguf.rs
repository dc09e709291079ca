//! A GGUF file builder for tests: every part encoded by hand, so that any one can be made wrong
//! (`tests/gguf_header.rs`, `tests/fuzz_loaders.rs`).

#![allow(dead_code)]

// GGUF value types.
pub const U8: u32 = 0;
pub const U32: u32 = 4;
pub const STRING: u32 = 8;
pub const ARRAY: u32 = 9;
pub const U64: u32 = 10;
// ggml types.
pub const F32: u32 = 0;
pub const Q4_0: u32 = 2;

/// A GGUF file under construction: every part encoded by hand, so any one can be wrong.
#[derive(Clone)]
pub struct Gguf {
    pub magic: [u8; 4],
    pub version: u32,
    /// Overrides of the counts (else the number of entries).
    pub tensor_count: Option<u64>,
    pub kv_count: Option<u64>,
    /// Encoded metadata entries (key, type, value).
    pub kvs: Vec<Vec<u8>>,
    /// Encoded tensor infos.
    pub tensors: Vec<Vec<u8>>,
    /// Padding of the header (the data section starts at a multiple of it).
    pub layout_alignment: usize,
    /// Bytes of tensor data.
    pub data_len: usize,
}

impl Gguf {
    /// A valid llama GGUF: a 4-token, 8-wide embedding and the final norm, one layer declared.
    pub fn valid() -> Self {
        Self::valid_version(3)
    }

    pub fn valid_version(version: u32) -> Self {
        let mut g = Self {
            magic: *b"GGUF",
            version,
            tensor_count: None,
            kv_count: None,
            kvs: Vec::new(),
            tensors: Vec::new(),
            layout_alignment: 32,
            data_len: 4 * 8 * 4 + 8 * 4,
        };
        g.kv_str("general.architecture", "llama");
        g.kv_str("general.name", "tiny");
        for (k, v) in [
            ("llama.embedding_length", 8),
            ("llama.feed_forward_length", 16),
            ("llama.block_count", 1),
            ("llama.attention.head_count", 2),
        ] {
            g.kv_u32(k, v);
        }
        g.kv_u32("general.alignment", 32);
        g.tensor("token_embd.weight", &[8, 4], F32, 0);
        g.tensor("output_norm.weight", &[8], F32, 128);
        g
    }

    pub fn v1(&self) -> bool {
        self.version == 1
    }

    /// A length, count or dimension: u64, u32 in version 1.
    pub fn len_bytes(&self, n: u64) -> Vec<u8> {
        if self.v1() {
            (n as u32).to_le_bytes().to_vec()
        } else {
            n.to_le_bytes().to_vec()
        }
    }

    pub fn string(&self, s: &str) -> Vec<u8> {
        let mut b = self.len_bytes(s.len() as u64);
        b.extend_from_slice(s.as_bytes());
        b
    }

    pub fn kv(&mut self, key: &str, ty: u32, value: &[u8]) {
        let mut b = self.string(key);
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(value);
        self.kvs.push(b);
    }

    pub fn kv_u32(&mut self, key: &str, v: u32) {
        self.kv(key, U32, &v.to_le_bytes());
    }

    pub fn kv_str(&mut self, key: &str, v: &str) {
        let value = self.string(v);
        self.kv(key, STRING, &value);
    }

    /// Replace the value of `key` (type and bytes).
    pub fn set_kv(&mut self, key: &str, ty: u32, value: &[u8]) {
        let prefix = self.string(key);
        self.kvs.retain(|e| !e.starts_with(&prefix));
        self.kv(key, ty, value);
    }

    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) {
        let mut b = self.string(name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for &d in dims {
            b.extend(self.len_bytes(d));
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        self.tensors.push(b);
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b = self.magic.to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend(self.len_bytes(self.tensor_count.unwrap_or(self.tensors.len() as u64)));
        b.extend(self.len_bytes(self.kv_count.unwrap_or(self.kvs.len() as u64)));
        for e in self.kvs.iter().chain(&self.tensors) {
            b.extend_from_slice(e);
        }
        b.resize(b.len().next_multiple_of(self.layout_alignment), 0);
        b.resize(b.len() + self.data_len, 0);
        b
    }
}
