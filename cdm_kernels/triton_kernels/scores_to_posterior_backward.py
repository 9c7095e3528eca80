"""``triton_scores_to_posterior_backward``: the gradient w.r.t. ``log_score`` of
``<grad, scores_to_posterior(...)>``, recomputing the forward (nothing saved).

Uniform / dense: ``_inversion._posterior_backward_kernel`` (three passes; dense
then applies ``K(-tau)`` and the ``r`` factor in the eigenbasis). Absorbing: the
log-softmax backward ``g - softmax * sum(g)`` over the real tokens where ``x``
is the mask (two passes), zero elsewhere (``sum(g)`` runs over every entry, as
autograd of the reference does).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dense
from ._common import (ABSORBING, DENSE, compute_f64, prepare, program_rows, row_cache, row_kernel, row_sum, row_tile,
                      schema, tile_load, to_store, upstream_scale)
from ._inversion import posterior_backward_kernel
from .scores_to_posterior import real_max_sumexp

SCHEMA = schema("Tensor grad, Tensor log_score, Tensor x, Tensor tau")


@triton.jit
def _absorbing_backward_kernel(g_ptr, gl_ptr, ls_ptr, x_ptr, out_ptr, loss_ptr, P, N, F64: tl.constexpr,
                               FROM_TARGET: tl.constexpr, LOSS: tl.constexpr, ONE_BLOCK: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """``FROM_TARGET``: ``g = -grad_loss * target`` (the matching loss's backward);
    ``LOSS``: ``g = -target`` and the last pass also sums the loss into ``loss_ptr``
    (``inf`` for target mass on a structural zero: the mask, or any state but a real ``x``)."""
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    x = tl.load(x_ptr + rows, mask=rmask, other=0)
    masked = rmask & (x == N - 1)
    gscale = upstream_scale(gl_ptr, rows, rmask, FROM_TARGET, LOSS, CT, BLOCK_P)
    g_rows = rmask if LOSS else masked  # the loss reads every row's target
    ls_cache = row_cache(ls_ptr, base, masked, N, ONE_BLOCK, BLOCK_N)
    g_cache = row_cache(g_ptr, base, g_rows, N, ONE_BLOCK, BLOCK_N)
    m, s = real_max_sumexp(ls_ptr, base, masked, N, ls_cache, CT, ONE_BLOCK, BLOCK_P, BLOCK_N)
    G = row_sum(g_ptr, base, masked, N, g_cache, CT, ONE_BLOCK, BLOCK_P, BLOCK_N) * gscale
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    coef = G / s  # softmax_y * G = exp(ls_y - m) * G / s
    lse = m + tl.log(s)
    A = tl.zeros([BLOCK_P], CT)  # LOSS: sum_{g != 0} g (ls - lse) over the real tokens
    bad = tl.zeros([BLOCK_P], tl.int32)  # LOSS: target mass on a structural zero
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        real = masked[:, None] & (cols[None, :] < N - 1)
        v = tile_load(ls_ptr, offs, msk & real, float("-inf"), ls_cache, ONE_BLOCK).to(CT)
        if LOSS:
            g = tile_load(g_ptr, offs, msk, 0.0, g_cache, ONE_BLOCK).to(CT) * gscale[:, None]
            A += tl.sum(tl.where(real & (g < 0), g * (v - lse[:, None]), 0.0), axis=1)
            zero = tl.where(masked[:, None], cols[None, :] == N - 1, cols[None, :] != x[:, None])
            bad = tl.maximum(bad, tl.max(tl.where((g < 0) & zero, 1, 0), axis=1))
            g = tl.where(real, g, 0.0)
        else:
            g = tile_load(g_ptr, offs, msk & real, 0.0, g_cache, ONE_BLOCK).to(CT) * gscale[:, None]
        out = tl.where(real, g - tl.exp(v - m_safe[:, None]) * coef[:, None], 0.0)
        tl.store(out_ptr + offs, to_store(out, out_ptr), mask=msk)
    if LOSS:
        loss = tl.where(bad != 0, float("inf"), tl.where(masked, A, 0.0))
        tl.store(loss_ptr + rows, to_store(loss, loss_ptr), mask=rmask)


absorbing_backward_kernel = row_kernel(_absorbing_backward_kernel)


def posterior_backward(family: int, graph, g: torch.Tensor, grad_loss: Optional[torch.Tensor],
                       log_score: torch.Tensor, x: torch.Tensor, tau: torch.Tensor,
                       loss: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shared with the matching loss: ``grad_loss`` given means ``g`` is the target
    and the upstream gradient w.r.t. ``log q`` is ``-grad_loss * target``; ``loss``
    given (a (P,) float32 output) means ``g`` is the target, ``grad_loss = 1``, and the
    same passes write the loss there."""
    p, n = log_score.shape
    with_loss = loss is not None
    from_target = grad_loss is not None or with_loss
    gl = grad_loss if grad_loss is not None else g
    loss_out = loss if with_loss else gl  # not written without the loss
    out = torch.empty_like(log_score)
    f64 = compute_f64(log_score, g)
    flags = dict(FROM_TARGET=from_target, LOSS=with_loss)
    if family == ABSORBING:
        absorbing_backward_kernel(p, g, gl, log_score, x, out, loss_out, p, n, F64=f64, **flags)
    elif family == DENSE:
        r, inv, col = _dense.inversion_workspaces(log_score, x, tau, graph)
        gu = torch.empty((p, n), dtype=torch.float64, device=log_score.device)
        posterior_backward_kernel(p, g, gl, log_score, x, tau, inv, col, gu, loss_out, p, n, FAMILY=DENSE, F64=True,
                                  **flags)
        # g_r = K(-tau) g_u, then the gradient r * g_r, 0 at x
        out = _dense.apply(gu, tau, graph, transpose=False, out_dtype=log_score.dtype, sign=-1, mul=r, x=x)
    else:
        posterior_backward_kernel(p, g, gl, log_score, x, tau, log_score, log_score, out, loss_out, p, n,
                                  FAMILY=family, F64=f64, **flags)
    return out


@torch.library.custom_op("cdm_kernels::triton_scores_to_posterior_backward", mutates_args=(), schema=SCHEMA)
def scores_to_posterior_backward(family: int, evals: Optional[torch.Tensor], vecs: Optional[torch.Tensor],
                                 vecs_inv: Optional[torch.Tensor], grad: torch.Tensor, log_score: torch.Tensor,
                                 x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    graph, x, tau, log_score, grad = prepare(family, evals, vecs, vecs_inv, log_score.shape[1], x, tau, log_score, grad)
    return posterior_backward(family, graph, grad, None, log_score, x, tau)
