#!/usr/bin/env bash
# The CUDA kernels' algorithms on a machine without a GPU: compiles csrc/cuda/*.cu as C++
# with -DCDM_CUDA_EMULATE (cuda/emulate.h: one OS thread per CUDA thread, barriers for
# __syncthreads / __syncwarp / shuffles) into a library that registers the ops as
# cdm_emu::* for CPU tensors (cuda/emulate_ops.cpp), then runs tests/test_cuda_backend.py
# and tests/test_cuda_traffic.py (the bytes each kernel moves) against it
# (CDM_CUDA_EMULATION_LIB). Numerics differ from a GPU (libm exp/log for the
# fast __expf/__logf); the row layouts, reductions, caches and the sampler are the same code.
#
# Usage: .ci/cuda_emulation_check.sh [pytest args...]   (default: both test files, whole)
# Environment:
#   PYTHON     the python of a venv with torch and cdm_kernels installed (default: python3)
#   CXX        C++20 compiler (default g++)
#   MAX_JOBS   parallel compile jobs (default: all cores)
#   CDM_EMU_LIB  where to put the library (default: a temporary folder, deleted at exit)
set -euo pipefail
cd "$(dirname "$0")/.."

py="${PYTHON:-python3}"
cxx="${CXX:-g++}"
jobs="${MAX_JOBS:-$(nproc)}"
work="$(mktemp -d /tmp/cdm-cuda-emu.XXXXXX)"
trap 'rm -rf "$work"' EXIT
lib="${CDM_EMU_LIB:-$work/libcdm_emu.so}"

read -r -a flags < <("$py" - <<'EOF'
import torch
from torch.utils import cpp_extension
flags = [f"-I{p}" for p in cpp_extension.include_paths()]
flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(" ".join(flags))
EOF
)
torch_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"

sources=(csrc/cuda/*.cu csrc/cuda/dense.cpp csrc/cuda/emulate_ops.cpp)
start=$SECONDS
objects=()
pids=()
for src in "${sources[@]}"; do
  obj="$work/$(basename "$src").o"
  objects+=("$obj")
  "$cxx" -std=c++20 -O2 -fPIC -pthread -Wall -Wno-unknown-pragmas -Wno-unused-function -DCDM_CUDA_EMULATE \
    -Icsrc "${flags[@]}" -x c++ -c "$src" -o "$obj" &
  pids+=($!)
  if [ "${#pids[@]}" -ge "$jobs" ]; then
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$cxx" -shared -pthread -o "$lib" "${objects[@]}" -L"$torch_lib" -Wl,-rpath,"$torch_lib" -lc10 -ltorch_cpu -ltorch
echo "cuda emulation: built $lib in $((SECONDS - start))s"

[ $# -gt 0 ] || set -- tests/test_cuda_backend.py tests/test_cuda_traffic.py
CDM_CUDA_EMULATION_LIB="$lib" "$py" -m pytest -q "$@"
