#!/usr/bin/env bash
# Run the whole course: every notebook in order, auto profile (the tiny stand-in on a CPU).
# Executed notebooks and a summary land in runs/. Extra arguments go to `python -m course_utils run`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/ensure_venv.sh
exec .venv/bin/python -m course_utils run "$@"
