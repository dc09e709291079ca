//! Memory health: the model's own surprise on a conversation, and a verdict on it.
//!
//! An untrained (or out-of-its-depth) linear memory does not fail loudly: as a conversation
//! grows, it adds more and more noise to every layer until the model no longer predicts text at
//! all (on the untrained demo, perplexity 26 at the start of a text, 200 past 3k tokens), and
//! then it streams garbage. The prompt's logits are computed during prefill anyway: a
//! [`Session`](crate::Session) keeps a sample of them ([`SURPRISE_STRIDE`]) and records here the
//! negative log-likelihood of the tokens it read — text the user or the template wrote, never
//! the model's own samples (those are what it already finds likely).
//!
//! [`Surprise`] keeps two figures: the mean over the conversation's start (positions below
//! [`EARLY_POSITIONS`]), and the mean over the last [`RECENT_SAMPLES`] samples. Their ratio, as
//! perplexities, is the verdict ([`Surprise::verdict`]): a memory whose text reads
//! [`BROKEN_RATIO`]× as surprising as the start is drowning the transformer. It is a ratio
//! against the same conversation because absolute perplexity depends on the text (code, a
//! licence, small talk) far more than on the memory.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// One prompt position in this many keeps its logits for the surprise sample (the `lm_head` of
/// the others is skipped).
pub const SURPRISE_STRIDE: usize = 8;
/// Positions that count as the conversation's start.
pub const EARLY_POSITIONS: usize = 1024;
/// Samples the recent mean is taken over.
pub const RECENT_SAMPLES: usize = 64;
/// Samples each mean needs before a verdict.
pub const MIN_SAMPLES: usize = 24;
/// Recent perplexity this many times the start's: the memory is degrading the model.
pub const STRAINED_RATIO: f64 = 2.5;
/// Recent perplexity this many times the start's: the memory has broken the model.
pub const BROKEN_RATIO: f64 = 4.0;
/// Below this recent perplexity nothing is called broken, whatever the ratio (a start of very
/// predictable text — a template, a list — would otherwise make ordinary prose look alarming).
pub const MIN_BROKEN_PERPLEXITY: f64 = 40.0;

/// The verdict on a conversation's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Health {
    /// Too few samples yet.
    Unknown,
    /// Recent text is about as predictable as the start.
    Healthy,
    /// Recent text reads noticeably more surprising than the start.
    Strained,
    /// The model no longer predicts the text: its answers will be garbage.
    Broken,
}

/// Running surprise of a conversation (see the module doc). Serialisable, so it can travel
/// with a saved state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Surprise {
    /// Sum of the sampled NLLs at positions below [`EARLY_POSITIONS`].
    pub early_sum: f64,
    /// How many there were.
    pub early_count: u32,
    /// The last [`RECENT_SAMPLES`] sampled NLLs (nats), oldest first.
    pub recent: VecDeque<f32>,
    /// Samples recorded in all.
    pub samples: u64,
}

impl Surprise {
    /// Records the NLL (nats) of the token at `position` (tokens before it in the conversation).
    /// Non-finite values count as a very large surprise (a token the model ruled out).
    pub fn record(&mut self, position: usize, nll: f32) {
        let nll = if nll.is_finite() { nll.max(0.0) } else { 30.0 };
        if position < EARLY_POSITIONS {
            self.early_sum += nll as f64;
            self.early_count += 1;
        }
        if self.recent.len() == RECENT_SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back(nll);
        self.samples += 1;
    }

    /// Checks a record read from a file: finite, non-negative values and at most
    /// [`RECENT_SAMPLES`] recent ones.
    pub fn validated(self) -> Result<Self, String> {
        if self.recent.len() > RECENT_SAMPLES {
            return Err(format!(
                "{} recent samples, at most {RECENT_SAMPLES} are kept",
                self.recent.len()
            ));
        }
        if !(self.early_sum.is_finite() && self.early_sum >= 0.0) {
            return Err(format!(
                "early sum {} is not a finite non-negative number",
                self.early_sum
            ));
        }
        if let Some(x) = self.recent.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
            return Err(format!(
                "recent sample {x} is not a finite non-negative number"
            ));
        }
        if (self.early_count as u64).max(self.recent.len() as u64) > self.samples {
            return Err("more samples kept than recorded".into());
        }
        Ok(self)
    }

    /// Perplexity of the conversation's start, once it has [`MIN_SAMPLES`].
    pub fn early_perplexity(&self) -> Option<f64> {
        (self.early_count as usize >= MIN_SAMPLES)
            .then(|| (self.early_sum / self.early_count as f64).exp())
    }

    /// Perplexity of the recent samples, once there are [`MIN_SAMPLES`].
    pub fn recent_perplexity(&self) -> Option<f64> {
        (self.recent.len() >= MIN_SAMPLES).then(|| {
            let sum: f64 = self.recent.iter().map(|&x| x as f64).sum();
            (sum / self.recent.len() as f64).exp()
        })
    }

    /// Recent perplexity over the start's.
    pub fn ratio(&self) -> Option<f64> {
        Some(self.recent_perplexity()? / self.early_perplexity()?)
    }

    /// The verdict (module doc).
    pub fn verdict(&self) -> Health {
        match (self.ratio(), self.recent_perplexity()) {
            (Some(r), Some(p)) if r >= BROKEN_RATIO && p >= MIN_BROKEN_PERPLEXITY => Health::Broken,
            (Some(r), _) if r >= STRAINED_RATIO => Health::Strained,
            (Some(_), _) => Health::Healthy,
            _ => Health::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(s: &mut Surprise, from: usize, n: usize, nll: f32) {
        for i in 0..n {
            s.record(from + i * SURPRISE_STRIDE, nll);
        }
    }

    #[test]
    fn unknown_until_both_means_have_samples() {
        let mut s = Surprise::default();
        fill(&mut s, 0, MIN_SAMPLES - 1, 3.0);
        assert_eq!(s.verdict(), Health::Unknown);
        fill(&mut s, 400, 1, 3.0);
        assert_eq!(s.verdict(), Health::Healthy);
        assert!((s.ratio().unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_collapse_like_the_untrained_demo_is_broken() {
        // Measured on the untrained demo: perplexity 26.6 at the start, 200 past 3k tokens.
        let mut s = Surprise::default();
        fill(&mut s, 0, 100, 26.6f32.ln());
        fill(&mut s, 3072, RECENT_SAMPLES, 200f32.ln());
        assert_eq!(s.verdict(), Health::Broken);
        // 34.5 at 2–3k: not yet.
        let mut s = Surprise::default();
        fill(&mut s, 0, 100, 26.6f32.ln());
        fill(&mut s, 2048, RECENT_SAMPLES, 34.5f32.ln());
        assert_eq!(s.verdict(), Health::Healthy);
    }

    #[test]
    fn a_predictable_start_does_not_make_prose_broken() {
        let mut s = Surprise::default();
        fill(&mut s, 0, 100, 1.5f32.ln());
        fill(&mut s, 2048, RECENT_SAMPLES, 20f32.ln());
        assert_eq!(s.verdict(), Health::Strained);
    }

    #[test]
    fn recent_mean_forgets_old_samples_and_survives_bad_values() {
        let mut s = Surprise::default();
        fill(&mut s, 0, 100, 3.0);
        fill(&mut s, 5000, RECENT_SAMPLES, 8.0);
        assert_eq!(s.verdict(), Health::Broken);
        fill(&mut s, 9000, RECENT_SAMPLES, 3.0);
        assert_eq!(s.verdict(), Health::Healthy);
        s.record(10_000, f32::NAN);
        s.record(10_001, f32::INFINITY);
        assert!(s.recent_perplexity().unwrap().is_finite());
        assert_eq!(s.recent.len(), RECENT_SAMPLES);
    }
}
