#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (an H200: Python 3.12, torch 2.11 with
# CUDA 13.0, triton 3.6, nvcc 13.0, no package registry). Within ~9 minutes it
#   1. builds and installs the package with the CUDA kernels (editable, no downloads),
#   2. runs the CUDA backend tests and the trainer's GPU tests (tests/test_gpu_training.py),
#   3. trains the README's best 4-step joint-CDM student for CDM_GPU_CHECK_TRAIN_SECONDS
#      (benchmarks/gpu_distill.sh: step times, the exact table, the handover table),
#   4. runs the issue-4 benchmark (bf16, B*L*N >= 2^28 at N = 32768 and GPT-2's 50257:
#      scores_to_posterior and fused_euler_step against a device copy, the eager
#      reference and torch.compile) and writes the markdown report,
#   5. runs the Triton backend tests (one config per N: CDM_KERNELS_TRITON_AUTOTUNE=0),
#      the rest of the suite (8 pytest-xdist workers when installed, so a crashing test
#      is reported and the others still run), then a broader sweep without torch.compile.
# Every stage has a time cap and the whole run a budget; a failing stage is recorded and
# the next one still runs. Everything lands in $OUT (default ./gpu-out):
#   summary.txt (one line per stage: status, seconds), env.txt, <stage>.log,
#   tests-*.xml (JUnit), distill-summary.txt, bench.json, bench-breadth.json, RESULTS-gpu.md
#
#   OUT=/path/to/out bash benchmarks/gpu_check.sh
# Environment: OUT, PYTHON (default python3), CDM_GPU_CHECK_BUDGET (seconds, default 560),
# CDM_GPU_CHECK_TRAIN_SECONDS (default 180; 0 skips stage 3), CDM_GPU_CHECK_BENCH_SHAPES (stage 4's
# B*LxN list, default 8192x32768,5344x50257), MAX_JOBS (compile jobs, default all cores),
# CDM_GPU_CHECK_SKIP_INSTALL=1 (already installed).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${CDM_GPU_CHECK_BUDGET:-560}"
TRAIN_SECONDS="${CDM_GPU_CHECK_TRAIN_SECONDS:-180}"
BENCH_SHAPES="${CDM_GPU_CHECK_BENCH_SHAPES:-8192x32768,5344x50257}"
START=$SECONDS
: >"$OUT/summary.txt"

note() { echo "$*" | tee -a "$OUT/summary.txt"; }

# stage NAME CAP_SECONDS COMMAND...: runs COMMAND with a timeout of min(CAP, budget left),
# output in $OUT/NAME.log; returns the command's status (124: timed out).
stage() {
  local name="$1" cap="$2"
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    note "$name: skipped (budget of ${BUDGET}s spent)"
    return 125
  fi
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status="ok"
  [ "$rc" -eq 0 ] || status="FAILED (rc $rc$([ "$rc" -eq 124 ] && echo ", timed out after ${limit}s"))"
  note "$name: $status, $((SECONDS - t0))s; last line: $(tail -n 1 "$OUT/$name.log" | cut -c1-160)"
  return "$rc"
}

# --- the machine
{
  date -u
  nvidia-smi 2>&1 | head -15
  "$PY" - <<'EOF'
import platform, sys
print("python", sys.version.split()[0], platform.machine())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
except Exception as e:  # noqa: BLE001
    print("torch: not importable:", e)
for mod in ("triton", "pytest", "pytest_benchmark", "numpy"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(mod, "MISSING", e)
EOF
  command -v nvcc && nvcc --version | tail -2
} >"$OUT/env.txt" 2>&1

# --- 1. build and install with the CUDA kernels (no build isolation: nothing to download)
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ] && [ ! -e "$CUDA_HOME/include/cusparse.h" ]; then
  # a toolkit without the library headers: take them from the CUDA wheels torch depends on
  wheel_include="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/include"
  [ -d "$wheel_include" ] && export CPATH="$wheel_include${CPATH:+:$CPATH}"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CDM_KERNELS_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${CDM_GPU_CHECK_SKIP_INSTALL:-}" ]; then
  stage install 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e . ||
    note "install failed: the tests below use whatever cdm_kernels is importable"
fi
"$PY" -c 'import cdm_kernels as ck; print("backends on cuda:", ck.available_backends("cuda"))' >>"$OUT/env.txt" 2>&1

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
export CDM_KERNELS_QUIET=1

# --- 2. tests: the CUDA backend (every failure listed), the trainer on the GPU
if have pytest; then
  stage tests-cuda 110 "$PY" -m pytest tests/test_cuda_backend.py -q -rfEs --maxfail=40 -p no:cacheprovider \
    --junitxml="$OUT/tests-cuda.xml"
  stage tests-gpu-training 90 "$PY" -m pytest tests/test_gpu_training.py -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT/tests-gpu-training.xml"
else
  note "tests: pytest is not installed on this machine"
fi

# --- 3. the best 4-step student, trained for a fixed time (start-up, calibration and evaluation: ~60 s more)
if [ "$TRAIN_SECONDS" -gt 0 ]; then
  stage distill $((TRAIN_SECONDS + 120)) env OUT="$OUT" PYTHON="$PY" TRAIN_SECONDS="$TRAIN_SECONDS" \
    bash benchmarks/gpu_distill.sh
fi

# --- 4. the issue-4 benchmark

bench_common=(--benchmark-only --cdm-device cuda -p no:cacheprovider)
if have pytest_benchmark; then
  # issue 4's goal: bf16, B*L*N >= 2^28 (8192 * 32768 = 2^28; 5344 * 50257 just above);
  # reported against the session's device copy
  stage bench 150 "$PY" -m pytest benchmarks/test_ops.py "${bench_common[@]}" \
    --cdm-shapes "$BENCH_SHAPES" --cdm-dtypes bf16 --cdm-graphs uniform \
    --cdm-ops scores_to_posterior,fused_euler_step --cdm-passes fwd --cdm-budget 0.3 \
    --benchmark-json="$OUT/bench.json"
else
  note "benchmarks: pytest-benchmark is not installed on this machine"
fi

report() {
  local files=()
  for f in "$OUT/bench.json" "$OUT/bench-breadth.json"; do [ -s "$f" ] && files+=("$f"); done
  [ "${#files[@]}" -gt 0 ] || return 0
  "$PY" benchmarks/report.py "${files[@]}" >"$OUT/RESULTS-gpu.md" 2>"$OUT/report.log" ||
    note "report: FAILED (see report.log)"
}
report

# --- 5. the rest, as the budget allows
if have pytest; then
  stage tests-triton 90 "$PY" -m pytest tests/test_triton_backend.py -q -p no:cacheprovider --maxfail=20 \
    --junitxml="$OUT/tests-triton.xml"
  workers=()
  have xdist && workers=(-n 8)
  stage tests-all 100 "$PY" -m pytest tests -q -rfE -p no:cacheprovider "${workers[@]}" \
    --ignore=tests/test_cuda_backend.py --ignore=tests/test_triton_backend.py --junitxml="$OUT/tests-all.xml"
fi
if have pytest_benchmark; then
  # every op, both passes, two graphs, at GPT-2's vocabulary; fused backends against eager only (no compile)
  stage bench-breadth 100 "$PY" -m pytest benchmarks/test_ops.py "${bench_common[@]}" \
    --cdm-shapes 4096x50257 --cdm-dtypes bf16 --cdm-graphs uniform,absorbing \
    --cdm-impls eager,triton,cuda --cdm-budget 0.15 --benchmark-json="$OUT/bench-breadth.json"
  report
fi

note "gpu check: done in $((SECONDS - START))s; results in $OUT"
