#!/usr/bin/env bash
# One command for the GPU machine (the `device` tool): build with all cores,
# run the GPU tests, the demo, the Python suite and the benchmarks, keep logs
# under $OUT (at most 8 files come back) and print a short table last.
#   scripts/gpu-check.sh [all|tests|python|bench|profile|rates|trace]     (default all)
# Optional: GTEST_FILTER (a gtest filter for the GPU tests), BENCH_ARGS (extra
# `snapmla bench` options, e.g. "--format fp8"), TRACE_CONFIG (the bench config
# whose fp8 phase trace `trace` prints; build-trace, -DSNAPMLA_DECODE_TRACE).
# The machine has no package registry: .deps/gtest and .deps/cutlass must be
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

note "$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader)"
jobs=$(nproc)
# bench, profile and trace need only the CLI (trace: its own build with the kernel's trace points).
build=build-gpu
targets=""
cuda_flags=""
case "$mode" in
  bench|profile) targets="--target snapmla" ;;
  trace) build=build-trace; targets="--target snapmla"; cuda_flags="-DCMAKE_CUDA_FLAGS=-DSNAPMLA_DECODE_TRACE" ;;
  rates) targets="--target snapmla_wgmma_rates" ;;
esac
t0=$(date +%s)
if ! { cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release $cuda_flags >"$OUT/build.log" 2>&1 &&
       cmake --build "$build" -j"$jobs" $targets >>"$OUT/build.log" 2>&1; }; then
  grep -E "error|Error" -A3 "$OUT/build.log" | head -n 60
  echo "BUILD FAILED"
  exit 1
fi
note "build: ok in $(( $(date +%s) - t0 )) s on $jobs cores"
rm -f "$OUT/build.log"

if [ "$mode" = all ] || [ "$mode" = tests ]; then
  # A kernel that hangs must not eat the session's device time.
  timeout 300 build-gpu/snapmla_gpu_tests --gtest_color=no ${GTEST_FILTER:+--gtest_filter="$GTEST_FILTER"} >"$OUT/gpu-tests.log" 2>&1
  note "gpu tests: exit $?; $(grep -E '^\[  PASSED  \]|^\[  FAILED  \] [0-9]+ test|^\[  SKIPPED \] [0-9]+ test' "$OUT/gpu-tests.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \] [A-Za-z]' "$OUT/gpu-tests.log" | sort -u | head -20 | tee -a "$summary"
  grep -E '^CASE |^WGMMA-' "$OUT/gpu-tests.log" >"$OUT/cases.txt"
  build-gpu/snapmla_tests --gtest_brief=1 >/tmp/cpu-tests.log 2>&1
  note "cpu tests on the GPU machine: exit $? ($(grep -E '^\[  PASSED' /tmp/cpu-tests.log))"
  build-gpu/snapmla demo >/tmp/demo.log 2>&1
  note "demo: exit $?"
  grep -E 'rel. L2' /tmp/demo.log | tee -a "$summary"
fi

if [ "$mode" = all ] || [ "$mode" = python ]; then
  # The image's python3 has torch, nanobind and scikit-build-core; no registry is reachable.
  # Its default CXX (/opt/gcc) links libstdc++ statically, which crashes inside an
  # extension module (std::ostream in locale code); the system g++ links it shared.
  CC=gcc CXX=g++ CUDAHOSTCXX=g++ python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/snapmla-py . >/tmp/pip.log 2>&1
  rc=$?
  note "python build: exit $rc"
  [ $rc -ne 0 ] && tail -n 30 /tmp/pip.log
  PYTHONPATH=/tmp/snapmla-py python3 -m pytest -q -rs -p no:cacheprovider tests/python >"$OUT/pytest.log" 2>&1
  note "pytest: exit $?; $(tail -n 1 "$OUT/pytest.log")"
  PYTHONPATH=/tmp/snapmla-py python3 examples/deepseek_decode_layer.py >/tmp/example.log 2>&1
  note "example: exit $?"
  tail -n 8 /tmp/example.log | tee -a "$summary"
fi

if [ "$mode" = all ] || [ "$mode" = bench ]; then
  timeout 300 build-gpu/snapmla bench ${BENCH_ARGS:-} --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
  note "bench: exit $?"
  timeout 120 build-gpu/snapmla kv-bench --json "$OUT/kv-bench.json" >>"$OUT/bench.log" 2>&1
  note "kv-bench: exit $?"
fi

if [ "$mode" = trace ]; then
  timeout 120 "$build"/snapmla bench --format fp8 --only "${TRACE_CONFIG:-b64_sq2_h128_sk8192}" --groups 1 \
    --calls 5 >"$OUT/trace.txt" 2>&1
  note "trace: exit $? (${TRACE_CONFIG:-b64_sq2_h128_sk8192})"
fi

if [ "$mode" = rates ]; then
  timeout 120 build-gpu/snapmla_wgmma_rates >"$OUT/wgmma-rates.txt" 2>&1
  note "wgmma rates: exit $?"
fi

if [ "$mode" = profile ]; then
  # Nsight Compute on one bench config (PROFILE_CONFIG, default b64_sq1_h128_sk4096) and the
  # fp8 decode kernel: the details page and the SASS lines with the most stall samples.
  cfg="${PROFILE_CONFIG:-b64_sq1_h128_sk4096}"
  timeout 400 ncu --kernel-name regex:"${PROFILE_KERNEL:-mla_decode_fp8_wgmma}" --launch-skip 3 --launch-count 1 \
    --set full --import-source no -f -o "$OUT/profile" build-gpu/snapmla bench --format "${PROFILE_FORMAT:-fp8}" \
    --only "$cfg" --groups 1 --calls 5 >"$OUT/ncu.log" 2>&1
  note "ncu: exit $? ($cfg)"
  ncu --import "$OUT/profile.ncu-rep" --page details >"$OUT/ncu-details.txt" 2>&1
  # Tensor-pipe and shared-memory utilisation, the two candidate page-time limits.
  ncu --import "$OUT/profile.ncu-rep" --page raw --csv 2>/dev/null | python3 -c '
import csv, sys
rows = list(csv.reader(sys.stdin))
for name, unit, value in zip(rows[0], rows[1], rows[2]):
    if any(k in name for k in ("pipe_tensor", "mem_shared", "data_bank", "pipe_lsu", "sm__throughput", "issue_active", "inst_executed_pipe_uniform", "cycles_elapsed.avg.per_second")):
        print(f"{name:90s} {value:>14s} {unit}")' >"$OUT/ncu-pipes.txt"
  ncu --import "$OUT/profile.ncu-rep" --page source --csv --print-source sass >/tmp/ncu-sass.csv 2>&1
  python3 - /tmp/ncu-sass.csv >"$OUT/ncu-top-sass.txt" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
head = next(i for i, r in enumerate(rows) if any("Source" == c for c in r))
cols = rows[head]
src = cols.index("Source")
addr = cols.index("Address") if "Address" in cols else 0
stall = [i for i, c in enumerate(cols) if c.startswith("Warp Stall Sampling (All")][0]
reasons = [i for i, c in enumerate(cols) if c.startswith("stall_") or c.startswith("Stall")]
data = []
for r in rows[head + 1:]:
    try:
        data.append((float(r[stall] or 0), r))
    except (ValueError, IndexError):
        pass
total = sum(d[0] for d in data) or 1
print("total stall samples", total, "columns:", [cols[i] for i in reasons][:30])
for v, r in sorted(data, key=lambda d: -d[0])[:70]:
    print(f"{100 * v / total:5.1f}% {r[addr]:>8} {r[src][:90]}")
PY
fi

echo
echo "=== summary ==="
cat "$summary"
[ -s "$OUT/cases.txt" ] && { echo "--- accuracy cases ---"; cut -c1-230 "$OUT/cases.txt" | head -70; }
[ -f "$OUT/bench.log" ] && { echo "--- bench ---"; tail -n 36 "$OUT/bench.log"; }
[ -f "$OUT/trace.txt" ] && { echo "--- trace ---"; grep -E '^ *[0-9]+ \||^n \|' "$OUT/trace.txt" | head -40; }
[ -f "$OUT/wgmma-rates.txt" ] && { echo "--- wgmma rates ---"; cat "$OUT/wgmma-rates.txt"; }
[ -f "$OUT/ncu-pipes.txt" ] && { echo "--- pipes ---"; cat "$OUT/ncu-pipes.txt"; }
[ -f "$OUT/ncu-top-sass.txt" ] && { echo "--- top stalled SASS ---"; head -n 45 "$OUT/ncu-top-sass.txt"; }
exit 0
