"""``triton_apply_kernel``: ``K(tau)^T v`` (``transpose``) or ``K(tau) v`` along the last dim.

Uniform (symmetric): ``alpha v + beta (sum v)``; absorbing: transpose
``[alpha v_real, v_mask + (1 - alpha) sum v_real]``, else
``[alpha v_real + (1 - alpha) v_mask, v_mask]``. Two passes (sum, write), float32
accumulation (float64 for float64 ``v``; a row that fits one block is read
once); a negative ``tau`` applies the inverse. Dense: two float64 eigenbasis matrix-vector passes (``_dense.apply``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dense
from ._common import (DENSE, compute_f64, decay_coefficients, prepare, program_rows, row_cache, row_kernel, row_tile,
                      schema, spread, tile_load, to_store)

SCHEMA = schema("Tensor v, Tensor tau, bool transpose")


@triton.jit
def _apply_kernel_kernel(v_ptr, tau_ptr, out_ptr, P, N, FAMILY: tl.constexpr, TRANSPOSE: tl.constexpr,
                         F64: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    rows, rmask, base = program_rows(P, N, BLOCK_P)
    cache = row_cache(v_ptr, base, rmask, N, ONE_BLOCK, BLOCK_N)
    alpha, oma = decay_coefficients(tl.load(tau_ptr + rows, mask=rmask, other=0.0))
    alpha = alpha.to(CT)
    oma = oma.to(CT)
    # pass 1: the sum the family needs (uniform: all of v; absorbing: the real tokens, or v_mask)
    total = tl.zeros([BLOCK_P], CT)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        v = tile_load(v_ptr, offs, msk, 0.0, cache, ONE_BLOCK).to(CT)
        if FAMILY == 0:
            keep = msk
        elif TRANSPOSE:
            keep = msk & (cols[None, :] < N - 1)
        else:
            keep = msk & (cols[None, :] == N - 1)
        total += tl.sum(tl.where(keep, v, 0.0), axis=1)
    add = spread(oma, total, N, FAMILY)
    for start in range(0, N, BLOCK_N):
        cols, msk, offs = row_tile(start, base, rmask, N, BLOCK_N)
        v = tile_load(v_ptr, offs, msk, 0.0, cache, ONE_BLOCK).to(CT)
        if FAMILY == 0:
            out = alpha[:, None] * v + add[:, None]
        else:
            is_mask = cols[None, :] == N - 1
            if TRANSPOSE:
                out = tl.where(is_mask, v + add[:, None], alpha[:, None] * v)
            else:
                out = tl.where(is_mask, v, alpha[:, None] * v + add[:, None])
        tl.store(out_ptr + offs, to_store(out, out_ptr), mask=msk)


apply_kernel_kernel = row_kernel(_apply_kernel_kernel)


@torch.library.custom_op("cdm_kernels::triton_apply_kernel", mutates_args=(), schema=SCHEMA)
def apply_kernel(family: int, evals: Optional[torch.Tensor], vecs: Optional[torch.Tensor],
                 vecs_inv: Optional[torch.Tensor], v: torch.Tensor, tau: torch.Tensor, transpose: bool) -> torch.Tensor:
    p, n = v.shape
    graph, _, tau, v = prepare(family, evals, vecs, vecs_inv, n, None, tau, v)
    if family == DENSE:
        return _dense.apply(v, tau, graph, bool(transpose), out_dtype=v.dtype)
    out = torch.empty_like(v)
    apply_kernel_kernel(p, v, tau, out, p, n, FAMILY=family, TRANSPOSE=bool(transpose), F64=compute_f64(v))
    return out
