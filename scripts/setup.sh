#!/usr/bin/env bash
# Set up facehd on a fresh machine: system library for open3d, a virtual environment in .venv,
# and the package with its extras. Safe to run again; it only does what is missing.
#
#   bash scripts/setup.sh            # runtime + dev tools (pytest, ruff)
#   FACEHD_EXTRAS=dev,gpu bash scripts/setup.sh   # also nvdiffrast (needs CUDA)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FACEHD_VENV:-$ROOT/.venv}"
EXTRAS="${FACEHD_EXTRAS:-dev}"
PYTHON="${PYTHON:-python3}"

say() { printf '[facehd setup] %s\n' "$*" >&2; }

have_libusb() {
    ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'
}

# open3d links against libusb-1.0 and fails to import without it.
if ! have_libusb; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        say "installing libusb-1.0-0 (needed by open3d)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null || say "apt-get update failed; trying the install anyway"
        apt-get install -y -qq libusb-1.0-0 >/dev/null
    elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        say "installing libusb-1.0-0 with sudo (needed by open3d)"
        sudo -n apt-get update -qq >/dev/null || true
        sudo -n apt-get install -y -qq libusb-1.0-0 >/dev/null
    else
        say "open3d needs the system library libusb-1.0 and it is missing."
        say "Install it as an administrator, then run this script again:"
        say "  Debian/Ubuntu: sudo apt-get install libusb-1.0-0"
        say "  Fedora:        sudo dnf install libusb1"
        say "  conda:         conda install -c conda-forge libusb"
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
