"""cdm-kernels: fused kernels for distilling discrete diffusion models.

Graphs (the forward CTMC of one token) and the ops over them; every op takes
``backend=None`` (the fastest available for the tensors' device) or one of
:func:`available_backends` (:func:`why_unavailable` says why one is missing).
Without a build made ahead of time, the C++ kernels are compiled on first use
(cdm_kernels/build.py). The math is in docs/MATH.md.
"""

from . import backends as _backends
from . import ops as _ops
from .backends import available_backends, why_unavailable
from .graphs import AbsorbingGraph, DenseGraph, Graph, UniformGraph, ordinal_graph
from .ops._validation import check_value_errors, set_value_checks
from .ops.apply_kernel import apply_kernel
from .ops.fused_euler_step import fused_euler_step
from .ops.conditional_matching_loss import conditional_matching_loss
from .ops.posterior_to_scores import posterior_to_scores
from .ops.scores_to_posterior import scores_to_posterior
from .ops.transition_column import transition_column
from .reference import POSTERIOR_FLOOR

__version__ = "0.1.0"

__all__ = [
    "Graph",
    "UniformGraph",
    "AbsorbingGraph",
    "DenseGraph",
    "ordinal_graph",
    "available_backends",
    "why_unavailable",
    "set_value_checks",
    "check_value_errors",
    "transition_column",
    "apply_kernel",
    "scores_to_posterior",
    "posterior_to_scores",
    "fused_euler_step",
    "conditional_matching_loss",
    "POSTERIOR_FLOOR",
]

if _backends.extension_loaded():
    _ops.register_compiled_backend("")
