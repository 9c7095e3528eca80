"""Triton kernels, one file per op, each registered as a custom op
``cdm_kernels::triton_<op>`` with the same schema as the C++ op (csrc/ops.cpp).
Loaded on first use so that importing cdm_kernels never needs triton.

Shared pieces: ``_common.py`` (launch / autotune plumbing, coefficients, the
online and scan building blocks), ``_inversion.py`` (the clamped inversion of
the uniform and dense families), ``_dense.py`` (float64 eigenbasis kernels)."""

#: the op modules; importing one registers its custom op
OP_MODULES = (
    "transition_column",
    "apply_kernel",
    "scores_to_posterior",
    "scores_to_posterior_backward",
    "posterior_to_scores",
    "posterior_to_scores_backward",
    "fused_euler_step",
    "conditional_matching_loss",
    "conditional_matching_loss_backward",
)

_loaded = None

#: why the kernels failed to load (None when they loaded or were never tried)
LOAD_ERROR = None


def load() -> bool:
    """Import the kernels and register their fake/autograd functions, once."""
    global _loaded, LOAD_ERROR
    if _loaded is None:
        try:
            import importlib

            for name in OP_MODULES:
                importlib.import_module(f"{__name__}.{name}")
        except Exception as error:  # a missing or broken triton: the backend is simply unavailable
            import warnings

            LOAD_ERROR = f"{type(error).__name__}: {error}"
            warnings.warn(f"cdm_kernels: the Triton kernels failed to load ({LOAD_ERROR})", RuntimeWarning)
            _loaded = False
        else:
            from .. import ops

            ops.register_compiled_backend("triton_")
            _loaded = True
    return _loaded
