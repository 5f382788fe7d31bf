#!/usr/bin/env bash
# Build a wheelhouse for a room of laptops (or an offline CI): every pinned package as a wheel — the
# llama-cpp-python source distribution compiled once — plus pip/setuptools/wheel so editable installs
# build offline. Then, on every machine: WHEELHOUSE=DIR ./run_tests.sh (or run_course.sh), which installs
# with `pip install --no-index --find-links DIR` and never touches the network.
# Usage: scripts/build_wheelhouse.sh [DIR]   (default: wheelhouse/)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-wheelhouse}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
mkdir -p "$DIR"
"$PYTHON" -m pip wheel -q --wheel-dir "$DIR" "pip>=24" "setuptools>=68" wheel
"$PYTHON" -m pip wheel -q --wheel-dir "$DIR" -r requirements.txt
# Lesson 06 extracts llama.cpp's converters from this source distribution (pip download, which then
# finds it here when PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR are set).
llama=$(grep -o '^llama-cpp-python\[server\]==[^ ]*' requirements.txt | sed 's/\[server\]//')
"$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$DIR" "$llama"
echo "wheelhouse: $(ls "$DIR" | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR/"
