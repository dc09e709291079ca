//! Stop strings over a stream of text pieces.
//!
//! [`StopMatcher`] sits between the detokenizer and the user: each decoded piece goes through
//! [`StopMatcher::push`], which returns the text that is safe to show ([`StopResult::emit`]) and
//! whether a stop string was completed ([`StopResult::stopped`]).
//!
//! Invariants:
//! - the text of a stop string is never emitted, nor anything after it;
//! - a suffix of the stream that could still grow into a stop string is held back, and released
//!   as soon as it can no longer match (or by [`StopMatcher::finish`] when the stream ends);
//! - the concatenation of everything emitted plus [`StopMatcher::finish`] is the stream cut just
//!   before the earliest stop string (the whole stream when none occurs);
//! - held-back text always ends on a `char` boundary, so emitted pieces are valid UTF-8 splits.

/// What one [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopResult {
    /// Text now safe to show; may be empty.
    pub emit: String,
    /// `true` once a stop string has been seen: the generation should end.
    pub stopped: bool,
}

/// Finds stop strings in streamed text, holding back possible partial matches.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet emitted: a possible prefix of a stop string.
    held: String,
    /// Index into `stops` of the stop string that ended the stream.
    matched: Option<usize>,
}

impl StopMatcher {
    /// A matcher for `stops`. Empty strings are ignored; with no stop strings every piece is
    /// passed straight through.
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let stops = stops
            .into_iter()
            .map(Into::into)
            .filter(|s: &String| !s.is_empty())
            .collect();
        Self {
            stops,
            held: String::new(),
            matched: None,
        }
    }

    /// The stop strings being watched for.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// The stop string that ended the stream, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    /// Feeds the next piece of generated text. After a stop, every push returns an empty,
    /// stopped result.
    pub fn push(&mut self, piece: &str) -> StopResult {
        if self.matched.is_some() {
            return StopResult {
                emit: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(piece);

        // Earliest complete match wins (ties: the first stop string listed).
        let earliest = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, i)) = earliest {
            self.matched = Some(i);
            let mut emit = std::mem::take(&mut self.held);
            emit.truncate(at);
            return StopResult {
                emit,
                stopped: true,
            };
        }

        // No match: emit all but the longest suffix that is a proper prefix of a stop string.
        let hold = self.partial_match_len();
        let emit_len = self.held.len() - hold;
        let rest = self.held.split_off(emit_len);
        let emit = std::mem::replace(&mut self.held, rest);
        StopResult {
            emit,
            stopped: false,
        }
    }

    /// Ends the stream: returns the held-back text (empty after a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Byte length of the longest suffix of `held` that starts some stop string. Only suffixes
    /// starting on a char boundary are considered, so the split is always valid UTF-8.
    fn partial_match_len(&self) -> usize {
        let max = self.stops.iter().map(String::len).max().unwrap_or(0);
        let held = self.held.as_str();
        // Longest first: the first suffix that matches is the one to hold.
        held.char_indices()
            .map(|(at, _)| at)
            .filter(|&at| held.len() - at < max)
            .find(|&at| {
                let suffix = &held[at..];
                self.stops.iter().any(|s| s.starts_with(suffix))
            })
            .map_or(0, |at| held.len() - at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes `pieces`, returning the emitted pieces, the stop flag and the final flush.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().copied());
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let r = m.push(p);
            out.push(r.emit);
            stopped = r.stopped;
            if stopped {
                break;
            }
        }
        (out, stopped, m.finish())
    }

    #[test]
    fn no_stop_strings_pass_everything() {
        let (out, stopped, rest) = run(&[], &["a", "b"]);
        assert_eq!(out, ["a", "b"]);
        assert!(!stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn stop_in_one_piece() {
        let (out, stopped, rest) = run(&["</s>"], &["Hello", " world</s> junk"]);
        assert_eq!(out, ["Hello", " world"]);
        assert!(stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn stop_split_across_pieces() {
        let (out, stopped, _) = run(&["<|im_end|>"], &["Paris", ".<|im", "_e", "nd|>", "more"]);
        assert_eq!(out, ["Paris", ".", "", ""]);
        assert!(stopped);
    }

    #[test]
    fn false_partial_match_is_released() {
        let mut m = StopMatcher::new(["### Instruction:"]);
        assert_eq!(m.push("Answer\n#").emit, "Answer\n");
        assert_eq!(m.push("##").emit, "");
        let r = m.push(" Heading");
        assert_eq!(r.emit, "### Heading");
        assert!(!r.stopped);
        assert_eq!(m.matched(), None);
    }

    #[test]
    fn held_text_is_flushed_at_the_end() {
        let (out, stopped, rest) = run(&["User:"], &["ok", " Us"]);
        assert_eq!(out, ["ok", " "]);
        assert!(!stopped);
        assert_eq!(rest, "Us");
    }

    #[test]
    fn earliest_stop_wins_and_is_reported() {
        let mut m = StopMatcher::new(["world", "lo w"]);
        let r = m.push("hello world");
        assert_eq!(r.emit, "hel");
        assert!(r.stopped);
        assert_eq!(m.matched(), Some("lo w"));
        // After a stop nothing more comes through.
        assert_eq!(
            m.push("x"),
            StopResult {
                emit: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn multibyte_text_splits_on_char_boundaries() {
        // The stop string starts with a 2-byte char; the held suffix must be whole chars.
        let (out, stopped, _) = run(&["éé!"], &["café", "é", "!"]);
        assert_eq!(out, ["caf", "", ""]);
        assert!(stopped);
        let (out, stopped, rest) = run(&["éé!"], &["café", "x"]);
        assert_eq!(out, ["caf", "éx"]);
        assert!(!stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn concatenation_is_the_stream_cut_at_the_stop() {
        let text = "The answer is 42.\n\n### Instruction:\nnext";
        // Every split of the stream into 3-byte pieces (on char boundaries) gives the same text.
        let pieces: Vec<&str> = text
            .as_bytes()
            .chunks(3)
            .map(|c| std::str::from_utf8(c).expect("ASCII"))
            .collect();
        let (out, stopped, rest) = run(&["### Instruction:"], &pieces);
        assert!(stopped);
        assert_eq!(out.concat() + &rest, "The answer is 42.\n\n");
    }
}
