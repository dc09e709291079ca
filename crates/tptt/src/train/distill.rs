//! Distillation of a TPTT adapter: the student (the base with the LiZA branch, a short softmax
//! window and trainable LoRA on q/k/v/o) learns to match the teacher (the same base with full
//! attention) on long sequences, so that what leaves the window is carried by the memory.
//!
//! One [`Distiller::step`] on a sequence of `S` tokens:
//! 1. the teacher's log-probabilities, from the inference path (`Model::forward`, no graph);
//! 2. the student's forward without a graph, keeping each layer's input `[S, E]` (a checkpoint
//!    per layer, so memory holds one layer's graph at a time);
//! 3. the loss `KL(teacher ‖ student)` averaged over positions; its gradient with respect to the
//!    student's logits is `(softmax(student) − teacher) / S`, taken through the head by autograd;
//! 4. layer by layer from the top, the layer is run again from its saved input with a graph,
//!    and `Σ output ⊙ grad` is back-propagated, giving the gradients of that layer's LoRA and of
//!    its input (the next layer down's output gradient);
//! 5. the gradients are clipped to a global norm and applied with Adam.
//!
//! The LoRA is PEFT's: `W x + s·B(A x)`, `s = alpha / r`, `A` Kaiming-uniform (bound
//! `1/√in`), `B = 0`, so training starts from the untrained injection. [`Distiller::save_adapter`]
//! writes it with the names the reference's `save_tptt_safetensors` uses (SPEC §1.3), which our
//! loader and the reference both read. Checkpoints ([`Distiller::save_checkpoint`]) hold the
//! LoRA, Adam's moments and the step, written to a temporary file and renamed into place.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var, D};

use crate::error::{Error, Result};
use crate::linear::CarryMode;
use crate::model::{LayerLora, Logits, LoraPair, Model};

/// Distillation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillConfig {
    /// The student's softmax window.
    pub window: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (scale `alpha / rank`).
    pub alpha: f64,
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warm-up to `lr`.
    pub warmup: usize,
    /// Global gradient-norm clip.
    pub clip: f64,
    /// Seed of the LoRA initialisation and of the sequence offsets.
    pub seed: u64,
}

impl DistillConfig {
    /// Refuses values that cannot train: zero sizes, a window not shorter than the sequence,
    /// non-finite or non-positive rates.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::config(m));
        if self.window == 0 || self.seq_len < 2 || self.rank == 0 {
            return bad(format!(
                "window ({}), sequence length ({}) and LoRA rank ({}) must be at least 1, 2 and 1",
                self.window, self.seq_len, self.rank
            ));
        }
        if self.window >= self.seq_len {
            return bad(format!(
                "the window ({}) must be shorter than the sequence length ({}): the memory learns from what leaves the window",
                self.window, self.seq_len
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr < 1.0) {
            return bad(format!("learning rate {} must be in (0, 1)", self.lr));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0)
            || !(self.clip.is_finite() && self.clip > 0.0)
        {
            return bad(format!(
                "LoRA alpha ({}) and the gradient clip ({}) must be positive numbers",
                self.alpha, self.clip
            ));
        }
        Ok(())
    }
}

/// A rough upper bound of the memory one [`Distiller::step`] on `seq_len` tokens needs beyond
/// the weights, in bytes: one layer's attention graph (`H·S²` floats, a few times over), the
/// teacher's and student's `[S, V]` log-probabilities and their gradient, every layer's saved
/// input, and one layer's other activations. Used to refuse a sequence length that cannot fit
/// before any work is done.
pub fn estimate_step_bytes(model: &Model, seq_len: usize) -> u64 {
    let b = &model.config().base;
    // Saturating: an absurd --seq-len must come out as "too large", not overflow.
    let s = seq_len as u64;
    let mul = |xs: &[u64]| xs.iter().fold(1u64, |a, &x| a.saturating_mul(x));
    let attention = mul(&[10, b.num_heads as u64, s, s]);
    let vocab = mul(&[6, s, b.vocab_size as u64]);
    let saved = mul(&[b.num_layers as u64 + 2, s, b.hidden_size as u64]);
    let layer = mul(&[12, s, b.intermediate_size as u64 + 4 * b.hidden_size as u64]);
    attention
        .saturating_add(vocab)
        .saturating_add(saved)
        .saturating_add(layer)
        .saturating_mul(4)
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The step just taken (1-based).
    pub step: usize,
    /// Mean KL(teacher ‖ student) over the sequence's positions (nats).
    pub loss: f64,
    /// Mean KL over the positions past the window (where only the memory can help).
    pub loss_past_window: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// The four projections, in the order of [`LayerLora`].
const PROJ: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

/// The PEFT adapter name of layer `i`'s projection `p`, side `ab` (`"A"` or `"B"`).
pub fn adapter_key(i: usize, p: &str, ab: &str) -> String {
    format!("model.model.layers.{i}.self_attn.base_attn.{p}.lora_{ab}.default.weight")
}

/// Trainable LoRA: per layer, per projection, `(A, B)`.
pub struct Lora {
    vars: Vec<[(Var, Var); 4]>,
    scale: f64,
}

impl Lora {
    /// PEFT's initialisation (module doc), deterministic in `seed`.
    pub fn init(model: &Model, rank: usize, alpha: f64, seed: u64) -> Result<Self> {
        let b = &model.config().base;
        let (e, hd, kvd) = (
            b.hidden_size,
            b.num_heads * b.head_dim,
            b.num_kv_heads * b.head_dim,
        );
        let dev = model.device();
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = |n: usize, bound: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    ((rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
                })
                .collect()
        };
        let mut vars = Vec::with_capacity(b.num_layers);
        for _ in 0..b.num_layers {
            let mut pair = |inp: usize, out: usize| -> Result<(Var, Var)> {
                let a = Var::from_vec(
                    uniform(rank * inp, 1.0 / (inp as f32).sqrt()),
                    (rank, inp),
                    dev,
                )?;
                let bb = Var::zeros((out, rank), DType::F32, dev)?;
                Ok((a, bb))
            };
            vars.push([pair(e, hd)?, pair(e, kvd)?, pair(e, kvd)?, pair(hd, e)?]);
        }
        Ok(Self {
            vars,
            scale: alpha / rank as f64,
        })
    }

    /// Every trainable tensor with its adapter name, in a fixed order.
    pub fn named(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::with_capacity(self.vars.len() * 8);
        for (i, layer) in self.vars.iter().enumerate() {
            for (p, (a, b)) in PROJ.iter().zip(layer) {
                out.push((adapter_key(i, p, "A"), a));
                out.push((adapter_key(i, p, "B"), b));
            }
        }
        out
    }

    /// Layer `i`'s tensors: tracked by autograd, or `detached` (no graph).
    fn layer(&self, i: usize, detached: bool) -> LayerLora {
        let t = |v: &Var| {
            if detached {
                v.as_tensor().detach()
            } else {
                v.as_tensor().clone()
            }
        };
        let pair = |(a, b): &(Var, Var)| LoraPair { a: t(a), b: t(b) };
        let [q, k, v, o] = &self.vars[i];
        LayerLora {
            q: pair(q),
            k: pair(k),
            v: pair(v),
            o: pair(o),
        }
    }

    /// Overwrites the values from `tensors` (adapter names), checking every name and shape.
    fn load(&self, tensors: &HashMap<String, Tensor>, prefix: &str) -> Result<()> {
        for (name, var) in self.named() {
            let t = tensors
                .get(&format!("{prefix}{name}"))
                .ok_or_else(|| Error::Input(format!("the checkpoint lacks {name}")))?;
            if t.dims() != var.dims() {
                return Err(Error::Input(format!(
                    "{name} is {:?} in the checkpoint, {:?} here (another base or rank?)",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }
}

/// Adam (no weight decay), with bias correction.
struct Adam {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: u64,
}

impl Adam {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(lora: &Lora) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let vars = lora.named();
        Ok(Self {
            m: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            t: 0,
        })
    }

    fn update(&mut self, vars: &[(String, &Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let c1 = 1.0 - Self::B1.powi(self.t as i32);
        let c2 = 1.0 - Self::B2.powi(self.t as i32);
        for (i, ((_, var), g)) in vars.iter().zip(grads).enumerate() {
            self.m[i] = ((&self.m[i] * Self::B1)? + (g * (1.0 - Self::B1))?)?;
            self.v[i] = ((&self.v[i] * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?;
            let step = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + Self::EPS)?)?;
            var.set(&(var.as_tensor() - (step * lr)?)?)?;
        }
        Ok(())
    }
}

/// A distillation run: student, teacher, LoRA, optimizer and data.
pub struct Distiller {
    student: Model,
    teacher: Model,
    lora: Lora,
    adam: Adam,
    cfg: DistillConfig,
    tokens: Vec<u32>,
    step: usize,
}

impl Distiller {
    /// A fresh run. `student` is the base with the TPTT settings to train (no adapter): its
    /// mag weight and operator mode are the student's; the teacher is the same weights with the
    /// branch off and full attention. `tokens` is the training text, at least `seq_len`
    /// tokens.
    pub fn new(student: Model, cfg: DistillConfig, tokens: Vec<u32>) -> Result<Self> {
        cfg.validate()?;
        student.check_trainable()?;
        if student.config().tptt.mag_weight == 0.0 {
            return Err(Error::config(
                "mag_weight is 0: the student has no memory to train",
            ));
        }
        if tokens.len() < cfg.seq_len {
            return Err(Error::Input(format!(
                "the training text has {} tokens; a sequence of {} needs at least that many (use a longer text or a shorter --seq-len)",
                tokens.len(),
                cfg.seq_len
            )));
        }
        let vocab = student.config().base.vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary ({vocab}): the tokenizer does not belong to this base"
            )));
        }
        let b = &student.config().base;
        let widest = b.hidden_size.min(b.num_kv_heads * b.head_dim);
        if cfg.rank > widest {
            return Err(Error::config(format!(
                "LoRA rank {} is larger than the smallest projection dimension ({widest}) of this base",
                cfg.rank
            )));
        }
        let mut teacher = student.clone();
        teacher.set_mag_weight(0.0);
        let lora = Lora::init(&student, cfg.rank, cfg.alpha, cfg.seed)?;
        let adam = Adam::new(&lora)?;
        Ok(Self {
            student,
            teacher,
            lora,
            adam,
            cfg,
            tokens,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The settings.
    pub fn config(&self) -> &DistillConfig {
        &self.cfg
    }

    /// The training sequence of step `k` (0-based): a slice of the text at an offset drawn from
    /// `(seed, k)`, so a resumed run reads what an uninterrupted one would.
    pub fn sequence(&self, k: usize) -> &[u32] {
        let room = self.tokens.len() - self.cfg.seq_len;
        let mut x = (self.cfg.seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
        for _ in 0..3 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        let at = (x % (room as u64 + 1)) as usize;
        &self.tokens[at..at + self.cfg.seq_len]
    }

    fn lr_at(&self, step: usize) -> f64 {
        let warm = self.cfg.warmup.max(1);
        self.cfg.lr * ((step + 1) as f64 / warm as f64).min(1.0)
    }

    /// One optimisation step on the next sequence (module doc).
    pub fn step(&mut self) -> Result<StepReport> {
        let ids = self.sequence(self.step).to_vec();
        let (loss, loss_past, grads) = self.loss_and_grads(&ids)?;
        let vars = self.lora.named();
        let sq: f64 = grads
            .iter()
            .map(|g| {
                g.sqr()
                    .and_then(|x| x.sum_all())
                    .and_then(|x| x.to_scalar::<f32>())
            })
            .collect::<candle_core::Result<Vec<f32>>>()?
            .iter()
            .map(|&x| x as f64)
            .sum();
        let norm = sq.sqrt();
        if !norm.is_finite() || !loss.is_finite() {
            return Err(Error::State(format!(
                "training diverged at step {} (loss {loss}, gradient norm {norm}): lower the learning rate",
                self.step + 1
            )));
        }
        let factor = if norm > self.cfg.clip {
            self.cfg.clip / norm
        } else {
            1.0
        };
        let grads = grads
            .iter()
            .map(|g| g * factor)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lr = self.lr_at(self.step);
        self.adam.update(&vars, &grads, lr)?;
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss,
            loss_past_window: loss_past,
            grad_norm: norm,
            lr,
        })
    }

    /// The student's logits `[S, V]` on `ids` with the current LoRA (no graph).
    pub fn student_logits(&self, ids: &[u32]) -> Result<Tensor> {
        let ctx = self.student.seq_context(ids.len(), Some(self.cfg.window))?;
        let mut h = self.student.train_embed(ids)?;
        for i in 0..self.student.num_layers() {
            let l = self.lora.layer(i, true);
            h = self
                .student
                .train_layer(i, &h, Some((&l, self.lora.scale)), &ctx)?;
        }
        self.student.train_head(&h)
    }

    /// The loss (all positions, positions past the window) of the current LoRA on `ids`,
    /// without training: a held-out check.
    pub fn eval_loss(&self, ids: &[u32]) -> Result<(f64, f64)> {
        let t_logp = self.teacher_logp(ids)?;
        let (loss, past, _) = kl_and_grad(&t_logp, &self.student_logits(ids)?, self.cfg.window)?;
        Ok((loss, past))
    }

    /// The trainable tensors.
    pub fn lora(&self) -> &Lora {
        &self.lora
    }

    /// The gradients of the loss on `ids` for every LoRA tensor (order of [`Lora::named`]),
    /// computed layer by layer as [`Distiller::step`] does; no update.
    pub fn gradients(&self, ids: &[u32]) -> Result<Vec<Tensor>> {
        Ok(self.loss_and_grads(ids)?.2)
    }

    /// Writes a complete variant folder `dir` (a TPTT `config.json` — the base's keys, the TPTT
    /// settings of the student, `max_self_attn_length` = the trained window, the LoRA config —
    /// and `adapter_model.safetensors`). It is built in `dir` + `.tmp` and renamed into place,
    /// so a crash or a full disk never leaves a folder that looks complete.
    pub fn write_variant(
        &self,
        dir: &Path,
        base_config: &serde_json::Map<String, serde_json::Value>,
        base_model_name: &str,
    ) -> Result<()> {
        let t = &self.student.config().tptt;
        let rc = &t.recurrent;
        let gate = |g: crate::config::Gate| match g {
            crate::config::Gate::K => "k",
            crate::config::Gate::V => "v",
            crate::config::Gate::Kv => "kv",
            crate::config::Gate::C => "c",
        };
        let trick = match rc.trick {
            crate::config::Trick::Dt => "dt",
            crate::config::Trick::Rot => "rot",
            crate::config::Trick::Rdt => "rdt",
            crate::config::Trick::Cte => "cte",
        };
        let mut cfg = base_config.clone();
        let extra = serde_json::json!({
            "model_type": "tptt",
            "architectures": ["TpttModel"],
            "auto_map": {
                "AutoConfig": "configuration_tptt.TpttConfig",
                "AutoModelForCausalLM": "modeling_tptt.TpttModel"
            },
            "base_model_name": base_model_name,
            "base_model_subfolder": null,
            "model_task": "causal_lm",
            "operator_mode": t.operator_mode,
            "recurrent_config": {
                "order": rc.order,
                "alpha_gate": gate(rc.alpha_gate),
                "beta_gate": gate(rc.beta_gate),
                "linear": rc.linear,
                "trick": trick
            },
            "mag_weight": t.mag_weight,
            "cross_gate": t.cross_gate,
            "base_scale_attn": t.base_scale_attn,
            "max_chunk_size": t.max_chunk_size,
            "max_self_attn_length": self.cfg.window,
            "linear_precision": "float32",
            "bidirectional": false,
            "padding_side": "right",
            "pooling_config": null,
            "target_modules_names": ["attn", "self_attn", "attention"],
            "use_linear_checkpoint": false,
            "lora_config": {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": self.cfg.rank,
                "lora_alpha": self.cfg.alpha,
                "lora_dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "bias": "none",
                "use_rslora": false,
                "use_dora": false,
                "fan_in_fan_out": false,
                "init_lora_weights": true,
                "inference_mode": false
            },
            "tptt_chat_distill": {
                "window": self.cfg.window,
                "seq_len": self.cfg.seq_len,
                "steps": self.step,
                "rank": self.cfg.rank,
                "lr": self.cfg.lr
            }
        });
        if let serde_json::Value::Object(m) = extra {
            cfg.extend(m);
        }
        let mut tmp = dir.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let werr = |p: &Path, e: String| Error::Write {
            path: p.to_path_buf(),
            message: e,
        };
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| werr(&tmp, e.to_string()))?;
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| werr(dir, e.to_string()))?;
        let cfg_path = tmp.join("config.json");
        std::fs::write(&cfg_path, text).map_err(|e| werr(&cfg_path, e.to_string()))?;
        self.save_adapter(&tmp.join("adapter_model.safetensors"))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| werr(dir, e.to_string()))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| werr(dir, e.to_string()))
    }

    fn teacher_logp(&self, ids: &[u32]) -> Result<Tensor> {
        let mut st = self.teacher.new_state(CarryMode::Continue, None);
        let logits = self.teacher.forward(ids, &mut st, Logits::All)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }

    /// Loss, loss past the window, and the gradient of every LoRA tensor (order of
    /// [`Lora::named`]).
    fn loss_and_grads(&self, ids: &[u32]) -> Result<(f64, f64, Vec<Tensor>)> {
        let t_logp = self.teacher_logp(ids)?;
        let model = &self.student;
        let n_layers = model.num_layers();
        let ctx = model.seq_context(ids.len(), Some(self.cfg.window))?;
        // Forward without a graph, keeping every layer's input.
        let mut inputs = Vec::with_capacity(n_layers + 1);
        inputs.push(model.train_embed(ids)?);
        for i in 0..n_layers {
            let l = self.lora.layer(i, true);
            let out = model.train_layer(i, &inputs[i], Some((&l, self.lora.scale)), &ctx)?;
            inputs.push(out);
        }
        // The head: loss and the gradient at the last layer's output.
        let top = Var::from_tensor(&inputs[n_layers])?;
        let logits = model.train_head(top.as_tensor())?;
        let (loss, past, g_logits) = kl_and_grad(&t_logp, &logits.detach(), self.cfg.window)?;
        let mut grad = (logits * g_logits)?
            .sum_all()?
            .backward()?
            .remove(top.as_tensor())
            .ok_or_else(|| Error::State("no gradient reached the last layer".into()))?;
        // Layer by layer from the top, recomputed with a graph.
        let mut grads: Vec<Option<Tensor>> = vec![None; n_layers * 8];
        for i in (0..n_layers).rev() {
            let x = Var::from_tensor(&inputs[i])?;
            let l = self.lora.layer(i, false);
            let y = model.train_layer(i, x.as_tensor(), Some((&l, self.lora.scale)), &ctx)?;
            let mut store = (y * &grad)?.sum_all()?.backward()?;
            for (j, t) in [
                &l.q.a, &l.q.b, &l.k.a, &l.k.b, &l.v.a, &l.v.b, &l.o.a, &l.o.b,
            ]
            .into_iter()
            .enumerate()
            {
                grads[i * 8 + j] = Some(match store.remove(t) {
                    Some(g) => g,
                    None => t.zeros_like()?,
                });
            }
            grad = match store.remove(x.as_tensor()) {
                Some(g) => g,
                None => x.as_tensor().zeros_like()?,
            };
        }
        let grads = grads
            .into_iter()
            .map(|g| g.ok_or_else(|| Error::State("a LoRA gradient is missing".into())))
            .collect::<Result<Vec<_>>>()?;
        Ok((loss, past, grads))
    }

    /// Writes the adapter (`adapter_model.safetensors`, PEFT names, f32) to `path`, atomically.
    pub fn save_adapter(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .lora
            .named()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        write_safetensors(path, &tensors, None)
    }

    /// Writes a checkpoint (LoRA, Adam's moments, the step and the settings) to `path`,
    /// atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (i, (n, v)) in self.lora.named().into_iter().enumerate() {
            tensors.push((format!("lora.{n}"), v.as_tensor().clone()));
            tensors.push((format!("adam_m.{n}"), self.adam.m[i].clone()));
            tensors.push((format!("adam_v.{n}"), self.adam.v[i].clone()));
        }
        let meta = HashMap::from([
            ("step".to_string(), self.step.to_string()),
            ("adam_t".to_string(), self.adam.t.to_string()),
            ("config".to_string(), format!("{:?}", self.cfg)),
        ]);
        write_safetensors(path, &tensors, Some(meta))
    }

    /// Continues from a checkpoint written by [`Distiller::save_checkpoint`] with the same
    /// settings (the number of steps may differ); anything else is refused.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::Input(format!("{}: not a checkpoint ({e})", path.display())))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let want = format!("{:?}", self.cfg);
        if meta.get("config") != Some(&want) {
            return Err(Error::Input(format!(
                "{} was made with other settings ({}); this run uses {want}: remove it to start over",
                path.display(),
                meta.get("config").map(String::as_str).unwrap_or("none recorded")
            )));
        }
        let num = |k: &str| -> Result<u64> {
            meta.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::Input(format!("{}: no valid {k}", path.display())))
        };
        let (step, t) = (num("step")?, num("adam_t")?);
        let tensors = candle_core::safetensors::load_buffer(&bytes, self.student.device())?;
        self.lora.load(&tensors, "lora.")?;
        for (i, (n, v)) in self.lora.named().into_iter().enumerate() {
            for (prefix, slot) in [
                ("adam_m.", &mut self.adam.m[i]),
                ("adam_v.", &mut self.adam.v[i]),
            ] {
                let x = tensors
                    .get(&format!("{prefix}{n}"))
                    .ok_or_else(|| Error::Input(format!("the checkpoint lacks {prefix}{n}")))?;
                if x.dims() != v.dims() {
                    return Err(Error::Input(format!("{prefix}{n} has the wrong shape")));
                }
                *slot = x.clone();
            }
        }
        self.step = step as usize;
        self.adam.t = t;
        Ok(())
    }
}

/// `KL(p_t ‖ p_s)` averaged over positions, the same over positions `≥ window`, and its
/// gradient with respect to the student's logits, `(softmax(s) − p_t) / S`.
fn kl_and_grad(t_logp: &Tensor, s_logits: &Tensor, window: usize) -> Result<(f64, f64, Tensor)> {
    let s = s_logits.dim(0)?;
    let s_logp = candle_nn::ops::log_softmax(s_logits, D::Minus1)?;
    let p_t = t_logp.exp()?;
    let per_pos = (&p_t * (t_logp - &s_logp)?)?
        .sum(D::Minus1)?
        .to_vec1::<f32>()?;
    let loss = per_pos.iter().map(|&x| x as f64).sum::<f64>() / s as f64;
    let past = &per_pos[window.min(s)..];
    let loss_past = if past.is_empty() {
        f64::NAN
    } else {
        past.iter().map(|&x| x as f64).sum::<f64>() / past.len() as f64
    };
    let grad = ((s_logp.exp()? - p_t)? / s as f64)?;
    Ok((loss, loss_past, grad))
}

/// f32 tensors to a safetensors file, through `path.tmp` renamed into place.
fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: Option<HashMap<String, String>>,
) -> Result<()> {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            Ok((
                n.clone(),
                bytemuck::cast_slice(&v).to_vec(),
                t.dims().to_vec(),
            ))
        })
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(n, b, shape)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Input(format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let tmp = path.with_extension("tmp");
    let io = |message: String| Error::Write {
        path: path.to_path_buf(),
        message,
    };
    safetensors::serialize_to_file(views, meta, &tmp).map_err(|e| io(e.to_string()))?;
    // The safetensors crate creates the file owner-only; a model file is world-readable.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| io(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e.to_string())
    })
}
