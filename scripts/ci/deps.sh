# shellcheck shell=bash disable=SC2034
# Debian packages the tests need, installed when missing. Sourced (not run) by scripts/test.sh,
# tests/e2e/run, tests/package/run, scripts/package.sh and .ci/run:
#
#   source scripts/ci/deps.sh
#   ensure_python_venv
#   ensure_debian_packages "${TEST_DEB_PACKAGES[@]}"
#
# Only the missing packages are installed (one `apt-get update` first), as root or through sudo;
# apt's output goes to a log that is shown only if it fails. On a machine without apt (or where
# nothing is missing) it does nothing.

# The desktop app (src-tauri, Tauri 2 on WebKitGTK) builds against these.
APP_DEB_PACKAGES=(libwebkit2gtk-4.1-dev libgtk-3-dev librsvg2-dev libsoup-3.0-dev build-essential pkg-config)
# ui/tests/run: Debian's chromium, driven headless by playwright-core (never a downloaded browser).
UI_DEB_PACKAGES=(chromium)
# tests/e2e/run: the app under Xvfb, driven through WebKitGTK's WebDriver server.
E2E_DEB_PACKAGES=(xvfb xauth webkit2gtk-driver)
# tests/package/run: the installed .deb under Xvfb with a session bus; its window found and
# photographed (xdotool, xprop, ImageMagick), its desktop entry validated, its data read (sqlite3).
PACKAGE_DEB_PACKAGES=(xvfb xauth dbus-daemon xdotool x11-utils imagemagick desktop-file-utils sqlite3)
TEST_DEB_PACKAGES=("${APP_DEB_PACKAGES[@]}" "${UI_DEB_PACKAGES[@]}" "${E2E_DEB_PACKAGES[@]}" "${PACKAGE_DEB_PACKAGES[@]}")

# ensure_debian_packages PKG...: installs those of PKG that are not installed.
ensure_debian_packages() {
    command -v dpkg-query >/dev/null 2>&1 || return 0
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "missing Debian packages (install them as root): ${missing[*]}" >&2
            return 1
        fi
        sudo=(sudo)
    fi
    echo "== installing Debian packages: ${missing[*]}"
    local log
    log="$(mktemp)"
    if ! { "${sudo[@]}" apt-get update -qq &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "apt-get could not install: ${missing[*]}" >&2
        return 1
    fi
    rm -f "$log"
}

# ensure_python_venv: a python3 that can make a venv with pip (scripts/smollm2/fetch.sh needs
# one); Debian's python3 packages are installed only when the python3 on PATH cannot.
ensure_python_venv() {
    if ! command -v python3 >/dev/null 2>&1; then
        ensure_debian_packages python3 python3-venv python3-pip
    elif ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        ensure_debian_packages python3-venv
    fi
}
