//! Streaming detokenization: token ids in, UTF-8 text pieces out.
//!
//! Decoding token by token is wrong in two ways: a byte-level BPE token can hold part of a
//! multi-byte character (an emoji is often 2–4 tokens), and decoders such as SentencePiece's
//! `Metaspace` drop or add a leading space depending on what precedes a token. The
//! [`IncrementalDecoder`] therefore uses the *prefix-offset* technique of HF
//! text-generation-inference and candle's `TokenOutputStream`:
//!
//! ```text
//!   tokens:  … [prefix_offset ……… read_offset) [read_offset ……… len)
//!              ^ context already emitted       ^ not yet emitted
//!   prefix = decode(tokens[prefix_offset..read_offset])
//!   full   = decode(tokens[prefix_offset..])
//!   emit full[prefix.len()..] unless it ends in U+FFFD (an incomplete character)
//! ```
//!
//! Invariants: every returned piece is complete UTF-8 text (no partial character turned into
//! U+FFFD while more bytes may follow); the concatenation of all pieces and [`flush`] equals
//! decoding the generated ids in one go (for byte-level BPE tokenizers exactly; decoders that
//! treat the first token of a sequence specially are handled by seeding the context with
//! [`IncrementalDecoder::with_context`]). Memory stays bounded: tokens before the context
//! window are dropped as text is emitted.
//!
//! [`flush`]: IncrementalDecoder::flush

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Replacement character produced by lossy decoding of an incomplete UTF-8 sequence.
const REPLACEMENT: char = '\u{FFFD}';

/// After this many undecodable tokens the text is emitted as is: no UTF-8 character needs more
/// than four bytes, hence four byte tokens, so such a run is genuinely invalid output.
const MAX_PENDING: usize = 8;

/// Turns a stream of token ids into text pieces that are always whole characters.
pub struct IncrementalDecoder<'t> {
    tokenizer: &'t Tokenizer,
    skip_special_tokens: bool,
    /// Context tokens (already emitted) followed by pending ones.
    tokens: Vec<u32>,
    /// Start of the context window in `tokens`.
    prefix_offset: usize,
    /// End of the emitted part of `tokens`.
    read_offset: usize,
}

impl std::fmt::Debug for IncrementalDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncrementalDecoder")
            .field("skip_special_tokens", &self.skip_special_tokens)
            .field("tokens", &self.tokens)
            .field("prefix_offset", &self.prefix_offset)
            .field("read_offset", &self.read_offset)
            .finish_non_exhaustive()
    }
}

impl<'t> IncrementalDecoder<'t> {
    /// A decoder with no context. With `skip_special_tokens`, special tokens (EOS, chat markers)
    /// decode to nothing.
    pub fn new(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        Self::with_context(tokenizer, skip_special_tokens, &[])
    }

    /// A decoder whose first pieces are decoded after `context` (typically the last few prompt
    /// tokens), which is itself never emitted. This gives SentencePiece-style decoders the
    /// preceding token they need to place a leading space correctly.
    pub fn with_context(
        tokenizer: &'t Tokenizer,
        skip_special_tokens: bool,
        context: &[u32],
    ) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            tokens: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Adds one generated token; returns the newly completed text, or `None` while the token
    /// only continues an incomplete character (or decodes to nothing).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.tokens.push(id);
        let prefix = self.decode(self.prefix_offset, self.read_offset)?;
        let full = self.decode(self.prefix_offset, self.tokens.len())?;
        let pending = self.tokens.len() - self.read_offset;
        if full.ends_with(REPLACEMENT) && pending < MAX_PENDING {
            return Ok(None);
        }
        let new = new_suffix(&prefix, &full);
        if new.is_empty() {
            // e.g. a skipped special token: nothing to show, but it is consumed.
            self.read_offset = self.tokens.len();
            return Ok(None);
        }
        let new = new.to_string();
        self.advance();
        Ok(Some(new))
    }

    /// Returns whatever text is still pending (an incomplete character decodes to U+FFFD) and
    /// resets the decoder for a new stream, keeping no context.
    pub fn flush(&mut self) -> Result<Option<String>> {
        let out = if self.read_offset < self.tokens.len() {
            let prefix = self.decode(self.prefix_offset, self.read_offset)?;
            let full = self.decode(self.prefix_offset, self.tokens.len())?;
            Some(new_suffix(&prefix, &full).to_string()).filter(|s| !s.is_empty())
        } else {
            None
        };
        self.tokens.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        Ok(out)
    }

    /// Every pending token was emitted: the emitted window becomes the next context, and older
    /// tokens are dropped so memory does not grow with the generation.
    fn advance(&mut self) {
        self.tokens.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.tokens.len();
    }

    fn decode(&self, from: usize, to: usize) -> Result<String> {
        self.tokenizer
            .decode(&self.tokens[from..to], self.skip_special_tokens)
            .map_err(Error::Tokenizer)
    }
}

/// The part of `full` after `prefix`. Decoding with more tokens normally only appends; when a
/// decoder rewrites the end of the prefix instead, the text after the longest common prefix is
/// returned (cut on a char boundary, so it is always valid).
fn new_suffix<'a>(prefix: &str, full: &'a str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .take_while(|((_, a), b)| a == b)
        .last()
        .map_or(0, |((at, c), _)| at + c.len_utf8());
    tracing::trace!(
        prefix,
        full,
        "decoder rewrote the context; emitting the difference"
    );
    &full[common..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// GPT-2's byte → printable char map used by byte-level BPE vocabularies.
    fn byte_to_char(b: u8) -> char {
        let printable =
            |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        if printable(b) {
            return char::from(b);
        }
        let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + rank).expect("below 0x200, a valid scalar")
    }

    fn bl(s: &str) -> String {
        s.bytes().map(byte_to_char).collect()
    }

    /// A byte-level BPE tokenizer: the 256 byte tokens, a few merges (so words and partial
    /// emoji are single tokens), and one special token `<|endoftext|>` (id 256).
    fn tokenizer() -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        for b in 0..=255u8 {
            vocab.insert(byte_to_char(b).to_string(), json!(b as u32));
        }
        let merges: Vec<(String, String)> = vec![
            (bl("H"), bl("i")),
            (bl(" "), bl("t")),
            (bl(" t"), bl("h")),
            (bl(" th"), bl("e")),
            // The first two bytes of 😀 (F0 9F 98 80) merge: the emoji becomes 3 tokens.
            (
                byte_to_char(0xF0).to_string(),
                byte_to_char(0x9F).to_string(),
            ),
        ];
        // The special token is in the model's vocabulary too (as in GPT-2), so ids stay dense.
        vocab.insert("<|endoftext|>".to_string(), json!(256));
        for (id, (a, b)) in (257u32..).zip(&merges) {
            vocab.insert(format!("{a}{b}"), json!(id));
        }
        let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        let config = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{
                "id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }],
            "normalizer": null,
            "pre_tokenizer": {
                "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                "use_regex": true
            },
            "post_processor": null,
            "decoder": {
                "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                "use_regex": true
            },
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            }
        });
        config.to_string().parse().expect("valid tokenizer.json")
    }

    fn encode(t: &Tokenizer, text: &str) -> Vec<u32> {
        t.encode(text, false).expect("encodes").get_ids().to_vec()
    }

    /// Streams `ids` through a decoder, returning the pieces (flush included, marked).
    fn stream(t: &Tokenizer, ids: &[u32], skip_special: bool) -> Vec<Option<String>> {
        let mut d = IncrementalDecoder::new(t, skip_special);
        let mut out: Vec<Option<String>> =
            ids.iter().map(|&id| d.push(id).expect("decodes")).collect();
        out.push(d.flush().expect("decodes"));
        out
    }

    #[test]
    fn emoji_split_over_tokens_is_emitted_whole() {
        let t = tokenizer();
        let text = "Hi 😀 the end 🎉!";
        let ids = encode(&t, text);
        // 😀 = [F09F merge, 98, 80]: three tokens, the first two incomplete.
        let smile = encode(&t, "😀");
        assert_eq!(smile.len(), 3, "{smile:?}");
        let pieces = stream(&t, &ids, false);
        let emitted: Vec<&String> = pieces.iter().flatten().collect();
        assert!(
            emitted.iter().all(|p| !p.contains(REPLACEMENT)),
            "{emitted:?}"
        );
        assert!(emitted.iter().any(|p| p.contains('😀')), "{emitted:?}");
        let joined: String = emitted.into_iter().map(String::as_str).collect();
        assert_eq!(joined, t.decode(&ids, false).expect("decodes"));
        assert_eq!(joined, text);
    }

    #[test]
    fn incomplete_tokens_yield_none_then_the_char() {
        let t = tokenizer();
        let ids = encode(&t, "😀");
        let mut d = IncrementalDecoder::new(&t, false);
        assert_eq!(d.push(ids[0]).expect("decodes"), None);
        assert_eq!(d.push(ids[1]).expect("decodes"), None);
        assert_eq!(d.push(ids[2]).expect("decodes"), Some("😀".to_string()));
        assert_eq!(d.flush().expect("decodes"), None);
    }

    #[test]
    fn flush_returns_an_unfinished_character() {
        let t = tokenizer();
        let ids = encode(&t, "a😀");
        let mut d = IncrementalDecoder::new(&t, false);
        assert_eq!(d.push(ids[0]).expect("decodes"), Some("a".to_string()));
        assert_eq!(d.push(ids[1]).expect("decodes"), None);
        assert_eq!(d.flush().expect("decodes"), Some(REPLACEMENT.to_string()));
    }

    #[test]
    fn special_tokens_are_skipped_or_shown() {
        let t = tokenizer();
        let mut ids = encode(&t, "Hi");
        ids.push(256);
        let shown: String = stream(&t, &ids, false).into_iter().flatten().collect();
        assert_eq!(shown, "Hi<|endoftext|>");
        let skipped: String = stream(&t, &ids, true).into_iter().flatten().collect();
        assert_eq!(skipped, "Hi");
    }

    #[test]
    fn context_is_not_emitted() {
        let t = tokenizer();
        let prompt = encode(&t, "Hi");
        let reply = encode(&t, " the 🎉");
        let mut d = IncrementalDecoder::with_context(&t, false, &prompt);
        let mut out = String::new();
        for &id in &reply {
            out.extend(d.push(id).expect("decodes"));
        }
        out.extend(d.flush().expect("decodes"));
        assert_eq!(out, " the 🎉");
    }

    #[test]
    fn invalid_bytes_do_not_stall_forever() {
        let t = tokenizer();
        // A run of lone continuation bytes never completes a character.
        let ids = vec![0x80u32; MAX_PENDING];
        let pieces = stream(&t, &ids, false);
        assert!(pieces[..MAX_PENDING - 1].iter().all(Option::is_none));
        assert!(pieces[MAX_PENDING - 1].is_some(), "{pieces:?}");
    }

    #[test]
    fn new_suffix_handles_rewritten_prefixes() {
        assert_eq!(new_suffix("ab", "abc"), "c");
        assert_eq!(new_suffix("a\u{FFFD}", "aé"), "é");
        assert_eq!(new_suffix("", "x"), "x");
    }
}
