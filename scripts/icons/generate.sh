#!/usr/bin/env bash
# Regenerates the app icons in icons/ from icons/icon.svg: `rsvg-convert` (Debian package
# librsvg2-bin) rasterizes, ImageMagick (`convert`, package imagemagick) packs the .ico.
# Output: RGBA PNGs (Tauri refuses others) at the sizes Tauri's bundler expects, and the hicolor
# sizes the Debian package installs (32, 48, 64, 128, 256, 512; tauri.conf.json bundle.icon).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../icons"
png() { rsvg-convert -w "$1" -h "$1" icon.svg -o "$2.tmp.png" && convert "$2.tmp.png" "PNG32:$2" && rm "$2.tmp.png"; }
png 32 32x32.png
png 48 48x48.png
png 64 64x64.png
png 128 128x128.png
png 256 256x256.png
png 256 128x128@2x.png
png 512 icon.png
for s in 16 24 32 48 64 256; do png "$s" "ico-$s.png"; done
convert ico-16.png ico-24.png ico-32.png ico-48.png ico-64.png ico-256.png icon.ico
rm ico-*.png
