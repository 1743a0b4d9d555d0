#!/usr/bin/env bash
# The accuracy study of docs/accuracy.md in one command: builds snapmla
# (scripts/build.sh), runs `snapmla accuracy` at its default sizes (CPU; the GPU
# kernel is measured too when a Hopper GPU is present), draws docs/accuracy.png
# and rewrites the results tables of docs/accuracy.md. Extra arguments go to
# `snapmla accuracy` (e.g. --lengths 1024,8192 for a quick look).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/build.sh
out=build/accuracy
mkdir -p "$out"
time build/snapmla accuracy --json "$out/accuracy.json" "$@" | tee "$out/accuracy.txt"
.deps/venv/bin/python scripts/plot_accuracy.py "$out/accuracy.json" --png docs/accuracy.png --markdown docs/accuracy.md
