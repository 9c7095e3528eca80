"""The op fronts: checks, broadcasting, backend choice, and the fake-tensor and
autograd registrations of the compiled ops. One file per op."""

from . import (
    apply_kernel,
    conditional_matching_loss,
    fused_euler_step,
    posterior_to_scores,
    scores_to_posterior,
    transition_column,
)

_OP_MODULES = (
    transition_column,
    apply_kernel,
    scores_to_posterior,
    posterior_to_scores,
    fused_euler_step,
    conditional_matching_loss,
)


def register_compiled_backend(prefix: str) -> None:
    """Register fake (meta) functions and autograd formulas for the compiled ops
    named ``cdm_kernels::{prefix}<op>`` (prefix "" for _C, "triton_" for Triton)."""
    for module in _OP_MODULES:
        module.register(prefix)
