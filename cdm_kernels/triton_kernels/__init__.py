"""Triton kernels, one file per op, each registered as a custom op
``cdm_kernels::triton_<op>`` with the same schema as the C++ op.
Loaded on first use so that importing cdm_kernels never needs triton."""

_loaded = None


def load() -> bool:
    """Import the kernels and register their fake/autograd functions, once."""
    global _loaded
    if _loaded is None:
        try:
            from . import kernels  # noqa: F401
        except ImportError:
            _loaded = False
        else:
            from .. import ops

            ops.register_compiled_backend("triton_")
            _loaded = True
    return _loaded
