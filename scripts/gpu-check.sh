#!/usr/bin/env bash
# One command for the GPU machine (the `device` tool): build with all cores,
# run the GPU tests, the demo and the benchmarks, keep logs under $OUT and
# print a short table last.
#   scripts/gpu-check.sh [all|tests|python|bench]     (default all)
# The machine has no package registry: .deps/gtest (and .deps/cutlass) must be
# carried from the development machine, where scripts/install-deps.sh made them.
set -uo pipefail
mode="${1:-all}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/gpu-out}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
jobs=$(nproc)
t0=$(date +%s)
if ! { cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release >"$OUT/configure.log" 2>&1 &&
       cmake --build build-gpu -j"$jobs" >"$OUT/build.log" 2>&1; }; then
  tail -n 60 "$OUT/configure.log" "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
note "build: ok in $(( $(date +%s) - t0 )) s on $jobs cores"

if [ "$mode" = all ] || [ "$mode" = tests ]; then
  build-gpu/snapmla_gpu_tests --gtest_color=no >"$OUT/gpu-tests.log" 2>&1
  rc=$?
  note "gpu tests: exit $rc; $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]|^\[  SKIPPED \]' "$OUT/gpu-tests.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]' "$OUT/gpu-tests.log" | head -20 | tee -a "$summary"
  grep -E '^CASE ' "$OUT/gpu-tests.log" >"$OUT/cases.txt"
  build-gpu/snapmla_tests --gtest_brief=1 >"$OUT/cpu-tests.log" 2>&1
  note "cpu tests on the GPU machine: exit $?"
  build-gpu/snapmla demo >"$OUT/demo.log" 2>&1
  note "demo: exit $?"
  grep -E 'rel. L2' "$OUT/demo.log" | tee -a "$summary"
fi

if [ "$mode" = all ] || [ "$mode" = python ]; then
  # The image's python3 has torch, nanobind and scikit-build-core; no registry is reachable.
  python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/snapmla-py . >"$OUT/pip.log" 2>&1
  note "python build: exit $?"
  PYTHONPATH=/tmp/snapmla-py python3 -m pytest -q -rs -p no:cacheprovider tests/python >"$OUT/pytest.log" 2>&1
  note "pytest: exit $?; $(tail -n 1 "$OUT/pytest.log")"
  PYTHONPATH=/tmp/snapmla-py python3 examples/deepseek_decode_layer.py >"$OUT/example.log" 2>&1
  note "example: exit $?"
  tail -n 6 "$OUT/example.log" | tee -a "$summary"
fi

if [ "$mode" = all ] || [ "$mode" = bench ]; then
  build-gpu/snapmla bench --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
  note "bench: exit $?"
  if build-gpu/snapmla --help | grep -q kv-bench; then
    build-gpu/snapmla kv-bench --json "$OUT/kv-bench.json" >"$OUT/kv-bench.log" 2>&1
    note "kv-bench: exit $?"
  fi
fi

echo
echo "=== summary ==="
cat "$summary"
[ -f "$OUT/cases.txt" ] && { echo "--- accuracy cases ---"; column -t "$OUT/cases.txt" 2>/dev/null | cut -c1-200 | head -60; }
[ -f "$OUT/bench.log" ] && { echo "--- bench ---"; tail -n 25 "$OUT/bench.log"; }
[ -f "$OUT/kv-bench.log" ] && { echo "--- kv-bench ---"; tail -n 12 "$OUT/kv-bench.log"; }
exit 0
