"""``posterior_to_scores``: the forward map from ``p_0|t`` back to concrete scores."""

from __future__ import annotations

from typing import Optional

import torch

from ._compiled import dispatch, register_recomputing_backward
from ._validation import check_graph, check_scores, check_tau, check_tokens, kernel_checks


def posterior_to_scores(graph, log_p0: torch.Tensor, x: torch.Tensor, tau, *, backend: Optional[str] = None) -> torch.Tensor:
    """Log-scores ``log r`` from the conditional ``log p_0|t(. | x)``:
    ``r = K(tau)^T u`` with ``u(a) = q(a) / K(tau)[a, x]`` (MATH.md section 2), so
    ``r_x = 1``. Where ``K(tau)[a, x] = 0`` (absorbing graph, ``x`` not the mask)
    the forward process forces ``q = e_x``; that ``q`` says nothing about the
    ratios to other tokens, which come back as 0 (``log r = -inf``), while mass
    on such an ``a`` has no consistent scores (``u(a) = q(a) / 0``: ``+inf``;
    docs/MATH.md section 6). ``-inf`` in ``log_p0`` is probability 0.
    Differentiable in ``log_p0``."""
    check_graph(graph)
    in_kernel = kernel_checks("posterior_to_scores", graph, backend, log_p0)
    log_p0 = check_scores(log_p0, graph, "log_p0", allow_minus_inf=True, scan=not in_kernel)
    x = check_tokens(x, log_p0.shape[:-1], graph.num_states, log_p0.device, scan=in_kernel != "all")
    tau = check_tau(tau, x.shape, x.device, scan=in_kernel != "all")
    return dispatch("posterior_to_scores", backend, graph, log_p0, x, tau)


def register(prefix: str) -> None:
    def fake(family, evals, vecs, vecs_inv, log_p0, x, tau):
        return torch.empty_like(log_p0)

    register_recomputing_backward(prefix, "posterior_to_scores", fake)
