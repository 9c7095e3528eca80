"""One call of every op of a backend, forward and backward: what the Triton tests
record (the launches to compile ahead of time, the traffic of every kernel)."""

from __future__ import annotations

import torch

import cdm_kernels as ck


def run_every_op(graph, log_score, x, tau, target, backend: str = "triton") -> None:
    """The inversion, its forward map, the kernel, the loss (each with its backward),
    both step methods to ``tau_s = tau / 2`` and to 0, and the kernel's column."""
    s = log_score.clone().requires_grad_(True)
    q = ck.scores_to_posterior(graph, s, x, tau, backend=backend)
    torch.autograd.grad(q, s, torch.ones_like(q))
    lq = q.detach().clone().requires_grad_(True)
    r = ck.posterior_to_scores(graph, lq, x, tau, backend=backend)
    torch.autograd.grad(r, lq, torch.ones_like(r))
    v = log_score.clone().requires_grad_(True)
    torch.autograd.grad(ck.apply_kernel(graph, v, tau, backend=backend).sum(), v)
    s = log_score.clone().requires_grad_(True)
    torch.autograd.grad(ck.conditional_matching_loss(graph, s, x, tau, target, backend=backend), s)
    for method in ("analytic", "euler"):
        for tau_s in (0.5 * tau, 0.0):
            ck.fused_euler_step(graph, log_score, x, tau, tau_s, method=method, backend=backend)
    ck.transition_column(graph, x, tau, backend=backend)
