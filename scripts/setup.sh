#!/usr/bin/env bash
# Set up facehd on a fresh machine: system library for open3d, a virtual environment in .venv,
# and the package with its extras. Safe to run again; it only does what is missing.
#
#   bash scripts/setup.sh            # runtime + dev tools (pytest, ruff)
#   FACEHD_EXTRAS=dev,gpu bash scripts/setup.sh   # also nvdiffrast (needs CUDA and nvcc)
#   bash scripts/setup.sh --detect   # also the face detector's own environment (.venv-detect,
#                                    # scripts/setup_detect.sh) for photos without landmark files
set -euo pipefail

DETECT=0
for arg in "$@"; do
    case "$arg" in
        --detect) DETECT=1 ;;
        *) printf 'usage: bash scripts/setup.sh [--detect]\n' >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FACEHD_VENV:-$ROOT/.venv}"
EXTRAS="${FACEHD_EXTRAS:-dev}"
# "detect" is not a pip extra (the detector needs numpy < 2, so it gets its own environment): it means --detect
if [[ ",$EXTRAS," == *,detect,* ]]; then
    DETECT=1
    EXTRAS="$(tr ',' '\n' <<<"$EXTRAS" | { grep -vx detect || true; } | paste -sd, -)"
    EXTRAS="${EXTRAS:-dev}"
fi
PYTHON="${PYTHON:-python3}"

say() { printf '[facehd setup] %s\n' "$*" >&2; }

# System libraries the Python packages load at run time, as "soname:Debian package".
# open3d links against libusb-1.0; pyrender renders offscreen through EGL (Mesa's llvmpipe on a
# machine without a GPU).
SYSTEM_LIBS="libusb-1.0.so.0:libusb-1.0-0 libEGL.so.1:libegl1 libEGL_mesa.so.0:libegl-mesa0 libGL.so.1:libgl1"
MESA_DRI_PACKAGE="libgl1-mesa-dri"

missing_packages() {
    local cache
    cache="$(ldconfig -p 2>/dev/null || true)"
    for entry in $SYSTEM_LIBS; do
        if ! grep -q "${entry%%:*}" <<<"$cache"; then printf '%s ' "${entry##*:}"; fi
    done
    if ! ls /usr/lib/*/dri/swrast_dri.so /usr/lib/*/dri/*_dri.so >/dev/null 2>&1; then
        printf '%s ' "$MESA_DRI_PACKAGE"
    fi
}

MISSING="$(missing_packages)"
if [ -n "$MISSING" ]; then
    export DEBIAN_FRONTEND=noninteractive
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        say "installing system libraries: $MISSING"
        apt-get update -qq >/dev/null || say "apt-get update failed; trying the install anyway"
        # shellcheck disable=SC2086
        apt-get install -y -qq $MISSING >/dev/null
    elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        say "installing system libraries with sudo: $MISSING"
        sudo -n apt-get update -qq >/dev/null || true
        # shellcheck disable=SC2086
        sudo -n DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $MISSING >/dev/null
    else
        say "missing system libraries (Debian package names): $MISSING"
        say "open3d needs libusb-1.0 and offscreen rendering needs EGL with Mesa. Install them as an"
        say "administrator, then run this script again:"
        say "  Debian/Ubuntu: sudo apt-get install $MISSING"
        say "  Fedora:        sudo dnf install libusb1 mesa-libEGL mesa-dri-drivers"
        exit 1
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when the project's metadata changed since the last successful install.
STAMP="$VENV/.facehd-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)-$EXTRAS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    say "installing facehd[$EXTRAS] and its dependencies (first time: a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
    echo "$WANT" > "$STAMP"
fi

if ! "$VENV/bin/python" -c 'import open3d, torch, torchvision, pyrender' 2>/dev/null; then
    say "the environment in $VENV does not import; the error follows"
    "$VENV/bin/python" -c 'import open3d, torch, torchvision, pyrender'
    exit 1
fi
say "ready: $VENV"
if [ "$DETECT" = 1 ]; then
    bash "$ROOT/scripts/setup_detect.sh"
fi
