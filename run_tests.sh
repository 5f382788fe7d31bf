#!/usr/bin/env bash
# Style (ruff) + unit tests + every lesson's solutions notebook under nbval on the CPU profile, offline.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/ensure_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m course_utils doctor
exec .venv/bin/python -m pytest "$@"
