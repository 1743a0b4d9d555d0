#!/usr/bin/env bash
# Installs the pinned dependencies (once) and builds snapmla into build/:
# the library (CUDA kernels included when nvcc is present), the CLI and the tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
