#!/usr/bin/env bash
# Chat in the terminal with the offline demo model: SmolLM2-135M-Instruct (from PyPI) with an
# untrained TPTT injection (delta_product_c, mag_weight 0.125). Pass a TPTT repo folder (and
# optionally --variant V) to chat with another model instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The dev profile compiles every dependency and the engine crates at opt-level 3 (see
# Cargo.toml) and shares its build with the tests; `cargo build --release` adds LTO.
cargo build -p tptt-cli
if [ "$#" -eq 0 ]; then
    base="$(scripts/smollm2/fetch.sh)"
    demo="models/demo-smollm2-tptt"
    if [ ! -f "$demo/delta_product_c_mag0.125/config.json" ]; then
        target/debug/tptt inject "$base" --out "$demo" --modes delta_product_c --mag-weight 0.125 >/dev/null
    fi
    set -- "$demo" --variant delta_product_c_mag0.125
fi
exec target/debug/tptt chat "$@"
