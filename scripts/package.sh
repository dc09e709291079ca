#!/usr/bin/env bash
# Builds the desktop app's Debian package with the Tauri bundler (`tauri bundle`, from the
# @tauri-apps/cli npm package pinned in ui/package.json: its prebuilt binary, nothing compiled):
#
#   scripts/package.sh --debug     the dev-profile app the tests build (scripts/build.sh, the
#                                  build `cargo test --workspace --all-targets` and tests/e2e/run
#                                  share, so after scripts/test.sh cargo has nothing to recompile)
#                                  → target/debug/bundle/deb/tptt-chat_<version>_amd64.deb
#   scripts/package.sh [--release] the distributable: `cargo build --release -p tptt-chat` (LTO)
#                                  → target/release/bundle/deb/tptt-chat_<version>_amd64.deb
#
# The app is built with cargo first and then only bundled (`tauri bundle`, not `tauri build`): the
# bundler would otherwise run its own cargo build, with its own features. The package is described
# by src-tauri/tauri.conf.json (bundle.linux.deb): its runtime dependencies (WebKitGTK 4.1, GTK 3),
# the desktop entry (template: src-tauri/packaging/tptt-chat.desktop), the icons of icons/ in
# hicolor sizes (and icon.svg as the scalable one); everything under /usr. Installs missing Debian packages (the app's build libraries) and the npm
# packages of ui/ when missing. Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=release
case "${1:-}" in
    --debug) profile=debug ;;
    --release | "") profile=release ;;
    *)
        echo "usage: scripts/package.sh [--debug|--release]" >&2
        exit 2
        ;;
esac

source scripts/ci/deps.sh
ensure_debian_packages "${APP_DEB_PACKAGES[@]}"

# The UI is embedded in the binary: build it when missing or older than its sources (as
# tests/e2e/run does), and get the bundler from ui/node_modules.
if [[ ! -x ui/node_modules/.bin/tauri ]]; then
    echo "== npm ci (ui/: the UI's build tools and the Tauri bundler)"
    npm --prefix ui ci --no-audit --no-fund --loglevel=error
fi
if [[ ! -f ui/dist/index.html ]] ||
    [[ -n "$(find ui/src ui/index.html ui/package-lock.json ui/vite.config.ts -newer ui/dist/index.html -print -quit)" ]]; then
    echo "== building the UI (ui/dist)"
    npm --prefix ui run --silent build -- --logLevel warn
fi

echo "== building the app ($profile)"
if [[ "$profile" == debug ]]; then
    scripts/build.sh
else
    cargo build --release -p tptt-chat
fi

echo "== bundling the .deb"
out="target/$profile/bundle/deb"
rm -f "$out"/*.deb
bundle=(bundle --bundles deb --ci
    # The bundler would rewrite the cargo-built binary in place (a bundle-type marker for the
    # updater, which the app does not use): the tests keep running the binary cargo made.
    --no-binary-patching)
[[ "$profile" == debug ]] && bundle+=(--debug)
(cd src-tauri && ../ui/node_modules/.bin/tauri "${bundle[@]}")

made=("$out"/*.deb)
[[ ${#made[@]} -eq 1 && -f "${made[0]}" ]] || {
    echo "scripts/package.sh: the bundler made no single .deb in $out" >&2
    exit 1
}
# The bundler names it after the product ("TPTT Chat_0.1.0_amd64.deb"); Debian's convention is
# package_version_architecture.deb.
f() { dpkg-deb -f "${made[0]}" "$1"; }
deb="$out/$(f Package)_$(f Version)_$(f Architecture).deb"
[[ "${made[0]}" == "$deb" ]] || mv -f "${made[0]}" "$deb"
echo "$deb"
