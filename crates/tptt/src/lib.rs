//! `tptt`: faithful TPTT inference ("Transforming Pretrained Transformers into Titans",
//! <https://arxiv.org/abs/2506.17671>) in candle, matching the reference package tptt 0.12.1.
//!
//! Main types: [`config::ModelConfig`] (validated config), [`repo::TpttRepo`] (a repo on disk and
//! its variants), [`model::Model`] (immutable weights) and [`model::State`] (everything that
//! belongs to one conversation: KV window, linear-branch carries, position).
//!
//! The crate knows nothing of Tauri, SQLite, the network or threads.

pub mod alloc;
pub mod config;
pub mod cpu;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod linear;
pub mod model;
pub mod repo;
pub mod rope;
pub mod state;
pub mod synth;
pub mod team;
#[cfg(test)]
mod testutil;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
