#!/usr/bin/env bash
# One pass over everything that needs a GPU, for a lent GPU machine:
#
#   bash benchmarks/gpu_check.sh
#
# 1. prints the GPU, driver and torch it runs on;
# 2. builds the extension in place against that machine's torch, CUDA kernels for
#    the visible GPU's arch only (KVCOMPACT_DEVICE=cuda, MAX_JOBS=16);
# 3. runs `pytest tests -q -m "not slow"` (CUDA tests run, CPU tests too), then
#    tests/test_tensor_parallel.py over NCCL on two GPUs (SKIP with fewer);
# 4. runs each GPU benchmark under benchmarks/ that exists (bench_quantize.py,
#    bench_compact.py, bench_offload.py, bench_cache.py, bench_attention.py: decode
#    attention GB/s against a device copy of the same bytes) with --device cuda and
#    --quick where supported, JSON beside its log;
# 4b. runs the offload="layers" cache decode at 16k context (bench_offload.py
#    --only-cache-decode), printing torch.cuda.max_memory_allocated;
# 5. runs compute-sanitizer memcheck, racecheck and synccheck over the CUDA kernel
#    tests (tests/test_*cuda*.py) at small sizes, with torch's caching allocator
#    off so out-of-bounds accesses hit real allocation edges (after the
#    benchmarks, so a slow sanitizer cannot cost the timings);
# 6. prints a summary table (step, status, seconds) last.
#
# Logs and JSON go to $OUT when set (the device tool's output folder, which
# brings back at most 8 files: everything is packed into gpu_check.tar.gz and
# summary.txt), else to benchmarks/out/gpu_check/. A failed step is recorded and
# later steps still run; the exit status is non-zero when any step failed.
# Steps share a time budget (GPU_CHECK_BUDGET_S, default 510 s) so the whole
# script ends inside a 10-minute command limit; a step that would start with
# too little time left is marked SKIP.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, SANITIZER_K (pytest -k
# expression for the sanitizer runs), GPU_CHECK_SKIP_BUILD=1 (reuse an in-place
# build).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-510}"
START_S=$(date +%s)
export PYTHONUNBUFFERED=1

if [[ -n "${OUT:-}" ]]; then
  RESULTS="$OUT"
  LOGS="$(mktemp -d /tmp/gpu_check.XXXXXX)"
else
  RESULTS="$ROOT/benchmarks/out/gpu_check"
  LOGS="$RESULTS"
fi
mkdir -p "$RESULTS" "$LOGS"

STEPS=()
STATUS=()
SECONDS_TAKEN=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START_S )); }

# Packs the logs into $OUT after every step, so a run cut short still brings
# back everything up to that point.
pack() {
  if [[ -n "${OUT:-}" ]]; then
    tar -C "$LOGS" -czf "$RESULTS/gpu_check.tar.gz.tmp" . 2>/dev/null &&
      mv "$RESULTS/gpu_check.tar.gz.tmp" "$RESULTS/gpu_check.tar.gz"
  fi
}

summary() {
  {
    printf '\n%-34s %-8s %8s\n' "step" "status" "seconds"
    printf '%-34s %-8s %8s\n' "----" "------" "-------"
    local i
    for i in "${!STEPS[@]}"; do
      printf '%-34s %-8s %8s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}"
    done
    printf '%-34s %-8s %8s\n' "total" "$([[ $FAILED == 0 ]] && echo PASS || echo FAIL)" "$(elapsed)"
    echo "logs: $([[ -n "${OUT:-}" ]] && echo "\$OUT/gpu_check.tar.gz" || echo "$LOGS")"
  } | tee "$RESULTS/summary.txt"
}

# run_step NAME MAX_SECONDS LOGFILE CMD...: runs CMD with a timeout of
# min(MAX_SECONDS, budget left), output to LOGFILE and to the console (tail).
run_step() {
  local name="$1" max_s="$2" log="$3"
  shift 3
  local left=$(( BUDGET_S - $(elapsed) ))
  local limit=$(( max_s < left ? max_s : left ))
  if (( limit < 15 )); then
    STEPS+=("$name"); STATUS+=("SKIP"); SECONDS_TAKEN+=("0")
    echo "=== $name: skipped, ${left}s of the budget left"
    FAILED=1
    return 0
  fi
  echo "=== $name (limit ${limit}s) -> $(basename "$log")"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local st=PASS
  if (( rc == 124 || rc == 137 )); then
    st=TIMEOUT
  elif (( rc != 0 )); then
    st=FAIL
  fi
  [[ $st != PASS ]] && FAILED=1
  tail -n 25 "$log"
  echo "=== $name: $st (rc=$rc, ${dt}s)"
  STEPS+=("$name"); STATUS+=("$st"); SECONDS_TAKEN+=("$dt")
  pack
  return 0
}

# --- 1. machine ------------------------------------------------------------------
info() {
  date -u
  nvidia-smi || true
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv || true
  command -v nvcc && nvcc --version | tail -n 2
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
EOF
}
run_step "info" 60 "$LOGS/info.log" bash -c "$(declare -f info); PY='$PY' info"

ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
[[ -z "$ARCH" ]] && ARCH="9.0"

# --- 2. build ----------------------------------------------------------------------
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]]; then
  run_step "build (sm ${ARCH})" 300 "$LOGS/build.log" \
    env KVCOMPACT_DEVICE=cuda TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 \
    "$PY" setup.py build_ext --inplace
fi
run_step "build_info" 60 "$LOGS/build_info.log" "$PY" -c \
  'import kvcompact, json; i = kvcompact.build_info(); print(json.dumps(i)); assert i["cuda_kernels"], "no CUDA kernels in this build"'

# --- 3. tests ----------------------------------------------------------------------
run_step "pytest tests -m 'not slow'" 240 "$LOGS/pytest.log" \
  "$PY" -m pytest tests -q -m "not slow" -p no:cacheprovider -ra

# --- 3b. tensor parallel over NCCL --------------------------------------------------------
# The same test the CPU suite runs over gloo, with its two ranks on two GPUs.
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if (( NGPU >= 2 )); then
  run_step "tensor parallel (nccl, 2 GPUs)" 180 "$LOGS/tensor_parallel.log" \
    env KVCOMPACT_TP_BACKEND=nccl "$PY" -m pytest tests/test_tensor_parallel.py -q -p no:cacheprovider -ra
else
  STEPS+=("tensor parallel (nccl)"); STATUS+=("SKIP"); SECONDS_TAKEN+=("0")
  echo "=== tensor parallel (nccl): skipped, ${NGPU} GPU(s) visible and it needs 2 (the gloo/CPU run is in the pytest step)"
fi

# --- 4. benchmarks ---------------------------------------------------------------------
for bench in bench_quantize bench_compact bench_offload bench_cache bench_attention; do
  file="benchmarks/$bench.py"
  [[ -f "$file" ]] || continue
  help="$("$PY" "$file" --help 2>/dev/null || true)"
  args=()
  [[ "$help" == *"--device"* ]] && args+=(--device cuda)
  [[ "$help" == *"--quick"* ]] && args+=(--quick)
  if [[ "$help" == *"--out"* ]]; then
    args+=(--out "$LOGS/$bench.json")
  elif [[ "$help" == *"--json"* ]]; then
    args+=(--json "$LOGS/$bench.json")
  fi
  run_step "$bench ${args[*]:0:3}" 150 "$LOGS/$bench.log" "$PY" "$file" "${args[@]}"
done

# --- 4b. offload="layers" decode at 16k context ------------------------------------------
# KVCompactCache(offload="layers") against the same cache on the device and transformers'
# DynamicCache(offloading=True), Llama-3.1-8B-shaped (8 layers, bf16); prints
# torch.cuda.max_memory_allocated during the decode steps beside the cache's own accounting
# (two layer slots + workspace).
run_step "offload=layers decode 16k" 150 "$LOGS/offload_layers_decode.log" \
  "$PY" benchmarks/bench_offload.py --device cuda --only-cache-decode --cache-contexts 16384 \
  --cache-steps 16 --json "$LOGS/offload_layers_decode.json"

# --- 5. sanitizers -------------------------------------------------------------------
SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
mapfile -t CUDA_TESTS < <(ls tests/test_*cuda*.py 2>/dev/null)
# Small sizes only: every kernel path (vector and scalar, quantize and dequantize,
# strided, sliced and unaligned views) in fp16/bf16; no large caches, no fp32
# duplicates (same index math), nothing that only re-checks rounding.
SAN_K="${SANITIZER_K:-not large and not 32k and not random_layouts and not rounding_boundary and not opcheck and not stream and not float32}"
if (( ${#CUDA_TESTS[@]} == 0 )); then
  STEPS+=("compute-sanitizer"); STATUS+=("SKIP"); SECONDS_TAKEN+=("0")
  echo "=== compute-sanitizer: no tests/test_*cuda*.py"
else
  for tool in memcheck racecheck synccheck; do
    run_step "sanitizer $tool" 100 "$LOGS/sanitizer_$tool.log" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 \
      --print-limit 20 "$PY" -m pytest "${CUDA_TESTS[@]}" -q -x -p no:cacheprovider -k "$SAN_K"
  done
fi

# --- 6. summary ------------------------------------------------------------------------
pack
summary
exit "$FAILED"
