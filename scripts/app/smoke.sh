#!/usr/bin/env bash
# Smoke test of the desktop app under Xvfb: starts target/debug/tptt-chat (build it first:
# `npm --prefix ui run build && cargo build -p tptt-chat`) on a throwaway data folder, checks it
# is still running after a few seconds, and writes a screenshot of the screen to
# target/smoke/app.png (needs ImageMagick's `import`). Exit status 0 when the app stayed up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin=target/debug/tptt-chat
wait_s="${SMOKE_SECONDS:-15}"
out=target/smoke
mkdir -p "$out"
data="$(mktemp -d)"
display=":$((90 + RANDOM % 100))"
Xvfb "$display" -screen 0 1280x800x24 -nolisten tcp >"$out/xvfb.log" 2>&1 &
xvfb=$!
app=""
cleanup() {
    [[ -n "$app" ]] && kill "$app" 2>/dev/null || true
    kill "$xvfb" 2>/dev/null || true
    rm -rf "$data"
}
trap cleanup EXIT
sleep 1
DISPLAY="$display" TPTT_CHAT_DATA_DIR="$data" HF_HOME="$data/hf" "$bin" >"$out/app.log" 2>&1 &
app=$!
sleep "$wait_s"
if ! kill -0 "$app" 2>/dev/null; then
    echo "the app exited early; its log:" >&2
    cat "$out/app.log" >&2
    exit 1
fi
if command -v import >/dev/null; then
    DISPLAY="$display" import -window root "$out/app.png"
    echo "screenshot: $out/app.png"
fi
if grep -q "panicked" "$out/app.log"; then
    echo "the app panicked; its log:" >&2
    cat "$out/app.log" >&2
    exit 1
fi
echo "the app ran for ${wait_s}s under Xvfb"
