//! Rebuilds the crate when a migration is added or changed: `sqlx::migrate!` embeds the files
//! at build time, and Cargo does not otherwise look at them.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
