//! A local OpenAI-compatible HTTP API on a TPTT model (issue 15): `GET /v1/models`,
//! `POST /v1/chat/completions` and `POST /v1/completions`, following OpenAI's wire format so that
//! the official clients work unchanged (streaming as server-sent events ending in `[DONE]`,
//! `stream_options.include_usage`, OpenAI error objects and status codes).
//!
//! What only a recurrent memory allows: a request that repeats a conversation the server has
//! answered, plus new messages, continues from that conversation's saved state and reads only
//! the new messages ([`sessions`]); `usage.prompt_tokens_details.cached_tokens` says how many
//! tokens it did not read again. Requests wait in a bounded queue for the one model (503 past
//! it); a client that disconnects cancels its generation.
//!
//! The engine stays free of the network: this crate owns the HTTP side (axum on tokio); the
//! generations run on the [`Host`]'s engine thread (`tptt serve`: its own; the desktop app: the
//! one its chats use, so both queue behind each other).

pub mod error;
pub mod host;
pub mod server;
pub mod sessions;
pub mod wire;

pub use error::ApiError;
pub use host::{Host, LoadingHost, Runner, Serving};
pub use server::{router, serve, serve_until, Api, ApiConfig};
