#!/usr/bin/env bash
# Installs everything snapmla's build and tests need, pinned, from Debian's
# packages and PyPI. Idempotent; safe to run on a fresh machine (CI) and again.
#   .deps/venv            Python tools: pytest, numpy, nanobind, scikit-build-core, matplotlib
#   .deps/cutlass/include CUTLASS/CuTe C++ headers from the nvidia-cutlass wheel
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="$root/.deps"
mkdir -p "$deps"

# --- system packages (Debian) ---
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v ninja >/dev/null || need_apt+=(ninja-build)
command -v g++ >/dev/null || need_apt+=(g++)
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
python3 -c "import venv, ensurepip" 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}"
fi

# --- Python packages (PyPI, pinned) ---
if [ ! -x "$deps/venv/bin/python" ]; then
  python3 -m venv "$deps/venv"
fi
"$deps/venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/scripts/requirements.txt"

# --- CUTLASS/CuTe headers: the wheel ships them under cutlass_library/source/include ---
cutlass_src="$("$deps/venv/bin/python" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))')"
if [ ! -f "$cutlass_src/cute/tensor.hpp" ] || [ ! -f "$cutlass_src/cutlass/cutlass.h" ]; then
  echo "install-deps: nvidia-cutlass does not ship cute/ and cutlass/ headers at $cutlass_src" >&2
  exit 1
fi
mkdir -p "$deps/cutlass"
rm -rf "$deps/cutlass/include"
cp -r "$cutlass_src" "$deps/cutlass/include"   # a real copy so it can travel to the GPU machine
# --- GoogleTest staged beside the project so it can travel to the GPU machine (no registry there) ---
if [ ! -f "$deps/gtest/lib/libgtest.a" ]; then
  mkdir -p "$deps/gtest/lib" "$deps/gtest/include"
  cp -r /usr/include/gtest "$deps/gtest/include/"
  cp /usr/lib/x86_64-linux-gnu/libgtest.a /usr/lib/x86_64-linux-gnu/libgtest_main.a "$deps/gtest/lib/"
fi
echo "install-deps: ok ($(du -sh "$deps/cutlass/include" | cut -f1) of CUTLASS headers, venv at $deps/venv)"
