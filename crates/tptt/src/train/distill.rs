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
//! **Episodes** (truncated back-propagation through time): with `episode_len > seq_len`, an
//! episode of `episode_len` tokens is read as consecutive segments of `seq_len`, one per step.
//! The teacher reads the whole episode with full attention (its inference state carried from
//! segment to segment); the student continues from what it read before, as in a long chat —
//! each layer's linear state after the previous segment, and each layer's saved input for the
//! last `max(window, 3)` tokens before the segment, whose keys and values fill the softmax
//! window of the segment's first tokens ([`Model::train_layer_carried`]). The carry is a
//! constant (no gradient flows into the previous segment) computed with the weights of the
//! step that read it. So the memory learns on states that have read up to `episode_len`
//! tokens, not only `seq_len`, at the cost of `seq_len` tokens per step.
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
use crate::model::{LayerLora, Logits, LoraPair, Model, SeqContext, State, TrainCarry};
use crate::train::linear::HISTORY;

/// Distillation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillConfig {
    /// The student's softmax window.
    pub window: usize,
    /// Tokens per training sequence (one step).
    pub seq_len: usize,
    /// Tokens per episode: a multiple of `seq_len`, read as consecutive segments with the
    /// memory carried across them (module doc); `seq_len` for independent sequences.
    pub episode_len: usize,
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
        if self.episode_len < self.seq_len || !self.episode_len.is_multiple_of(self.seq_len) {
            return bad(format!(
                "the episode length ({}) must be a multiple of the sequence length ({})",
                self.episode_len, self.seq_len
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr < 1.0) {
            return bad(format!("learning rate {} must be in (0, 1)", self.lr));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !(positive(self.alpha) && positive(self.clip)) {
            return bad(format!(
                "LoRA alpha ({}) and the gradient clip ({}) must be positive numbers",
                self.alpha, self.clip
            ));
        }
        Ok(())
    }
}

/// A rough upper bound of the memory one [`Distiller::step`] needs beyond the weights, in
/// bytes: one layer's attention graph over the segment and its carried prefix (`H·R²` floats,
/// a few times over), the teacher's and student's `[S, V]` log-probabilities and their
/// gradient, every layer's saved input and prefix, one layer's other activations, and the
/// teacher's keys and values for a whole episode. Used to refuse settings that cannot fit
/// before any work is done.
pub fn estimate_step_bytes(model: &Model, cfg: &DistillConfig) -> u64 {
    let b = &model.config().base;
    // Saturating: an absurd --seq-len must come out as "too large", not overflow.
    let s = cfg.seq_len as u64;
    let episodes = cfg.episode_len > cfg.seq_len;
    let p = if episodes {
        cfg.window.max(HISTORY) as u64
    } else {
        0
    };
    let r = s.saturating_add(p);
    let mul = |xs: &[u64]| xs.iter().fold(1u64, |a, &x| a.saturating_mul(x));
    let attention = mul(&[10, b.num_heads as u64, r, r]);
    let vocab = mul(&[6, s, b.vocab_size as u64]);
    let saved = mul(&[2 * b.num_layers as u64 + 2, r, b.hidden_size as u64]);
    let layer = mul(&[12, r, b.intermediate_size as u64 + 4 * b.hidden_size as u64]);
    let teacher_kv = mul(&[
        2 * b.num_layers as u64,
        cfg.episode_len as u64,
        (b.num_kv_heads * b.head_dim) as u64,
    ]);
    attention
        .saturating_add(vocab)
        .saturating_add(saved)
        .saturating_add(layer)
        .saturating_add(teacher_kv)
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

/// What the student carries from one segment of an episode to the next (module doc).
#[derive(Debug, Clone, Default)]
struct Carry {
    /// Tokens of the episode read before the segment.
    read: usize,
    /// Per layer, its input for the last tokens read, `[P, E]` (empty when nothing was read).
    prefix: Vec<Tensor>,
    /// Per layer, the linear state after the last token read (empty when nothing was read).
    states: Vec<Tensor>,
}

impl Carry {
    /// Rows of the prefix.
    fn rows(&self) -> Result<usize> {
        Ok(match self.prefix.first() {
            Some(t) => t.dim(0)?,
            None => 0,
        })
    }
}

/// An episode being read: the teacher's inference state and the student's carry, before the
/// segment of step `step`.
struct Episode {
    step: usize,
    teacher: State,
    carry: Carry,
}

/// What the student's forward without a graph gives: every layer's input for the segment
/// (`[S, E]`; the last entry is the top layer's output), the context it ran with, and the carry
/// after the segment.
struct Forward {
    inputs: Vec<Tensor>,
    ctx: SeqContext,
    next: Carry,
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
    /// The episode being read, when a step continues one.
    episode: Option<Episode>,
    /// A student carry loaded from a checkpoint, for step `.0`.
    resumed: Option<(usize, Carry)>,
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
        if tokens.len() < cfg.episode_len {
            return Err(Error::Input(format!(
                "the training text has {} tokens; {} {} needs at least that many (use a longer text or a shorter {})",
                tokens.len(),
                if cfg.episode_len > cfg.seq_len { "an episode of" } else { "a sequence of" },
                cfg.episode_len,
                if cfg.episode_len > cfg.seq_len { "--episode-len" } else { "--seq-len" },
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
            episode: None,
            resumed: None,
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

    /// Segments per episode.
    fn segments(&self) -> usize {
        self.cfg.episode_len / self.cfg.seq_len
    }

    /// The training sequence of step `k` (0-based): segment `k mod n` of episode `k / n`
    /// (`n` segments per episode), an episode being a slice of the text at an offset drawn
    /// from `(seed, episode)`, so a resumed run reads what an uninterrupted one would.
    pub fn sequence(&self, k: usize) -> &[u32] {
        let n = self.segments();
        let (e, j) = (k / n, k % n);
        let room = self.tokens.len() - self.cfg.episode_len;
        let mut x = (self.cfg.seed ^ (e as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
        for _ in 0..3 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        let at = (x % (room as u64 + 1)) as usize + j * self.cfg.seq_len;
        &self.tokens[at..at + self.cfg.seq_len]
    }

    /// The episode state before step `k`: the one carried from step `k − 1`, or rebuilt by
    /// reading the episode's earlier segments (after a resume: the teacher replays them, the
    /// student's carry comes from the checkpoint).
    fn episode_for(&mut self, k: usize) -> Result<Episode> {
        if let Some(ep) = self.episode.take().filter(|ep| ep.step == k) {
            return Ok(ep);
        }
        let first = k - k % self.segments();
        let resumed = self.resumed.take().filter(|(at, _)| *at == k);
        let mut ep = Episode {
            step: first,
            teacher: self.teacher.new_state(CarryMode::Continue, None),
            carry: Carry::default(),
        };
        for j in first..k {
            let ids = self.sequence(j).to_vec();
            self.teacher.forward(&ids, &mut ep.teacher, Logits::Last)?;
            if resumed.is_none() {
                ep.carry = self.student_forward(&ids, &ep.carry)?.next;
            }
        }
        if let Some((_, carry)) = resumed {
            ep.carry = carry;
        }
        ep.step = k;
        Ok(ep)
    }

    fn lr_at(&self, step: usize) -> f64 {
        let warm = self.cfg.warmup.max(1);
        self.cfg.lr * ((step + 1) as f64 / warm as f64).min(1.0)
    }

    /// One optimisation step on the next sequence (module doc).
    pub fn step(&mut self) -> Result<StepReport> {
        let k = self.step;
        let ids = self.sequence(k).to_vec();
        let mut ep = self.episode_for(k)?;
        let t_logp = self.teacher_logp(&ids, &mut ep.teacher)?;
        let (loss, loss_past, grads, next) = self.loss_and_grads(&ids, &t_logp, &ep.carry)?;
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
        if !self.step.is_multiple_of(self.segments()) {
            ep.carry = next;
            ep.step = self.step;
            self.episode = Some(ep);
        }
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
        let f = self.student_forward(ids, &Carry::default())?;
        let top = f
            .inputs
            .last()
            .ok_or_else(|| Error::State("no layer output".into()))?;
        self.student.train_head(top)
    }

    /// The student's logits `[S, V]` on `ids` read as an episode is: in segments of
    /// `segment` tokens (the last one may be shorter), each continuing from the carry of the
    /// one before (no graph).
    pub fn episode_logits(&self, ids: &[u32], segment: usize) -> Result<Tensor> {
        if segment == 0 {
            return Err(Error::Input("segments of 0 tokens".into()));
        }
        let mut carry = Carry::default();
        let mut out = Vec::new();
        for seg in ids.chunks(segment) {
            let f = self.student_forward(seg, &carry)?;
            let top = f
                .inputs
                .last()
                .ok_or_else(|| Error::State("no layer output".into()))?;
            out.push(self.student.train_head(top)?);
            carry = f.next;
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// The loss (all positions, positions past the window) of the current LoRA on `ids`,
    /// without training: a held-out check.
    pub fn eval_loss(&self, ids: &[u32]) -> Result<(f64, f64)> {
        let mut st = self.teacher.new_state(CarryMode::Continue, None);
        let t_logp = self.teacher_logp(ids, &mut st)?;
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
        let mut st = self.teacher.new_state(CarryMode::Continue, None);
        let t_logp = self.teacher_logp(ids, &mut st)?;
        Ok(self.loss_and_grads(ids, &t_logp, &Carry::default())?.2)
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
                "episode_len": self.cfg.episode_len,
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

    /// The teacher's log-probabilities `[S, V]` on `ids`, continuing `state`.
    fn teacher_logp(&self, ids: &[u32], state: &mut State) -> Result<Tensor> {
        let logits = self.teacher.forward(ids, state, Logits::All)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
    }

    /// Layer `i`'s input for the segment preceded by the carry's prefix (`[P + S, E]`).
    fn with_prefix(carry: &Carry, i: usize, x: &Tensor) -> Result<Tensor> {
        Ok(match carry.prefix.get(i) {
            Some(p) => Tensor::cat(&[p, x], 0)?,
            None => x.clone(),
        })
    }

    /// The student's forward on a segment without a graph, continuing `carry` (module doc).
    fn student_forward(&self, ids: &[u32], carry: &Carry) -> Result<Forward> {
        let model = &self.student;
        let n_layers = model.num_layers();
        let p = carry.rows()?;
        if p > 0 && (carry.prefix.len() != n_layers || carry.states.len() != n_layers) {
            return Err(Error::State(
                "the carry does not match the model's layers".into(),
            ));
        }
        let start = carry.read.checked_sub(p).ok_or_else(|| {
            Error::State(format!("a prefix of {p} tokens after {} read", carry.read))
        })?;
        let ctx = model.seq_context_at(start, p + ids.len(), Some(self.cfg.window))?;
        let read = carry.read + ids.len();
        let keep = self.cfg.window.max(HISTORY).min(read);
        let mut inputs = Vec::with_capacity(n_layers + 1);
        inputs.push(model.train_embed(ids)?);
        let mut next = Carry {
            read,
            prefix: Vec::with_capacity(n_layers),
            states: Vec::with_capacity(n_layers),
        };
        for i in 0..n_layers {
            let l = self.lora.layer(i, true);
            let full = Self::with_prefix(carry, i, &inputs[i])?;
            let tc = carry
                .states
                .get(i)
                .map(|state| TrainCarry { prefix: p, state });
            let (out, state) =
                model.train_layer_carried(i, &full, Some((&l, self.lora.scale)), &ctx, tc)?;
            let rows = full.dim(0)?;
            next.prefix.push(full.narrow(0, rows - keep, keep)?);
            next.states.push(
                state.ok_or_else(|| Error::State("the student has no linear branch".into()))?,
            );
            inputs.push(out);
        }
        Ok(Forward { inputs, ctx, next })
    }

    /// Loss, loss past the window, the gradient of every LoRA tensor (order of
    /// [`Lora::named`]) on the segment `ids` continuing `carry`, and the carry after it.
    fn loss_and_grads(
        &self,
        ids: &[u32],
        t_logp: &Tensor,
        carry: &Carry,
    ) -> Result<(f64, f64, Vec<Tensor>, Carry)> {
        let model = &self.student;
        let n_layers = model.num_layers();
        // Forward without a graph, keeping every layer's input.
        let Forward { inputs, ctx, next } = self.student_forward(ids, carry)?;
        // The head: loss and the gradient at the last layer's output.
        let top = Var::from_tensor(&inputs[n_layers])?;
        let logits = model.train_head(top.as_tensor())?;
        let past_from = self.cfg.window.saturating_sub(carry.read);
        let (loss, past, g_logits) = kl_and_grad(t_logp, &logits.detach(), past_from)?;
        let mut grad = (logits * g_logits)?
            .sum_all()?
            .backward()?
            .remove(top.as_tensor())
            .ok_or_else(|| Error::State("no gradient reached the last layer".into()))?;
        // Layer by layer from the top, recomputed with a graph.
        let p = carry.rows()?;
        let mut grads: Vec<Option<Tensor>> = vec![None; n_layers * 8];
        for i in (0..n_layers).rev() {
            let x = Var::from_tensor(&inputs[i])?;
            let l = self.lora.layer(i, false);
            let full = Self::with_prefix(carry, i, x.as_tensor())?;
            let tc = carry
                .states
                .get(i)
                .map(|state| TrainCarry { prefix: p, state });
            let (y, _) =
                model.train_layer_carried(i, &full, Some((&l, self.lora.scale)), &ctx, tc)?;
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
        Ok((loss, past, grads, next))
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

    /// Writes a checkpoint (LoRA, Adam's moments, the step and the settings; in the middle of
    /// an episode, the student's carry too — the teacher's is rebuilt by reading the episode
    /// again) to `path`, atomically.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (i, (n, v)) in self.lora.named().into_iter().enumerate() {
            tensors.push((format!("lora.{n}"), v.as_tensor().clone()));
            tensors.push((format!("adam_m.{n}"), self.adam.m[i].clone()));
            tensors.push((format!("adam_v.{n}"), self.adam.v[i].clone()));
        }
        let mut meta = HashMap::from([
            ("step".to_string(), self.step.to_string()),
            ("adam_t".to_string(), self.adam.t.to_string()),
            ("config".to_string(), format!("{:?}", self.cfg)),
        ]);
        let carry = match (&self.episode, &self.resumed) {
            (Some(ep), _) if ep.step == self.step => Some(&ep.carry),
            (_, Some((at, c))) if *at == self.step => Some(c),
            _ => None,
        };
        if let Some(c) = carry.filter(|c| c.read > 0) {
            meta.insert("carry_read".to_string(), c.read.to_string());
            for (i, (p, st)) in c.prefix.iter().zip(&c.states).enumerate() {
                tensors.push((format!("carry.prefix.{i}"), p.clone()));
                tensors.push((format!("carry.state.{i}"), st.clone()));
            }
        }
        write_safetensors(path, &tensors, Some(meta))
    }

    /// Starts from the LoRA of a variant trained before (its `adapter_model.safetensors`, PEFT
    /// names, same rank), instead of PEFT's initialisation; Adam starts afresh. Only before the
    /// first step.
    pub fn init_from_adapter(&mut self, path: &Path) -> Result<()> {
        if self.step > 0 {
            return Err(Error::State(
                "a run that has taken steps cannot start from another adapter".into(),
            ));
        }
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, self.student.device())
            .map_err(|e| Error::Input(format!("{}: not an adapter ({e})", path.display())))?;
        self.lora.load(&tensors, "")
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
        self.episode = None;
        self.resumed = None;
        if let Some(read) = meta.get("carry_read") {
            let read: usize = read
                .parse()
                .map_err(|_| Error::Input(format!("{}: no valid carry_read", path.display())))?;
            let n = self.student.num_layers();
            let get = |k: String| {
                tensors
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| Error::Input(format!("the checkpoint lacks {k}")))
            };
            let carry = Carry {
                read,
                prefix: (0..n)
                    .map(|i| get(format!("carry.prefix.{i}")))
                    .collect::<Result<_>>()?,
                states: (0..n)
                    .map(|i| get(format!("carry.state.{i}")))
                    .collect::<Result<_>>()?,
            };
            let b = &self.student.config().base;
            let rows = self.cfg.window.max(HISTORY).min(read);
            let shapes_ok = carry
                .prefix
                .iter()
                .all(|t| t.dims() == [rows, b.hidden_size])
                && carry
                    .states
                    .iter()
                    .all(|t| t.dims() == [b.num_kv_heads, b.head_dim, b.head_dim]);
            if !shapes_ok {
                return Err(Error::Input(format!(
                    "{}: the carried tensors do not have this model's shapes",
                    path.display()
                )));
            }
            let in_episode = self.step % self.segments();
            if in_episode == 0 || read != in_episode * self.cfg.seq_len {
                return Err(Error::Input(format!(
                    "{}: a carry after {read} tokens does not fit step {}",
                    path.display(),
                    self.step
                )));
            }
            self.resumed = Some((self.step, carry));
        } else if !self.step.is_multiple_of(self.segments()) {
            return Err(Error::Input(format!(
                "{}: step {} is in the middle of an episode but the checkpoint has no carry",
                path.display(),
                self.step
            )));
        }
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
