#!/usr/bin/env bash
# The face-landmark detector's own virtual environment (.venv-detect), for photos without landmark
# files. Run by `bash scripts/setup.sh --detect`; safe to run again, it only does what is missing.
#
# mediapipe 0.10.21 is the last release whose wheel ships the Face Mesh models (later releases
# need a model download). It pins numpy<2 and protobuf 4, which the main environment (numpy 2)
# cannot satisfy, so it lives apart; facehd calls it through facehd/mediapipe_landmarks.py in a
# subprocess (facehd.landmarks_detect).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FACEHD_DETECT_VENV:-$ROOT/.venv-detect}"
PYTHON="${PYTHON:-python3}"
REQUIREMENTS="mediapipe==0.10.21"

say() { printf '[facehd setup --detect] %s\n' "$*" >&2; }

# mediapipe 0.10.21 has wheels for CPython 3.9 to 3.12 (Linux x86_64 and aarch64, macOS, Windows)
if [ ! -x "$VENV/bin/python" ] && ! "$PYTHON" -c 'import sys; sys.exit(not (3, 9) <= sys.version_info[:2] <= (3, 12))'; then
    say "$REQUIREMENTS needs Python 3.9 to 3.12; $PYTHON is $("$PYTHON" -V 2>&1). Point PYTHON at one:"
    say "  PYTHON=python3.11 bash scripts/setup.sh --detect"
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating the detector's virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi

STAMP="$VENV/.facehd-detect-installed"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$REQUIREMENTS" ]; then
    say "installing $REQUIREMENTS and its dependencies (first time: a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $REQUIREMENTS
    echo "$REQUIREMENTS" > "$STAMP"
fi

CHECK='import mediapipe as mp; mp.solutions.face_mesh.FaceMesh(static_image_mode=True).close()'
if ! "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    say "the detector environment in $VENV does not work; the error follows"
    "$VENV/bin/python" -c "$CHECK"
    exit 1
fi
say "ready: $VENV (facehd landmarks, and hrn predict on photos without landmark files, use it)"
