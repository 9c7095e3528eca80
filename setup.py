"""Installs cdm-kernels; builds the extension cdm_kernels._C ahead of time when torch is there.

Two ways, chosen by whether torch can be imported while building:

* ``pip install --no-build-isolation .`` after installing torch: _C is compiled now,
  against that torch (the sources and flags are in cdm_kernels/_extension_spec.py).
* ``pip install .`` (pip's isolated build environment holds no torch, and must not:
  it would download a second, multi-GB torch, and an extension built against another
  torch than the one it runs with breaks): no compiled extension is installed; the
  first call that needs the ``cpp`` or ``cuda`` backend compiles _C just in time
  against the running torch (cdm_kernels/build.py).

Either way the C++/CUDA sources (csrc/) are copied into the package as
cdm_kernels/csrc/, for the just-in-time build.
"""

import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def load_spec():
    # by path: importing the package cdm_kernels would import torch
    location = os.path.join(HERE, "cdm_kernels", "_extension_spec.py")
    spec = importlib.util.spec_from_file_location("_cdm_extension_spec", location)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into the package as cdm_kernels/csrc/. Skipped for
    editable installs, which find csrc/ where it is (cdm_kernels/build.py looks there)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "cdm_kernels", "csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.so"))


def extension(spec, cpp_extension):
    try:
        with_cuda = spec.build_cuda()
    except spec.CudaChoiceError as error:
        raise SystemExit(str(error)) from None
    sources = [os.path.relpath(path, HERE) for path in spec.sources(CSRC, with_cuda)]
    common = dict(include_dirs=[CSRC], extra_link_args=spec.LINK_FLAGS)
    if with_cuda:
        return cpp_extension.CUDAExtension(
            f"cdm_kernels.{spec.NAME}",
            sources,
            define_macros=spec.CUDA_DEFINES,
            extra_compile_args={"cxx": spec.CXX_FLAGS, "nvcc": spec.NVCC_FLAGS},
            py_limited_api=False,
            **common,
        )
    return cpp_extension.CppExtension(
        f"cdm_kernels.{spec.NAME}", sources, extra_compile_args={"cxx": spec.CXX_FLAGS}, **common
    )


def ahead_of_time():
    """setup() arguments of the ahead-of-time build, or none where torch is missing."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "cdm-kernels: no torch in this build environment (an isolated build): installing "
            "without the compiled extension; it is compiled on first use, or by "
            "`python -m cdm_kernels.build`. For an ahead-of-time build: "
            "pip install --no-build-isolation ."
        )
        return {}
    return dict(
        ext_modules=[extension(load_spec(), cpp_extension)],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )


arguments = ahead_of_time()
arguments.setdefault("cmdclass", {})["build_py"] = BuildPyWithSources
setup(**arguments)
