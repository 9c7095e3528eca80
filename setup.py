"""Builds the extension cdm_kernels._C against the torch that is installed.

The C++ CPU kernels are always built (OpenMP, with AVX2/AVX-512 code paths
chosen at run time). The CUDA kernels under csrc/cuda/ are added when torch has
CUDA and nvcc is found; CDM_KERNELS_CUDA=1 forces them (failing loudly if
impossible), CDM_KERNELS_CUDA=0 skips them.

Build with `pip install --no-build-isolation .` after installing torch: an
isolated build environment would download a second (multi-GB) torch, and an
extension built against another torch than the one it runs with breaks.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - what a user sees without torch
    sys.exit(
        "cdm-kernels builds against the installed torch, and none was found.\n"
        "Install torch first, then build without isolation:\n"
        "    pip install torch && pip install --no-build-isolation ."
    )


def build_cuda() -> bool:
    choice = os.environ.get("CDM_KERNELS_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        sys.exit(f"CDM_KERNELS_CUDA must be auto, 0 or 1, got {choice!r}")
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if choice == "1" and not possible:
        sys.exit("CDM_KERNELS_CUDA=1 but torch has no CUDA or nvcc/CUDA_HOME was not found")
    return choice == "1" or (choice == "auto" and possible)


def extension():
    here = os.path.dirname(os.path.abspath(__file__))

    def files(*pattern):
        return [os.path.relpath(p, here) for p in sorted(glob.glob(os.path.join(here, "csrc", *pattern)))]

    sources = files("*.cpp") + files("cpu", "*.cpp")
    include_dirs = [os.path.join(here, "csrc")]
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    # no -std flag: torch's cpp_extension adds the standard its own headers need (C++20 for
    # torch 2.13 / 2.14), and nvcc rejects a second -std
    cxx_flags = ["-O3", "-fno-math-errno", *openmp]
    # -lstdc++: link the C++ runtime dynamically, the one torch uses, even where the compiler
    # driver links it statically (the H200 image's /opt/gcc g++ adds -static-libstdc++). With a
    # second, static libstdc++ inside _C, streaming an integer into an error message used that
    # copy's locale facets on the process's locale: "got 7" printed as "got ", or a segfault.
    extra_link = [*openmp, *(["-lstdc++"] if sys.platform.startswith("linux") else [])]
    if build_cuda():
        sources += files("cuda", "*.cpp") + files("cuda", "*.cu")
        # no --use_fast_math: the kernels call the fast intrinsics (__expf, __logf) where the
        # forward passes can afford ~2 ulp, and keep IEEE expf and division in the backward.
        # -ftz=true: no denormal fix-ups around each ex2/lg2 (values below float32's smallest
        # normal never matter here: the inversion's floor is at least that)
        nvcc_flags = ["-O3", "-ftz=true", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "cdm_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("CDM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link,
            py_limited_api=False,
        )
    return cpp_extension.CppExtension(
        "cdm_kernels._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=extra_link,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
