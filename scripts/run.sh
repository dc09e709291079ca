#!/usr/bin/env bash
# Chat in the terminal with the offline demo model: SmolLM2-135M-Instruct (from PyPI) with an
# untrained TPTT injection (delta_product, mag_weight 0.125). Pass a TPTT repo folder (and
# optionally --variant V) to chat with another model instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -p tptt-cli
if [ "$#" -eq 0 ]; then
    base="$(scripts/smollm2/fetch.sh)"
    demo="models/demo-smollm2-tptt"
    if [ ! -f "$demo/delta_product_mag0.125/config.json" ]; then
        target/release/tptt inject "$base" --out "$demo" --modes delta_product --mag-weight 0.125 >/dev/null
    fi
    set -- "$demo" --variant delta_product_mag0.125
fi
exec target/release/tptt chat "$@"
