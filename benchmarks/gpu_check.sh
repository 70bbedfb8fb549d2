#!/usr/bin/env bash
# The prepared GPU check: build the extension in place, load the backends, run the GPU test suite
# (pytest -m gpu), time the fused step per backend against the memory floor, measure cifar10 sampler
# throughput at batch 1000 per variant next to the official-style baseline, then run the CPU suite's
# Triton/CUDA cases compiled on the GPU (dry mode compiles the Triton kernels ahead of time instead). Works from a bare copy of the tree (PYTHONPATH, build_ext --inplace; nothing
# is installed). Logs and JSON go to OUTDIR; OUTDIR/summary.json is always written:
#   {"stages": [{"name", "status", "seconds", "last_line"}, ...]}
# status: ok, failed, timeout, skipped (budget spent) or "needs a GPU".
#
#   bash benchmarks/gpu_check.sh OUTDIR          # $PYTHON (default python3); exit 0 iff every stage is ok
#                                                # or needs a GPU
# Without a visible CUDA device (or with GPU_CHECK_DRY=1) it runs in dry mode: every stage that needs no
# GPU runs (CPU build, backends, AOT compile, a CPU smoke run of the step benchmark), the others report
# "needs a GPU". Budget: GPU_CHECK_BUDGET seconds (default 460 on a GPU, 600 dry), each stage capped.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-${OUT:-}}"
if [ -z "$DEST" ]; then echo "usage: $0 OUTDIR (or set OUT)" >&2; exit 2; fi
mkdir -p "$DEST" && DEST="$(cd "$DEST" && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}" GFDM_CUDA_ARCHS="${GFDM_CUDA_ARCHS:-9.0}"

if [ "${GPU_CHECK_DRY:-0}" != "1" ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1; BUDGET="${GPU_CHECK_BUDGET:-460}"
else
  GPU=0; BUDGET="${GPU_CHECK_BUDGET:-600}"
  export TRITON_INTERPRET=1          # the Triton backend on CPU tensors
fi
START=$(date +%s)
SUMMARY="$DEST/summary.json"
ENTRIES=()
N=0
FAILED=0

json_str() {  # a JSON string literal of $1 (escapes \ and ", drops control characters)
  local s="${1//\\/\\\\}"; s="${s//\"/\\\"}"
  printf '"%s"' "$(printf '%s' "$s" | tr -d '\000-\037')"
}

record() {  # record NAME STATUS SECONDS LAST_LINE: append and rewrite summary.json
  ENTRIES+=("{\"name\": $(json_str "$1"), \"status\": $(json_str "$2"), \"seconds\": $3, \"last_line\": $(json_str "$4")}")
  local IFS=,
  printf '{"stages": [%s]}\n' "${ENTRIES[*]}" > "$SUMMARY"
  printf '%-20s %-12s %5ss  %s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | cut -c1-100)"
  case "$2" in ok|"needs a GPU") ;; *) FAILED=1 ;; esac
}

# stage NAME NEEDS_GPU CAP_SECONDS CMD...: run CMD under `timeout` (at most CAP and what is left of the budget)
stage() {
  local name="$1" needs_gpu="$2" cap="$3"; shift 3
  N=$((N + 1))
  local log; log="$DEST/$(printf '%02d' "$N")_$name.log"
  if [ "$needs_gpu" = 1 ] && [ "$GPU" = 0 ]; then
    record "$name" "needs a GPU" 0 "dry mode: no CUDA device visible"; return 0
  fi
  local left=$((BUDGET - ($(date +%s) - START) - 3))
  local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt 10 ]; then record "$name" skipped 0 "budget of ${BUDGET}s spent"; return 0; fi
  echo "== $name (timeout ${t}s): $*" > "$log"
  local t0; t0=$(date +%s)
  timeout --kill-after=5 "$t" "$@" >> "$log" 2>&1
  local rc=$? status=ok
  [ "$rc" -ne 0 ] && status=failed
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status=timeout
  record "$name" "$status" "$(( $(date +%s) - t0 ))" "$(grep -v '^\s*$' "$log" | tail -n 1)"
}

# --- environment, build, backends (no GPU needed) ----------------------------------------------------
stage env 0 30 bash -c "command -v nvidia-smi >/dev/null && nvidia-smi -L; command -v nvcc >/dev/null && nvcc --version | tail -n 1; \
  $PY -c 'import sys, torch, triton; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpu\", torch.cuda.is_available())'"
if [ "$GPU" = 1 ]; then
  stage build 0 200 env GFDM_FORCE_CUDA=1 "$PY" setup.py build_ext --inplace
else
  stage build 0 300 env GFDM_SKIP_CUDA=1 "$PY" setup.py build_ext --inplace
fi
stage backends 0 60 "$PY" - "$GPU" <<'PYEOF'
import sys
from gfdm_fast import ops
gpu = sys.argv[1] == "1"
for dev in ("cpu", "cuda") if gpu else ("cpu",):
    print(dev, ops.backend_status(dev), "auto:", ops.available_backends(dev))
need = {"cpu": ["cpp", "torch"] + ([] if gpu else ["triton"]), "cuda": ["triton", "cuda", "torch"] if gpu else []}
missing = [(d, b) for d, bs in need.items() for b in bs if ops.backend_status(d)[b] != "ok"]
assert not missing, f"backends that did not load: {missing}"
print("backends loaded:", ", ".join(f"{d}:{b}" for d, bs in need.items() for b in bs))
PYEOF
if [ "$GPU" = 0 ]; then   # on a GPU the suite compiles the kernels for real; this CPU-side compile is CI's
  stage triton_aot 0 150 env -u TRITON_INTERPRET "$PY" benchmarks/triton_aot.py --subset --arch 90 80 100 --jobs "$(( MAX_JOBS < 8 ? MAX_JOBS : 8 ))" \
    --json "$DEST/triton_aot_subset.json"
fi

# --- the GPU suite and the GPU figures -----------------------------------------------------------------
# test modules that import pytorch-fid / vendi-score at collection are left out where those are absent
IGNORE=()
if ! "$PY" -c 'import pytorch_fid, vendi_score' 2>/dev/null; then
  IGNORE=(--ignore=tests/test_fid.py --ignore=tests/test_vendi.py --ignore=tests/test_generate.py)
fi
# -s: the end-to-end module prints its measured cuda-vs-CPU differences
stage pytest_gpu 1 100 "$PY" -m pytest -q -s -m gpu -p no:cacheprovider "${IGNORE[@]}" tests
stage fused_step 1 45 "$PY" benchmarks/fused_step.py --device cuda --shape 1000 3 32 32 --num-aug 0 2 3 \
  --json "$DEST/fused_step_cuda.json"
# a large batch (bandwidth) and a single small image (the launch cost per op), the GPU backends only
stage fused_step_large 1 40 "$PY" benchmarks/fused_step.py --device cuda --shape 8000 3 32 32 --num-aug 0 3 \
  --backends triton cuda --json "$DEST/fused_step_cuda_b8000.json"
stage fused_step_launch 1 30 "$PY" benchmarks/fused_step.py --device cuda --shape 1 3 32 32 --num-aug 3 \
  --backends triton cuda --iters 10 --json "$DEST/fused_step_cuda_b1.json"
# the CPU suite's Triton and CUDA cases, now compiled on the GPU (the interpreter is off with a CUDA device);
# one line per test (-v) so that a timeout still leaves every finished result in the log
XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
stage pytest_compiled 1 120 "$PY" -m pytest -v -p no:cacheprovider "${XDIST[@]}" -m "not gpu" -k "triton or cuda" \
  tests/test_ops.py tests/test_triton_kernels.py tests/test_exp_step.py tests/test_exp_solver.py
stage throughput_cifar10 1 150 "$PY" benchmarks/throughput.py --device cuda --preset cifar10 --batch 1000 \
  --num-aug 3 --variants official fused bf16 cuda_graphs compiled all --steps 3 --repeats 2 \
  --json "$DEST/throughput_cifar10_b1000.json"
if [ "$GPU" = 0 ]; then   # the step benchmark itself, proven on CPU tensors
  stage fused_step_cpu_smoke 0 120 "$PY" benchmarks/fused_step.py --device cpu --shape 2 3 8 8 --num-aug 0 2 --iters 2 \
    --json "$DEST/fused_step_cpu_smoke.json"
fi

echo "gpu_check ($([ "$GPU" = 1 ] && echo GPU || echo dry mode)): $(( $(date +%s) - START ))s of ${BUDGET}s; $SUMMARY"
exit "$FAILED"
