//! The long-context check of the bench JSON: `tptt eval`'s figures on one text.

use super::*;

/// Softmax window of the long-context check (the memory is judged past 4× it).
pub(super) const LONG_CONTEXT_WINDOW: usize = 512;

/// `tptt eval`'s figures on one text for the bench JSON: the report and the two ratios of the
/// perplexity past 4× the window (TPTT / full attention, TPTT / same window without memory).
pub(super) fn long_context(
    subject: &Subject,
    dir: &Path,
    text: &Path,
    quick: bool,
    kv: tptt::state::KvFormat,
) -> std::result::Result<(Value, Option<f64>, Option<f64>), String> {
    if text.as_os_str() == "none" {
        return Err("--eval-text none".into());
    }
    let tok_path = [
        dir.join("tokenizer.json"),
        subject.base_dir.join("tokenizer.json"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or("no tokenizer.json next to the model")?;
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| e.to_string())?;
    let max = if quick { 2560 } else { 8192 };
    let texts = crate::eval::read_texts(&tokenizer, &[text.to_path_buf()], Some(max))
        .map_err(|e| format!("{e:#}"))?;
    let from = 4 * LONG_CONTEXT_WINDOW;
    let len = texts[0].1.len();
    if len <= from + 1 {
        return Err(format!(
            "{} has {len} tokens, fewer than 4× the window",
            text.display()
        ));
    }
    progress(format!(
        "[long context] {} ({len} tokens), window {LONG_CONTEXT_WINDOW}",
        text.display()
    ));
    let plan = crate::eval::EvalPlan {
        texts: &texts,
        configs: crate::eval::CONFIGS.to_vec(),
        window: LONG_CONTEXT_WINDOW,
        kv: tptt::state::KvChoice::Exactly(kv),
        edges: vec![0, LONG_CONTEXT_WINDOW, from, len],
        full_max_tokens: max,
        probe_distances: if quick { vec![512] } else { vec![1024, 4096] },
    };
    let results =
        crate::eval::evaluate(&subject.model, &tokenizer, &plan).map_err(|e| format!("{e:#}"))?;
    let past = |name: &str| {
        results
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.buckets.as_ref().ok())
            .and_then(|b| b.last().filter(|b| b.tokens > 0).map(|b| b.perplexity()))
    };
    let (t, w, f) = (past("tptt"), past("no_memory"), past("full_attention"));
    let report = crate::eval::to_json(&subject.label, &texts, &results);
    Ok((report, ratio(t, f), ratio(t, w)))
}
