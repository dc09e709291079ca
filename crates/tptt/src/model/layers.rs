//! The layers of the decoder on tensors: projections (dense, quantized, with unmerged LoRA),
//! norms, the gated MLP and OLMoE's mixture of experts, and a decoder layer's weights with the
//! softmax branch's q/k/v preparation (q/k norms, `clip_qkv`, RoPE), shared by inference, the
//! fused step and training.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor, D};

use crate::config::{Activation, BaseConfig, NormKind, QkNorm};
use crate::error::Result;
use crate::kernels::gated;
use crate::rope;
use crate::weights::LoraSide;

use super::packed::Packed;

#[derive(Debug, Clone)]
pub(super) enum Matrix {
    /// `[out, in]` f32, or f16 / bf16 as stored (`LoadOptions::half_weights`, CPU).
    Dense(Tensor),
    /// Quantized: our kernels where they take the type (decode, short prompts; K-quant prompts in
    /// 8-bit integers), widened to f32 for other prompts, else candle's quantized matmul.
    Quant(QMatMul),
    /// A Q4_K, Q4_1 or Q8_0 matrix repacked 16 rows to a group on the CPU ([`Packed`]).
    Packed(std::sync::Arc<Packed>),
}

#[derive(Debug, Clone)]
pub(super) struct Linear {
    pub(super) w: Matrix,
    pub(super) b: Option<Tensor>,
    /// LoRA kept unmerged (quantized bases).
    pub(super) lora: Option<LoraSide>,
}

/// Rows of input from which a quantized matrix is widened to f32 for the product (a prompt):
/// candle's quantized matmul takes the rows one by one, a dense product is blocked for the
/// cache, and the widening (one pass over the matrix) is small next to `rows` products with it.
pub(super) const WIDEN_QUANT_ROWS: usize = 16;

/// f32 bytes of one widened piece of a quantized matrix ([`widened_product`]): a few MB, so that
/// a prompt never holds a whole widened matrix (a quantized 128k-row vocabulary head would be a
/// gigabyte in f32) and the piece stays in cache while the product reads it.
pub(super) const WIDEN_TILE_BYTES: usize = 4 << 20;

/// Rows of `q` widened at a time.
fn widen_tile_rows(q: &candle_core::quantized::QTensor) -> usize {
    let cols = q.shape().dims().last().copied().unwrap_or(1).max(1);
    (WIDEN_TILE_BYTES / (cols * 4)).max(1)
}

/// `x · qᵀ` with `q` widened to f32 `tile_rows` rows at a time, each piece's product written
/// into its columns of the result. Equal to the product with the whole dequantized matrix.
fn widened_product(
    x: &Tensor,
    q: &candle_core::quantized::QTensor,
    tile_rows: usize,
) -> Result<Tensor> {
    let rows = q.shape().dims().first().copied().unwrap_or(0);
    widened_pieces(x, rows, tile_rows, &|start, len| {
        Ok(crate::gguf::split_rows(q, start, len, x.device())?.dequantize(x.device())?)
    })
}

/// `x · wᵀ` for a dense matrix of another dtype than `x` (f16 / bf16 kept as stored), widened
/// `tile_rows` rows at a time (exact: every half value is an f32).
fn widened_dense_product(x: &Tensor, w: &Tensor, tile_rows: usize) -> Result<Tensor> {
    widened_pieces(x, w.dim(0)?, tile_rows, &|start, len| {
        Ok(w.narrow(0, start, len)?.to_dtype(x.dtype())?)
    })
}

/// The dims of `x` with the last one `n`: a product's output for input `x` and `n` matrix rows.
pub(super) fn out_dims(x: &Tensor, n: usize) -> Vec<usize> {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    dims
}

/// `x · Wᵀ` for a matrix of `rows` rows whose pieces `piece(start, len)` come widened to `x`'s
/// dtype, `tile_rows` rows at a time (all at once when they fit one piece).
pub(super) fn widened_pieces(
    x: &Tensor,
    rows: usize,
    tile_rows: usize,
    piece: &dyn Fn(usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let tile_rows = tile_rows.max(1);
    if tile_rows >= rows {
        return Ok(x.broadcast_matmul(&piece(0, rows)?.t()?)?);
    }
    let mut parts = Vec::with_capacity(rows.div_ceil(tile_rows));
    let mut start = 0;
    while start < rows {
        let len = tile_rows.min(rows - start);
        parts.push(x.broadcast_matmul(&piece(start, len)?.t()?)?);
        start += len;
    }
    Ok(Tensor::cat(&parts, D::Minus1)?)
}

impl Linear {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        let mut y = match &self.w {
            // A matrix kept in half precision on the CPU (`LoadOptions::half_weights`): our
            // kernels row by row for a few rows, else widened a few MB at a time.
            Matrix::Dense(w)
                if w.dtype() != x.dtype() && x.device().is_cpu() && x.dtype() == DType::F32 =>
            {
                let cols = x.dim(D::Minus1)?;
                if rows < WIDEN_QUANT_ROWS {
                    let xs = x.flatten_all()?.to_vec1::<f32>()?;
                    let out = super::step::half_matmul_rows(w, &xs, cols)?;
                    Tensor::from_vec(out, out_dims(x, w.dim(0)?), x.device())?
                } else {
                    widened_dense_product(x, w, (WIDEN_TILE_BYTES / (cols.max(1) * 4)).max(1))?
                }
            }
            Matrix::Dense(w) => x.matmul(&w.t()?)?,
            // A prompt through a K-quant matrix: the 8-bit prompt kernels.
            Matrix::Quant(QMatMul::QTensor(q))
                if rows >= WIDEN_QUANT_ROWS
                    && x.device().is_cpu()
                    && x.dtype() == DType::F32
                    && matches!(
                        q.dtype(),
                        candle_core::quantized::GgmlDType::Q4K
                            | candle_core::quantized::GgmlDType::Q5K
                            | candle_core::quantized::GgmlDType::Q6K
                    ) =>
            {
                let cols = x.dim(D::Minus1)?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                match super::step::quant_prompt_product(q, &xs, cols)? {
                    Some(out) => Tensor::from_vec(
                        out,
                        out_dims(x, q.shape().dims().first().copied().unwrap_or(0)),
                        x.device(),
                    )?,
                    None => widened_product(x, q, widen_tile_rows(q))?,
                }
            }
            // (Q4_1, Q5_0 and Q5_1 from 2 rows: candle 0.11's CPU kernels for them have no SIMD
            // path; Q4_0, Q8_0 and the K-quants have an AVX one.)
            Matrix::Quant(QMatMul::QTensor(q))
                if (rows >= WIDEN_QUANT_ROWS
                    || (rows > 1
                        && matches!(
                            q.dtype(),
                            candle_core::quantized::GgmlDType::Q4_1
                                | candle_core::quantized::GgmlDType::Q5_0
                                | candle_core::quantized::GgmlDType::Q5_1
                        )))
                    && x.device().is_cpu()
                    && x.dtype() == DType::F32 =>
            {
                widened_product(x, q, widen_tile_rows(q))?
            }
            // Fewer rows (a short prompt; the tensor path's decode): our kernels, row by row,
            // for the types they take. candle 0.11's own product would also keep an expanded
            // ("repacked") copy of every Q4_K matrix it touches (and of Q8_0 ones on CPUs with
            // VNNI) for the model's life: +890 MB beside a 700 MB 1B Q4_K file.
            Matrix::Quant(QMatMul::QTensor(q))
                if x.device().is_cpu() && x.dtype() == DType::F32 && super::step::takes(q) =>
            {
                let cols = x.dim(D::Minus1)?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let out = super::step::quant_matmul_rows(q, &xs, cols)?;
                Tensor::from_vec(
                    out,
                    out_dims(x, q.shape().dims().first().copied().unwrap_or(0)),
                    x.device(),
                )?
            }
            Matrix::Quant(q) => q.forward(x)?,
            Matrix::Packed(p) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                if x.dim(D::Minus1)? != p.cols {
                    return Err(crate::error::Error::State(format!(
                        "a [{}, {}] matrix and inputs of {}",
                        p.rows,
                        p.cols,
                        x.dim(D::Minus1)?
                    )));
                }
                if rows < WIDEN_QUANT_ROWS {
                    let xs = x.flatten_all()?.to_vec1::<f32>()?;
                    let out = super::step::packed_matmul_rows(p, &xs)?;
                    Tensor::from_vec(out, out_dims(x, p.rows), x.device())?
                } else {
                    p.prompt_product(x)?
                }
            }
            // (Not reached: a matrix is repacked only on the CPU, where inputs are f32.)
            Matrix::Packed(p) => x.broadcast_matmul(&p.dequantize(x.device())?.t()?)?,
        };
        if let Some(l) = &self.lora {
            // y += s · B(A x)
            y = (y + (x.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale)?)?;
        }
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    pub(super) fn tensors(&self) -> Vec<Tensor> {
        let mut v = Vec::new();
        if let Matrix::Dense(w) = &self.w {
            v.push(w.clone());
        }
        v.extend(self.b.iter().cloned());
        if let Some(l) = &self.lora {
            v.extend([l.a.clone(), l.b.clone()]);
        }
        v
    }

    pub(super) fn size_bytes(&self) -> usize {
        let q = match &self.w {
            Matrix::Quant(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Matrix::Packed(p) => p.bytes.len(),
            _ => 0,
        };
        q + self
            .tensors()
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum::<usize>()
    }
}

/// A normalisation with its weight (if any).
#[derive(Debug, Clone)]
pub(super) struct Norm {
    pub(super) kind: NormKind,
    pub(super) w: Option<Tensor>,
    pub(super) eps: f64,
}

impl Norm {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            NormKind::LayerNoParam => {
                // F.layer_norm without affine parameters, eps 1e-5.
                let mean = x.mean_keepdim(D::Minus1)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                Ok(xc.broadcast_div(&(var + self.eps)?.sqrt()?)?)
            }
            NormKind::Rms | NormKind::RmsOnePlus => {
                // x * rsqrt(mean(x²) + eps), then weight (Llama) or (1 + weight) (Gemma).
                let var = x.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
                match &self.w {
                    Some(w) => Ok(normed.broadcast_mul(w)?),
                    None => Ok(normed),
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Expert {
    pub(super) gate: Linear,
    pub(super) up: Linear,
    pub(super) down: Linear,
}

#[derive(Debug, Clone)]
pub(super) enum Mlp {
    /// `down(act(gate(x)) · up(x))`.
    Gated(Expert),
    /// OLMoE: softmax router, top-k experts weighted by their routing probability.
    Moe {
        router: Linear,
        experts: Vec<Expert>,
        top_k: usize,
        norm_topk: bool,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub(super) in_norm: Norm,
    /// Gemma-3: applied to the attention output before the residual add.
    pub(super) post_attn_norm: Option<Norm>,
    pub(super) pre_ff_norm: Norm,
    /// Gemma-3: applied to the MLP output before the residual add.
    pub(super) post_ff_norm: Option<Norm>,
    pub(super) q: Linear,
    pub(super) k: Linear,
    pub(super) v: Linear,
    pub(super) o: Linear,
    pub(super) q_norm: Option<Norm>,
    pub(super) k_norm: Option<Norm>,
    pub(super) mlp: Mlp,
    /// The base's own window for this layer.
    pub(super) window: Option<usize>,
    /// Index into `Model::ropes`.
    pub(super) rope: usize,
    /// Query heads of this layer (OpenELM's differ from layer to layer).
    pub(super) heads: usize,
    /// KV heads of this layer.
    pub(super) kv_heads: usize,
}

impl Layer {
    /// The softmax branch's inputs from the raw projections `[S, ·]`: q/k norms, `clip_qkv`,
    /// RoPE. Returns `q: [H, S, D]`, `k: [Hkv, S, D]` (rotated) and `v: [S, Hkv·D]` (clipped).
    pub(super) fn softmax_qkv(
        &self,
        b: &BaseConfig,
        q_raw: &Tensor,
        k_raw: &Tensor,
        v_raw: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (nh, nkv, d) = (self.heads, self.kv_heads, b.head_dim);
        let s = q_raw.dim(0)?;
        let (mut qs, mut ks, mut vs) = (q_raw.clone(), k_raw.clone(), v_raw.clone());
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            match b.qk_norm {
                QkNorm::PerHead => {
                    qs = qn.forward(&qs.reshape((s, nh, d))?)?.reshape((s, nh * d))?;
                    ks = kn
                        .forward(&ks.reshape((s, nkv, d))?)?
                        .reshape((s, nkv * d))?;
                }
                _ => {
                    qs = qn.forward(&qs)?;
                    ks = kn.forward(&ks)?;
                }
            }
        }
        if let Some(c) = b.clip_qkv {
            qs = qs.clamp(-c, c)?;
            ks = ks.clamp(-c, c)?;
            vs = vs.clamp(-c, c)?;
        }
        let q = rope::apply(
            &qs.reshape((s, nh, d))?.transpose(0, 1)?.contiguous()?,
            cos,
            sin,
        )?;
        let k = rope::apply(
            &ks.reshape((s, nkv, d))?.transpose(0, 1)?.contiguous()?,
            cos,
            sin,
        )?;
        Ok((q, k, vs))
    }
}

/// Prompt rows per pass through an MLP on the CPU: its gate and up products (`[rows, I]` each,
/// `I` several times the hidden size) are a prompt's largest activations. A 512-token block of
/// a 1B-class model held 2 × 16 MB of them at once, now a quarter of that; every kernel behind
/// it computes each row on its own, so the rows come out the same.
const MLP_ROWS: usize = 128;

impl Expert {
    pub(super) fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let rows = if x.rank() == 2 { x.dim(0)? } else { 0 };
        if rows > MLP_ROWS && x.device().is_cpu() {
            // Equal parts (no short last one), each through the whole MLP.
            let per = rows.div_ceil(rows.div_ceil(MLP_ROWS));
            let parts = (0..rows)
                .step_by(per)
                .map(|start| self.forward_rows(&x.narrow(0, start, per.min(rows - start))?, act))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&parts, 0)?);
        }
        self.forward_rows(x, act)
    }

    /// All of `x` through the MLP at once.
    fn forward_rows(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        if act == Activation::Silu {
            let g = self.gate.forward(x)?;
            let u = self.up.forward(x)?;
            if gated::applies(&g, &u) {
                // `g` is the gate's fresh output: the product goes over it, and `u` is freed
                // before the down projection (`kernels/gated.rs`).
                gated::silu_mul_in_place(&g, &u)?;
                drop(u);
                return self.down.forward(&g);
            }
            return self.down.forward(&gated::silu_mul_naive(&g, &u)?);
        }
        // The gate's pre-activation is dropped as soon as its GELU exists.
        let g = self.gate.forward(x)?.gelu()?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

impl Mlp {
    pub(super) fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        match self {
            Mlp::Gated(e) => e.forward(x, act),
            Mlp::Moe {
                router,
                experts,
                top_k,
                norm_topk,
            } => {
                let (s, e_dim) = x.dims2()?;
                let probs =
                    candle_nn::ops::softmax_last_dim(&router.forward(x)?)?.to_vec2::<f32>()?;
                // Route each token; then run each expert once on the tokens that chose it.
                let mut per_expert: Vec<(Vec<u32>, Vec<f32>)> =
                    vec![(Vec::new(), Vec::new()); experts.len()];
                for (t, p) in probs.iter().enumerate() {
                    let mut idx: Vec<usize> = (0..p.len()).collect();
                    // torch.topk order: by value, descending (ties: lower index first).
                    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
                    let top = &idx[..*top_k];
                    let sum: f32 = top.iter().map(|&i| p[i]).sum();
                    for &i in top {
                        let w = if *norm_topk { p[i] / sum } else { p[i] };
                        per_expert[i].0.push(t as u32);
                        per_expert[i].1.push(w);
                    }
                }
                let mut out = Tensor::zeros((s, e_dim), DType::F32, x.device())?;
                for (expert, (tokens, weights)) in experts.iter().zip(per_expert) {
                    if tokens.is_empty() {
                        continue;
                    }
                    let n = tokens.len();
                    let idx = Tensor::from_vec(tokens, n, x.device())?;
                    let y = expert.forward(&x.index_select(&idx, 0)?, act)?;
                    let y = y.broadcast_mul(&Tensor::from_vec(weights, (n, 1), x.device())?)?;
                    out = out.index_add(&idx, &y, 0)?;
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A prompt's rows through a quantized matrix take the widened (dequantized f32) product:
    /// equal to the product with the dequantized matrix, and within the activation
    /// quantization of candle's row-by-row quantized matmul; below [`WIDEN_QUANT_ROWS`] rows
    /// our kernels run row by row and equal candle's product (both quantize the input per 32
    /// values for Q8_0 at this shape).
    #[test]
    fn widened_quantized_product_matches_row_by_row() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 64), &dev).expect("w");
        let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize"));
        let lin = Linear {
            w: Matrix::Quant(QMatMul::from_arc(q.clone()).expect("qmatmul")),
            b: None,
            lora: None,
        };
        for rows in [1, WIDEN_QUANT_ROWS - 1, WIDEN_QUANT_ROWS, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, 64), &dev).expect("x");
            let got = lin.forward(&x).expect("forward");
            let by_rows = QMatMul::from_arc(q.clone())
                .and_then(|m| m.forward(&x))
                .expect("rows");
            let widened = x
                .matmul(&q.dequantize(&dev).and_then(|t| t.t()).expect("deq"))
                .expect("matmul");
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .and_then(|t| t.abs()?.max_all()?.to_scalar::<f32>())
                    .expect("diff")
            };
            let scale = widened
                .abs()
                .and_then(|t| t.max_all()?.to_scalar::<f32>())
                .expect("max");
            assert!(
                diff(&by_rows, &widened) < 2e-2 * scale,
                "rows {rows}: quantized activations drift"
            );
            if rows >= WIDEN_QUANT_ROWS {
                assert!(
                    diff(&got, &widened) < 1e-5 * scale,
                    "rows {rows}: widened product"
                );
            } else {
                assert!(
                    diff(&got, &by_rows) < 1e-5 * scale,
                    "rows {rows}: row-by-row product"
                );
            }
        }
    }

    /// A prompt through a Q4_K matrix takes the 8-bit prompt kernel: for 2-D and 3-D inputs
    /// it equals candle's own Q4_K product (the input quantized per 256 values in both) to f32
    /// rounding, and the dequantized product within the input's 8-bit rounding.
    #[test]
    fn q4k_prompt_product_matches_candle() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 512), &dev).expect("w");
        let q = std::sync::Arc::new(QTensor::quantize(&w, GgmlDType::Q4K).expect("quantize"));
        let lin = Linear {
            w: Matrix::Quant(QMatMul::from_arc(q.clone()).expect("qmatmul")),
            b: None,
            lora: None,
        };
        let max = |t: &Tensor| {
            t.abs()
                .and_then(|t| t.max_all()?.to_scalar::<f32>())
                .expect("max")
        };
        for dims in [vec![WIDEN_QUANT_ROWS, 512], vec![2, 21, 512]] {
            let x = Tensor::randn(0f32, 1.0, dims.as_slice(), &dev).expect("x");
            let got = lin.forward(&x).expect("forward");
            let candle = QMatMul::from_arc(q.clone())
                .and_then(|m| m.forward(&x))
                .expect("candle");
            let exact = x
                .broadcast_matmul(&q.dequantize(&dev).and_then(|t| t.t()).expect("deq"))
                .expect("matmul");
            assert_eq!(got.dims(), exact.dims());
            let scale = max(&exact);
            let to_candle = max(&(&got - &candle).expect("diff"));
            let to_exact = max(&(&got - &exact).expect("diff"));
            assert!(
                to_candle < 1e-5 * scale,
                "{dims:?}: {to_candle} from candle's product"
            );
            assert!(
                to_exact < 2e-2 * scale,
                "{dims:?}: {to_exact} from the exact product"
            );
        }
    }

    /// The widened product taken in pieces of any height (here 1, 7 and 13 rows of 48, the last
    /// piece short) equals the product with the whole widened matrix, for 2-D and 3-D inputs.
    #[test]
    fn widened_product_in_pieces_equals_whole() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 64), &dev).expect("w");
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let whole = q.dequantize(&dev).and_then(|t| t.t()).expect("deq");
            for shape in [vec![20, 64], vec![2, 17, 64]] {
                let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).expect("x");
                let want = x.broadcast_matmul(&whole).expect("whole");
                for tile in [1, 7, 13, 48, 100] {
                    let got = widened_product(&x, &q, tile).expect("pieces");
                    assert_eq!(got.dims(), want.dims());
                    let diff = (&got - &want)
                        .and_then(|t| t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
                        .expect("diff");
                    assert!(diff < 1e-4, "{dtype:?} tile {tile}: {diff}");
                }
            }
        }
        assert_eq!(
            widen_tile_rows(&QTensor::quantize(&w, GgmlDType::Q8_0).expect("q")),
            16384
        );
    }

    #[test]
    fn unmerged_lora_equals_merged() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (24, 16), &dev).expect("w");
        let a = Tensor::randn(0f32, 1.0, (4, 16), &dev).expect("a");
        let b = Tensor::randn(0f32, 1.0, (24, 4), &dev).expect("b");
        let x = Tensor::randn(0f32, 1.0, (5, 16), &dev).expect("x");
        let scale = 0.7;
        let merged = Linear {
            w: Matrix::Dense((&w + (b.matmul(&a).expect("ba") * scale).expect("s")).expect("add")),
            b: None,
            lora: None,
        };
        let side = Linear {
            w: Matrix::Quant(QMatMul::Tensor(w)),
            b: None,
            lora: Some(LoraSide { a, b, scale }),
        };
        let d = (merged.forward(&x).expect("m") - side.forward(&x).expect("s"))
            .and_then(|t| t.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff");
        assert!(d < 1e-4, "{d}");
    }

    /// A prompt longer than [`MLP_ROWS`] goes through the MLP in equal parts, and its rows come
    /// out as from one pass: dense, stored quantized (widened) and repacked matrices.
    #[test]
    fn mlp_in_row_parts_equals_one_pass() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let (e, i) = (64, 160);
        let dense = |rows, cols, seed: u64| {
            let v: Vec<f32> = crate::testutil::rand_vec(rows * cols, seed);
            Tensor::from_vec(v, (rows, cols), &dev).expect("w")
        };
        let ws = [dense(i, e, 1), dense(i, e, 2), dense(e, i, 3)];
        let linear = |w: &Tensor, kind: usize| Linear {
            w: match kind {
                0 => Matrix::Dense(w.clone()),
                _ => {
                    let q = QTensor::quantize(w, GgmlDType::Q8_0).expect("quantize");
                    match kind {
                        1 => Matrix::Quant(QMatMul::from_arc(std::sync::Arc::new(q)).expect("q")),
                        _ => Matrix::Packed(std::sync::Arc::new(Packed::new(&q).expect("packed"))),
                    }
                }
            },
            b: None,
            lora: None,
        };
        for kind in 0..3 {
            let ex = Expert {
                gate: linear(&ws[0], kind),
                up: linear(&ws[1], kind),
                down: linear(&ws[2], kind),
            };
            for rows in [MLP_ROWS + 1, 3 * MLP_ROWS + 17] {
                let x = dense(rows, e, 10 + rows as u64);
                let parts = ex.forward(&x, Activation::Silu).expect("parts");
                let whole = ex.forward_rows(&x, Activation::Silu).expect("whole");
                assert_eq!(parts.dims(), whole.dims());
                let (p, w) = (
                    parts
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .expect("p"),
                    whole
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .expect("w"),
                );
                assert!(p == w, "kind {kind}, {rows} rows");
            }
        }
    }
}
