"""SEDD's denoising score entropy, the teacher's pre-training loss.

For a clean sequence x0, its noised version x_t = x (total noise tau) and a
network's log-scores s (B, L, N), every position i contributes

    DSE_i = sum_{y != x_i} Q[y, x_i] ( e^{s_iy} - R_y s_iy + R_y (log R_y - 1) ),
    R_y = K(tau)[x0_i, y] / K(tau)[x0_i, x_i]   (the ratio of the forward kernel),

with ``0 log 0 = 0``. Each summand is a Bregman divergence of ``e^s`` from
``R``: non-negative and 0 exactly at ``s = log R``. Averaged over
``x0 ~ p(x0 | x_t)`` it is minimised by the true concrete score
``p_t(x with x_i := y) / p_t(x)`` (the average of R over the posterior).

The weights ``Q[y, x]`` are the forward rates into the current token (the
reverse process's structure): 1/N for every ``y`` on the uniform graph, 1 from
every real token into the mask on the absorbing graph (an unmasked position
contributes 0). With the constant ``R (log R - 1)`` this is exactly the
quantity of SEDD's ``graph.score_entropy`` (Lou et al. 2024, graph_lib.py,
checked term by term for both graphs), and, as in SEDD's ``losses.py``, the
training loss of a sequence is ``rate(t) * sum_i DSE_i`` with
``t ~ U(eps, 1)``, ``eps = 1e-3``, averaged over the batch.

The kernel ratios come from ``cdm_kernels.apply_kernel`` on the one-hot of
x0 (``K^T e_{x0}`` is the row ``K[x0, :]``), so every graph family (dense
included) works the same way.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import cdm_kernels as ck

from ..sampling import add_noise, call_model, rate_column

__all__ = ["kernel_ratios", "score_entropy", "score_entropy_loss"]

REDUCTIONS = ("mean", "sum", "none")


def kernel_ratios(graph: ck.Graph, x0: torch.Tensor, x_t: torch.Tensor, tau, dtype=torch.float32) -> torch.Tensor:
    """``R[..., y] = K(tau)[x0, y] / K(tau)[x0, x_t]`` (..., N) in ``dtype``.

    tau broadcasts to x0's shape. ``K[x0, x_t] > 0`` whenever x_t was drawn
    from the forward process; a 0 there gives ``inf`` ratios."""
    tau = torch.broadcast_to(torch.as_tensor(tau, dtype=torch.float64, device=x0.device), x0.shape)
    onehot = nn.functional.one_hot(x0.long(), graph.num_states).to(dtype)
    row = ck.apply_kernel(graph, onehot, tau).clamp_min(0)  # K[x0, :]
    return row / row.gather(-1, x_t.long().unsqueeze(-1))


def score_entropy(graph: ck.Graph, log_score: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, tau) -> torch.Tensor:
    """Denoising score entropy per position (..., not weighted by the noise rate).

    log_score: (..., N) the network's log-ratios at ``(x_t, tau)`` (entry at
    ``x_t`` ignored); x_t, x0: (...) tokens; tau: total noise broadcastable to
    x_t. Computed in float32 (float64 for float64 scores). Differentiable in
    ``log_score``; >= 0, and 0 where ``log_score`` is the per-x0 ratio ``log R``.
    """
    if log_score.shape[:-1] != x_t.shape or x0.shape != x_t.shape:
        raise ValueError(f"log_score (..., N), x_t and x0 must share leading shapes: got {tuple(log_score.shape)}, "
                         f"{tuple(x_t.shape)}, {tuple(x0.shape)}")
    if log_score.shape[-1] != graph.num_states:
        raise ValueError(f"log_score must have {graph.num_states} states in its last dim, got {log_score.shape[-1]}")
    dtype = torch.promote_types(log_score.dtype, torch.float32)
    s = log_score.to(dtype)
    weight = rate_column(graph, x_t, dtype)
    ratio = kernel_ratios(graph, x0, x_t, tau, dtype)
    active = weight > 0
    s = torch.where(active, s, 0.0)  # inactive entries (y = x_t, zero rates) never reach exp
    ratio = torch.where(active, ratio, 0.0)
    safe = torch.where(ratio > 0, ratio, 1.0)
    constant = torch.where(ratio > 0, ratio * (safe.log() - 1.0), 0.0)
    per_state = torch.exp(s) - ratio * s + constant
    return (weight * torch.where(active, per_state, 0.0)).sum(-1)


def score_entropy_loss(model, graph: ck.Graph, noise, x0: torch.Tensor, *, t: Optional[torch.Tensor] = None,
                       sampling_eps: float = 1e-3, generator: Optional[torch.Generator] = None,
                       reduction: str = "mean") -> torch.Tensor:
    """SEDD's training loss on a batch of clean sequences ``x0`` (B, L).

    ``t ~ U(sampling_eps, 1)`` per sequence (or the given ``t``), ``tau =
    noise.total(t)``, ``x_t`` by forward noising, and the loss of a sequence
    ``noise.rate(t) * sum_i DSE_i``. reduction: ``"mean"`` over the batch (SEDD),
    ``"sum"``, or ``"none"`` ((B,)).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape (B, L), got {tuple(x0.shape)}")
    batch = x0.shape[0]
    if t is None:
        draw_device = generator.device if generator is not None else x0.device
        u = torch.rand(batch, generator=generator, dtype=torch.float64, device=draw_device).to(x0.device)
        t = (1.0 - sampling_eps) * u + sampling_eps
    t = torch.as_tensor(t, dtype=torch.float64, device=x0.device).expand(batch)
    tau, rate = noise.total(t), noise.rate(t)
    x_t = add_noise(graph, x0, tau[:, None], generator)
    log_score = call_model(model, x_t, tau)
    per_sequence = rate.to(log_score.dtype) * score_entropy(graph, log_score, x_t, x0, tau[:, None]).sum(-1)
    if reduction == "mean":
        return per_sequence.mean()
    if reduction == "sum":
        return per_sequence.sum()
    return per_sequence
