"""What the extension ``cdm_kernels._C`` is compiled from and with, in one place.

Read by setup.py (the ahead-of-time build) and by cdm_kernels/build.py (the
just-in-time build), so that both compile the same sources with the same flags.
setup.py loads this file by its path, without importing the package: at module
level it needs nothing beyond the standard library (torch is imported inside
:func:`build_cuda` only).

The C++ CPU kernels are always built (OpenMP, with AVX2/AVX-512 code paths
chosen at run time). The CUDA kernels under csrc/cuda/ are added when torch has
CUDA and nvcc is found; ``CDM_KERNELS_CUDA=1`` forces them (failing loudly if
impossible), ``CDM_KERNELS_CUDA=0`` skips them.
"""

import glob
import os
import sys

NAME = "_C"

_OPENMP = ["-fopenmp"] if sys.platform != "darwin" else []

# no -std flag: torch's cpp_extension adds the standard its own headers need (C++20 for
# torch 2.13 / 2.14), and nvcc rejects a second -std. -DNDEBUG: setuptools adds it from
# Python's own CFLAGS, torch's just-in-time build does not; both builds are release builds.
CXX_FLAGS = ["-O3", "-DNDEBUG", "-fno-math-errno", *_OPENMP]

# no --use_fast_math: the kernels call the fast intrinsics (__expf, __logf) where the
# forward passes can afford ~2 ulp, and keep IEEE expf and division in the backward.
# -ftz=true: no denormal fix-ups around each ex2/lg2 (values below float32's smallest
# normal never matter here: the inversion's floor is at least that)
NVCC_FLAGS = ["-O3", "-ftz=true", "-lineinfo"]

# -lstdc++: link the C++ runtime dynamically, the one torch uses, even where the compiler
# driver links it statically (the H200 image's /opt/gcc g++ adds -static-libstdc++). With a
# second, static libstdc++ inside _C, streaming an integer into an error message used that
# copy's locale facets on the process's locale: "got 7" printed as "got ", or a segfault.
LINK_FLAGS = [*_OPENMP, *(["-lstdc++"] if sys.platform.startswith("linux") else [])]

#: the preprocessor definitions of a build with the CUDA kernels
CUDA_DEFINES = [("CDM_WITH_CUDA", "1")]


class CudaChoiceError(RuntimeError):
    """``CDM_KERNELS_CUDA`` holds a bad value, or asks for what cannot be built."""


def build_cuda() -> bool:
    """Whether to compile the CUDA kernels: ``CDM_KERNELS_CUDA`` (auto, 0 or 1), and in
    ``auto`` whether torch has CUDA and the CUDA toolkit (nvcc, CUDA_HOME) is found."""
    choice = os.environ.get("CDM_KERNELS_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        raise CudaChoiceError(f"CDM_KERNELS_CUDA must be auto, 0 or 1, got {choice!r}")
    if choice == "0":
        return False
    import torch

    # importing cpp_extension looks for the toolkit (~0.2 s): only where torch has CUDA
    possible = torch.version.cuda is not None and _cuda_home() is not None
    if choice == "1" and not possible:
        raise CudaChoiceError("CDM_KERNELS_CUDA=1 but torch has no CUDA or nvcc/CUDA_HOME was not found")
    return possible


def _cuda_home():
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def sources(csrc: str, with_cuda: bool) -> list:
    """The files compiled, under the source folder ``csrc`` (paths start with it)."""

    def files(*pattern):
        return sorted(glob.glob(os.path.join(csrc, *pattern)))

    found = files("*.cpp") + files("cpu", "*.cpp")
    if with_cuda:
        found += files("cuda", "*.cpp") + files("cuda", "*.cu")
    return found
