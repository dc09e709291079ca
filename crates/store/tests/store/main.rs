//! Integration tests of `tptt-store`: every query, each test on its own temporary database
//! file (or in memory), through the public API; "hand-written" bad rows go through a raw
//! SQLite connection, as a person with the `sqlite3` tool would write them.

mod branch;
mod common;
mod conversations;
mod export;
mod hardening;
mod import;
mod malformed;
mod memories;
mod messages;
mod open;
mod search;
mod settings;
mod snapshots;
mod versions;
