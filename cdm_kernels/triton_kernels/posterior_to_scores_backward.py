"""``triton_posterior_to_scores_backward``: the gradient w.r.t. ``log_p0`` of
``<grad, posterior_to_scores(...)>``: ``g_r = grad / r`` (0 where ``r <= 0``),
``g_u = K(tau) g_r``, ``g = u g_u`` where ``log_p0 > -inf`` (else 0).

Uniform: three passes (``sum u``, ``sum g_r``, the write); absorbing: two (the
mask entries ``u_mask``, ``grad_mask`` are per-position gathers). Dense: float64
eigenbasis pipeline.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dense
from ._common import DENSE, compute_f64, prepare, row_cache, row_kernel, row_tile, schema, spread, tile_load, to_store
from .posterior_to_scores import forward_map_setup, weights_block, weights_total

SCHEMA = schema("Tensor grad, Tensor log_p0, Tensor x, Tensor tau")


@triton.jit
def _posterior_to_scores_backward_kernel(g_ptr, lq_ptr, x_ptr, tau_ptr, out_ptr, P, N, FAMILY: tl.constexpr,
                                         F64: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                                         BLOCK_N: tl.constexpr):
    """The gradient through ``r = K^T u``, ``u = q / col``: uniform three passes, absorbing two."""
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    rows, rmask, base, x, alpha, oma, l_on, l_off, cache = forward_map_setup(lq_ptr, x_ptr, tau_ptr, P, N, FAMILY, CT,
                                                                             ONE_BLOCK, BLOCK_P, BLOCK_N)
    g_cache = row_cache(g_ptr, base, rmask, N, ONE_BLOCK, BLOCK_N)
    total = weights_total(lq_ptr, x, base, rmask, l_on, l_off, N, cache, FAMILY, CT, ONE_BLOCK, BLOCK_P, BLOCK_N)
    add = spread(oma, total, N, FAMILY)
    if FAMILY == 0:
        beta = oma / N
        # sum of g_r = grad / r: K is symmetric, K g_r = alpha g_r + beta sum(g_r)
        gr_sum = tl.zeros([BLOCK_P], CT)
        for start in range(0, N, BLOCK_N):
            cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
            lq, u = weights_block(lq_ptr, offs, msk, cols[None, :] == x[:, None], l_on, l_off, cache, CT, ONE_BLOCK)
            r = alpha[:, None] * u + add[:, None]
            g = tile_load(g_ptr, offs, msk, 0.0, g_cache, ONE_BLOCK).to(CT)
            gr_sum += tl.sum(tl.where(msk & (r > 0), g / r, 0.0), axis=1)
        gu_add = beta * gr_sum
    else:
        # K g_r: real tokens alpha g_r + (1 - alpha) g_r[mask]; the mask keeps g_r[mask]
        mask_offs = base + N - 1
        lq_m = tl.load(lq_ptr + mask_offs, mask=rmask, other=float("-inf")).to(CT)
        l_m = tl.where(x == N - 1, l_on, l_off)
        u_m = tl.where(lq_m > float("-inf"), tl.exp(lq_m - l_m), 0.0)
        r_m = u_m + oma * total
        g_m = tl.load(g_ptr + mask_offs, mask=rmask, other=0.0).to(CT)
        gr_m = tl.where(r_m > 0, g_m / r_m, 0.0)
        gu_add = oma * gr_m
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        lq, u = weights_block(lq_ptr, offs, msk, cols[None, :] == x[:, None], l_on, l_off, cache, CT, ONE_BLOCK)
        g = tile_load(g_ptr, offs, msk, 0.0, g_cache, ONE_BLOCK).to(CT)
        if FAMILY == 0:
            r = alpha[:, None] * u + add[:, None]
            gu = alpha[:, None] * tl.where(r > 0, g / r, 0.0) + gu_add[:, None]
        else:
            r = alpha[:, None] * u
            gu = tl.where(cols[None, :] == N - 1, gr_m[:, None],
                          alpha[:, None] * tl.where(r > 0, g / r, 0.0) + gu_add[:, None])
        out = tl.where(lq > float("-inf"), gu * u, 0.0)
        tl.store(out_ptr + offs, to_store(out, out_ptr), mask=msk)


posterior_to_scores_backward_kernel = row_kernel(_posterior_to_scores_backward_kernel)


@torch.library.custom_op("cdm_kernels::triton_posterior_to_scores_backward", mutates_args=(), schema=SCHEMA)
def posterior_to_scores_backward(family: int, evals: Optional[torch.Tensor], vecs: Optional[torch.Tensor],
                                 vecs_inv: Optional[torch.Tensor], grad: torch.Tensor, log_p0: torch.Tensor,
                                 x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    p, n = log_p0.shape
    graph, x, tau, log_p0, grad = prepare(family, evals, vecs, vecs_inv, n, x, tau, log_p0, grad)
    if family == DENSE:
        u = _dense.weights(log_p0, _dense.column(x, tau, graph, n))
        r = _dense.apply(u, tau, graph, transpose=True)
        return _dense.apply(grad, tau, graph, transpose=False, out_dtype=log_p0.dtype, div=r, mul=u)
    out = torch.empty_like(log_p0)
    posterior_to_scores_backward_kernel(p, grad, log_p0, x, tau, out, p, n, FAMILY=family,
                                        F64=compute_f64(log_p0, grad))
    return out
