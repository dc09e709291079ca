//! The LiZA linear branch (SPEC §4): gates, q/k/v preparation, order-2 virtual tokens, chunked
//! delta-product scan, head merge and the parameter-free RMS norm. Everything here is f32 on
//! the CPU, on plain row-major slices; the caller applies `o_proj`.
//!
//! One call processes the `S` tokens of a forward call for one layer. What crosses calls lives in
//! a [`LinearCarry`]: the recurrent state (`[H, D, D]`), the last two raw k/v rows (so the causal
//! 3-mean pooling of the gates sees them) and, for order 2, the previous token's processed
//! `q, k, v, α, β` (the reference's one-token buffer). [`CarryMode`] says how much of it is used:
//! * [`CarryMode::Continue`] (ours): everything carries over, so splitting a sequence into calls
//!   equals one call under the same chunking (see the `engine` crate for the semantics).
//! * [`CarryMode::Reference`]: tptt 0.12.1's cached generation, which restarts the state at
//!   `1e-6` and the pooling at every call and only keeps the order-2 buffer (SPEC §7).
//!
//! [`scan`] dispatches to the fast path ([`fast`]); [`naive`] is the literal specification.
//! [`forward`] with [`ScanImpl::Naive`] follows SPEC §4 literally (every processed and virtual
//! row of the call materialised, then the naive scan); with [`ScanImpl::Fast`] the rows are made
//! per chunk inside the fast scan and the heads sharing a kv head share the key-side work.
//!
//! The pieces: `carry` ([`LinearCarry`]), `prepare` (gates, pooling, activations, virtual rows:
//! shared by both paths), `expanded` (the naive path's literal order), `fused` (the fast path's
//! per-chunk rows), [`fast`] and [`naive`] (the scans).

mod carry;
mod expanded;
pub mod fast;
mod fused;
pub mod naive;
mod prepare;
#[cfg(test)]
mod tests;

pub use carry::{LinearCarry, PrevToken};
pub(crate) use prepare::gelu_rows;

use crate::config::RecurrentConfig;

/// The initial value of every entry of a fresh recurrent state (SPEC §4.8).
pub const STATE_INIT: f32 = 1e-6;

/// Inputs of one scan, all `[H, S·n, D]` (token-major virtual rows), f32.
pub struct ScanInput<'a> {
    /// Query heads H.
    pub heads: usize,
    /// Head dim D.
    pub dim: usize,
    /// Tokens S of this call.
    pub tokens: usize,
    /// Recurrent order n (1 or 2).
    pub order: usize,
    /// Chunk size C (divides S).
    pub chunk: usize,
    /// `false`: inter-chunk GELU activation.
    pub linear: bool,
    /// Queries.
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Decays.
    pub alpha: &'a [f32],
    /// Write strengths.
    pub beta: &'a [f32],
}

/// Which scan implementation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScanImpl {
    /// [`fast::scan`].
    #[default]
    Fast,
    /// [`naive::scan`].
    Naive,
}

/// Run the scan. `state`: `[H, D, D]` in, final state out. Returns `[H, S, D]`.
pub fn scan(inp: &ScanInput<'_>, state: &mut [f32], which: ScanImpl) -> Vec<f32> {
    debug_assert!(inp.chunk >= 1 && inp.tokens.is_multiple_of(inp.chunk));
    match which {
        ScanImpl::Fast => fast::scan(inp, state),
        ScanImpl::Naive => naive::scan(inp, state),
    }
}

/// The reference's chunk-size rule (SPEC §4.6): the largest `c ≤ min(max, S)` dividing `S`.
pub fn chunk_size(tokens: usize, max_chunk: usize) -> usize {
    (1..=max_chunk.min(tokens).max(1))
        .rev()
        .find(|c| tokens.is_multiple_of(*c))
        .unwrap_or(1)
}

/// How much of the carry a call uses (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CarryMode {
    /// Carry state, pooling history and order-2 buffer.
    #[default]
    Continue,
    /// tptt 0.12.1's cached generation: restart state and pooling, keep the order-2 buffer.
    Reference,
}

/// Shapes and the recurrence for [`forward`].
#[derive(Debug, Clone, Copy)]
pub struct LinearShape {
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads Hkv.
    pub kv_heads: usize,
    /// Head dim D.
    pub dim: usize,
    /// The recurrence.
    pub rc: RecurrentConfig,
    /// `max_chunk_size` (the chunk is derived from it and S).
    pub max_chunk: usize,
}

/// One layer's linear branch for the `S` tokens of a call.
///
/// `q_raw`: `[S, H·D]`, `k_raw`, `v_raw`: `[S, Hkv·D]` (the LoRA'd, biased projections, no RoPE).
/// Returns `[S, H·D]` after the parameter-free RMS norm, ready for `o_proj`.
pub fn forward(
    shape: &LinearShape,
    q_raw: &[f32],
    k_raw: &[f32],
    v_raw: &[f32],
    carry: &mut LinearCarry,
    mode: CarryMode,
    which: ScanImpl,
) -> Vec<f32> {
    if mode == CarryMode::Reference {
        carry.state.iter_mut().for_each(|x| *x = STATE_INIT);
        carry.pool_k.clear();
        carry.pool_v.clear();
    }
    match which {
        ScanImpl::Fast => fused::forward_fused(shape, q_raw, k_raw, v_raw, carry),
        ScanImpl::Naive => expanded::forward_expanded(shape, q_raw, k_raw, v_raw, carry),
    }
}
