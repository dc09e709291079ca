//! Training support on the tiny fixtures:
//!
//! * the differentiable layers (`Model::train_layer`, no LoRA of their own) give the logits of
//!   the inference path, for every variant of every non-MoE base and with a sliding window;
//! * the layer-by-layer (checkpointed) gradients equal finite differences of the loss;
//! * a few distillation steps lower the loss; a checkpoint resumes exactly;
//! * the written variant loads through `TpttRepo` / `Model::load` (PEFT names, LoRA merged) and
//!   gives the student's logits: what was trained is what runs;
//! * episodes (truncated back-propagation through time): a text read in segments with the
//!   carry gives the logits of one uninterrupted read, and of inference fed the same segments;
//!   a run stopped in the middle of an episode resumes exactly;
//! * settings and inputs that cannot train are refused with an error.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use tptt::config::TpttSettings;
use tptt::linear::CarryMode;
use tptt::model::{LoadOptions, Logits, Model};
use tptt::repo::TpttRepo;
use tptt::train::distill::{DistillConfig, Distiller};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 3 + (i * 37 + seed * 101 + (i * i) % 13) % 290)
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("f32");
    let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("f32");
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The training forward (no LoRA) of `m` over `ids` with `window`.
fn train_logits(m: &Model, ids: &[u32], window: Option<usize>) -> Tensor {
    let ctx = m.seq_context(ids.len(), window).expect("context");
    let mut h = m.train_embed(ids).expect("embed");
    for i in 0..m.num_layers() {
        h = m.train_layer(i, &h, None, &ctx).expect("layer");
    }
    m.train_head(&h).expect("head")
}

#[test]
fn the_training_forward_equals_inference_on_every_fixture() {
    let mut checked = 0;
    for repo in ["tptt-llama", "tptt-qwen2", "tptt-gemma3", "tptt-olmo"] {
        let Ok(r) = TpttRepo::open(fixtures().join(repo)) else {
            panic!("fixture repo {repo}");
        };
        for v in &r.variants {
            let files = r.variant(Some(v), None).expect("variant");
            let m = Model::load(&files, &LoadOptions::default()).expect("load");
            m.check_trainable().expect("dense weights, LoRA merged");
            for (n, window) in [(40usize, None), (67, Some(24))] {
                let toks = ids(n, checked as u32);
                let window = window.or(m.config_window());
                let mut st = m.new_state(CarryMode::Continue, window);
                let want = m.forward(&toks, &mut st, Logits::All).expect("forward");
                let got = train_logits(&m, &toks, window);
                let d = max_diff(&want, &got);
                assert!(
                    d < 2e-4,
                    "{repo}/{v} S={n} window {window:?}: max |Δlogit| {d}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "checked {checked} variants");
}

fn base_student(mode: &str, mag: f32) -> Model {
    let base = fixtures().join("llama-base");
    let settings = TpttSettings::injected(mode, mag, "llama-base").expect("settings");
    Model::load_plain(&base, settings, &LoadOptions::default()).expect("load base")
}

fn cfg(window: usize, seq_len: usize) -> DistillConfig {
    DistillConfig {
        window,
        seq_len,
        episode_len: seq_len,
        rank: 4,
        alpha: 8.0,
        lr: 1e-2,
        warmup: 1,
        clip: 1.0,
        seed: 7,
    }
}

fn text() -> Vec<u32> {
    // A repetitive text: what leaves a short window comes back, so the memory can help.
    let phrase = ids(23, 5);
    phrase.iter().cycle().take(400).copied().collect()
}

#[test]
fn checkpointed_gradients_equal_finite_differences() {
    let mut d =
        Distiller::new(base_student("delta_product", 0.5), cfg(8, 40), text()).expect("new");
    // Two steps so that B ≠ 0 and every LoRA tensor has a gradient.
    d.step().expect("step");
    d.step().expect("step");
    let seq = d.sequence(5).to_vec();
    let grads = d.gradients(&seq).expect("grads");
    let named: Vec<(String, candle_core::Var)> = d
        .lora()
        .named()
        .into_iter()
        .map(|(n, v)| (n, v.clone()))
        .collect();
    // A, B of q in layer 0, B of o in the last layer, A of v in layer 1.
    for (which, idx) in [(0usize, 3usize), (1, 2), (named.len() - 1, 5), (8 + 4, 7)] {
        let (name, var) = &named[which];
        let g = grads[which]
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("grad")[idx] as f64;
        let orig = var
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("v");
        let at = |delta: f32| -> f64 {
            let mut v = orig.clone();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, var.dims(), var.device()).expect("t"))
                .expect("set");
            d.eval_loss(&seq).expect("loss").0
        };
        let eps = 1e-2;
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        at(0.0);
        eprintln!("{name}[{idx}]: {g:e} vs {numeric:e}");
        assert!(
            g.abs() > 1e-7,
            "{name}[{idx}]: a zero gradient tests nothing"
        );
        assert!(
            (numeric - g).abs() < 1e-3 + 0.05 * g.abs().max(numeric.abs()),
            "{name}[{idx}]: layer-by-layer gradient {g:e}, finite difference {numeric:e}"
        );
    }
}

#[test]
fn distillation_lowers_the_loss_and_resumes_exactly() {
    let scratch = std::env::temp_dir().join(format!("tptt-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch");
    let held_out = text()[3..67].to_vec();
    let mut d =
        Distiller::new(base_student("delta_product_c", 0.5), cfg(8, 64), text()).expect("new");
    let before = d.eval_loss(&held_out).expect("loss");
    for _ in 0..12 {
        let r = d.step().expect("step");
        assert!(r.loss.is_finite() && r.grad_norm.is_finite(), "{r:?}");
    }
    let after = d.eval_loss(&held_out).expect("loss");
    assert!(
        after.1 < 0.8 * before.1,
        "loss past the window {:.4} → {:.4}",
        before.1,
        after.1
    );
    // Resume: a new run loading the checkpoint takes the same next step as this one.
    let ckpt = scratch.join("checkpoint.safetensors");
    d.save_checkpoint(&ckpt).expect("checkpoint");
    let mut resumed =
        Distiller::new(base_student("delta_product_c", 0.5), cfg(8, 64), text()).expect("new");
    resumed.load_checkpoint(&ckpt).expect("resume");
    assert_eq!(resumed.steps_done(), 12);
    let a = d.step().expect("step");
    let b = resumed.step().expect("step");
    assert_eq!(a, b, "the resumed run continues exactly");
    // Other settings are refused.
    let mut other =
        Distiller::new(base_student("delta_product_c", 0.5), cfg(16, 64), text()).expect("new");
    let e = other.load_checkpoint(&ckpt).expect_err("other settings");
    assert!(e.to_string().contains("other settings"), "{e}");
    assert!(other.load_checkpoint(&scratch.join("missing")).is_err());
    std::fs::write(scratch.join("junk"), b"not a checkpoint").expect("junk");
    assert!(other.load_checkpoint(&scratch.join("junk")).is_err());

    // The variant folder loads as a normal TPTT repo and runs what was trained.
    let repo = scratch.join("repo");
    std::fs::create_dir_all(&repo).expect("repo");
    let base_dir = fixtures().join("llama-base");
    let base_cfg = tptt::config::read_json_object(&base_dir.join("config.json")).expect("cfg");
    let base_name = base_dir.canonicalize().expect("abs");
    d.write_variant(
        &repo.join("distilled"),
        &base_cfg,
        &base_name.display().to_string(),
    )
    .expect("write variant");
    assert!(
        !repo.join("distilled.tmp").exists(),
        "no temporary folder left"
    );
    let files = TpttRepo::open(&repo)
        .and_then(|r| r.variant(Some("distilled"), None))
        .expect("variant");
    assert_eq!(files.config.tptt.max_self_attn_length, Some(8));
    let loaded = Model::load(&files, &LoadOptions::default()).expect("load trained");
    let toks = held_out.clone();
    let mut st = loaded.new_state(CarryMode::Continue, loaded.config_window());
    let got = loaded
        .forward(&toks, &mut st, Logits::All)
        .expect("forward");
    let want = d.student_logits(&toks).expect("student");
    let diff = max_diff(&got, &want);
    assert!(
        diff < 2e-4,
        "loaded variant vs student: max |Δlogit| {diff}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn what_cannot_train_is_refused() {
    let t = text();
    let bad = |c: DistillConfig, m: Model, toks: Vec<u32>| {
        Distiller::new(m, c, toks)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(bad(cfg(64, 64), base_student("delta_rule", 0.5), t.clone()).contains("shorter"));
    assert!(bad(cfg(0, 64), base_student("delta_rule", 0.5), t.clone()).contains("at least"));
    assert!(bad(cfg(8, 64), base_student("delta_rule", 0.0), t.clone()).contains("no memory"));
    assert!(bad(
        cfg(8, 64),
        base_student("delta_rule", 0.5),
        t[..30].to_vec()
    )
    .contains("tokens"));
    assert!(bad(
        cfg(8, 64),
        base_student("delta_rule", 0.5),
        vec![999_999; 100]
    )
    .contains("vocabulary"));
    let wide = DistillConfig {
        rank: 1 << 20,
        ..cfg(8, 64)
    };
    assert!(bad(wide, base_student("delta_rule", 0.5), t.clone()).contains("rank"));
    let nan = DistillConfig {
        lr: f64::NAN,
        ..cfg(8, 64)
    };
    assert!(bad(nan, base_student("delta_rule", 0.5), t.clone()).contains("learning rate"));
    for episode_len in [0, 63, 100] {
        let odd = DistillConfig {
            episode_len,
            ..cfg(8, 64)
        };
        let e = bad(odd, base_student("delta_rule", 0.5), t.clone());
        assert!(e.contains("multiple"), "episode {episode_len}: {e}");
    }
    let long = DistillConfig {
        episode_len: 640,
        ..cfg(8, 64)
    };
    let e = bad(long, base_student("delta_rule", 0.5), t.clone());
    assert!(e.contains("--episode-len"), "{e}");
    // A mixture-of-experts base is refused up front.
    let r = TpttRepo::open(fixtures().join("tptt-olmoe")).expect("olmoe repo");
    let files = r.variant(Some(&r.variants[0]), None).expect("variant");
    let m = Model::load(&files, &LoadOptions::default()).expect("load");
    assert!(bad(cfg(8, 64), m, t).contains("mixture-of-experts"));
}

/// `tests/fixtures/tiny/tptt-trained/distilled` was written by `tptt distill` (command in the
/// fixtures' README); `cases/distilled.safetensors` holds what tptt 0.12.1 computes with it
/// (`reference_distilled.py`): with its trained window (8 tokens, the reference's limit) and
/// with the window off over 40 tokens.
#[test]
fn the_reference_runs_what_we_trained() {
    let dev = candle_core::Device::Cpu;
    let cases =
        candle_core::safetensors::load(fixtures().join("cases/distilled.safetensors"), &dev)
            .expect("reference logits");
    let files = TpttRepo::open(fixtures().join("tptt-trained"))
        .and_then(|r| r.variant(Some("distilled"), None))
        .expect("distilled variant");
    assert_eq!(files.config.tptt.max_self_attn_length, Some(8));
    assert!(files.config.tptt.lora.is_some(), "trained with LoRA");
    let m = Model::load(&files, &LoadOptions::default()).expect("load");
    for (name, window) in [("w", Some(8)), ("full", None)] {
        let got_ids: Vec<u32> = cases[&format!("ids_{name}")]
            .to_vec1::<i32>()
            .expect("ids")
            .into_iter()
            .map(|i| i as u32)
            .collect();
        assert_eq!(got_ids, ids(got_ids.len(), 3), "{name}: the script's ids");
        let mut st = m.new_state(CarryMode::Continue, window);
        let ours = m.forward(&got_ids, &mut st, Logits::All).expect("forward");
        let d = max_diff(&ours, &cases[&format!("logits_{name}")]);
        assert!(d < 1e-4, "{name}: max |Δlogit| against tptt 0.12.1: {d}");
    }
}

fn episodes(window: usize, seq_len: usize, segments: usize) -> DistillConfig {
    DistillConfig {
        episode_len: seq_len * segments,
        ..cfg(window, seq_len)
    }
}

#[test]
fn an_episode_reads_like_one_long_text() {
    let scratch = std::env::temp_dir().join(format!("tptt-episode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch");
    let base_dir = fixtures().join("llama-base");
    let base_cfg = tptt::config::read_json_object(&base_dir.join("config.json")).expect("cfg");
    let base_name = base_dir.canonicalize().expect("abs").display().to_string();
    // A window of 5 (prefix rows: 5, more than the linear branch's 3 of history) and of 2
    // (prefix rows: 3, more than the window).
    for (mode, window, seq_len) in [
        ("delta_product_c", 5, 32),
        ("delta_rule", 2, 16),
        ("delta_rule_gelu", 5, 32),
    ] {
        let mut d = Distiller::new(
            base_student(mode, 0.5),
            episodes(window, seq_len, 3),
            text(),
        )
        .expect("new");
        // Steps inside an episode make the LoRA non-zero and run the carried path.
        for _ in 0..2 {
            let r = d.step().expect("step");
            assert!(r.loss.is_finite() && r.grad_norm > 0.0, "{mode}: {r:?}");
        }
        let toks = ids(3 * seq_len - 5, 11);
        let got = d.episode_logits(&toks, seq_len).expect("episode");
        // The same model, written and loaded as a variant, fed the same segments.
        let repo = scratch.join(mode);
        d.write_variant(&repo.join("v"), &base_cfg, &base_name)
            .expect("write");
        let files = TpttRepo::open(&repo)
            .and_then(|r| r.variant(Some("v"), None))
            .expect("variant");
        let m = Model::load(&files, &LoadOptions::default()).expect("load");
        let mut st = m.new_state(CarryMode::Continue, Some(window));
        let parts: Vec<Tensor> = toks
            .chunks(seq_len)
            .map(|seg| m.forward(seg, &mut st, Logits::All).expect("forward"))
            .collect();
        let want = Tensor::cat(&parts, 0).expect("cat");
        let diff = max_diff(&got, &want);
        assert!(
            diff < 2e-4,
            "{mode}: episode vs inference: max |Δlogit| {diff}"
        );
        // One uninterrupted read, where its chunks of the linear branch fall where the
        // segments' do (the branch's output depends on the chunking, SPEC §4.6): 3 × 64
        // tokens read at once are chunked by 64, like each segment of 64.
        if seq_len == 64 {
            let toks = ids(3 * seq_len, 12);
            let got = d.episode_logits(&toks, seq_len).expect("episode");
            let whole = d.student_logits(&toks).expect("whole");
            let diff = max_diff(&got, &whole);
            assert!(
                diff < 2e-4,
                "{mode}: episode vs one read: max |Δlogit| {diff}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn a_run_stopped_inside_an_episode_resumes_exactly() {
    let scratch = std::env::temp_dir().join(format!("tptt-episode-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch");
    let c = episodes(6, 32, 3);
    let new = || Distiller::new(base_student("delta_product_c", 0.5), c.clone(), text());
    let mut d = new().expect("new");
    // Segments 0 and 1 of episode 0 read; the checkpoint carries the student's memory.
    d.step().expect("step");
    d.step().expect("step");
    let ckpt = scratch.join("checkpoint.safetensors");
    d.save_checkpoint(&ckpt).expect("checkpoint");
    let mut resumed = new().expect("new");
    resumed.load_checkpoint(&ckpt).expect("resume");
    for _ in 0..3 {
        // Segment 2, then episode 1 from a fresh memory.
        let a = d.step().expect("step");
        let b = resumed.step().expect("step");
        assert_eq!(a, b, "the resumed run continues exactly");
    }
    // Segments follow each other in the text; episodes start at drawn offsets.
    let (s0, s1) = (
        d.sequence(0).as_ptr() as usize,
        d.sequence(1).as_ptr() as usize,
    );
    assert_eq!(s1 - s0, 32 * std::mem::size_of::<u32>());
    // A checkpoint of independent sequences does not resume an episode run, and a carry
    // that does not fit is refused.
    let mut plain =
        Distiller::new(base_student("delta_product_c", 0.5), cfg(6, 32), text()).expect("new");
    plain.step().expect("step");
    let other = scratch.join("plain.safetensors");
    plain.save_checkpoint(&other).expect("checkpoint");
    let e = new()
        .expect("new")
        .load_checkpoint(&other)
        .expect_err("other settings");
    assert!(e.to_string().contains("other settings"), "{e}");
    let _ = std::fs::remove_dir_all(&scratch);
}
