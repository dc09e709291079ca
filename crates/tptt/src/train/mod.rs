//! Training support: the model's forward pass as differentiable candle operations.
//!
//! Inference never goes through here: it runs the fused kernels and the fast scan of
//! [`crate::model`] and [`crate::linear`]. Training needs gradients, so [`linear`] rebuilds the
//! LiZA branch from tensor operations (tested against the naive scan).

pub mod distill;
pub mod frozen;
pub mod linear;
pub mod softmax;
