//! Our quantized path against llama.cpp's `llama-bench` on the same GGUF, measured in alternating
//! rounds (ours then llama.cpp, then the other way round, …), each round's ratios taken over the
//! same minute of the machine, and the median round's ratio reported. On a shared machine two
//! single runs minutes apart compare the neighbours' load as much as the engines: on 2026-12-04
//! llama-bench's tg128 on one file moved between 34.8 and 51.5 tok/s within two hours.

use super::*;

/// Rounds of a full run (a `--quick` run measures one).
pub(super) const ROUNDS: usize = 3;

/// The two sides and their paired ratios.
pub(super) struct Versus {
    /// Ours: the first measured round's JSON, with `decode_tok_s` / `prefill_tok_s` the medians
    /// over the rounds, `peak_rss` / `kv_bytes` the round of the largest peak, and every round's
    /// rates (`*_rounds`).
    pub(super) ours: Baseline,
    /// llama.cpp: the same, with `tg128_tok_s` / `pp512_tok_s`.
    pub(super) llama: Baseline,
    /// Median over the rounds of ours / llama.cpp decode (tg128) in the same round.
    pub(super) decode_ratio: Option<f64>,
    /// Median over the rounds of ours / llama.cpp prefill (pp512) in the same round.
    pub(super) prefill_ratio: Option<f64>,
}

/// Measure `ours` and `llama` in `rounds` alternating rounds. A side missing in the first round
/// ends the rounds (the other side is still reported); a later round where either side failed is
/// left out of the ratios.
pub(super) fn versus(
    rounds: usize,
    mut ours: impl FnMut() -> Baseline,
    mut llama: impl FnMut() -> Baseline,
) -> Versus {
    let mut pairs: Vec<(Value, Value)> = Vec::new();
    for round in 0..rounds.max(1) {
        let (o, l) = if round % 2 == 0 {
            let o = ours();
            (o, llama())
        } else {
            let l = llama();
            (ours(), l)
        };
        match (o, l) {
            (Baseline::Measured(o), Baseline::Measured(l)) => {
                progress(format!(
                    "[versus] round {} of {rounds}: decode {} vs {} tok/s, prefill {} vs {} tok/s",
                    round + 1,
                    fmt_opt(num(&o, "decode_tok_s"), 1),
                    fmt_opt(num(&l, "tg128_tok_s"), 1),
                    fmt_opt(num(&o, "prefill_tok_s"), 1),
                    fmt_opt(num(&l, "pp512_tok_s"), 1),
                ));
                pairs.push((o, l));
            }
            (o, l) if round == 0 => {
                return Versus {
                    ours: o,
                    llama: l,
                    decode_ratio: None,
                    prefill_ratio: None,
                };
            }
            (o, l) => {
                for (side, b) in [("ours", &o), ("llama.cpp", &l)] {
                    if let Baseline::Missing(why) = b {
                        progress(format!(
                            "[versus] round {round}: {side} failed ({why}); round left out"
                        ));
                    }
                }
            }
        }
    }
    let paired = |a: &str, b: &str| {
        median(
            pairs
                .iter()
                .filter_map(|(o, l)| ratio(num(o, a), num(l, b)))
                .collect(),
        )
    };
    let decode_ratio = paired("decode_tok_s", "tg128_tok_s");
    let prefill_ratio = paired("prefill_tok_s", "pp512_tok_s");
    let ours = summarize(
        pairs.iter().map(|p| &p.0),
        &["decode_tok_s", "prefill_tok_s"],
        true,
    );
    let llama = summarize(
        pairs.iter().map(|p| &p.1),
        &["tg128_tok_s", "pp512_tok_s"],
        false,
    );
    Versus {
        ours,
        llama,
        decode_ratio,
        prefill_ratio,
    }
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
pub(super) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some((v[(n - 1) / 2] + v[n / 2]) / 2.0)
}

/// One side over its rounds: the first round's JSON, each rate key replaced by its median and
/// its rounds listed; with `peak`, `peak_rss` and `kv_bytes` from the round of the largest peak.
fn summarize<'a>(rounds: impl Iterator<Item = &'a Value>, rates: &[&str], peak: bool) -> Baseline {
    let rounds: Vec<&Value> = rounds.collect();
    let Some(first) = rounds.first() else {
        return Baseline::Missing("no round measured both sides".into());
    };
    let mut out = (*first).clone();
    let Value::Object(m) = &mut out else {
        return Baseline::Measured(out);
    };
    for key in rates {
        let all: Vec<Option<f64>> = rounds.iter().map(|r| num(r, key)).collect();
        m.insert(
            (*key).into(),
            json!(median(all.iter().flatten().copied().collect())),
        );
        m.insert(format!("{key}_rounds"), json!(all));
    }
    if peak {
        if let Some(top) = rounds
            .iter()
            .filter(|r| num(r, "peak_rss").is_some())
            .max_by(|a, b| {
                num(a, "peak_rss")
                    .unwrap_or(0.0)
                    .total_cmp(&num(b, "peak_rss").unwrap_or(0.0))
            })
        {
            for key in ["peak_rss", "kv_bytes"] {
                if let Some(v) = top.get(key) {
                    m.insert(key.into(), v.clone());
                }
            }
        }
    }
    m.insert("rounds".into(), json!(rounds.len()));
    Baseline::Measured(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(rates: &[(f64, f64, f64)]) -> impl FnMut() -> Baseline + '_ {
        let mut i = 0;
        move || {
            let (d, p, peak) = rates[i];
            i += 1;
            Baseline::Measured(
                json!({"decode_tok_s": d, "prefill_tok_s": p, "peak_rss": peak, "kv_bytes": peak / 10.0, "file_bytes": 1.0}),
            )
        }
    }

    #[test]
    fn the_ratio_is_the_median_of_same_round_ratios() {
        // The machine slows down in round 1 for both sides: each round's own ratio is 1.1, 1.0,
        // 1.2; the medians of each side alone (40 / 40) would say 1.0.
        let o = [(44.0, 100.0, 5.0), (30.0, 90.0, 7.0), (48.0, 80.0, 6.0)];
        let mut l = [(40.0, 50.0), (30.0, 50.0), (40.0, 50.0)].into_iter();
        let v = versus(3, ours(&o), move || match l.next() {
            Some((tg, pp)) => Baseline::Measured(json!({"tg128_tok_s": tg, "pp512_tok_s": pp})),
            None => Baseline::Missing("called too often".into()),
        });
        assert!((v.decode_ratio.unwrap() - 1.1).abs() < 1e-12);
        assert!((v.prefill_ratio.unwrap() - 1.8).abs() < 1e-12);
        assert_eq!(v.ours.num("decode_tok_s"), Some(44.0));
        assert_eq!(v.ours.num("peak_rss"), Some(7.0));
        assert_eq!(v.ours.num("kv_bytes"), Some(0.7));
        assert_eq!(v.llama.num("tg128_tok_s"), Some(40.0));
        assert_eq!(v.ours.num("rounds"), Some(3.0));
    }

    #[test]
    fn a_missing_side_stops_after_one_round_and_a_failed_later_round_is_left_out() {
        let mut calls = 0;
        let v = versus(3, ours(&[(1.0, 1.0, 1.0)]), || {
            calls += 1;
            Baseline::Missing("llama-bench is not on PATH".into())
        });
        assert_eq!(calls, 1);
        assert!(v.decode_ratio.is_none());
        assert_eq!(v.ours.num("decode_tok_s"), Some(1.0));
        assert!(matches!(v.llama, Baseline::Missing(ref w) if w.contains("PATH")));

        let mut n = 0;
        let v = versus(
            3,
            ours(&[(10.0, 1.0, 1.0), (99.0, 1.0, 1.0), (20.0, 1.0, 1.0)]),
            || {
                n += 1;
                if n == 2 {
                    Baseline::Missing("killed".into())
                } else {
                    Baseline::Measured(json!({"tg128_tok_s": 10.0, "pp512_tok_s": 1.0}))
                }
            },
        );
        // Rounds 0 and 2 only: ratios 1 and 2.
        assert!((v.decode_ratio.unwrap() - 1.5).abs() < 1e-12);
        assert_eq!(v.ours.num("rounds"), Some(2.0));
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, f64::NAN, 1.0, 2.0]), Some(2.0));
    }
}
