"""What is available where, and how a backend is chosen.

Backends of every op:
  ``reference``  pure PyTorch (cdm_kernels/reference.py), always available
  ``cpp``        the C++ CPU kernels of ``cdm_kernels._C`` (CPU tensors)
  ``cuda``       the CUDA C++ kernels of ``cdm_kernels._C`` (CUDA tensors, when built with CUDA)
  ``triton``     the Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)

Importing never fails because a backend is missing: a missing one is simply
not listed by :func:`available_backends`, :func:`why_unavailable` says why,
and asking for it explicitly raises a ``ValueError`` that says so too.

``cdm_kernels._C`` is imported with the package where it was built ahead of
time (``pip install --no-build-isolation .``); otherwise the first question
about ``cpp`` or ``cuda`` loads it from the cache of cdm_kernels/build.py,
compiling it there first if needed. Where that fails, one warning names the
cause and the other backends still work.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from typing import List, Optional

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")

# Order of preference for backend=None, per device type: the fastest measured
# first (benchmarks/RESULTS.md; on an H200 the CUDA C++ kernels beat Triton's).
_PREFERENCE = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}

# why cdm_kernels._C is not loaded: None once it is; _NOT_TRIED until the first
# question about cpp or cuda loads it from the cache (building it there if needed)
_NOT_TRIED = "not loaded yet"
_C_ERROR: Optional[str] = None
_C_LOADING = threading.Lock()  # threads asking at once: one loads, the others wait
_PREBUILT_ERROR: Optional[str] = None
try:
    # built ahead of time; importing registers torch.ops.cdm_kernels.*
    importlib.import_module(f"{__package__}._C")
except ImportError as error:
    # no build ahead of time (an isolated `pip install .`, a fresh checkout), or a broken one
    _PREBUILT_ERROR = None if isinstance(error, ModuleNotFoundError) and error.name == f"{__package__}._C" else str(error)
    _C_ERROR = _NOT_TRIED

_TRITON_ERROR: Optional[str] = None
try:
    import triton  # noqa: F401
except ImportError as error:
    _TRITON_ERROR = str(error)


def extension_loaded() -> bool:
    """Whether the compiled extension ``cdm_kernels._C`` is loaded (this never builds it)."""
    return _C_ERROR is None


def _extension_error() -> Optional[str]:
    """None once ``cdm_kernels._C`` is loaded, else why it cannot be; the first call
    without a build made ahead of time loads (or compiles) it just in time."""
    global _C_ERROR
    with _C_LOADING:
        if _C_ERROR is _NOT_TRIED:
            from . import build

            try:
                build.load()
            except build.Unavailable as error:
                prebuilt = f"the build made ahead of time does not load ({_PREBUILT_ERROR}), and " if _PREBUILT_ERROR else ""
                _C_ERROR = prebuilt + str(error)
                if os.environ.get("CDM_KERNELS_QUIET", "0") != "1":
                    warnings.warn(
                        f"cdm_kernels: the C++ extension is not available: {_C_ERROR}. "
                        "The reference backend (and triton on CUDA) still work.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            else:
                from . import ops

                ops.register_compiled_backend("")
                _C_ERROR = None
    return _C_ERROR


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_kernel(dispatch_key: str) -> bool:
    if _extension_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("cdm_kernels::scores_to_posterior", dispatch_key)


def _triton_ops_loaded() -> bool:
    if _TRITON_ERROR is not None:
        return False
    from . import triton_kernels

    return triton_kernels.load()


def why_unavailable(backend: str, device="cpu") -> Optional[str]:
    """None if ``backend`` can run on ``device``, else the reason (e.g. why ``cpp`` is
    missing from :func:`available_backends`)."""
    device = torch.device(device)
    kind = device.type
    if backend == "reference":
        return None
    if backend == "cpp":
        if kind != "cpu":
            return f"backend 'cpp' runs on CPU tensors, got {kind} tensors"
        if not _has_kernel("CPU"):
            return f"the C++ extension cdm_kernels._C is not available: {_extension_error() or 'it has no CPU kernels'}"
        return None
    if backend == "cuda":
        if kind != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got {kind} tensors"
        if not _has_kernel("CUDA"):
            reason = _extension_error()
            if reason:
                return f"the C++ extension cdm_kernels._C is not available: {reason}"
            return "cdm_kernels._C was built without CUDA kernels (torch without CUDA, no nvcc, or CDM_KERNELS_CUDA=0)"
        return None
    if backend == "triton":
        if _TRITON_ERROR is not None:
            return f"triton is not installed ({_TRITON_ERROR})"
        if kind == "cpu" and not triton_interpreting():
            return "backend 'triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1)"
        if kind not in ("cpu", "cuda"):
            return f"backend 'triton' does not run on {kind} tensors"
        if not _triton_ops_loaded():
            return "the Triton kernels failed to load"
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def available_backends(device="cpu") -> List[str]:
    """The backends that can run on ``device``, fastest first (the first is the default)."""
    device = torch.device(device)
    preference = _PREFERENCE.get(device.type, ("reference",))
    extra = tuple(b for b in BACKENDS if b not in preference)
    return [b for b in preference + extra if why_unavailable(b, device) is None]


@torch.compiler.assume_constant_result
def _default_backend(device_type: str) -> str:
    # a constant for torch.compile: availability does not change while a program runs
    return available_backends(device_type)[0]


@torch.compiler.assume_constant_result
def _unavailable_reason(backend: str, device_type: str) -> str:
    return why_unavailable(backend, device_type) or ""


def select_backend(backend: Optional[str], device: torch.device) -> str:
    """Resolve ``backend`` (None = the default for ``device``) or raise a ``ValueError``."""
    if backend is None:
        return _default_backend(device.type)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    reason = _unavailable_reason(backend, device.type)
    if reason:
        raise ValueError(f"backend {backend!r} is not available: {reason}")
    return backend


def kernel_op(name: str, backend: str):
    """The registered custom op implementing ``name`` for a compiled backend."""
    namespace = torch.ops.cdm_kernels
    return getattr(namespace, f"triton_{name}" if backend == "triton" else name)

