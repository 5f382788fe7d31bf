#!/usr/bin/env bash
# Create .venv (Python 3.11) with the course's pinned set, once; reinstall only when the pins change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Setting up .venv with the pinned requirements (first time: a few minutes)…"
  "$PYTHON" -m venv .venv
  # WHEELHOUSE=DIR (scripts/build_wheelhouse.sh): install from those wheels only, no network at all.
  offline=()
  if [ -n "${WHEELHOUSE:-}" ]; then
    offline=(--no-index --find-links "$WHEELHOUSE")
    echo "…from the wheelhouse $WHEELHOUSE (--no-index)"
  fi
  .venv/bin/python -m pip install -q ${offline[@]+"${offline[@]}"} --upgrade "pip>=24"
  # torch/torchvision are pinned exactly in requirements.txt and installed in the same command,
  # so pip never pulls an unexpected multi-GB build.
  .venv/bin/python -m pip install -q ${offline[@]+"${offline[@]}"} -r requirements.txt
  .venv/bin/python -m pip install -q ${offline[@]+"${offline[@]}"} --no-deps -e .
  .venv/bin/python -m pip check
  echo "$want" > "$stamp"
fi
