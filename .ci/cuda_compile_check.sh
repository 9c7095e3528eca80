#!/usr/bin/env bash
# CI: the CUDA kernels (csrc/cuda/*.cu) must compile, even on a machine without a GPU.
#
# Builds the extension out of tree (nothing is written into the checkout) against a CUDA
# build of torch with the machine's nvcc, for Hopper:
#   CUDA_HOME=/usr/local/cuda  CPATH=<site-packages>/nvidia/cu13/include
#   TORCH_CUDA_ARCH_LIST=9.0   CDM_KERNELS_CUDA=1  python setup.py build_ext --build-temp ... --build-lib ...
# then checks that the library holds the CUDA registrations of every .cu file.
#
# Environment:
#   CDM_CUDA_VENV   venv to use; reused when it already has torch==$CDM_CUDA_TORCH (default
#                   /tmp/cdm-cuda-venv; created with `pip install torch==... numpy ninja setuptools wheel`)
#   CDM_CUDA_TORCH  torch version (default 2.14.1: a CUDA 13.0 build, ~5.4 GB installed)
#   CUDA_HOME       CUDA toolkit (default /usr/local/cuda; its bin/nvcc must exist)
#   CDM_CUDA_ARCH   TORCH_CUDA_ARCH_LIST (default 9.0)
#   MAX_JOBS        parallel compile jobs (default: all cores)
#   CDM_CUDA_KEEP   keep the build folder (printed) instead of deleting it
set -euo pipefail
cd "$(dirname "$0")/.."

torch_version="${CDM_CUDA_TORCH:-2.14.1}"
venv="${CDM_CUDA_VENV:-/tmp/cdm-cuda-venv}"
cuda_home="${CUDA_HOME:-/usr/local/cuda}"
arch="${CDM_CUDA_ARCH:-9.0}"
fail() {
  echo "cuda compile check: FAILED: $*" >&2
  exit 1
}

# --- the toolkit: the default CUDA_HOME detection can pick /usr/local (a wrapper nvcc) and fail
[ -x "$cuda_home/bin/nvcc" ] || fail "no nvcc at $cuda_home/bin/nvcc (set CUDA_HOME to a CUDA toolkit)"
nvcc_version="$("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"

# --- a venv with a CUDA build of torch (reused when it already has the right one)
have_torch() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$torch_version" <<'EOF' 2>/dev/null
import sys
import torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
EOF
}
if ! have_torch; then
  echo "cuda compile check: installing torch==$torch_version (CUDA build) into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_version" numpy ninja setuptools wheel
  have_torch || fail "torch==$torch_version in $venv is not a CUDA build"
fi
py="$venv/bin/python"
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cu_include="$site/nvidia/cu13/include"
[ -d "$cu_include" ] || fail "no CUDA headers at $cu_include (the nvidia-*-cu13 wheels that torch==$torch_version pulls)"
torch_cuda="$("$py" -c 'import torch; print(torch.version.cuda)')"

# --- the out-of-tree build
sources=(csrc/cuda/*.cu)
[ -e "${sources[0]}" ] || fail "no CUDA sources in csrc/cuda/"
work="$(mktemp -d /tmp/cdm-cuda-check.XXXXXX)"
# deleted at exit unless CDM_CUDA_KEEP is set (a failed build sets it, to keep its log)
trap '[ -n "${CDM_CUDA_KEEP:-}" ] || rm -rf "$work"' EXIT
echo "cuda compile check: ${#sources[@]} files, nvcc $nvcc_version, torch $("$py" -c 'import torch; print(torch.__version__)') (CUDA $torch_cuda), arch $arch, build in $work"
start=$SECONDS
if ! env CUDA_HOME="$cuda_home" CPATH="$cu_include${CPATH:+:$CPATH}" TORCH_CUDA_ARCH_LIST="$arch" \
  CDM_KERNELS_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" PATH="$cuda_home/bin:$PATH" \
  "$py" setup.py -q build_ext --build-temp "$work/temp" --build-lib "$work/lib" >"$work/build.log" 2>&1; then
  grep -E "error|Error" "$work/build.log" | head -40 >&2 || true
  if grep -q "C++20 or later compatible compiler is required" "$work/build.log"; then
    echo "hint: torch >= 2.14 needs C++20; setup.py must not force -std=c++17 (let torch choose the standard)" >&2
  fi
  tail -5 "$work/build.log" >&2
  CDM_CUDA_KEEP=1
  fail "the build failed (log: $work/build.log)"
fi
elapsed=$((SECONDS - start))
# warnings from our own sources (not from torch's headers)
if grep -E "csrc/.*(warning|remark)" "$work/build.log" >&2; then
  echo "cuda compile check: warnings above (from csrc/)" >&2
fi

# --- the library: one CUDA registration per .cu file, every kernel for the requested arch
lib="$(find "$work/lib" -name '_C*.so' | head -1)"
[ -n "$lib" ] || fail "no cdm_kernels/_C*.so under $work/lib"
registrations="$(nm -C "$lib" | grep -c 'TORCH_LIBRARY_IMPL_static_init_cdm_kernels_CUDA' || true)"
[ "$registrations" -ge "${#sources[@]}" ] ||
  fail "$registrations CUDA registrations in $lib, expected one per .cu file (${#sources[@]})"

echo "cuda compile check: ok (${#sources[@]} files, $registrations CUDA registrations, ${elapsed}s)"
