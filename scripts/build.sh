#!/usr/bin/env bash
# Builds the workspace's programs in the dev profile — `tptt` (the CLI), `tptt-chat` (the desktop
# app) and `fake_hub` (the end-to-end test's hub) — as ONE build that `cargo test --workspace
# --all-targets` shares.
#
# Why not `cargo build -p tptt-chat`: cargo unifies the features of a dependency over what one
# invocation builds, and an invocation that builds tests or examples also counts the
# dev-dependencies' features (`tauri/test`, `tptt-hub/testing`, `tptt-engine/testing`...). A
# per-package build without them gives tauri, the plugins, the engine and the app other features,
# hence other artifacts: after the tests, it compiled them all again (minutes on 2 cores), and the
# end-to-end test ran a binary other than the one the tests had built. Naming an example here makes
# cargo resolve features as the test build does, so the artifacts are the same files.
#
# The features the tests add are additive (a mock runtime module in tauri, a fake hub module in
# tptt-hub, snapshot-crafting helpers in the engine): code the app never calls, compiled in. The
# distributable (`scripts/package.sh --release`) is built per package, without them.
#
# Used by scripts/run.sh, tests/e2e/run and scripts/package.sh --debug. Extra arguments go to
# cargo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec cargo build --workspace --bins --example fake_hub "$@"
