//! Turning one step's logits into the next token.
//!
//! [`SamplingParams`] is the user-facing knob set (serde, so it can travel in settings and
//! requests); [`SamplingParams::validate`] checks it once where it enters, and [`Sampler::new`]
//! refuses invalid parameters, so [`Sampler::sample`] never re-checks them.
//!
//! The pipeline of [`Sampler::sample`], in order:
//!
//! 1. **Repetition penalty** (llama.cpp `penalty_repeat`, HF `RepetitionPenaltyLogitsProcessor`):
//!    for every *distinct* token among the last `repeat_last_n` tokens of `history`, a positive
//!    logit is divided by `repeat_penalty` and a negative one multiplied by it. Applied to the
//!    caller's logits in place.
//! 2. **Greedy** when `temperature == 0` (or below `1e-4`, where scaling would overflow): the
//!    arg-max (the lowest id on ties), no randomness.
//! 3. **Temperature**: logits divided by `temperature`.
//! 4. **Top-k**: keep the `top_k` most likely tokens (`0` = off).
//! 5. **Top-p** (nucleus): keep the smallest most-likely set whose probability reaches `top_p`,
//!    never fewer than one token (`1.0` = off).
//! 6. **Min-p**: drop tokens whose probability is below `min_p` times the most likely token's
//!    (`0.0` = off).
//! 7. **Draw** from the renormalised survivors with the sampler's seeded `StdRng`.
//!
//! Logits may contain `-inf` (masked tokens); NaN, `+inf`, an empty slice or all `-inf` are
//! reported as [`Error::InvalidLogits`], never a panic.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to pick tokens. `Default` gives sensible chat settings; [`SamplingParams::greedy`] gives
/// deterministic arg-max decoding.
///
/// Fields missing from a serialized value take their default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature, `>= 0`; `0` means greedy decoding.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables the filter.
    pub top_k: usize,
    /// Nucleus sampling threshold in `(0, 1]`; `1.0` disables the filter.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, in `[0, 1)`; `0.0` disables it.
    pub min_p: f32,
    /// Repetition penalty, `> 0`; `1.0` disables it, values above 1 discourage repeats.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the repetition penalty looks at; `0` disables it.
    pub repeat_last_n: usize,
    /// Seed of the random generator; `None` draws a fresh one per [`Sampler`].
    pub seed: Option<u64>,
    /// Upper bound on the number of generated tokens, `>= 1`. Enforced by the generation loop.
    pub max_new_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: None,
            max_new_tokens: 512,
        }
    }
}

impl SamplingParams {
    /// Deterministic arg-max decoding: temperature 0, every filter and the penalty off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            seed: Some(0),
            max_new_tokens: Self::default().max_new_tokens,
        }
    }

    /// Checks every field's range; the error names the first offending field.
    pub fn validate(&self) -> Result<()> {
        fn bad(name: &'static str, value: impl ToString, expected: &'static str) -> Result<()> {
            Err(Error::InvalidSamplingParam {
                name,
                value: value.to_string(),
                expected,
            })
        }
        // Written so that NaN fails every check (comparisons with NaN are false).
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                self.temperature,
                "must be a finite number >= 0",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "must be in (0, 1]");
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return bad("min_p", self.min_p, "must be in [0, 1)");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad(
                "repeat_penalty",
                self.repeat_penalty,
                "must be a finite number > 0",
            );
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", self.max_new_tokens, "must be at least 1");
        }
        Ok(())
    }
}

/// Temperatures below this decode greedily: dividing logits by a near-zero temperature would
/// overflow `f32`, and the resulting distribution is the arg-max anyway.
const MIN_TEMPERATURE: f32 = 1e-4;

/// A token candidate: id and its (scaled) logit, later its probability.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    value: f32,
}

/// Picks tokens from logits according to validated [`SamplingParams`], with its own seeded RNG:
/// two samplers built from the same params (with a `seed`) and fed the same logits pick the same
/// tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: StdRng,
    /// Scratch buffer reused across steps (one vocabulary's worth of candidates).
    candidates: Vec<Candidate>,
    /// Scratch buffer for the distinct recent tokens of the repetition penalty.
    recent: Vec<u32>,
}

impl Sampler {
    /// Validates `params` and seeds the RNG (`params.seed`, or a fresh random seed).
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(rand::random);
        tracing::debug!(seed, ?params, "sampler created");
        Ok(Self {
            params,
            seed,
            rng: StdRng::seed_from_u64(seed),
            candidates: Vec::new(),
            recent: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed actually used (the drawn one when `params.seed` was `None`), for reproducing a
    /// generation.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks the next token.
    ///
    /// `logits` holds one score per vocabulary entry; the repetition penalty is applied to it in
    /// place. `history` is every token so far (prompt and generated); only its last
    /// `repeat_last_n` entries matter, and ids outside the vocabulary are ignored.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Result<u32> {
        check_logits(logits)?;
        self.apply_repeat_penalty(logits, history);

        if self.params.temperature < MIN_TEMPERATURE {
            return Ok(argmax(logits));
        }

        // Temperature: finite logits only; -inf tokens can never be drawn.
        let inv_t = 1.0 / self.params.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| Candidate {
                    id: i as u32,
                    value: l * inv_t,
                }),
        );
        let cands = &mut self.candidates;
        let by_value_desc = |a: &Candidate, b: &Candidate| b.value.total_cmp(&a.value);

        // Top-k: partition so the k best come first (O(vocab)), then keep them.
        let k = self.params.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_value_desc);
            cands.truncate(k);
        }

        // Softmax over the survivors.
        let max = cands
            .iter()
            .map(|c| c.value)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for c in cands.iter_mut() {
            c.value = (c.value - max).exp();
            sum += c.value as f64;
        }
        for c in cands.iter_mut() {
            c.value = (c.value as f64 / sum) as f32;
        }

        // Top-p: smallest most-likely set whose mass reaches top_p, at least one token. The
        // only step that needs the candidates sorted, so the full sort is paid only here.
        if self.params.top_p < 1.0 {
            cands.sort_unstable_by(by_value_desc);
            let mut cum = 0.0f64;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                cum += c.value as f64;
                if cum >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }

        // Min-p: relative to the most likely survivor, which always passes its own threshold.
        if self.params.min_p > 0.0 {
            let p_max = cands.iter().map(|c| c.value).fold(0.0f32, f32::max);
            let threshold = self.params.min_p * p_max;
            cands.retain(|c| c.value >= threshold);
        }

        if cands.len() == 1 {
            return Ok(cands[0].id);
        }

        // Draw from the renormalised survivors.
        let total: f64 = cands.iter().map(|c| c.value as f64).sum();
        let r = self.rng.random::<f64>() * total;
        let mut cum = 0.0f64;
        for c in cands.iter() {
            cum += c.value as f64;
            if r < cum {
                return Ok(c.id);
            }
        }
        // Rounding can leave r a hair above the final cumulative sum: the last survivor.
        Ok(cands[cands.len() - 1].id)
    }

    /// llama.cpp / HF repetition penalty over the distinct tokens of the recent window.
    fn apply_repeat_penalty(&mut self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repeat_penalty;
        let n = self.params.repeat_last_n;
        if penalty == 1.0 || n == 0 || history.is_empty() {
            return;
        }
        let window = &history[history.len().saturating_sub(n)..];
        self.recent.clear();
        self.recent.extend_from_slice(window);
        self.recent.sort_unstable();
        self.recent.dedup();
        for &id in &self.recent {
            if let Some(l) = logits.get_mut(id as usize) {
                if *l > 0.0 {
                    *l /= penalty;
                } else {
                    *l *= penalty;
                }
            }
        }
    }
}

/// Rejects logits nothing can be sampled from.
fn check_logits(logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(Error::InvalidLogits("the logits are empty".into()));
    }
    let mut any_finite = false;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            return Err(Error::InvalidLogits(format!("logit of token {i} is NaN")));
        }
        if l == f32::INFINITY {
            return Err(Error::InvalidLogits(format!("logit of token {i} is +inf")));
        }
        any_finite |= l.is_finite();
    }
    if !any_finite {
        return Err(Error::InvalidLogits("every logit is -inf".into()));
    }
    Ok(())
}

/// Index of the largest logit, the lowest index on ties. `logits` is non-empty and NaN-free.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate().skip(1) {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).expect("test params are valid")
    }

    fn free(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn sample(s: &mut Sampler, logits: &[f32], history: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        s.sample(&mut l, history).expect("finite logits")
    }

    /// Frequencies of each token over `n` draws.
    fn frequencies(params: SamplingParams, logits: &[f32], n: usize) -> Vec<f64> {
        let mut s = sampler(params);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[sample(&mut s, logits, &[]) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    const LOGITS: [f32; 6] = [0.5, 2.0, -1.0, 1.5, 1.9, 0.0];

    #[test]
    fn greedy_is_argmax() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(sample(&mut s, &LOGITS, &[]), 1);
        // Ties go to the lowest id; -inf entries are fine.
        assert_eq!(sample(&mut s, &[f32::NEG_INFINITY, 3.0, 3.0], &[]), 1);
    }

    #[test]
    fn seeded_samplers_agree() {
        let draw = |seed| {
            let mut s = sampler(free(1.0, seed));
            (0..200)
                .map(|_| sample(&mut s, &LOGITS, &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(
            draw(7),
            draw(8),
            "different seeds should differ over 200 draws"
        );
    }

    #[test]
    fn unseeded_sampler_reports_its_seed() {
        let mut p = free(1.0, 0);
        p.seed = None;
        let s = sampler(p.clone());
        let mut again = sampler(SamplingParams {
            seed: Some(s.seed()),
            ..p
        });
        let mut s = s;
        let a: Vec<_> = (0..50).map(|_| sample(&mut s, &LOGITS, &[])).collect();
        let b: Vec<_> = (0..50).map(|_| sample(&mut again, &LOGITS, &[])).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = sampler(SamplingParams {
            top_k: 1,
            ..free(1.5, 3)
        });
        for _ in 0..100 {
            assert_eq!(sample(&mut s, &LOGITS, &[]), 1);
        }
    }

    #[test]
    fn top_k_restricts_to_the_k_best() {
        let mut s = sampler(SamplingParams {
            top_k: 2,
            ..free(5.0, 3)
        });
        for _ in 0..500 {
            let t = sample(&mut s, &LOGITS, &[]);
            assert!(t == 1 || t == 4, "token {t} is not in the top 2");
        }
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = sampler(SamplingParams {
            top_p: 1e-6,
            ..free(2.0, 11)
        });
        for _ in 0..100 {
            assert_eq!(sample(&mut s, &LOGITS, &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // p = [0.5, 0.3, 0.15, 0.05]: top_p 0.75 keeps exactly {0, 1}.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let f = frequencies(
            SamplingParams {
                top_p: 0.75,
                ..free(1.0, 5)
            },
            &logits,
            4000,
        );
        assert_eq!(f[2] + f[3], 0.0, "{f:?}");
        assert!((f[0] - 0.625).abs() < 0.03, "{f:?}");
    }

    #[test]
    fn min_p_filters_unlikely_tokens() {
        // p = [0.6, 0.3, 0.07, 0.03]; min_p 0.1 → threshold 0.06 keeps {0, 1, 2}.
        let logits: Vec<f32> = [0.6f32, 0.3, 0.07, 0.03].iter().map(|p| p.ln()).collect();
        let f = frequencies(
            SamplingParams {
                min_p: 0.1,
                ..free(1.0, 9)
            },
            &logits,
            5000,
        );
        assert_eq!(f[3], 0.0, "{f:?}");
        assert!(f[2] > 0.0, "{f:?}");
        // min_p 0.9 leaves only the best token.
        let mut s = sampler(SamplingParams {
            min_p: 0.9,
            ..free(1.0, 9)
        });
        for _ in 0..100 {
            assert_eq!(sample(&mut s, &logits, &[]), 0);
        }
    }

    #[test]
    fn repeat_penalty_changes_the_choice() {
        let params = SamplingParams {
            repeat_penalty: 1.5,
            repeat_last_n: 4,
            ..SamplingParams::greedy()
        };
        let mut s = sampler(params);
        let logits = [2.0, 1.9, -1.0];
        assert_eq!(sample(&mut s, &logits, &[]), 0);
        // Token 0 seen recently: 2.0 / 1.5 = 1.33 < 1.9.
        assert_eq!(sample(&mut s, &logits, &[0]), 1);
        // Seen long ago (outside the last 4): no penalty.
        assert_eq!(sample(&mut s, &logits, &[0, 2, 2, 2, 2]), 0);
        // Positive logits divided, negative multiplied, each distinct token once.
        let mut l = vec![2.0, 1.9, -1.0];
        s.sample(&mut l, &[0, 0, 2, 2, 99]).expect("finite");
        assert_eq!(l, vec![2.0 / 1.5, 1.9, -1.5]);
    }

    #[test]
    fn temperature_sampling_matches_the_distribution() {
        let p = [0.5f32, 0.3, 0.2];
        let logits: Vec<f32> = p.iter().map(|p| p.ln()).collect();
        let n = 20_000;
        let f = frequencies(free(1.0, 42), &logits, n);
        for (fi, pi) in f.iter().zip(p) {
            assert!((fi - pi as f64).abs() < 0.02, "T=1: {f:?} vs {p:?}");
        }
        // T = 0.5 squares the probabilities: [0.25, 0.09, 0.04] / 0.38.
        let f = frequencies(free(0.5, 42), &logits, n);
        let expected = [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38];
        for (fi, ei) in f.iter().zip(expected) {
            assert!((fi - ei).abs() < 0.02, "T=0.5: {f:?} vs {expected:?}");
        }
    }

    #[test]
    fn bad_logits_are_errors() {
        for params in [SamplingParams::greedy(), free(1.0, 1)] {
            let mut s = sampler(params);
            let cases: [&[f32]; 4] = [
                &[],
                &[1.0, f32::NAN],
                &[f32::INFINITY, 0.0],
                &[f32::NEG_INFINITY, f32::NEG_INFINITY],
            ];
            for logits in cases {
                let mut l = logits.to_vec();
                let err = s.sample(&mut l, &[]).expect_err("must be rejected");
                assert!(matches!(err, Error::InvalidLogits(_)), "{err}");
            }
        }
    }

    #[test]
    fn tiny_temperature_is_greedy_without_overflow() {
        let mut s = sampler(free(1e-30, 4));
        assert_eq!(sample(&mut s, &[1e30, 3.0e30, -2.0], &[]), 1);
        let mut s = sampler(free(1e-3, 4));
        assert_eq!(sample(&mut s, &LOGITS, &[]), 1);
    }

    #[test]
    fn masked_tokens_are_never_drawn() {
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.1];
        let mut s = sampler(free(3.0, 2));
        for _ in 0..200 {
            let t = sample(&mut s, &logits, &[]);
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn validate_rejects_out_of_range_values() {
        let base = SamplingParams::default();
        assert!(base.validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        let cases = [
            (
                "temperature",
                SamplingParams {
                    temperature: -0.1,
                    ..base.clone()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: f32::NAN,
                    ..base.clone()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 0.0,
                    ..base.clone()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 1.01,
                    ..base.clone()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: 1.0,
                    ..base.clone()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: -0.5,
                    ..base.clone()
                },
            ),
            (
                "repeat_penalty",
                SamplingParams {
                    repeat_penalty: 0.0,
                    ..base.clone()
                },
            ),
            (
                "max_new_tokens",
                SamplingParams {
                    max_new_tokens: 0,
                    ..base.clone()
                },
            ),
        ];
        for (field, params) in cases {
            match params.validate() {
                Err(Error::InvalidSamplingParam { name, .. }) => assert_eq!(name, field),
                other => panic!("{field}: expected an error, got {other:?}"),
            }
            assert!(Sampler::new(params).is_err());
        }
    }

    #[test]
    fn params_deserialize_with_defaults() {
        let p: SamplingParams =
            serde_json::from_str(r#"{"temperature": 0.2, "seed": 5}"#).expect("valid JSON");
        assert_eq!(p.temperature, 0.2);
        assert_eq!(p.seed, Some(5));
        assert_eq!(p.top_k, SamplingParams::default().top_k);
        let back: SamplingParams =
            serde_json::from_str(&serde_json::to_string(&p).expect("serializable"))
                .expect("round trip");
        assert_eq!(back, p);
    }
}
