"""``triton_posterior_to_scores``: ``log r`` with ``r = K(tau)^T u``,
``u(a) = q(a) / K(tau)[a, x]`` (``u = 0`` where ``q = 0``).

Uniform / absorbing: two passes (the sum ``K^T`` needs, then the write; one exp
per element per pass, one log in the write). ``K(tau)[a, x]`` takes two values
per position, so its logs are per-position scalars. As in the reference, a
positive ``q`` on a structural zero of the column (``log col`` clamped at
``-1e30``) gives ``u = inf``. Dense: the float64 eigenbasis pipeline.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dense
from ._common import (DENSE, compute_f64, decay_coefficients, prepare, program_rows, row_cache, row_kernel, row_tile,
                      schema, spread, tile_load, to_store)

SCHEMA = schema("Tensor log_p0, Tensor x, Tensor tau")


@triton.jit
def column_logs(x, tau, N, FAMILY: tl.constexpr, CT: tl.constexpr):
    """Per position: ``K`` coefficients ``alpha``, ``1 - alpha`` and the two values of
    ``max(log K(tau)[a, x], -1e30)``: at ``a = x`` and elsewhere."""
    alpha, oma = decay_coefficients(tau)
    alpha = alpha.to(CT)
    oma = oma.to(CT)
    if FAMILY == 0:
        l_on = tl.log(alpha + oma / N)
        l_off = tl.log(oma / N)
    else:  # absorbing: x the mask: 1 on it, 1 - alpha off it; else alpha on x, 0 off it
        is_mask = x == N - 1
        l_on = tl.where(is_mask, 0.0, tl.log(alpha))
        l_off = tl.where(is_mask, tl.log(oma), float("-inf"))
    return alpha, oma, tl.maximum(l_on, -1e30), tl.maximum(l_off, -1e30)


@triton.jit
def weights_block(lq_ptr, offs, msk, is_x, l_on, l_off, cache, CT: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """``u = exp(log q - log col)`` where ``log q > -inf``, else 0 (padding: 0)."""
    lq = tile_load(lq_ptr, offs, msk, float("-inf"), cache, ONE_BLOCK).to(CT)
    lcol = tl.where(is_x, l_on[:, None], l_off[:, None])
    return lq, tl.where(lq > float("-inf"), tl.exp(lq - lcol), 0.0)


@triton.jit
def weights_total(lq_ptr, x, base, rmask, l_on, l_off, N, cache, FAMILY: tl.constexpr, CT: tl.constexpr,
                  ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pass 1: ``sum u`` per row (absorbing: over the real tokens only)."""
    total = tl.zeros([BLOCK_P], CT)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        lq, u = weights_block(lq_ptr, offs, msk, cols[None, :] == x[:, None], l_on, l_off, cache, CT, ONE_BLOCK)
        if FAMILY == 1:
            u = tl.where(cols[None, :] < N - 1, u, 0.0)
        total += tl.sum(u, axis=1)
    return total


@triton.jit
def forward_map_setup(lq_ptr, x_ptr, tau_ptr, P, N, FAMILY: tl.constexpr, CT: tl.constexpr, ONE_BLOCK: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's positions, tokens, :func:`column_logs` and the row cache of ``log q``."""
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    x = tl.load(x_ptr + rows, mask=rmask, other=0)
    alpha, oma, l_on, l_off = column_logs(x, tl.load(tau_ptr + rows, mask=rmask, other=0.0), N, FAMILY, CT)
    cache = row_cache(lq_ptr, base, rmask, N, ONE_BLOCK, BLOCK_N)
    return rows, rmask, base, x, alpha, oma, l_on, l_off, cache


@triton.jit
def _posterior_to_scores_kernel(lq_ptr, x_ptr, tau_ptr, out_ptr, P, N, FAMILY: tl.constexpr, F64: tl.constexpr,
                                ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    rows, rmask, base, x, alpha, oma, l_on, l_off, cache = forward_map_setup(lq_ptr, x_ptr, tau_ptr, P, N, FAMILY, CT,
                                                                             ONE_BLOCK, BLOCK_P, BLOCK_N)
    add = spread(oma, weights_total(lq_ptr, x, base, rmask, l_on, l_off, N, cache, FAMILY, CT, ONE_BLOCK, BLOCK_P,
                                    BLOCK_N), N, FAMILY)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        lq, u = weights_block(lq_ptr, offs, msk, cols[None, :] == x[:, None], l_on, l_off, cache, CT, ONE_BLOCK)
        if FAMILY == 0:
            r = alpha[:, None] * u + add[:, None]
        else:
            r = tl.where(cols[None, :] == N - 1, u + add[:, None], alpha[:, None] * u)
        out = tl.where(r > 0, tl.log(r), float("-inf"))
        tl.store(out_ptr + offs, to_store(out, out_ptr), mask=msk)


posterior_to_scores_kernel = row_kernel(_posterior_to_scores_kernel)


@torch.library.custom_op("cdm_kernels::triton_posterior_to_scores", mutates_args=(), schema=SCHEMA)
def posterior_to_scores(family: int, evals: Optional[torch.Tensor], vecs: Optional[torch.Tensor],
                        vecs_inv: Optional[torch.Tensor], log_p0: torch.Tensor, x: torch.Tensor,
                        tau: torch.Tensor) -> torch.Tensor:
    p, n = log_p0.shape
    graph, x, tau, log_p0 = prepare(family, evals, vecs, vecs_inv, n, x, tau, log_p0)
    if family == DENSE:
        u = _dense.weights(log_p0, _dense.column(x, tau, graph, n))
        return _dense.apply(u, tau, graph, transpose=True, out_dtype=log_p0.dtype, out_log=True)
    out = torch.empty_like(log_p0)
    posterior_to_scores_kernel(p, log_p0, x, tau, out, p, n, FAMILY=family, F64=compute_f64(log_p0))
    return out
