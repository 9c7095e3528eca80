"""``triton_scores_to_posterior``: ``log p_0|t(. | x)`` from log-scores.

Uniform / dense: the clamped inversion of ``_inversion.py`` (three passes:
online max / sum-exp, the normaliser ``Z = sum col u``, the write; one exp per
element per pass and one log in the last). Absorbing: the closed form, a
log-softmax over the real tokens where ``x`` is the mask (two passes) and
``log e_x`` elsewhere (a write only, the scores are not read).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dense
from ._common import (ABSORBING, DENSE, compute_f64, online_update, prepare, program_rows, row_cache, row_kernel,
                      row_tile, schema, tile_load, to_store)
from ._inversion import posterior_kernel

SCHEMA = schema("Tensor log_score, Tensor x, Tensor tau")


@triton.jit
def real_max_sumexp(ls_ptr, base, masked, N, cache, CT: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """The absorbing pass 1: online max and sum-exp over the real tokens of the
    ``masked`` rows (the others read nothing)."""
    m = tl.full([BLOCK_P], float("-inf"), CT)
    s = tl.zeros([BLOCK_P], CT)
    for start in range(0, N - 1, BLOCK_N):
        cols, msk, offs = row_tile(start, base, masked, N - 1, BLOCK_N)
        m, s = online_update(m, s, tile_load(ls_ptr, offs, msk, float("-inf"), cache, ONE_BLOCK).to(CT))
    return m, s


@triton.jit
def _absorbing_posterior_kernel(ls_ptr, x_ptr, out_ptr, P, N, F64: tl.constexpr, ONE_BLOCK: tl.constexpr,
                                BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    x = tl.load(x_ptr + rows, mask=rmask, other=0)
    masked = rmask & (x == N - 1)  # only these rows read their scores
    cache = row_cache(ls_ptr, base, masked, N, ONE_BLOCK, BLOCK_N)
    m, s = real_max_sumexp(ls_ptr, base, masked, N, cache, CT, ONE_BLOCK, BLOCK_P, BLOCK_N)
    lse = m + tl.log(s)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        real = cols[None, :] < N - 1
        v = tile_load(ls_ptr, offs, msk & masked[:, None] & real, 0.0, cache, ONE_BLOCK).to(CT)
        out_masked = tl.where(real, v - lse[:, None], float("-inf"))
        out_real = tl.where(cols[None, :] == x[:, None], 0.0, float("-inf"))
        out = tl.where(masked[:, None], out_masked, out_real)
        tl.store(out_ptr + offs, to_store(out, out_ptr), mask=msk)


absorbing_posterior_kernel = row_kernel(_absorbing_posterior_kernel)


def posterior(family: int, graph, log_score: torch.Tensor, x: torch.Tensor, tau: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """``log q`` in ``out_dtype`` (shared with the dense analytic step, which wants float64)."""
    p, n = log_score.shape
    out = torch.empty((p, n), dtype=out_dtype, device=log_score.device)
    if family == ABSORBING:
        absorbing_posterior_kernel(p, log_score, x, out, p, n, F64=compute_f64(log_score))
    elif family == DENSE:
        _, inv, col = _dense.inversion_workspaces(log_score, x, tau, graph)
        posterior_kernel(p, log_score, x, tau, inv, col, out, p, n, FAMILY=DENSE, F64=True)
    else:
        posterior_kernel(p, log_score, x, tau, log_score, log_score, out, p, n, FAMILY=family,
                         F64=compute_f64(log_score))
    return out


@torch.library.custom_op("cdm_kernels::triton_scores_to_posterior", mutates_args=(), schema=SCHEMA)
def scores_to_posterior(family: int, evals: Optional[torch.Tensor], vecs: Optional[torch.Tensor],
                        vecs_inv: Optional[torch.Tensor], log_score: torch.Tensor, x: torch.Tensor,
                        tau: torch.Tensor) -> torch.Tensor:
    graph, x, tau, log_score = prepare(family, evals, vecs, vecs_inv, log_score.shape[1], x, tau, log_score)
    return posterior(family, graph, log_score, x, tau, log_score.dtype)
