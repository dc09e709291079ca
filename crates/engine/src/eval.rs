//! Long-context evaluation: how well a model predicts a long real text, position by position,
//! and whether it can still recall a fact stated far back.
//!
//! * [`score_text`] feeds a token sequence through a [`Model`] in blocks (the way a chat reads a
//!   paste: the KV window slides, the linear memory carries everything) and returns the negative
//!   log-likelihood of every token given all the tokens before it.
//! * [`buckets`] folds those into perplexity by position bucket (`0–512`, `512–1024`, …), the
//!   figure that shows whether the memory helps or drowns the transformer as a text grows.
//! * [`run_probe`] states a fact, reads filler text, and asks for the fact at several distances:
//!   an answer is recalled when every token of it is the model's top choice (teacher forced).
//!
//! Everything here is deterministic (no sampling) and runs on one [`State`] per call, so the
//! same numbers come out of the CLI (`tptt eval`), the bench and the tests.

use tptt::linear::CarryMode;
use tptt::model::{Logits, Model, State};
use tptt::state::KvFormat;

use crate::error::{Error, Result};
use crate::session::{CancelToken, PREFILL_BLOCK};

/// `−ln softmax(logits)[target]`, computed stably (`logsumexp − logit`), in nats.
pub fn nll(logits: &[f32], target: u32) -> Result<f32> {
    let t = target as usize;
    let at = *logits.get(t).ok_or_else(|| {
        Error::Generate(format!(
            "token id {target} is outside the logits (vocabulary of {})",
            logits.len()
        ))
    })?;
    let mut max = f32::NEG_INFINITY;
    let mut nan = false;
    for &x in logits {
        nan |= x.is_nan();
        max = max.max(x);
    }
    if nan || !max.is_finite() {
        return Err(Error::InvalidLogits(format!(
            "non-finite logits while scoring (max {max}, target {at})"
        )));
    }
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    Ok((sum.ln() + (max - at) as f64) as f32)
}

/// Is `target` the arg-max of `logits` (ties go to the lowest id, as the greedy sampler does)?
pub fn is_top(logits: &[f32], target: u32) -> bool {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best == target as usize
}

/// The negative log-likelihood of every token of `ids` after the first: element `i` is
/// `−ln p(ids[i+1] | ids[..=i])`, so the result has `ids.len() − 1` entries. The text is fed
/// in blocks of [`PREFILL_BLOCK`] tokens into a fresh state with the given softmax `window`
/// (`None`: full attention) and KV cache format, in [`CarryMode::Continue`]. `progress` is told
/// how many tokens have been read after each block. Returns `Ok(None)` when cancelled between
/// blocks.
pub fn score_text(
    model: &Model,
    ids: &[u32],
    window: Option<usize>,
    kv_format: KvFormat,
    cancel: Option<&CancelToken>,
    progress: &mut dyn FnMut(usize),
) -> Result<Option<Vec<f32>>> {
    if window == Some(0) {
        return Err(Error::Generate(
            "the softmax window must be at least 1 position".into(),
        ));
    }
    let mut state = model.new_state(CarryMode::Continue, window);
    state.kv_format = kv_format;
    let mut out = Vec::with_capacity(ids.len().saturating_sub(1));
    let mut start = 0;
    while start < ids.len() {
        if cancel.is_some_and(CancelToken::is_cancelled) {
            return Ok(None);
        }
        let end = (start + PREFILL_BLOCK).min(ids.len());
        let rows = block_logits(model, &ids[start..end], &mut state, Logits::All)?;
        for (r, row) in rows.iter().enumerate() {
            if let Some(&next) = ids.get(start + r + 1) {
                out.push(nll(row, next)?);
            }
        }
        start = end;
        progress(start);
    }
    Ok(Some(out))
}

/// One forward call, its logits as rows.
fn block_logits(
    model: &Model,
    ids: &[u32],
    state: &mut State,
    which: Logits,
) -> Result<Vec<Vec<f32>>> {
    let logits = model.forward(ids, state, which)?;
    logits
        .to_vec2::<f32>()
        .map_err(|e| tptt::Error::from(e).into())
}

/// Perplexity over the tokens whose position falls in `[start, end)`. The position of a scored
/// token is the number of tokens before it (the first token of a text is not scored).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// First position.
    pub start: usize,
    /// One past the last position.
    pub end: usize,
    /// Tokens scored in the bucket.
    pub tokens: usize,
    /// Sum of their negative log-likelihoods (nats).
    pub nll_sum: f64,
}

impl Bucket {
    /// Mean negative log-likelihood (nats per token); NaN when empty.
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.tokens as f64
    }
    /// `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
    /// Adds another text's bucket with the same bounds.
    pub fn merge(&mut self, other: &Bucket) {
        self.tokens += other.tokens;
        self.nll_sum += other.nll_sum;
    }
}

/// Bucket bounds for a text of `len` tokens: `0, 512, 1024, 2048, 4096, …` (doubling), the last
/// bound being `len`.
pub fn default_edges(len: usize) -> Vec<usize> {
    let mut edges = vec![0];
    let mut e = 512;
    while e < len {
        edges.push(e);
        e *= 2;
    }
    if len > 0 {
        edges.push(len);
    }
    edges
}

/// Checks user-given bucket bounds: strictly increasing. A bound of 0 is added in front when
/// missing.
pub fn validate_edges(edges: &[usize]) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(edges.len() + 1);
    if edges.first() != Some(&0) {
        out.push(0);
    }
    out.extend_from_slice(edges);
    if out.len() < 2 {
        return Err(Error::Generate(
            "bucket bounds: give at least one bound above 0".into(),
        ));
    }
    if let Some(w) = out.windows(2).find(|w| w[1] <= w[0]) {
        return Err(Error::Generate(format!(
            "bucket bounds must increase: {} is followed by {}",
            w[0], w[1]
        )));
    }
    Ok(out)
}

/// Folds per-token NLLs (as [`score_text`] returns them: entry `i` is the token at position
/// `i + 1`) into the buckets `[edges[j], edges[j+1])`. Empty buckets are kept (0 tokens).
pub fn buckets(nlls: &[f32], edges: &[usize]) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = edges
        .windows(2)
        .map(|w| Bucket {
            start: w[0],
            end: w[1],
            tokens: 0,
            nll_sum: 0.0,
        })
        .collect();
    for (i, &x) in nlls.iter().enumerate() {
        let pos = i + 1;
        if let Some(b) = out.iter_mut().find(|b| b.start <= pos && pos < b.end) {
            b.tokens += 1;
            b.nll_sum += x as f64;
        }
    }
    out
}

/// A recall probe, tokenized: `fact`, then filler, then `question` followed by `answer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeIds {
    /// The statement to remember (read first).
    pub fact: Vec<u32>,
    /// The question, ending right before the answer.
    pub question: Vec<u32>,
    /// The expected answer's tokens.
    pub answer: Vec<u32>,
}

/// The outcome of one probe at one distance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeResult {
    /// Filler tokens between the end of the fact and the start of the question.
    pub distance: usize,
    /// Every answer token was the model's top choice (teacher forced).
    pub recalled: bool,
    /// Mean negative log-likelihood of the answer's tokens (nats).
    pub answer_nll: f32,
}

/// States `probe.fact`, reads `filler` (cycled when shorter than needed) and, at each of
/// `distances` (filler tokens read, ascending), asks `probe.question` on a copy of the state and
/// scores `probe.answer`. One pass over the filler serves every distance.
pub fn run_probe(
    model: &Model,
    probe: &ProbeIds,
    filler: &[u32],
    distances: &[usize],
    window: Option<usize>,
    cancel: Option<&CancelToken>,
) -> Result<Option<Vec<ProbeResult>>> {
    if probe.fact.is_empty() || probe.question.is_empty() || probe.answer.is_empty() {
        return Err(Error::Generate(
            "a recall probe needs a fact, a question and an answer".into(),
        ));
    }
    if window == Some(0) {
        return Err(Error::Generate(
            "the softmax window must be at least 1 position".into(),
        ));
    }
    let mut distances = distances.to_vec();
    distances.sort_unstable();
    distances.dedup();
    if distances.iter().any(|&d| d > 0) && filler.is_empty() {
        return Err(Error::Generate("a recall probe needs filler text".into()));
    }
    let mut state = model.new_state(CarryMode::Continue, window);
    model.forward(&probe.fact, &mut state, Logits::Last)?;
    let mut read = 0usize;
    let mut results = Vec::with_capacity(distances.len());
    for &d in &distances {
        while read < d {
            if cancel.is_some_and(CancelToken::is_cancelled) {
                return Ok(None);
            }
            let n = (d - read).min(PREFILL_BLOCK);
            let block: Vec<u32> = (read..read + n).map(|i| filler[i % filler.len()]).collect();
            model.forward(&block, &mut state, Logits::Last)?;
            read += n;
        }
        let mut asked = state.try_clone()?;
        let ids: Vec<u32> = probe
            .question
            .iter()
            .chain(&probe.answer[..probe.answer.len() - 1])
            .copied()
            .collect();
        let rows = block_logits(model, &ids, &mut asked, Logits::All)?;
        let first = probe.question.len() - 1;
        let mut recalled = true;
        let mut sum = 0f32;
        for (j, &target) in probe.answer.iter().enumerate() {
            let row = &rows[first + j];
            recalled &= is_top(row, target);
            sum += nll(row, target)?;
        }
        results.push(ProbeResult {
            distance: d,
            recalled,
            answer_nll: sum / probe.answer.len() as f32,
        });
    }
    Ok(Some(results))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_is_minus_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        for t in 0..3 {
            let want = -((l[t] as f64).exp() / z).ln();
            assert!((nll(&l, t as u32).unwrap() as f64 - want).abs() < 1e-6);
        }
        assert!(nll(&l, 3).is_err());
        assert!(nll(&[f32::NAN, 1.0], 1).is_err());
        // A −∞ target is an infinite surprise, not an error.
        assert_eq!(nll(&[f32::NEG_INFINITY, 1.0], 0).unwrap(), f32::INFINITY);
    }

    #[test]
    fn top_choice_ties_go_to_the_lowest_id() {
        assert!(is_top(&[0.0, 2.0, 2.0], 1));
        assert!(!is_top(&[0.0, 2.0, 2.0], 2));
    }

    #[test]
    fn edges_double_and_end_at_the_length() {
        assert_eq!(default_edges(4096), vec![0, 512, 1024, 2048, 4096]);
        assert_eq!(default_edges(3000), vec![0, 512, 1024, 2048, 3000]);
        assert_eq!(default_edges(100), vec![0, 100]);
        assert_eq!(default_edges(0), vec![0]);
        assert_eq!(validate_edges(&[512, 1024]).unwrap(), vec![0, 512, 1024]);
        assert!(validate_edges(&[512, 512]).is_err());
        assert!(validate_edges(&[0]).is_err());
        assert!(validate_edges(&[]).is_err());
    }

    #[test]
    fn buckets_count_positions_from_the_second_token() {
        // Tokens at positions 1..=5 with NLLs 1..=5.
        let b = buckets(&[1.0, 2.0, 3.0, 4.0, 5.0], &[0, 2, 4, 10]);
        assert_eq!(
            b.iter().map(|b| b.tokens).collect::<Vec<_>>(),
            vec![1, 2, 2]
        );
        assert_eq!(b[0].nll_sum, 1.0);
        assert_eq!(b[1].nll_sum, 5.0);
        assert_eq!(b[2].nll_sum, 9.0);
        assert!((b[2].perplexity() - 4.5f64.exp()).abs() < 1e-9);
    }
}
