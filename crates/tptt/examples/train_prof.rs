//! Times the pieces of one distillation step on a real base (dev tool):
//! `cargo run -p tptt --example train_prof -- BASE_DIR SEQ_LEN WINDOW`.
use std::time::Instant;

use candle_core::{Tensor, Var};
use tptt::config::TpttSettings;
use tptt::linear::CarryMode;
use tptt::model::{LoadOptions, Logits, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("NO_TRAIN_ALLOC").is_none() {
        tptt::alloc::tune_for_training();
    }
    let args: Vec<String> = std::env::args().collect();
    let base = std::path::Path::new(&args[1]);
    let s: usize = args[2].parse()?;
    let w: usize = args[3].parse()?;
    let m = Model::load_plain(
        base,
        TpttSettings::injected(
            "delta_product_c",
            std::env::var("MAG")
                .ok()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0.125),
            "b",
        )?,
        &LoadOptions::default(),
    )?;
    let ids: Vec<u32> = (0..s as u32).map(|i| 100 + (i * 7919) % 40000).collect();
    let t = Instant::now();
    let mut st = m.new_state(CarryMode::Continue, None);
    let _ = m.forward(&ids, &mut st, Logits::All)?;
    eprintln!("teacher forward: {:.2}s", t.elapsed().as_secs_f64());
    let ctx = m.seq_context(s, Some(w))?;
    let mut h = m.train_embed(&ids)?;
    let t = Instant::now();
    let mut inputs = vec![h.clone()];
    for i in 0..m.num_layers() {
        h = m.train_layer(i, &h, None, &ctx)?;
        inputs.push(h.clone());
    }
    eprintln!(
        "student forward (no graph): {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let top = Var::from_tensor(&h)?;
    let logits = m.train_head(top.as_tensor())?;
    let g = logits.ones_like()?;
    let _ = (logits * g)?.sum_all()?.backward()?;
    eprintln!("head fwd+bwd: {:.2}s", t.elapsed().as_secs_f64());
    let grad = inputs[0].ones_like()?;
    let reps: usize = std::env::var("LAYER_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    for i in (0..reps).map(|r| r % 2) {
        let t = Instant::now();
        let x = Var::from_tensor(&inputs[i])?;
        let y = m.train_layer(i, x.as_tensor(), None, &ctx)?;
        let t1 = t.elapsed().as_secs_f64();
        let _ = (y * &grad)?.sum_all()?.backward()?;
        eprintln!(
            "layer {i}: fwd with graph {t1:.2}s, total {:.2}s",
            t.elapsed().as_secs_f64()
        );
    }
    let _ = Tensor::zeros(1, candle_core::DType::F32, m.device())?;
    Ok(())
}
