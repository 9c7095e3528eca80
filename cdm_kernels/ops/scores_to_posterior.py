"""``scores_to_posterior``: the conditional-ratio inversion (MATH.md section 2)."""

from __future__ import annotations

from typing import Optional

import torch

from ._compiled import dispatch, register_recomputing_backward
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
    return dispatch("scores_to_posterior", backend, graph, log_score, x, tau)


def register(prefix: str) -> None:
    def fake(family, evals, vecs, vecs_inv, log_score, x, tau):
        return torch.empty_like(log_score)

    register_recomputing_backward(prefix, "scores_to_posterior", fake)
