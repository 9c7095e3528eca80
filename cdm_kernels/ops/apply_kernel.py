"""``apply_kernel``: ``K(tau)^T v`` along the last dim (negative tau: the inverse)."""

from __future__ import annotations

from typing import Optional

import torch

from ._compiled import dispatch
from ._validation import check_graph, check_invertible, check_scores, check_tau


def apply_kernel(graph, v: torch.Tensor, tau, *, backend: Optional[str] = None) -> torch.Tensor:
    """``K(tau)^T v`` for ``v`` of shape ``(..., N)``: pushes a (signed) measure on
    ``x_0`` forward to ``x_t``. A negative ``tau`` applies ``K(tau)^-1 = K(-tau)``.
    Differentiable in ``v`` (the backward applies ``K(tau)``)."""
    check_graph(graph)
    v = check_scores(v, graph, "v")
    tau = check_tau(tau, v.shape[:-1], v.device, allow_negative=True)
    check_invertible(graph, tau.clamp_max(0))  # only a negative tau inverts
    return dispatch("apply_kernel", backend, graph, v, tau, extra=(True,))  # transpose: K^T v


def register(prefix: str) -> None:
    name = f"cdm_kernels::{prefix}apply_kernel"

    @torch.library.register_fake(name)
    def _(family, evals, vecs, vecs_inv, v, tau, transpose):
        return torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        ctx.graph_args = inputs[:4]
        ctx.tau, ctx.transpose = inputs[5], inputs[6]

    def backward(ctx, grad):
        # d<g, K^T v>/dv = K g (and vice versa): the same op, other orientation
        grad_v = getattr(torch.ops.cdm_kernels, f"{prefix}apply_kernel")(
            *ctx.graph_args, grad.contiguous(), ctx.tau, not ctx.transpose
        )
        return None, None, None, None, grad_v, None, None

    torch.library.register_autograd(name, backward, setup_context=setup_context)
