"""``scores_to_posterior``: the conditional-ratio inversion (MATH.md section 2)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..backends import kernel_op, select_backend
from ._validation import check_graph, check_invertible, check_scores, check_tau, check_tokens, kernel_checks


def scores_to_posterior(graph, log_score: torch.Tensor, x: torch.Tensor, tau, *, backend: Optional[str] = None) -> torch.Tensor:
    """``log p_0|t(a | x_t)`` for every state ``a``, from concrete log-scores.

    Args:
        log_score: ``(..., N)`` log-ratios ``log p_t(x with this position set to y) / p_t(x)``;
            the entry at ``x`` is 0 by definition and ignored.
        x: ``(...)`` the noisy tokens ``x_t``.
        tau: total noise, a float or a tensor broadcastable to ``x``'s shape.

    Returns ``(..., N)`` in ``log_score``'s dtype (computed in float32 or wider).
    Imperfect scores can give negative inverted ratios: they are clamped at
    ``reference.POSTERIOR_FLOOR`` and the conditional renormalised.
    Structural zeros (absorbing graph) are ``-inf``. Differentiable in ``log_score``.
    """
    check_graph(graph)
    in_kernel = kernel_checks("scores_to_posterior", graph, backend, log_score)
    log_score = check_scores(log_score, graph, "log_score", scan=not in_kernel)
    x = check_tokens(x, log_score.shape[:-1], graph.num_states, log_score.device, scan=in_kernel != "all")
    tau = check_tau(tau, x.shape, x.device, scan=in_kernel != "all")
    check_invertible(graph, tau)
    chosen = select_backend(backend, log_score.device)
    if chosen == "reference":
        return reference.scores_to_posterior(graph, log_score, x, tau)
    op = kernel_op("scores_to_posterior", chosen)
    flat = log_score.reshape(-1, graph.num_states).contiguous()
    return op(*graph.descriptor(x.device), flat, x.reshape(-1), tau.reshape(-1)).view(log_score.shape)


def register(prefix: str) -> None:
    name = f"cdm_kernels::{prefix}scores_to_posterior"

    @torch.library.register_fake(name)
    def _(family, evals, vecs, vecs_inv, log_score, x, tau):
        return torch.empty_like(log_score)

    @torch.library.register_fake(f"{name}_backward")
    def _(family, evals, vecs, vecs_inv, grad, log_score, x, tau):
        return torch.empty_like(log_score)

    def setup_context(ctx, inputs, output):
        ctx.graph_args = inputs[:4]
        ctx.save_for_backward(*inputs[4:7])  # recomputed in backward: no copy of q is kept

    def backward(ctx, grad):
        log_score, x, tau = ctx.saved_tensors
        grad_score = getattr(torch.ops.cdm_kernels, f"{prefix}scores_to_posterior_backward")(
            *ctx.graph_args, grad.contiguous(), log_score, x, tau
        )
        return None, None, None, None, grad_score, None, None

    torch.library.register_autograd(name, backward, setup_context=setup_context)
