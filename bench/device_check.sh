#!/usr/bin/env bash
# Everything that needs a GPU, in one go (docs/design.md, "GPU validation"): build the extension
# with its CUDA kernels, run the kernels' own test program, the GPU parity tests and the op tests,
# then the microbenchmarks on CUDA tensors. Logs, CSV and a summary go to $OUT
# (default: bench/results/device).
#
#     OUT=/some/dir bash bench/device_check.sh        # from the repository root or anywhere
#
# Assumes a python with a CUDA build of torch (plus setuptools, ninja, pytest) and nvcc; the machine
# may have no network, so nothing is downloaded (pip runs with --no-deps, no build isolation).
# Every step runs under a timeout cut from one overall budget (TOTAL_SECONDS, default 450 s, so the
# whole run stays under 8 minutes); a failing step is logged and the next one runs. The exit status
# is the number of failed steps (0: all passed).
set -u
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results/device}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python}"
TOTAL_SECONDS="${TOTAL_SECONDS:-450}"
START=$(date +%s)
SUMMARY="$OUT/summary.md"
FAILED=0

log() { echo "[device_check $(($(date +%s) - START))s] $*" | tee -a "$OUT/device_check.log"; }

# run_step NAME BUDGET_SECONDS COMMAND...: runs COMMAND with its output in $OUT/NAME.log, under
# min(BUDGET, what is left of TOTAL_SECONDS), and records the outcome in the summary.
run_step() {
  local name="$1" budget="$2"
  shift 2
  local left=$((TOTAL_SECONDS - ($(date +%s) - START)))
  if [ "$budget" -gt "$left" ]; then budget="$left"; fi
  if [ "$budget" -lt 5 ]; then
    log "$name: skipped, the time budget is spent"
    echo "| $name | skipped (no time left) | 0 | |" >>"$SUMMARY"
    FAILED=$((FAILED + 1))
    return 0
  fi
  log "$name: start (timeout ${budget}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0)) status="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="timed out"
  elif [ "$rc" -eq 77 ]; then
    status="no GPU visible: host part only (rc=77)"
  elif [ "$rc" -ne 0 ]; then
    status="failed (rc=$rc)"
  fi
  [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
  log "$name: $status after ${took}s; last lines:"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/device_check.log"
  echo "| $name | $status | $took | \`$name.log\` |" >>"$SUMMARY"
  return 0
}

{
  echo "# device check"
  echo
  echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "| step | result | seconds | log |"
  echo "|---|---|---:|---|"
} >"$SUMMARY"

# ---- the machine ----
{
  echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi not available"
  echo "== nvcc"; nvcc --version 2>&1 || echo "nvcc not on PATH"
  echo "== python / torch"
  "$PYTHON" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available()); print([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])' 2>&1
  echo "== cpu"; nproc; grep -m1 "model name" /proc/cpuinfo
} >"$OUT/environment.txt" 2>&1
log "environment: $(grep -m1 '^torch ' "$OUT/environment.txt" || echo 'torch not importable')"

JOBS="$(nproc 2>/dev/null || echo 4)"

# ---- 1. the kernels' own test program (no torch: checks the kernels even if the build fails) ----
run_step kernel_test_build 90 nvcc -std=c++17 -O2 -arch=native -I csrc/include -I csrc \
  -o "$OUT/test_cuda_kernels" tests/cpp/test_cuda_kernels.cu csrc/cuda/t1_step_kernel.cu csrc/cuda/segment_dot_kernel.cu \
  csrc/cuda/penalty_hypergrad_kernel.cu csrc/cuda/perturb_kernel.cu
if [ -x "$OUT/test_cuda_kernels" ]; then
  run_step kernel_test 60 "$OUT/test_cuda_kernels"
  rm -f "$OUT/test_cuda_kernels"  # a binary; the log is what matters
fi

# ---- 2. build with the CUDA kernels ----
run_step build 240 env T1T2_CUDA=1 MAX_JOBS="$JOBS" "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
run_step cuda_kernels_registered 30 "$PYTHON" -c '
import torch, t1t2_fast._extension as e
assert e.AVAILABLE, e.LOAD_ERROR
for op in ("penalty_segment_dot", "t1_step_", "penalty_hypergrad", "perturb_", "restore_", "gaussian_noise",
           "gaussian_noise_backward"):
    ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"t1t2::{op}", "CUDA")
    print(op, "CUDA kernel:", ok)
    assert ok, f"t1t2::{op} has no CUDA kernel"'

# ---- 3. GPU parity tests and the op tests ----
run_step pytest 300 "$PYTHON" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml" \
  tests/ops tests/noise/test_noise.py tests/noise/test_noise_ops.py tests/noise/test_rng.py \
  tests/noise/test_triton_noise.py tests/compiled/test_extension.py tests/optimizer/test_triton_oracle.py

# ---- 4. microbenchmarks on CUDA tensors ----
mkdir -p "$OUT/bench"
for script in bench/*.py; do
  name="bench_$(basename "$script" .py)"
  if "$PYTHON" "$script" --help 2>/dev/null | grep -q -- "--device"; then
    extra=()
    [ "$(basename "$script")" = kernels.py ] && extra=(--sizes 2e7 1e8 --runs 1 --max-seconds 1)
    run_step "$name" 240 "$PYTHON" "$script" --device cuda ${extra[@]+"${extra[@]}"} --out "$OUT/bench"
  else
    log "$name: no --device flag, not run (it would time this machine's CPU)"
    echo "| $name | not run: no --device flag | 0 | |" >>"$SUMMARY"
  fi
done

{
  echo
  echo "finished after $(($(date +%s) - START)) s; $FAILED failed step(s)"
  for table in "$OUT"/bench/*.md; do
    [ -e "$table" ] || continue
    echo
    echo "## $(basename "$table")"
    echo
    cat "$table"
  done
} >>"$SUMMARY"
log "done: $FAILED failed step(s); summary in $SUMMARY"
exit "$FAILED"
