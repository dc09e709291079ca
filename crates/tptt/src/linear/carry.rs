//! What crosses calls of the linear branch (module doc of [`super`]): the recurrent states,
//! the last raw k/v rows for the gate pooling and, for order 2, the previous processed token.

use super::STATE_INIT;

/// The previous token's processed values, per query head (`[H·D]` each): the order-2 buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct PrevToken {
    /// Normalised query.
    pub q: Vec<f32>,
    /// Normalised key.
    pub k: Vec<f32>,
    /// Scaled value.
    pub v: Vec<f32>,
    /// Decay gate.
    pub alpha: Vec<f32>,
    /// Write gate.
    pub beta: Vec<f32>,
}

/// What the linear branch of one layer carries from call to call.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearCarry {
    /// The recurrent states, `[Hs, D, D]` (rows: key dim, columns: value dim), where `Hs` divides
    /// the query heads `H`: query head `h` reads state `h / (H / Hs)`. `Hs = H` is one state per
    /// query head; `Hs = Hkv` (what [`LinearCarry::grouped`] makes and the fast path keeps) is one
    /// per kv head, shared by the query heads of its group, whose states are equal: they see the
    /// same keys, values and gates, and the recursion never reads the query. [`forward`] accepts
    /// both; [`LinearCarry::head_states`] gives the per-head view.
    pub state: Vec<f32>,
    /// Up to two previous raw key rows `[Hkv·D]` (oldest first), for the gate pooling.
    pub pool_k: Vec<Vec<f32>>,
    /// Up to two previous raw value rows, likewise.
    pub pool_v: Vec<Vec<f32>>,
    /// Order 2: the previous token, processed.
    pub prev: Option<PrevToken>,
}

impl LinearCarry {
    /// A fresh carry with one state per query head: state `1e-6`, no history.
    pub fn new(heads: usize, dim: usize) -> Self {
        Self {
            state: vec![STATE_INIT; heads * dim * dim],
            pool_k: Vec::new(),
            pool_v: Vec::new(),
            prev: None,
        }
    }

    /// A fresh carry with one state per kv head (see [`LinearCarry::state`]).
    pub fn grouped(kv_heads: usize, dim: usize) -> Self {
        Self::new(kv_heads, dim)
    }

    /// How many states the carry stores (`Hs`).
    pub fn stored_states(&self, dim: usize) -> usize {
        self.state.len() / (dim * dim).max(1)
    }

    /// The state of every one of `heads` query heads, `[H, D, D]`.
    pub fn head_states(&self, heads: usize, dim: usize) -> Vec<f32> {
        let (hs, dd) = (self.stored_states(dim), dim * dim);
        if hs == heads || hs == 0 {
            return self.state.clone();
        }
        let g = heads / hs;
        (0..heads)
            .flat_map(|h| self.state[h / g * dd..(h / g + 1) * dd].iter().copied())
            .collect()
    }

    /// Store one state per query head (a no-op when it already does).
    /// Keeps the last two raw key and value rows (`fkv` wide) of a call's `k_raw` / `v_raw`,
    /// after those of earlier calls: the causal 3-mean of the next call's gates reads them.
    pub(super) fn push_pool_rows(&mut self, k_raw: &[f32], v_raw: &[f32], fkv: usize) {
        let s = k_raw.len() / fkv;
        for (hist, x) in [(&mut self.pool_k, k_raw), (&mut self.pool_v, v_raw)] {
            for t in s.saturating_sub(2)..s {
                let row = &x[t * fkv..(t + 1) * fkv];
                // The oldest row's buffer reused once two are kept (decoding: every token).
                if hist.len() >= 2 {
                    let mut old = hist.remove(0);
                    old.clear();
                    old.extend_from_slice(row);
                    hist.push(old);
                } else {
                    hist.push(row.to_vec());
                }
            }
            let extra = hist.len().saturating_sub(2);
            hist.drain(..extra);
        }
    }

    pub(super) fn expand_states(&mut self, heads: usize, dim: usize) {
        if self.stored_states(dim) != heads {
            self.state = self.head_states(heads, dim);
        }
    }
}
